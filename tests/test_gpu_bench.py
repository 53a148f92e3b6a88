"""bench/gpu.py and bench/scan.py run end to end at --tiny sizes on CPU and report finite, positive RESULT fields."""

import math
import re

import pytest

from bench import gpu, scan


def _result_fields(text: str) -> dict[str, float]:
    fields = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            for kv in line.split()[1:]:
                k, v = kv.split("=", 1)
                fields[k] = float(v)
    return fields


def _check(fields: dict[str, float], printed: dict[str, float], required: set[str]):
    assert required <= set(fields), sorted(required - set(fields))
    for k, v in fields.items():
        assert re.fullmatch(r"[a-z0-9_]+", k), k
        assert math.isfinite(v) and v > 0, (k, v)
        assert math.isclose(printed[k], v, rel_tol=1e-3), (k, printed[k], v)  # printed = returned


@pytest.mark.slow
def test_gpu_bench_tiny(capsys):
    returned = gpu.main(["--tiny"])
    out = capsys.readouterr().out
    fields = _result_fields(out)
    names = {f"gpu_{p}_{m}" for p in ("dense", "moe") for m in ("tok_s", "mfu", "step_s", "compile_s")}
    _check(fields, returned, names | {"gpu_peak_tflops", "gpu_sampler_tok_s", "gpu_sampler_compile_s"})
    assert set(fields) == set(returned)
    assert "| dense train step" in out and "| moe train step" in out and "| sampler" in out


@pytest.mark.slow
def test_scan_bench_tiny(capsys):
    returned = scan.main(["--tiny"])
    fields = _result_fields(capsys.readouterr().out)
    names = {f"scan_{k}_{v}" for k in ("lower_s", "compile_s", "hlo_lines", "dots", "dense_step_ms",
                                       "dense_generate_ms") for v in ("unrolled", "scanned")}
    _check(fields, returned, names)
    # the unrolled program grows with depth, the scanned one does not
    assert fields["scan_hlo_lines_unrolled"] > fields["scan_hlo_lines_scanned"]
    assert fields["scan_dots_unrolled"] > fields["scan_dots_scanned"]


def test_gpu_bench_reports_a_broken_part_and_runs_the_next(capsys, monkeypatch):
    """One part raising (here the dense train step) costs that part and the sampler that needs its parameters, not
    the MoE part after it; the run then exits 1 naming what failed. The train step itself is replaced: this checks
    main's control flow, test_gpu_bench_tiny the measurements."""
    def train_part(cfg, batch, seq, steps, mesh):
        if cfg.moe is None:
            raise RuntimeError("injected dense failure")
        return {"batch": batch, "seq": seq, "step_s": 0.5, "compile_s": 2.0, "tok_s": batch * seq / 0.5,
                "flops_per_token": 1e6, "params": {"total": 200, "active": 100}, "loss": 1.0, "trained_params": {}}

    monkeypatch.setattr(gpu, "train_part", train_part)
    with pytest.raises(SystemExit, match="bench.gpu: dense, sampler failed"):
        gpu.main(["--tiny", "--peak-n", "64"])
    captured = capsys.readouterr()
    fields = _result_fields(captured.out)
    assert "injected dense failure" in captured.err
    assert fields["gpu_moe_tok_s"] == 2 * 32 / 0.5 and "gpu_peak_tflops" in fields
    assert not any(k.startswith(("gpu_dense", "gpu_sampler")) for k in fields)
    assert "| moe train step" in captured.out and "| dense train step" not in captured.out
