"""bench/: every benchmark module imports and has a `main(argv)`, no bench file reaches 400 lines, the cheapest
benches run end to end with tiny arguments and print their header (CPU, kernel libraries) and a RESULT line of finite
positive numbers, and a bench run as a script (`python bench/train.py`) imports the `train` package, not itself."""

import importlib
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
SCRIPTS = {"attention", "dtype", "forward", "gpu", "grpo", "mismatch", "moe", "rollout", "scan", "train", "trl_grpo"}  # have a CLI


def result(out: str) -> dict[str, float]:
    """The fields of the last RESULT line: {name: value}."""
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-3000:]
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in lines[-1].split()[1:])}


def check_header(out: str, name: str):
    from bench.common import cpu_name
    assert f"# bench.{name} on {cpu_name()}" in out, out[:1000]
    assert "# kernels: jax " in out and "XLA_FLAGS=" in out, out[:1000]


def test_every_bench_module_imports():
    for name in MODULES:
        mod = importlib.import_module(f"bench.{name}")
        if name in SCRIPTS:
            assert callable(getattr(mod, "main", None)), name
    assert SCRIPTS <= set(MODULES), SCRIPTS - set(MODULES)


def test_bench_files_under_400_lines():
    long = {p.name: n for p in BENCH.glob("*.py") if (n := len(p.read_text().splitlines())) >= 400}
    assert not long, long


def test_forward_tiny(capsys):
    from bench import forward
    forward.main(["--config", "small", "--batch", "2", "--seq", "16", "--decode-batch", "2", "--prompt", "4",
                  "--new", "4", "--rounds", "1", "--decode-rounds", "1", "--no-hf", "--peak-n", "128"])
    out = capsys.readouterr().out
    check_header(out, "forward")
    r = result(out)
    assert set(r) == {"forward_tok_s", "forward_frac_of_peak", "decode_tok_s"}, r
    assert all(math.isfinite(v) and v > 0 for v in r.values()), r
    assert "loop vs scan greedy tokens identical | 100.0%" in out  # both decoders run rl.sampler's pieces


@pytest.mark.slow
def test_grpo_tiny_against_trl(capsys):
    pytest.importorskip("trl")
    from bench import grpo
    grpo.main(["--iters", "1", "--prompts", "4", "--generations", "2", "--new", "4", "--mu", "2",
               "--mini-batches", "1", "--max-prompt-len", "96", "--data", "8", "--trl",  # the tests' 8 devices
               "--layers", "1"])
    out = capsys.readouterr().out
    check_header(out, "grpo")
    assert "oneDNN" in out  # TRL's side (torch) kernel libraries are printed too
    r = result(out)
    assert {"iteration_s", "trl_iteration_s", "speedup_vs_trl"} <= set(r), r
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("iteration_s", "trl_iteration_s", "speedup_vs_trl")), r
    # the speedup is the ratio of the printed times, printed to 2 decimals
    assert r["speedup_vs_trl"] == pytest.approx(r["trl_iteration_s"] / r["iteration_s"], abs=0.005 + 1e-9)


def test_rollout_tiny_against_transformers(capsys):
    pytest.importorskip("transformers")
    from bench import rollout
    rollout.main(["--batch", "2", "--prompt", "4", "--new", "3", "--rounds", "1", "--budget", "0",
                  "--quiet-wait", "0", "--no-tunix", "--also-devices", "0"])
    out = capsys.readouterr().out
    check_header(out, "rollout")
    assert "oneDNN" in out  # the torch side's kernel libraries
    r = result(out)
    assert set(r) == {"speedup_vs_transformers", "speedup_vs_tunix"}, r
    assert math.isfinite(r["speedup_vs_transformers"]) and r["speedup_vs_transformers"] > 0, r
    assert math.isnan(r["speedup_vs_tunix"])  # not installed here: reported as nan, not as a number


def test_bench_script_does_not_shadow_packages(tmp_path):
    """`python bench/train.py` puts bench/ first on sys.path, where train.py would be imported as `train`."""
    r = subprocess.run([sys.executable, str(BENCH / "train.py"), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--configs" in r.stdout, r.stderr[-3000:]


def test_train_profile_counts_weight_gradient_dots_as_matmuls():
    """`--profile`'s op classes, on op names and metadata read from the tiny DeepSeek step's compiled HLO: a batched
    `dot` whose op_name ends in /transpose is the dropless experts' weight gradient (it was counted as a layout copy),
    a real relayout stays a copy, and the dropless block products count as MoE."""
    from bench.profile import train_kind
    from model.config import tiny_deepseek
    cfg = tiny_deepseek()

    def kind(name, op_name, shape):
        return train_kind(name, f"jit(_step_fn)/{op_name}  {shape}", cfg, 16, 256)

    moe = "MoE routed experts (dropless blocks)"
    assert kind("dot.18", "transpose(jvp(jvp()))/checkpoint/gbd,gdf->gbf/transpose", "f32[144,128,64]{2,1,0}") \
        == (moe, "matmul, bwd")
    assert kind("ynn_fusion.404", "jvp(gbf,gfd->gbd)/dot_general", "f32[144,128,128]{2,1,0}") == (moe, "matmul, fwd")
    other = "everything else (q/k/v/o projections, MLP, norms, rope, head, loss)"
    assert kind("copy_bitcast_fusion.3", "transpose(jvp(silu))/transpose", "f32[768,4096]{1,0}") \
        == (other, "layout copies (transposes), bwd")
    assert kind("ynn_fusion.383", "transpose(jvp())/dot_general", "f32[4096,128]{1,0}") == (other, "matmul, bwd")
