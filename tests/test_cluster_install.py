"""The cluster half of the install: accelerator extras in pyproject.toml, mesh errors that name the backend.

A CPU-only jax on a GPU node shows up as 'N devices (backend cpu, ...)' in the mesh error, so the message
alone says what is wrong (tests/test_train.py checks the sizes part of the same messages).
"""

import tomllib
from pathlib import Path

import jax
import pytest

from sharding import MeshConfig, ShardingError, make_mesh

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_extras_pin_the_core_jax():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [d for d in project["dependencies"] if d.startswith("jax==")]
    assert core == ["jax==0.10.2"]
    extras = project["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda12]==0.10.2"] and extras["tpu"] == ["jax[tpu]==0.10.2"]


def test_mesh_errors_name_backend_kind_and_counts():
    n, backend, kind = len(jax.devices()), jax.default_backend(), jax.devices()[0].device_kind
    with pytest.raises(ShardingError) as too_many:
        make_mesh(MeshConfig(data=n + 1))
    msg = str(too_many.value)
    assert f"= {n + 1}, but there are {n} devices" in msg
    assert f"backend {backend}" in msg and f"device kind {kind}" in msg and "1 process" in msg
    assert "\n" not in msg
    with pytest.raises(ShardingError, match=rf"{n} devices \(backend {backend}, device kind {kind}.*not divisible "
                                            rf"by the fixed axes \({3 * n} = 1x{3 * n}x1\)"):
        make_mesh(MeshConfig(data=-1, tensor=3 * n))
