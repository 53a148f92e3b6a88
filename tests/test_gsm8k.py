"""experiments/r1_zero_gsm8k.py end to end on CPU: a tiny random HF Qwen2 checkpoint + tokenizer.json, GSM8K rows
from Parquet (train) and JSONL (held-out), through the `experiments.run` entry point; gold extraction units."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments.run import load_experiment  # noqa: E402
from experiments.run import main as run_main  # noqa: E402
from model import forward  # noqa: E402
from model.hf import load_hf  # noqa: E402
from model.hf_config import config_from_hf  # noqa: E402
from rl import tasks  # noqa: E402
from train.data import DataConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "r1_zero_gsm8k.py")
DATA = os.path.join(ROOT, "tests", "data", "gsm8k_tiny.jsonl")
VOCAB = 272  # >= the tokenizer's 262 ids
GOLDS = ["12", "75", "168", "1234", "32", "9", "260", "34", "105", "-5"]


@pytest.fixture(scope="module")
def gsm8k():
    import importlib.util
    spec = importlib.util.spec_from_file_location("r1_zero_gsm8k_under_test", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizer_json(path):
    """Byte-level BPE without merges (one token per byte, exact round trip), EOS and the four R1 tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Qwen2 checkpoint (transformers' save_pretrained, safetensors) with its tokenizer.json."""
    d = tmp_path_factory.mktemp("qwen2_tiny")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(d), safe_serialization=True)
    _tokenizer_json(d / "tokenizer.json")
    return d, model


# ---- gold extraction -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,gold", [
    ("She pays 2*3=<<2*3=6>>6 dollars.\n#### 6", "6"),
    ("... #### 1,234", "1234"),
    ("#### -5", "-5"),
    ("####  $18.", "18"),
    ("x #### 1 #### 2.5", "2.5"),
    ("+7", "7"),
])
def test_gold_extraction(answer, gold):
    assert tasks.gsm8k_gold(answer) == gold


@pytest.mark.parametrize("answer", ["The answer is seven.", "#### seven", "#### ", "", "#### 1/2"])
def test_gold_extraction_rejects_garbage(answer):
    with pytest.raises(ValueError, match="GSM8K answer"):
        tasks.gsm8k_gold(answer)
    with pytest.raises(TypeError, match="GSM8K answer"):
        tasks.gsm8k_gold(None)


def test_records_extract_gold_and_name_a_bad_row(tmp_path):
    cfg = DataConfig(kind="prompts", source="parquet", path="x.parquet", prompt_field="question")
    recs = tasks.gsm8k_records(cfg, DATA)  # the .jsonl extension picks the JSONL reader
    assert [r["answer"] for r in recs] == GOLDS
    assert recs[0]["question"].startswith("Tom has 3 boxes")
    assert len(tasks.gsm8k_records(cfg, DATA, limit=4)) == 4
    bad = tmp_path / "bad.jsonl"
    with open(DATA) as fh:
        first = fh.readline()
    bad.write_text(first + json.dumps({"question": "q?", "answer": "no number here"}) + "\n")
    with pytest.raises(ValueError, match="row 1"):
        tasks.gsm8k_records(cfg, str(bad))


def test_defaults_are_the_cluster_recipe(gsm8k):
    from rl.rewards import REWARDS
    from rl.tasks import R1_TEMPLATE

    exp = gsm8k.config()
    assert exp.prompts.chat_template == R1_TEMPLATE and exp.prompts.prompt_field == "question"
    assert all(r in REWARDS for r in exp.reward_names) and "math_verify" in exp.reward_names
    assert exp.task.correctness == "math_verify"  # held-out pass@k, maj@k and the `accuracy` metric
    assert exp.model.compute_dtype == "bfloat16" and exp.model.param_dtype == "float32"
    assert exp.mesh.fsdp == -1 and exp.grpo.beta == 0.0 and 8 <= exp.grpo.num_generations <= 16
    assert 512 <= exp.grpo.sampling.max_new_tokens <= 1024 and 1e-6 <= exp.optim.lr <= 3e-6
    with pytest.raises(ValueError, match="init_from"):
        gsm8k.resolve(exp)


# ---- the checkpoint ------------------------------------------------------------------------------------------------

def test_model_and_weights_come_from_the_checkpoint(gsm8k, checkpoint):
    from rl.loop import load_base_params

    d, hf_model = checkpoint
    _, exp = load_experiment(EXPERIMENT, [f"init_from={d}", "model.compute_dtype=float32", "model.n_layers=7"])
    exp = gsm8k.resolve(exp)
    with open(d / "config.json") as fh:
        want = config_from_hf(json.load(fh)).replace(remat="block")
    assert exp.model == want  # architecture from config.json (model.n_layers=7 is overridden by it)
    assert exp.prompts.tokenizer == str(d) and exp.prompts.source == "memory"
    params = load_base_params(exp.init_from, trainer=None)  # the path rl.loop.grpo takes for init_from
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 12))
    ours = np.asarray(forward(exp.model, params, jnp.asarray(tokens))[0])
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- end to end -----------------------------------------------------------------------------------------------------

def test_r1_zero_gsm8k_runs_end_to_end(gsm8k, checkpoint, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, _ = checkpoint
    with open(DATA) as fh:
        rows = [json.loads(line) for line in fh]
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(train))
    run_dir = tmp_path / "run"
    # the test's sizes; the shorter template and the evaluation's sampling settings (T 0.6, top-p 0.95) keep
    # prompts short and let the rollouts reuse the evaluation's compiled sampler (CPU time)
    overrides = [f"init_from={d}", f"prompts.path={train}", f"task.eval_path={DATA}", "eval.problems=4", "eval.k=2",
                 f"run_dir={run_dir}", "steps=2", "grpo.num_generations=4", "grpo.prompts_per_step=2",
                 "grpo.sampling.max_new_tokens=16", "grpo.mini_batches=1", "grpo.sampling.temperature=0.6",
                 "grpo.sampling.top_p=0.95",
                 "prompts.chat_template=User: {prompt}. Assistant:", "max_prompt_len=160",
                 "model.compute_dtype=float32", "model.remat=none", "checkpoint.every=0", "tensorboard=false",
                 "progress=false"]  # mesh: the default fsdp=-1, i.e. 8-way FSDP over the 8 fake devices
    assert run_main([EXPERIMENT, *overrides]) == 0  # the CLI: python -m experiments.run <file> key=value ...

    for name in ("eval_start.json", "eval_end.json"):
        with open(run_dir / name) as fh:
            ev = json.load(fh)
        for key in ("pass@1", "pass@k", "maj@k", "k", "n_problems", "response_len_mean"):
            assert key in ev, (name, key)
        assert ev["k"] == 2 and ev["n_problems"] == 4
        assert 0 < ev["response_len_mean"] <= 16
    with open(run_dir / "metrics.jsonl") as fh:
        metrics = [json.loads(line) for line in fh]
    assert len(metrics) == 2
    for row in metrics:
        for key in ("reward", "kl", "entropy", "reward_format", "reward_math_verify"):
            assert math.isfinite(row[key]), (key, row)
    with open(run_dir / "config.json") as fh:
        saved = json.load(fh)
    assert saved["model"]["d_model"] == 32 and saved["model"]["n_layers"] == 2  # the checkpoint's architecture
    assert saved["prompts"]["path"] == str(train) and saved["task"] == {"name": "gsm8k", "eval_path": DATA}

    # the trained policy is the HF checkpoint moved by two lr-1e-6 steps, not a random init
    from sharding import make_mesh
    from train.checkpoint import Checkpointer
    from train.config import LossConfig
    from train.step import Trainer

    _, exp = load_experiment(EXPERIMENT, overrides)
    exp = gsm8k.resolve(exp)
    trainer = Trainer(exp.model, exp.optim, LossConfig(), make_mesh(exp.mesh))
    _, hf_params = load_hf(str(d))
    state = trainer.state_from_params(hf_params)
    abstract = {"train": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)}
    ckpt = Checkpointer(str(run_dir / "checkpoints"))
    restored, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta["step"] == 2
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         restored["train"]["params"], hf_params))
    assert len(diffs) > 0 and max(diffs) < 1e-4, max(diffs)
    # every HF leaf is non-trivial (norms and biases perturbed in the fixture): no init of ours matches it by chance
    assert min(float(jnp.std(x)) for x in jax.tree.leaves(hf_params)) > 1e-2
