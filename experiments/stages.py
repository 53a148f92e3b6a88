"""What the R1 stages share: one held-out evaluation, SFT runs that report it, and traces from an RL policy.

- `stage_eval()`: the held-out evaluation every stage is scored with: r1_zero's `eval` resolved against its GRPO run
  (its max_new_tokens, max_prompt_len, key, T 0.6, top-p 0.95), so the numbers of SFT and RL stages compare;
  `held_out(ev)`: r1_zero's task's first `ev.problems` held-out problems.
- `SFTConfig` + `sft_experiment` + `sft`: an SFT run (train.loop.pretrain with kind='sft' on in-memory
  {'prompt', 'response'} records rendered with r1_zero.TASK.template; only responses are trained) followed by
  RUN_DIR/eval.json (experiments.eval.evaluate_run; the same keys as eval_start.json).
- `TraceConfig` + `policy_traces`: rejection sampling from a GRPO run's policy (rl.traces.verified_traces),
  cached as JSONL so that a rerun or a second consumer (distillation) reads instead of sampling again.
- `shared_base`, `require_rl_run`, `root_base`, `run_model`, `finished`: run-directory plumbing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from experiments import r1_zero
from experiments.config import CheckpointConfig, EvalConfig, Experiment, RLExperiment
from experiments.eval import (
    dataclass_from_dict,
    evaluate_run,
    model_config_from_dict,
    read_run_config,
    run_sampling,
)
from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig

log = logging.getLogger(__name__)
_ZERO = r1_zero.config()


def stage_eval(rl: RLExperiment = _ZERO) -> EvalConfig:
    """The evaluation `rl.loop.grpo` runs for `rl`, with every field explicit (SFT stages sample no GRPO rollouts)."""
    return rl.evaluation()


def held_out(ev: EvalConfig) -> list[dict]:
    return r1_zero.TASK.held_out(ev.problems)


@dataclass(frozen=True)
class SFTConfig:
    """An SFT stage's run length and optimizer; model, records and run_dir come from the stage."""

    steps: int = 40
    batch_size: int = 16  # rows of seq_len tokens, several examples packed per row
    seq_len: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine",
                                                                   final_lr_frac=0.1, weight_decay=0.0))
    seed: int = 0


def sft_experiment(name: str, model: ModelConfig, run_dir: str, cfg: SFTConfig, *, init_from: str = "",
                   mesh: MeshConfig | None = None, progress: bool = True,
                   tensorboard: bool = True) -> Experiment:
    return Experiment(name=name, model=model, run_dir=run_dir, init_from=init_from, steps=cfg.steps,
                      batch_size=cfg.batch_size, seed=cfg.seed, mesh=mesh or MeshConfig(data=-1), optim=cfg.optim,
                      data=DataConfig(kind="sft", source="memory", tokenizer="byte", seq_len=cfg.seq_len,
                                      chat_template=r1_zero.TASK.template, seed=cfg.seed),
                      checkpoint=CheckpointConfig(every=0, keep=1), progress=progress, tensorboard=tensorboard)


def sft(exp: Experiment, records: list[dict], ev: EvalConfig) -> dict:
    """Fine-tune `exp` (from exp.init_from, else random init; resumes a started run) on {'prompt', 'response'}
    records, then evaluate it on the held-out set into RUN_DIR/eval.json; returns the metrics."""
    from train.loop import pretrain

    if not records:
        raise ValueError(f"{exp.name}: no SFT records (no verified traces?)")
    log.info("%s: SFT on %d records for %d steps", exp.name, len(records), exp.steps)
    pretrain(exp, records=records)
    return evaluate_run(exp.directory, held_out(ev), k=ev.k, max_new_tokens=ev.max_new_tokens, seed=ev.seed,
                        max_prompt_len=ev.max_prompt_len, task=r1_zero.TASK,
                        meta={"records": f"{r1_zero.TASK.name}_held_out", "sft_records": len(records)})


@dataclass(frozen=True)
class TraceConfig:
    """Rejection sampling: k samples for each of the first `prompts` RL training prompts, keep verified ones."""

    prompts: int = 1024
    k: int = 4
    max_per_problem: int = 1
    require_think: bool = True  # drop correct answers without written reasoning (guesses)
    temperature: float = 0.6  # R1's sampling settings
    top_p: float = 0.95
    max_new_tokens: int = _ZERO.grpo.sampling.max_new_tokens
    batch_size: int = 256  # rows per generate call
    seed: int = 0


def matched_rl_steps(sft_cfg: SFTConfig, rl: RLExperiment) -> int:
    """GRPO steps of `rl` whose training compute matches `sft_cfg`'s SFT run (R1 §4.1's equal-compute comparison).

    Counted in forward-pass token equivalents over the padded tokens each side processes (the hardware computes
    the padding too): an SFT step is batch_size x seq_len tokens x 3 (forward + backward); a GRPO step is
    rows x (max_prompt_len + max_new_tokens) tokens x (1 to sample, 1 to score the old policy, 1 more for the
    reference when it is kept, 3 per update epoch), rows = prompts_per_step x num_generations."""
    g = rl.grpo
    sft_tokens = sft_cfg.steps * sft_cfg.batch_size * sft_cfg.seq_len * 3
    rows = g.prompts_per_step * g.num_generations
    passes = 1 + 1 + (g.beta > 0 or g.log_kl) + 3 * g.num_iterations
    return max(1, round(sft_tokens / (rows * (rl.max_prompt_len + g.sampling.max_new_tokens) * passes)))


def finished(run_dir: str, steps: int) -> bool:
    """Whether run_dir holds a checkpoint at `steps` or later (a finished run need not be restored to be reused)."""
    from train.checkpoint import Checkpointer

    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return False
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    done = ckpt.steps()
    ckpt.close()
    return bool(done) and done[-1] >= steps


def shared_base(rl: RLExperiment, base_dir: str) -> str:
    """rl's base stage in base_dir: pretrained, or resumed, unless finished there already."""
    from rl.loop import ensure_base
    if not finished(base_dir, rl.base_run(base_dir).steps):
        ensure_base(rl, base_dir)
    return base_dir


def run_model(run_dir: str) -> ModelConfig:
    return model_config_from_dict(read_run_config(run_dir)["model"])


def require_rl_run(path: str, override: str) -> str:
    """`path` if it is a GRPO run directory with a checkpoint, else a FileNotFoundError naming the override."""
    cfg = os.path.join(path, "config.json")
    ok = os.path.exists(cfg) and os.path.isdir(os.path.join(path, "checkpoints"))
    if ok:
        with open(cfg) as fh:
            ok = "grpo" in json.load(fh)
    if not ok:
        raise FileNotFoundError(
            f"{override}={path!r} is not a finished GRPO run (config.json with 'grpo' and checkpoints/). Run the RL "
            f"stage first (python -m experiments.run experiments/r1.py run_dir={path}), or set {override}=<a GRPO "
            "run_dir>; experiments/pipeline.py runs every stage in order.")
    return path


def root_base(run_dir: str) -> str:
    """The first run of run_dir's init_from chain (runs/r1 -> runs/r1/cold_start -> runs/r1/base): its base."""
    for _ in range(32):
        parent = read_run_config(run_dir).get("init_from") or ""
        if not parent:
            return run_dir
        run_dir = parent
    raise ValueError(f"{run_dir}: init_from chain longer than 32 runs (a cycle?)")


def policy_traces(policy_dir: str, records: list[dict], tc: TraceConfig, path: str, task=None) -> list[dict]:
    """Verified traces [{'prompt', 'response', 'difficulty'}] of the GRPO policy in `policy_dir` on records[:prompts],
    judged by `task` (default r1_zero's), written to `path` (JSONL, atomically); an existing `path` is read instead."""
    import jax

    from rl.traces import verified_traces
    from sharding import make_mesh
    from train.config import LossConfig
    from train.data import load_tokenizer
    from train.loop import load_base_params
    from train.step import Trainer

    if os.path.exists(path):
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    saved = read_run_config(policy_dir)
    model, prompts = run_model(policy_dir), dataclass_from_dict(DataConfig, saved["prompts"])
    mesh = make_mesh(dataclass_from_dict(MeshConfig, saved["mesh"]))
    params = load_base_params(policy_dir, Trainer(model, OptimConfig(schedule="constant"), LossConfig(), mesh))
    traces = verified_traces(model, params, load_tokenizer(prompts.tokenizer), records[:tc.prompts], k=tc.k,
                             max_per_problem=tc.max_per_problem, require_think=tc.require_think, data_cfg=prompts,
                             task=task or r1_zero.TASK,
                             sampling=run_sampling(saved, tc.temperature, tc.top_p, tc.max_new_tokens),
                             max_prompt_len=saved["max_prompt_len"], rng=jax.random.key(tc.seed),
                             batch_size=tc.batch_size, mesh=mesh)
    log.info("%s: %d verified traces from %d prompts x %d samples", policy_dir, len(traces), tc.prompts, tc.k)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.writelines(json.dumps(t) + "\n" for t in traces)
    os.replace(path + ".tmp", path)
    return traces
