"""load_hf(mesh=...): each parameter built straight into its sharding from file slices (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import forward  # noqa: E402
from model.hf import load_hf  # noqa: E402
from sharding import MeshConfig, make_mesh  # noqa: E402
from sharding.rules import use_rules  # noqa: E402
from tests.test_hf import FAMILIES, TOKENS, _randomise, _torch_logits  # noqa: E402


def _logits(cfg, params, mesh=None):
    fn = jax.jit(lambda p, t: forward(cfg, p, t)[0])
    if mesh is None:
        return np.asarray(fn(params, jnp.asarray(TOKENS)))
    with use_rules(mesh):
        return np.asarray(fn(params, jnp.asarray(TOKENS)))


def _device_bytes(params) -> dict:
    """device -> bytes of the parameter shards it holds (sum over each array's addressable shards)."""
    out: dict = {}
    for leaf in jax.tree.leaves(params):
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("llama", "deepseek_v3"):
        model = _randomise(FAMILIES[name]())
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def test_fsdp8_each_device_holds_an_eighth(checkpoints):
    model, path = checkpoints["llama"]
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    cfg, params = load_hf(path, mesh=mesh)
    leaves = jax.tree.leaves(params)
    total = sum(x.nbytes for x in leaves)
    # what cannot shard over fsdp=8 (norm scales carry no 'embed' axis): every device holds a full copy
    replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    per_device = _device_bytes(params)
    assert len(per_device) == 8
    assert max(per_device.values()) == (total - replicated) // 8 + replicated
    assert replicated < 0.02 * total, f"replicated {replicated} of {total} B"  # only the RMSNorm scales
    assert max(per_device.values()) < 0.15 * total  # ~1/8 = 0.125 of the bytes, plus the norms
    cfg0, params0 = load_hf(path)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(params0))
    for p, x in jax.tree_util.tree_leaves_with_path(params):
        assert x.dtype == flat0[p].dtype and np.array_equal(np.asarray(x), np.asarray(flat0[p])), p
    np.testing.assert_allclose(_logits(cfg, params, mesh), _logits(cfg0, params0), atol=1e-5, rtol=0)
    assert np.abs(_logits(cfg, params, mesh) - _torch_logits(model)).max() <= 1e-4


def test_deepseek_on_fsdp_tensor_expert_mesh(checkpoints):
    """Every slicer on a sharded dim: heads split 2-way through the interleaved-rope row permutation, experts
    2-way, embed 2-way; values equal the unsharded load exactly."""
    model, path = checkpoints["deepseek_v3"]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    cfg, params = load_hf(path, mesh=mesh)
    _, params0 = load_hf(path)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(params0))
    sharded_dims = 0
    for p, x in jax.tree_util.tree_leaves_with_path(params):
        assert np.array_equal(np.asarray(x), np.asarray(flat0[p])), p
        sharded_dims += sum(a is not None for a in x.sharding.spec)
    assert sharded_dims > 20  # the layout really is sharded, not replicated
    assert np.abs(_logits(cfg, params, mesh) - _torch_logits(model)).max() <= 1e-4


def test_bfloat16_checkpoint_loads(tmp_path):
    """Hub checkpoints are mostly bf16, which safetensors' numpy framework cannot read; memory maps can."""
    model = _randomise(FAMILIES["llama"]()).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    cfg, params = load_hf(str(tmp_path), mesh=mesh, param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    emb = np.asarray(params["embed_tokens"]["embedding"][...]).astype(np.float32)
    want = model.model.embed_tokens.weight.float().detach().numpy()
    assert np.array_equal(emb, want)
    cfg32, params32 = load_hf(str(tmp_path))  # float32 params from the same bf16 tensors: exact upcast
    # transformers reading the same file in float32 (a fresh model: `.to(bf16)` also rounded its rope inv_freq)
    ref = type(model).from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits(cfg32, params32), _torch_logits(ref), atol=1e-4, rtol=0)
