"""DeepSeek's R1 recipe end to end in one command (R1 §2, algorithms.md §2), at laptop scale.

    python -m experiments.run experiments/pipeline.py run_dir=runs/pipeline [zero.steps=60 r1.rl.steps=40 ...]

Stages, each a separate experiment file run here with its run_dir under run_dir:
    base/           r1_zero's pretraining of a tiny DeepSeek-V3-style model, trained once and shared (`base_dir`
                    points at an existing one instead)
    r1_zero/        R1-Zero: GRPO with rule rewards from the base (eval_start.json = the base, eval_end.json)
    r1/cold_start/  R1: SFT of the base on ~300 curated worked traces (eval.json) ...
    r1/             ... then the same GRPO from the cold-start model (eval_start.json, eval_end.json)
    rejection_sft/  rejection sampling from r1's policy (traces.jsonl), SFT of the base on it (eval.json)
    distill/        a dense student, random init, SFT on the same traces (eval.json)
    results.md      one row per stage (pass@1, pass@k, maj@k, think usage, response length, wall time) and
                    pass@1 by chain length; rl_curves.png: both RL runs' reward, accuracy, length, KL, entropy
Every stage is scored on the same first `zero.eval.problems` held-out problems with `zero.eval.k` samples each,
sampled as rl.loop.grpo samples its own evaluation of `zero`; the pipeline's progress / tensorboard apply to every
stage. Stage sizes are the nested configs' fields (zero.base.steps, zero.steps, r1.cold_start.steps, r1.rl.steps,
rejection.sample.prompts, rejection.sft.steps, distill.sft.steps, distill.student.d_model, ...). A stage whose
final eval file exists is skipped (delete it to redo the stage); an interrupted stage resumes from its checkpoint.

Measured on 2 idle CPU cores (2026-11-28, default sizes, docs/results/): base 391 s, R1-Zero 202 s, R1 (cold
start + GRPO) 237 s, rejection sampling + SFT 82 s, distillation 119 s; 17.2 min in all. Per step: base / SFT step
(16 x 256 tokens) ~0.9 s, GRPO step (16 prompts x 8, up to 40 tokens) ~2 s, an evaluation (96 x 8 samples) 6-11 s.
"""

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

from experiments import distill, r1, r1_zero, rejection_sft
from experiments.config import RLExperiment, RunConfig
from experiments.distill import DistillExperiment
from experiments.r1 import R1Experiment
from experiments.rejection_sft import RejectionSFTExperiment
from experiments.stages import shared_base, stage_eval

log = logging.getLogger(__name__)

# results.md rows: (stage, eval file under run_dir, timings.json key); the base is scored by R1-Zero's eval_start
STAGES = (("base (pretrained)", "r1_zero/eval_start.json", "base"),
          ("R1-Zero (GRPO from base)", "r1_zero/eval_end.json", "r1_zero"),
          ("cold-start SFT", "r1/cold_start/eval.json", None),
          ("R1 (cold start + GRPO)", "r1/eval_end.json", "r1"),
          ("rejection-sampling SFT", "rejection_sft/eval.json", "rejection_sft"),
          ("distilled dense student", "distill/eval.json", "distill"))
RL_CURVES = ("reward", "accuracy", "response_len_mean", "think_rate", "kl", "entropy")


@dataclass(frozen=True)
class PipelineExperiment(RunConfig):
    zero: RLExperiment = field(default_factory=r1_zero.config)
    r1: R1Experiment = field(default_factory=r1.config)
    rejection: RejectionSFTExperiment = field(default_factory=rejection_sft.config)
    distill: DistillExperiment = field(default_factory=distill.config)
    base_dir: str = ""  # default run_dir/base
    run_dir: str = ""
    name: str = "pipeline"
    progress: bool = True
    tensorboard: bool = True


def config() -> PipelineExperiment:
    return PipelineExperiment()


def main(exp: PipelineExperiment) -> None:
    from rl.loop import grpo

    root, rep = exp.directory, dataclasses.replace
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(exp.to_dict(), fh, indent=2)
    base = exp.base_dir or os.path.join(root, "base")
    run = {"progress": exp.progress, "tensorboard": exp.tensorboard}
    zero = rep(exp.zero, run_dir=os.path.join(root, "r1_zero"), init_from=base, **run)
    ev = stage_eval(zero)
    dirs = {s: os.path.join(root, s) for s in ("r1", "rejection_sft", "distill")}
    traces = os.path.join(dirs["rejection_sft"], "traces.jsonl")
    stages = {
        "base": (None, lambda: shared_base(zero, base)),
        "r1_zero": ("r1_zero/eval_end.json", lambda: grpo(zero)),
        "r1": ("r1/eval_end.json", lambda: r1.main(rep(exp.r1, rl=rep(exp.r1.rl, model=zero.model, eval=zero.eval,
                                                                      **run),
                                                       run_dir=dirs["r1"], base_dir=base))),
        "rejection_sft": ("rejection_sft/eval.json", lambda: rejection_sft.main(rep(
            exp.rejection, init_from=dirs["r1"], base_dir=base, run_dir=dirs["rejection_sft"], eval=ev, **run))),
        "distill": ("distill/eval.json", lambda: distill.main(rep(
            exp.distill, teacher=dirs["r1"], traces=traces, run_dir=dirs["distill"], eval=ev, **run))),
    }
    for name, (done, fn) in stages.items():
        if done and os.path.exists(os.path.join(root, done)):
            log.info("pipeline: %s is done (%s exists); skipping", name, done)
            continue
        t0 = time.perf_counter()
        fn()
        _record_time(root, name, time.perf_counter() - t0)
    print(f"pipeline: results in {write_results(root)}")


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as fh:
        return json.load(fh)


def _record_time(root: str, stage: str, seconds: float) -> None:
    path = os.path.join(root, "timings.json")
    times = _read_json(path, {})
    times[stage] = times.get(stage, 0.0) + seconds
    with open(path, "w") as fh:
        json.dump(times, fh, indent=2)
    log.info("pipeline: %s took %.0f s", stage, seconds)


def _cell(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def write_results(root: str) -> str:
    """run_dir/results.md from the stages' eval files (and timings.json), plus rl_curves.png; returns its path."""
    from train.metrics import plot_runs

    evals = {stage: m for stage, rel, _ in STAGES if (m := _read_json(os.path.join(root, rel))) is not None}
    times = _read_json(os.path.join(root, "timings.json"), {})
    k = next((m["k"] for m in evals.values()), "k")
    n = next((m["n_problems"] for m in evals.values()), "?")
    lines = [f"# R1 recipe at laptop scale: {root}", "",
             (f"Held-out digit chains: {n} problems, k = {k} samples each (T 0.6, top-p 0.95); pass@1 is the mean "
              f"over the k samples, maj@{k} the majority vote. Wall time is the stage's (the RL stages include their "
              "evaluations; cold start is inside R1's)."), "",
             f"| stage | pass@1 | pass@{k} | maj@{k} | format | think usage | response length | wall (min) | eval file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage, rel, key in STAGES:
        m, t = evals.get(stage, {}), times.get(key)
        lines.append(f"| {stage} | {_cell(m.get('pass@1'))} | {_cell(m.get('pass@k'))} | {_cell(m.get('maj@k'))} | "
                     f"{_cell(m.get('format_rate'), '{:.2f}')} | {_cell(m.get('think_usage'), '{:.2f}')} | "
                     f"{_cell(m.get('response_len_mean'), '{:.1f}')} | {_cell(t and t / 60, '{:.1f}')} | `{rel}` |")
    levels = sorted({int(d) for m in evals.values() for d in m.get("by_difficulty", {})})
    if levels:
        lines += ["", "pass@1 by number of terms:", "",
                  "| stage | " + " | ".join(str(d) for d in levels) + " |", "|---|" + "---|" * len(levels)]
        for stage, m in evals.items():
            by = {int(d): v for d, v in m.get("by_difficulty", {}).items()}
            lines.append(f"| {stage} | " + " | ".join(_cell(by.get(d, {}).get("pass@1")) for d in levels) + " |")
    curves = plot_runs({"R1-Zero": os.path.join(root, "r1_zero"), "R1": os.path.join(root, "r1")}, RL_CURVES,
                       os.path.join(root, "rl_curves.png"))
    pngs = [os.path.relpath(p, root) for p in ([curves] if curves else []) +
            [os.path.join(root, d, "curves.png") for d in ("base", "r1_zero", "r1/cold_start", "r1", "rejection_sft",
                                                           "distill")] if os.path.exists(p)]
    lines += ["", "Curves: " + ", ".join(f"[{p}]({p})" for p in pngs), ""]
    if curves:
        lines += ["![RL curves](rl_curves.png)", ""]
    path = os.path.join(root, "results.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path
