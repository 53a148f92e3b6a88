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

Runs go `workers` at a time (default 2), each in a spawned process, started as soon as the runs it reads are done
(`job_graph`); the results do not depend on it (each run is seeded; tests/test_pipeline.py checks workers=2 against
in-process runs). Measured with these defaults (2026-12-02, 2 idle cores of an Intel Xeon): 26.3 min (workers=1:
34.1 min, identical results). Results and timings: docs/results/ (results.md, results.json, timings.json). Sizing
note: a trial with a 250-step student base (instead of 300) was far weaker (held-out pass@1 0.125) and its
distillation fell to 0.15 from 0.51, so the student base keeps its 300 steps.
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
    zero = dataclasses.replace(zero, base=dataclasses.replace(zero.base, steps=400))  # as measured (README)
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
    workers: int = 2  # runs trained at once, each in its own process (a tiny model's step keeps one core busy)
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
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: must be an int >= 1, got {self.workers!r}")
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
    """timings.json: the train and eval seconds of each (stage, seed) run, and the pipeline's wall time."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "timings.json")
        self.times = {}
        if os.path.exists(self.path):
            with open(self.path) as fh:
                self.times = json.load(fh)

    def record(self, key: str, times: dict) -> None:
        prev = self.times.get(key, {})
        self.times[key] = {k: prev.get(k, 0.0) + v for k, v in times.items()}
        with open(self.path + ".tmp", "w") as fh:
            json.dump(self.times, fh, indent=2)
        os.replace(self.path + ".tmp", self.path)


def compile_cache(root: str, directory: str = "") -> str:
    """A persistent XLA cache (`directory`, default run_dir/xla_cache unless the user configured one): every seed and
    stage compiles the same GRPO, SFT and sampling programs, so only the first of each compiles, in any worker."""
    import jax
    if directory or not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory or os.path.join(os.path.abspath(root), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return jax.config.jax_compilation_cache_dir


def job_graph(exp: PipelineExperiment) -> dict[str, tuple[str, ...]]:
    """run key (its directory under run_dir) -> the keys it waits for; started in this order when ready (the
    bases, then each seed's longest chain first)."""
    on, g = set(exp.stages), {"base": ()}
    if "countdown" in on:
        g["countdown/base"] = ()
    if on & {"distill_student", "rl_student"}:
        g["student_base"] = ()
    after = {"r1_zero": ("base",), "cold_start": ("base",), "r1": ("cold_start",),
             "rejection_sft": ("r1",),  # samples r1's traces (traces.jsonl), which distill_student reuses
             "distill_student": ("r1", "rejection_sft", "student_base"), "rl_student": ("student_base",),
             "random_reward": ("base",), "format_only": ("base",)}
    order = ("cold_start", "r1", "rejection_sft", "distill_student", "r1_zero", "random_reward", "format_only",
             "rl_student")
    for s in exp.seeds:
        for stage in order:
            if stage in on:
                g[f"{stage}/seed{s}"] = tuple(d if d in ("base", "student_base") else f"{d}/seed{s}"
                                              for d in after[stage])
        if "countdown" in on:
            g[f"countdown/r1_zero/seed{s}"] = ("countdown/base",)
    return {k: tuple(d for d in deps if d in g) for k, deps in g.items()}


class _Stages:
    """What one process needs to train and score any run of the pipeline (built once per worker)."""

    def __init__(self, exp: PipelineExperiment):
        from experiments.results import base_rate

        rep = dataclasses.replace
        self.exp, self.root = exp, exp.directory
        self.run_cfg = {"progress": exp.progress and exp.workers <= 1, "tensorboard": exp.tensorboard}
        self.zero, n = rep(exp.zero, **self.run_cfg), exp.eval.problems
        self.base = exp.base_dir or os.path.join(self.root, "base")
        self.student_base = os.path.join(self.root, "student_base")
        student_base = rep(self.zero.base, name="student_base", steps=exp.student_base_steps or self.zero.base.steps)
        self.student = rep(self.zero, name="rl_student", model=exp.student, base=student_base)
        max_new = {"in_distribution": self.zero.grpo.sampling.max_new_tokens, "hard": exp.hard_max_new_tokens}
        self.digits = Scorer(self.zero, exp.eval, self.zero.task.splits(n), max_new, exp.eval_batch_size)
        self.rl_steps = exp.rl_student_steps or matched_rl_steps(exp.distill, self.student)
        self.rate = lambda: exp.random_rate if exp.random_rate >= 0 else base_rate(self.base)
        self.cd = rep(exp.countdown, **self.run_cfg)
        self.countdown = Scorer(self.cd, exp.eval, {"countdown": self.cd.task.held_out(n)},
                                {"countdown": self.cd.grpo.sampling.max_new_tokens}, exp.eval_batch_size)

    def run_dir(self, key: str) -> str:
        return self.base if key == "base" else os.path.join(self.root, key)

    def scorer(self, key: str) -> Scorer:
        return self.countdown if key.startswith("countdown/") else self.digits

    def done(self, key: str) -> bool:
        return all(os.path.exists(f) for f in self.scorer(key).files(self.run_dir(key)))

    def train(self, key: str) -> None:
        from rl.loop import grpo
        from train.loop import pretrain

        exp, zero, rep = self.exp, self.zero, dataclasses.replace
        if key in ("base", "student_base", "countdown/base"):
            cfg = {"base": zero, "student_base": self.student, "countdown/base": self.cd}[key]
            return shared_base(cfg, self.run_dir(key))
        if key.startswith("countdown/r1_zero/"):
            return grpo(rep(self.cd, seed=int(key.rsplit("seed", 1)[1]), run_dir=self.run_dir(key),
                            init_from=self.run_dir("countdown/base")))
        stage, s = key.split("/seed")
        s = int(s)

        def d(st):
            return os.path.join(self.root, st, f"seed{s}")

        def rl(init, **kw):
            return grpo(rep(zero, name=stage, seed=s, run_dir=d(stage), init_from=init, **kw))

        def sft(model, cfg, init, records):
            return pretrain(sft_experiment(stage, model, d(stage), rep(cfg, seed=s), init_from=init, mesh=zero.mesh,
                                           **self.run_cfg), records=records)

        def traces():  # r1's verified samples: rejection_sft's data, reused by the distillation
            return policy_traces(d("r1"), zero.task.train_records(), rep(exp.rejection, seed=s),
                                 os.path.join(d("rejection_sft"), "traces.jsonl"), task=zero.task)

        if stage == "r1_zero":
            return rl(self.base)
        if stage == "cold_start":
            cold = r1.cold_start_traces(R1Experiment(rl=zero, traces=exp.cold_start_traces,
                                                     cold_start_seed=exp.cold_start_seed))
            return sft(zero.model, exp.cold_start, self.base, cold)
        if stage == "r1":
            return rl(d("cold_start"))
        if stage == "rejection_sft":
            return sft(zero.model, exp.rejection_sft, self.base, traces())
        if stage == "distill_student":
            return sft(exp.student, exp.distill, self.student_base, traces())
        if stage == "rl_student":
            return grpo(rep(self.student, seed=s, run_dir=d(stage), init_from=self.student_base, steps=self.rl_steps))
        if stage == "random_reward":
            return rl(self.base, rewards=(f"random:{self.rate():.4f}",))
        return rl(self.base, rewards=("format",))  # format_only

    def __call__(self, key: str) -> dict:
        """Train and score one run -> its seconds {'train_s', 'eval_s'}."""
        t0 = time.perf_counter()
        self.train(key)
        t1 = time.perf_counter()
        self.scorer(key)(self.run_dir(key))
        t2 = time.perf_counter()
        log.info("pipeline: %s took %.0f s + %.0f s evaluation", key, t1 - t0, t2 - t1)
        return {"train_s": t1 - t0, "eval_s": t2 - t1}


_WORKER: dict = {}


def run_job(fields: dict, key: str, cache_dir: str) -> dict:
    """One run in a worker process (spawned: it rebuilds the config from its fields, importable by name)."""
    if "stages" not in _WORKER:
        from experiments.run import setup_logging

        if not logging.getLogger().handlers:
            setup_logging(False)
        compile_cache("", cache_dir)
        _WORKER["stages"] = _Stages(PipelineExperiment(**fields))
    return _WORKER["stages"](key)


class _InProcess:
    """`workers` <= 1: the same schedule, each run in this process when submitted."""

    def __init__(self, stages: _Stages):
        self.stages = stages

    def submit(self, fn, fields, key, cache_dir):
        from concurrent.futures import Future

        f = Future()
        try:
            f.set_result(self.stages(key))
        except BaseException as e:
            f.set_exception(e)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def schedule(exp: PipelineExperiment, stages: _Stages, ledger: Ledger, cache_dir: str) -> bool:
    """Run every job of `job_graph` not done yet, `exp.workers` at a time, each once its inputs are done; a finished
    run (its eval files exist) is skipped. -> whether anything ran. A failed run stops the pipeline (runs already
    finished keep their results and are skipped on the next call)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import experiments.pipeline as importable  # this file may have been loaded by path (experiments.run)

    graph = job_graph(exp)
    done = {k for k in graph if stages.done(k)}
    for k in sorted(done):
        log.info("pipeline: %s is done (its eval files exist); skipping", k)
    pending = {k: deps for k, deps in graph.items() if k not in done}
    if not pending:
        return False
    fields = {f.name: getattr(exp, f.name) for f in dataclasses.fields(exp)}
    pool = (ProcessPoolExecutor(min(exp.workers, len(pending)), mp_context=multiprocessing.get_context("spawn"))
            if exp.workers > 1 else _InProcess(stages))
    running = {}
    try:
        while pending or running:
            for k in list(pending):
                if len(running) < max(exp.workers, 1) and all(d in done for d in pending[k]):
                    running[pool.submit(importable.run_job, fields, k, cache_dir)] = k
                    del pending[k]
            if not running:
                raise RuntimeError(f"pipeline: runs {sorted(pending)} wait on runs that cannot finish")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                k = running.pop(f)
                ledger.record(k, f.result())
                done.add(k)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return True


def main(exp: PipelineExperiment) -> None:
    from experiments.results import write_results

    root = exp.directory
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(exp.to_dict(), fh, indent=2)
    cache_dir = compile_cache(root)
    stages, ledger, t0 = _Stages(exp), Ledger(root), time.perf_counter()
    if schedule(exp, stages, ledger, cache_dir):
        ledger.record("pipeline_wall_s", {"wall_s": time.perf_counter() - t0})
    md = write_results(root, exp, stages.base, rate=stages.rate(), rl_student_steps=stages.rl_steps)
    print(f"pipeline: results in {md}")
