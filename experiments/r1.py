"""DeepSeek-R1's first two stages at laptop scale (R1 §2.3): cold-start SFT, then reasoning RL.

    python -m experiments.run experiments/r1.py run_dir=runs/r1 [base_dir=runs/r1_zero/base] [rl.steps=60]

Base: r1_zero's base stage (`rl.base`; run_dir/base, or `base_dir` to share one trained once; made if missing).
Cold start: `traces` worked digit-chain responses (rl.tasks.DigitChain.worked from `cold_start_seed`, a seed
disjoint from the held-out problems and the RL prompts), curated as model output would be — kept only when the accuracy and the
format rewards both give 1 (rl.traces.curate) — fine-tune the base on the response tokens for `cold_start.steps`
(run_dir/cold_start, with eval.json on the held-out set). R1 uses thousands of long, readable CoT examples; here a
few hundred full worked solutions show every step the base otherwise writes only 30 % of the time.
Reasoning RL: R1-Zero's GRPO recipe as `rl` (r1_zero.config(): task, template, rewards, G, clip, no KL, `rl.eval`)
from the cold-start checkpoint, in run_dir (eval_start.json = the cold-start model, eval_end.json). R1's
language-consistency reward has no counterpart here (one language, one tokenizer).
"""

import dataclasses
import os
from dataclasses import dataclass, field

from experiments import r1_zero
from experiments.config import RLExperiment, RunConfig
from experiments.stages import SFTConfig, sft, sft_experiment, shared_base, stage_eval
from rl.traces import curate


@dataclass(frozen=True)
class R1Experiment(RunConfig):
    rl: RLExperiment  # reasoning RL; its run_dir and init_from are set by main (run_dir, run_dir/cold_start)
    cold_start: SFTConfig = field(default_factory=lambda: SFTConfig(steps=24))  # ~3 epochs
    traces: int = 300  # cold-start examples drawn (then curated)
    cold_start_seed: int = 201  # the task's other seeds: corpus 1, RL prompts 101, held-out 2
    base_dir: str = ""  # default run_dir/base
    run_dir: str = ""
    name: str = "r1"

    def __post_init__(self):
        t = self.rl.task
        used = {getattr(t, f): f for f in ("corpus_seed", "prompt_seed", "held_out_seed") if hasattr(t, f)}
        if self.cold_start_seed in used:
            raise ValueError(f"cold_start_seed: {self.cold_start_seed} is already rl.task.{used[self.cold_start_seed]}")


def config() -> R1Experiment:
    return R1Experiment(rl=dataclasses.replace(r1_zero.config(), name="r1"))


def cold_start_traces(exp: R1Experiment) -> list[dict]:
    """Curated worked responses {'prompt', 'response', 'difficulty'} for the first `traces` cold-start problems."""
    return curate(exp.rl.task.worked(exp.cold_start_seed, exp.traces), task=exp.rl.task)


def main(exp: R1Experiment) -> None:
    from rl.loop import grpo

    run_dir, ev = exp.directory, stage_eval(exp.rl)
    base_dir = shared_base(exp.rl, exp.base_dir or os.path.join(run_dir, "base"))
    cold = sft_experiment("r1_cold_start", exp.rl.model, os.path.join(run_dir, "cold_start"), exp.cold_start,
                          init_from=base_dir, mesh=exp.rl.mesh, progress=exp.rl.progress,
                          tensorboard=exp.rl.tensorboard)
    sft(cold, cold_start_traces(exp), ev)
    grpo(dataclasses.replace(exp.rl, run_dir=run_dir, init_from=cold.run_dir))
