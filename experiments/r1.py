"""DeepSeek-R1's first two stages at laptop scale (R1 §2.3): cold-start SFT, then reasoning RL.

    python -m experiments.run experiments/r1.py run_dir=runs/r1 [base_dir=runs/r1_zero/base] [rl.steps=60]

Base: r1_zero's pretrained base (run_dir/base, or `base_dir` to share one trained once; made if missing).
Cold start: `traces` worked digit-chain responses (rl.tasks.digit_chain's 'reasoning', a seed disjoint from the
held-out problems and the RL prompts), curated as model output would be — kept only when the accuracy and the
format rewards both give 1 (rl.traces.curate) — fine-tune the base on the response tokens for `cold_start.steps`
(run_dir/cold_start, with eval.json on the held-out set). R1 uses thousands of long, readable CoT examples; here a
few hundred full worked solutions show every step the base otherwise writes only 30 % of the time.
Reasoning RL: R1-Zero's GRPO recipe as `rl` (r1_zero.config(): template, format + accuracy rewards, G, clip,
no KL) from the cold-start checkpoint, in run_dir (eval_start.json = the cold-start model, eval_end.json). R1's
language-consistency reward has no counterpart here (one language, one tokenizer).
"""

import dataclasses
import os
from dataclasses import dataclass, field

from experiments import r1_zero
from experiments.config import RLExperiment, RunConfig
from experiments.stages import (
    EvalConfig,
    SFTConfig,
    held_out,
    sft,
    sft_experiment,
    shared_base,
)
from rl.tasks import digit_chain
from rl.traces import curate

COLD_START_SEED = r1_zero.TRAIN_SEED + 200  # pretraining uses TRAIN_SEED, RL prompts TRAIN_SEED + 100
assert COLD_START_SEED != r1_zero.HELD_OUT_SEED


@dataclass(frozen=True)
class R1Experiment(RunConfig):
    rl: RLExperiment  # reasoning RL; its run_dir and init_from are set by main (run_dir, run_dir/cold_start)
    cold_start: SFTConfig = field(default_factory=lambda: SFTConfig(steps=24))  # ~3 epochs
    traces: int = 300  # cold-start examples drawn (then curated)
    base_dir: str = ""  # default run_dir/base
    eval: EvalConfig = field(default_factory=EvalConfig)  # problems and k; sampled as grpo evaluates rl
    run_dir: str = ""
    name: str = "r1"


def config() -> R1Experiment:
    return R1Experiment(rl=dataclasses.replace(r1_zero.config(), name="r1"))


def cold_start_traces(n: int) -> list[dict]:
    """Curated worked responses {'prompt', 'response', 'difficulty'} for the first n cold-start problems."""
    return curate([{**rec, "response": rec["reasoning"]} for rec in (digit_chain(COLD_START_SEED, i)
                                                                     for i in range(n))])


def main(exp: R1Experiment) -> None:
    from rl.loop import grpo

    run_dir, ev = exp.directory, EvalConfig.like_grpo(exp.rl, exp.eval.problems, exp.eval.k)
    base_dir = shared_base(exp.rl, exp.base_dir or os.path.join(run_dir, "base"))
    cold = sft_experiment("r1_cold_start", exp.rl.model, os.path.join(run_dir, "cold_start"), exp.cold_start,
                          init_from=base_dir, mesh=exp.rl.mesh, progress=exp.rl.progress,
                          tensorboard=exp.rl.tensorboard)
    sft(cold, cold_start_traces(exp.traces), ev)
    rl = dataclasses.replace(exp.rl, run_dir=run_dir, init_from=cold.run_dir)
    grpo(rl, records=r1_zero.train_prompts(), eval_records=held_out(ev), eval_k=ev.k)
