"""model/host_memory.py: with R1JAX_HOST_MALLOC=keep (glibc settings applied at `import model`), an XLA:CPU
program whose scratch buffer is larger than glibc's mmap threshold stops page-faulting it in on every call;
without it (the default) nothing changes."""

import os
import subprocess
import sys

import pytest

from model.host_memory import _skip_reason

PROBE = """
import resource, jax, jax.numpy as jnp
import model
from model.host_memory import keep_freed_host_memory
f = jax.jit(lambda x, w: (jnp.sin(x) @ w + jnp.cos(x) @ w).sum())  # two 64 MiB temporaries
x, w = jnp.ones((2048, 8192), jnp.float32), jnp.ones((8192, 8), jnp.float32)
faults = []
for _ in range(16):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(keep_freed_host_memory(), *faults)
"""


def _faults_per_call(**env) -> tuple[str, list[int]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "R1JAX_HOST_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=base | env | {"XLA_FLAGS": ""}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], [int(n) for n in out[1:]]  # applied, minor page faults of each of 16 calls


@pytest.mark.skipif(_skip_reason() not in (None, "MALLOC_* set in the environment",
                                             "R1JAX_HOST_MALLOC is not 'keep'"), reason="not applicable here")
def test_scratch_buffer_is_reused_between_calls():
    applied, faults = _faults_per_call(R1JAX_HOST_MALLOC="keep")
    assert applied == "True"
    off, faults_default = _faults_per_call()
    assert off == "False"
    # 128 MiB of scratch is 32,768 pages: glibc's default maps them afresh on every call. With the settings the
    # heap grows for the first few calls (how many varies: the next call's buffer can be requested before the
    # last one's is freed) and is then reused: most calls fault nothing (measured: 8 to 15 of 16).
    assert min(faults_default) > 16_000, faults_default
    assert sum(n < 1_000 for n in faults) >= 5, faults
