"""DeepSeek's R1 recipe end to end in one command, at laptop scale: every stage on the same footing, with seeds,
controls and a second task (R1 §2-§4; algorithms.md §2, §4, §5).

    python -m experiments.run experiments/pipeline.py run_dir=runs/pipeline [seeds='(0,1,2)' zero.steps=25 ...]

Stages (seeded ones in run_dir/<stage>/seed<s>/; each is also an experiment file of its own):
    base             a tiny DeepSeek-V3-style model (MLA + MoE + MTP) pretrained on digit chains of which 30 % are
                     worked (experiments/r1_zero.py's base stage; run_dir/base, or `base_dir`); shared by all
    r1_zero          GRPO from the base with format + accuracy rewards (experiments/r1_zero.py)
    cold_start       SFT of the base on ~300 curated worked traces (the first half of experiments/r1.py)
    r1               GRPO from the cold-start model, the same budget as r1_zero (experiments/r1.py)
    rejection_sft    r1's policy sampled on training prompts, verified samples kept, SFT of the base on them
                     (experiments/rejection_sft.py; traces.jsonl)
    distill_student  a smaller dense student SFT'd on those traces (experiments/distill.py), from a student base
                     pretrained on the same corpus (run_dir/student_base, reported too)
    rl_student       the same student base trained with R1-Zero's GRPO for the same compute as its distillation
                     (experiments/rl_student.py; steps = experiments.stages.matched_rl_steps)
    random_reward    control: GRPO with a reward of 1 with probability = the base's pass@1, blind to correctness
                     (experiments/random_reward.py)
    format_only      control: GRPO with the format reward alone (experiments/format_only.py)
    countdown        R1-Zero on Countdown (experiments/r1_zero_countdown.py): its own base (run_dir/countdown/base)
                     and GRPO per seed, reported as split 'countdown' of stages base and r1_zero
Seeds: every RL and SFT stage runs once per seed in `seeds` (its data order and sampling stream), all from the
one base. Splits (`task.splits`): 'in_distribution' (2-6 terms, as trained) and 'hard' (7-8 terms in the same
8-slot worksheet: chains longer than any trained on). Every model is scored on `eval.problems` problems of each split,
eval.k samples at T 0.6 / top-p 0.95 with the same key -> <run>/eval_<split>.json; then experiments/results.py
writes results.json, results.md, rl_curves.png and pass_by_length.png. A run whose eval files exist is skipped
(delete them to redo it); an interrupted run resumes from its checkpoint. The RL stages are zero's GRPO recipe
(zero.steps, zero.grpo.*, zero.optim.*); the SFT stages' sizes are cold_start.*, rejection_sft.*, distill.*.

Measured with these defaults (2026-12-02, 2 idle cores of an Intel Xeon): 34.1 min, over the 30-minute target; the
bases take 12.1 of it. Results and timings: docs/results/ (results.md, results.json, timings.json). A trial at
30 minutes (eval.problems=40, zero.steps=16, student_base_steps=250, countdown.base.steps=200, ...) was stopped: the
250-step student base was far weaker (held-out pass@1 0.125; its distillation started at CE 0.54 instead of 0.32
from the 300-step one) and the distilled student fell to 0.15 (seed 0) from 0.51.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

from experiments import r1, r1_zero
from experiments.config import CheckpointConfig, EvalConfig, RLExperiment, RunConfig
from experiments.distill import dense_student
from experiments.r1 import R1Experiment
from experiments.stages import SFTConfig, TraceConfig, matched_rl_steps, policy_traces, sft_experiment, shared_base
from model.config import ModelConfig
from train.config import OptimConfig

log = logging.getLogger(__name__)

STAGES = ("base", "r1_zero", "cold_start", "r1", "rejection_sft", "distill_student", "rl_student", "random_reward",
          "format_only")
SEEDED = STAGES[1:]


def _zero() -> RLExperiment:
    """r1_zero's recipe with an 8-slot worksheet (so the hard split's 7-8-term chains are posed in the trained layout)
    and half the corpus worked (a 400-step base with 30 % in 8 slots learned its steps less reliably: held-out
    pass@1 0.14 against 0.36 with 50 %, measured 2026-12-02), 20 GRPO steps of 16 prompts x 8 (held-out pass@1 0.36 ->
    0.57 from that base), no reference model (the KL to the base is not plotted here), evaluation left to the
    pipeline, one checkpoint at the end."""
    zero = r1_zero.config()
    return dataclasses.replace(zero, task=dataclasses.replace(zero.task, slots=8, reason_prob=0.5), max_prompt_len=64,
                               steps=20, grpo=dataclasses.replace(zero.grpo, log_kl=False), eval=EvalConfig(),
                               checkpoint=CheckpointConfig(every=0, keep=1))


def _countdown() -> RLExperiment:
    """experiments/r1_zero_countdown.py sized for the pipeline's budget: 12 GRPO steps of 8 prompts x 8 (its own
    default is 25 x 16, ~3 min a seed), no reference model, evaluation left to the pipeline."""
    from experiments import r1_zero_countdown
    cd = r1_zero_countdown.config()
    return dataclasses.replace(cd, steps=12, grpo=dataclasses.replace(cd.grpo, prompts_per_step=8, log_kl=False),
                               eval=EvalConfig(), checkpoint=CheckpointConfig(every=0, keep=1))


@dataclass(frozen=True)
class PipelineExperiment(RunConfig):
    zero: RLExperiment = field(default_factory=_zero)  # base stage, task, model, and the GRPO recipe of every RL stage
    cold_start: SFTConfig = field(default_factory=lambda: SFTConfig(steps=24))  # ~3 epochs of the traces
    cold_start_traces: int = 300  # worked problems drawn from cold_start_seed, then curated
    cold_start_seed: int = 201
    rejection: TraceConfig = field(default_factory=lambda: TraceConfig(prompts=384))
    rejection_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=30))
    student: ModelConfig = field(default_factory=dense_student)
    student_base_steps: int = 300  # 0: as zero.base.steps
    distill: SFTConfig = field(default_factory=lambda: SFTConfig(steps=60, optim=OptimConfig(
        lr=1e-3, warmup_steps=5, schedule="cosine", final_lr_frac=0.1, weight_decay=0.0)))
    rl_student_steps: int = 0  # 0: the distillation's compute (matched_rl_steps)
    random_rate: float = -1.0  # random_reward's rate; < 0: the base's measured in-distribution pass@1
    countdown: RLExperiment = field(default_factory=_countdown)
    seeds: tuple[int, ...] = (0, 1, 2)
    stages: tuple[str, ...] = STAGES + ("countdown",)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(problems=48, k=8))
    hard_max_new_tokens: int = 56  # an 8-term worked answer is ~45 tokens
    eval_batch_size: int = 256  # rows per generate call
    base_dir: str = ""  # default run_dir/base
    run_dir: str = ""
    name: str = "pipeline"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.stages) - set(STAGES) - {"countdown"})
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; known: {list(STAGES) + ['countdown']}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: need one or more distinct seeds, got {self.seeds}")
        if self.eval.problems < 1:
            raise ValueError("eval.problems: every stage is scored; must be >= 1")
        t = self.zero.task
        used = {getattr(t, f): f for f in ("corpus_seed", "prompt_seed", "held_out_seed", "hard_seed") if hasattr(t, f)}
        if self.cold_start_seed in used:
            raise ValueError(f"cold_start_seed: {self.cold_start_seed} is already zero.task.{used[self.cold_start_seed]}")
        if self.random_rate > 1:
            raise ValueError(f"random_rate: must be <= 1 (< 0: the base's pass@1), got {self.random_rate}")


def config() -> PipelineExperiment:
    return PipelineExperiment()


class Scorer:
    """Scores a run directory's newest checkpoint on every split of a task -> <run>/eval_<split>.json."""

    def __init__(self, rl: RLExperiment, ev: EvalConfig, splits: dict[str, list[dict]],
                 max_new: dict[str, int], batch_size: int):
        from rl.evaluate import eval_sampling
        self.rl, self.ev, self.splits, self.batch_size = rl, ev, splits, batch_size
        self.sampling = {s: dataclasses.replace(eval_sampling(rl.grpo.sampling), max_new_tokens=max_new[s])
                         for s in splits}

    def files(self, run_dir: str) -> list[str]:
        return [os.path.join(run_dir, f"eval_{s}.json") for s in self.splits]

    def __call__(self, run_dir: str) -> None:
        from experiments.eval import evaluate_run
        for (split, records), out in zip(self.splits.items(), self.files(run_dir)):
            m = evaluate_run(run_dir, records, k=self.ev.k, seed=self.ev.seed, max_prompt_len=self.rl.max_prompt_len,
                             task=self.rl.task, sampling=self.sampling[split], batch_size=self.batch_size, out=out,
                             meta={"split": split})
            log.info("%s %s: pass@1 %.3f  pass@%d %.3f  think %.2f  length %.1f", run_dir, split, m["pass@1"],
                     m["k"], m["pass@k"], m["think_usage"], m["response_len_mean"])


class Ledger:
    """Runs each (stage, seed) once: skipped when its eval files exist; train and eval seconds -> timings.json."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "timings.json")
        self.times = {}
        if os.path.exists(self.path):
            with open(self.path) as fh:
                self.times = json.load(fh)

    def run(self, key: str, run_dir: str, train, score: Scorer) -> None:
        if all(os.path.exists(f) for f in score.files(run_dir)):
            log.info("pipeline: %s is done (%s exist); skipping", key, ", ".join(map(os.path.basename,
                                                                                     score.files(run_dir))))
            return
        t0 = time.perf_counter()
        train()
        t1 = time.perf_counter()
        score(run_dir)
        prev = self.times.get(key, {})
        self.times[key] = {"train_s": prev.get("train_s", 0.0) + t1 - t0,
                           "eval_s": prev.get("eval_s", 0.0) + time.perf_counter() - t1}
        with open(self.path + ".tmp", "w") as fh:
            json.dump(self.times, fh, indent=2)
        os.replace(self.path + ".tmp", self.path)
        log.info("pipeline: %s took %.0f s + %.0f s evaluation", key, t1 - t0, time.perf_counter() - t1)


def compile_cache(root: str) -> None:
    """A persistent XLA cache under run_dir: every seed and stage compiles the same GRPO, SFT and sampling programs,
    so only the first of each compiles (unless the user configured a cache of their own)."""
    import jax
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(root), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(exp: PipelineExperiment) -> None:
    from experiments.results import base_rate, write_results
    from rl.loop import grpo
    from train.loop import pretrain

    root, rep = exp.directory, dataclasses.replace
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(exp.to_dict(), fh, indent=2)
    compile_cache(root)
    on, run = set(exp.stages), {"progress": exp.progress, "tensorboard": exp.tensorboard}
    zero, ledger, n = rep(exp.zero, **run), Ledger(root), exp.eval.problems
    base = exp.base_dir or os.path.join(root, "base")
    digits = Scorer(zero, exp.eval, zero.task.splits(n), {"in_distribution": zero.grpo.sampling.max_new_tokens,
                                                          "hard": exp.hard_max_new_tokens}, exp.eval_batch_size)
    ledger.run("base", base, lambda: shared_base(zero, base), digits)

    student_base = os.path.join(root, "student_base")
    student = rep(zero, name="rl_student", model=exp.student,
                  base=rep(zero.base, name="student_base", steps=exp.student_base_steps or zero.base.steps))
    if on & {"distill_student", "rl_student"}:
        ledger.run("student_base", student_base, lambda: shared_base(student, student_base), digits)
    rate = exp.random_rate if exp.random_rate >= 0 else base_rate(base)
    rl_steps = exp.rl_student_steps or matched_rl_steps(exp.distill, student)
    cold_records = r1.cold_start_traces(R1Experiment(rl=zero, traces=exp.cold_start_traces,
                                                     cold_start_seed=exp.cold_start_seed))
    train_records = zero.task.train_records()

    for s in exp.seeds:
        def d(stage, s=s):
            return os.path.join(root, stage, f"seed{s}")

        def rl(stage, init, s=s, **kw):
            return rep(zero, name=stage, seed=s, run_dir=d(stage), init_from=init, **kw)

        def sft(stage, model, cfg, init, records, s=s):
            return pretrain(sft_experiment(stage, model, d(stage), rep(cfg, seed=s), init_from=init, mesh=zero.mesh,
                                           **run), records=records())

        def traces(s=s):  # r1's verified samples: rejection_sft's data, reused by the distillation
            return policy_traces(d("r1"), train_records, rep(exp.rejection, seed=s),
                                 os.path.join(d("rejection_sft"), "traces.jsonl"), task=zero.task)

        jobs = {
            "r1_zero": lambda: grpo(rl("r1_zero", base)),
            "cold_start": lambda: sft("cold_start", zero.model, exp.cold_start, base, lambda: cold_records),
            "r1": lambda: grpo(rl("r1", d("cold_start"))),
            "rejection_sft": lambda: sft("rejection_sft", zero.model, exp.rejection_sft, base, traces),
            "distill_student": lambda: sft("distill_student", exp.student, exp.distill, student_base, traces),
            "rl_student": lambda: grpo(rep(student, seed=s, run_dir=d("rl_student"), init_from=student_base,
                                           steps=rl_steps)),
            "random_reward": lambda: grpo(rl("random_reward", base, rewards=(f"random:{rate:.4f}",))),
            "format_only": lambda: grpo(rl("format_only", base, rewards=("format",))),
        }
        for stage in SEEDED:
            if stage in on:
                ledger.run(f"{stage}/seed{s}", d(stage), jobs[stage], digits)

    if "countdown" in on:
        cd, cd_root = rep(exp.countdown, **run), os.path.join(root, "countdown")
        score = Scorer(cd, exp.eval, {"countdown": cd.task.held_out(n)},
                       {"countdown": cd.grpo.sampling.max_new_tokens}, exp.eval_batch_size)
        cd_base = os.path.join(cd_root, "base")
        ledger.run("countdown/base", cd_base, lambda: shared_base(cd, cd_base), score)
        for s in exp.seeds:
            run_dir = os.path.join(cd_root, "r1_zero", f"seed{s}")
            ledger.run(f"countdown/r1_zero/seed{s}", run_dir,
                       lambda s=s, run_dir=run_dir: grpo(rep(cd, seed=s, run_dir=run_dir, init_from=cd_base)), score)
    print(f"pipeline: results in {write_results(root, exp, base, rate=rate, rl_student_steps=rl_steps)}")
