"""Logit parity with transformers' PyTorch implementations, both directions, and checkpoint error handling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model import ConfigError, forward, init_params  # noqa: E402
from model.config import tiny_deepseek  # noqa: E402
from model.hf import CheckpointError, load_hf, save_hf  # noqa: E402
from model.hf_config import config_from_hf  # noqa: E402

VOCAB, SEQ = 96, 40
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _deepseek(q_lora_rank):
    c = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=64,
        rope_parameters=dict(YARN))
    return transformers.DeepseekV3ForCausalLM(c)


FAMILIES = {
    # GQA ratio 4, tied embeddings, Llama-3 rope scaling
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # qkv bias, GQA ratio 4, YaRN beyond the original context
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters=dict(YARN, mscale=None, mscale_all_dim=None))),
    # YaRN with max_position_embeddings equal to the original context (as Qwen2.5's published YaRN recipe):
    # transformers still applies YaRN, so config_from_hf must run at original x factor
    "qwen2_yarn_mpe_is_original": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=16, rope_parameters=dict(YARN, mscale=None, mscale_all_dim=None))),
    # q/k norm, head_dim != hidden / heads
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24)),
    "deepseek_v3": lambda: _deepseek(24),
    "deepseek_v3_no_q_lora": lambda: _deepseek(None),
}


def _randomise(model):
    """Non-trivial weights everywhere, including norms, biases and the router correction bias."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.5)
    return model.eval()


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ))


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _our_logits(cfg, params):
    return np.asarray(jax.jit(lambda p, t: forward(cfg, p, t)[0])(params, jnp.asarray(TOKENS)))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    model = _randomise(FAMILIES[request.param]())
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_load_hf_matches_transformers(hf_checkpoint, scan):
    name, model, path = hf_checkpoint
    cfg, params = load_hf(path, scan_layers=scan)
    assert cfg.scan_layers == scan and ("layers" in params) != scan
    ref = _torch_logits(model)
    diff = np.abs(_our_logits(cfg, params) - ref).max()
    assert diff <= 1e-4, f"{name}: max |Δlogit| = {diff}"
    if name.startswith("deepseek"):
        assert cfg.rope.type == "yarn" and SEQ > cfg.rope.original_max_position_embeddings
        if scan:  # layer 0 dense, layers 1-2 one MoE stack [2, E]
            biases = list(np.asarray(params["moe_layers"]["mlp"]["gate"]["bias"][...]))
        else:
            biases = [np.asarray(params["layers"][i]["mlp"]["gate"]["bias"][...]) for i in (1, 2)]
        assert len(biases) == 2 and all(np.abs(b).max() > 0.1 for b in biases), "non-zero correction bias must load"
        assert np.abs(biases[0] - biases[1]).max() > 0.1, "each layer keeps its own bias"


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_save_hf_then_transformers(hf_checkpoint, tmp_path, scan):
    name, model, path = hf_checkpoint
    cfg, params = load_hf(path, scan_layers=scan)
    save_hf(cfg, params, str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()
    diff = np.abs(_torch_logits(reloaded) - _torch_logits(model)).max()
    assert diff <= 1e-5, f"{name}: transformers on save_hf output differs by {diff}"


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2)
    params = init_params(cfg, 1)
    save_hf(cfg, params, str(tmp_path), max_shard_bytes=64 << 10)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    cfg2, params2 = load_hf(str(tmp_path), mtp="require")
    assert cfg2.mtp_depth == 1
    a, b = jax.tree.leaves(params), jax.tree.leaves(params2)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_scanned_save_writes_the_unscanned_tensors(tmp_path):
    """save_hf of a scanned model writes the same per-layer files as the unscanned one, bit for bit; reading
    them back scanned gives the stacked leaves, each layer's slice equal to that layer's parameter."""
    from safetensors.numpy import load_file
    cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=3)
    scfg = cfg.replace(scan_layers=True)
    save_hf(cfg, init_params(cfg, 3), str(tmp_path / "u"))
    save_hf(scfg, init_params(scfg, 3), str(tmp_path / "s"))  # same values: scan stacks the same init
    u, s = load_file(str(tmp_path / "u/model.safetensors")), load_file(str(tmp_path / "s/model.safetensors"))
    assert sorted(u) == sorted(s) and all(np.array_equal(u[k], s[k]) for k in u)
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in s
    _, stacked = load_hf(str(tmp_path / "s"), scan_layers=True)
    _, flat = load_hf(str(tmp_path / "s"), scan_layers=False)
    k = np.asarray(stacked["moe_layers"]["mlp"]["experts"]["down_proj"][...])
    assert k.shape == (2, 16, 64, 32)  # [moe layers 1-2, E, f, d]
    assert np.array_equal(k[1], np.asarray(flat["layers"][2]["mlp"]["experts"]["down_proj"][...]))
    q = np.asarray(stacked["dense_layers"]["self_attn"]["q_b_proj"][...])
    assert q.shape[0] == 1 and np.array_equal(q[0], np.asarray(flat["layers"][0]["self_attn"]["q_b_proj"][...]))


def test_mtp_checkpoint_still_loads_in_transformers(tmp_path):
    cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2)
    params = init_params(cfg, 2)
    save_hf(cfg, params, str(tmp_path))
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path)).eval()
    toks = TOKENS % 64
    with torch.no_grad():
        theirs = model(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t)[0])(params, jnp.asarray(toks)))
    assert np.abs(ours - theirs).max() <= 1e-4


def _write(tmp_path, hf_cfg, tensors):
    from safetensors.numpy import save_file
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(hf_cfg, fh)
    save_file(tensors, str(tmp_path / "model.safetensors"))


@pytest.fixture()
def llama_dir(tmp_path):
    model = _randomise(FAMILIES["llama"]())
    model.save_pretrained(str(tmp_path))
    from safetensors.numpy import load_file
    return tmp_path, json.load(open(tmp_path / "config.json")), load_file(str(tmp_path / "model.safetensors"))


def test_missing_tensor_is_named(llama_dir):
    path, cfg, tensors = llama_dir
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _write(path, cfg, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(str(path))


def test_unexpected_tensor_is_named(llama_dir):
    path, cfg, tensors = llama_dir
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    _write(path, cfg, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_hf(str(path))


def test_shape_mismatch_names_both_shapes(llama_dir):
    path, cfg, tensors = llama_dir
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    _write(path, cfg, tensors)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(8, 64\).*\(16, 64\)"):
        load_hf(str(path))


def test_unsupported_config_values_are_named():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    config_from_hf(base)
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="rope_type"):
        config_from_hf({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="vocab_size"):
        config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})


def test_both_rope_config_styles_agree():
    base = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64}
    old = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                      "original_max_position_embeddings": 16}})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                                      "original_max_position_embeddings": 16}})
    assert old == new and old.rope.theta == 5e5 and old.rope.type == "yarn"


def test_yarn_context_is_original_times_factor():
    """max_seq_len = max(max_position_embeddings, original x factor) under YaRN, so YaRN stays active."""
    base = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32768}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = config_from_hf({**base, "rope_parameters": yarn})
    assert cfg.max_seq_len == 131072 and cfg.rope.active(cfg.max_seq_len).type == "yarn"
    assert config_from_hf({**base, "max_position_embeddings": 200000, "rope_parameters": yarn}).max_seq_len == 200000
    assert config_from_hf(base).max_seq_len == 32768
    # no original given: transformers takes max_position_embeddings as the original
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}).max_seq_len == 65536
