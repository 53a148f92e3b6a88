"""model/host_memory.py: by default (glibc settings and synchronous CPU dispatch applied at `import model`), an
XLA:CPU program whose scratch buffer is larger than glibc's mmap threshold stops page-faulting it in on every call;
with R1JAX_HOST_MALLOC=off nothing changes."""

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
print(keep_freed_host_memory(), jax.config.read('jax_cpu_enable_async_dispatch'), *faults)
"""


def _faults_per_call(**env) -> tuple[str, list[int]]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("R1JAX_HOST_MALLOC", "JAX_CPU_ENABLE_ASYNC_DISPATCH")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=base | env | {"XLA_FLAGS": ""}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[1] == str(out[0] != "True"), out[:2]  # synchronous CPU dispatch exactly when applied
    return out[0], [int(n) for n in out[2:]]  # applied, minor page faults of each of 16 calls


@pytest.mark.skipif(not sys.platform.startswith("linux") or _skip_reason() == "an accelerator plugin is installed",
                    reason="not applicable here")
def test_scratch_buffer_is_reused_between_calls():
    applied, faults = _faults_per_call()
    assert applied == "True"
    off, faults_default = _faults_per_call(R1JAX_HOST_MALLOC="off")
    assert off == "False"
    # 128 MiB of scratch is 32,768 pages: glibc's default maps them afresh on every call. With the settings the
    # heap grows on the first call(s) and is then reused: most calls fault (almost) nothing (measured: 15 of 16
    # under 100 faults).
    assert min(faults_default) > 16_000, faults_default
    assert sum(n < 1_000 for n in faults) >= 5, faults


def test_not_applied_once_jax_backends_exist():
    """The dispatch setting only takes effect before jax creates its CPU client: after that, nothing is changed."""
    code = ("import jax; jax.devices(); import model; from model.host_memory import keep_freed_host_memory; "
            "print(keep_freed_host_memory(), jax.config.read('jax_cpu_enable_async_dispatch'))")
    env = {k: v for k, v in os.environ.items() if k not in ("R1JAX_HOST_MALLOC", "JAX_CPU_ENABLE_ASYNC_DISPATCH")}
    out = subprocess.run([sys.executable, "-c", code], env=env | {"XLA_FLAGS": ""}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True"], out
