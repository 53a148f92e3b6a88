"""R1's stage 3 at laptop scale (R1 §2.3): rejection sampling from the RL model, then SFT of the base on what passed.

    python -m experiments.run experiments/rejection_sft.py run_dir=runs/rejection_sft init_from=runs/r1

Rejection sampling: the RL policy (`init_from`, a GRPO run directory: its newest checkpoint's policy) samples
`sample.k` completions at T 0.6 / top-p 0.95 for each of the first `sample.prompts` RL training prompts
(r1_zero.TASK.train_records()); a completion is kept when the task scores it correct and the format reward gives 1,
at most `sample.max_per_problem` distinct ones per prompt (rl.traces.verified_traces) -> run_dir/traces.jsonl.
SFT: the BASE model (`base_dir`; default the base that `init_from` descends from through its init_from chain) is
fine-tuned on those traces for `sft.steps` (response tokens only), then evaluated on the held-out set ->
run_dir/eval.json. R1 trains V3-Base for 2 epochs on ~600k such reasoning samples plus ~200k non-reasoning ones;
this task has no non-reasoning data.
"""

import os
from dataclasses import dataclass, field

from experiments import r1_zero
from experiments.config import RunConfig
from experiments.config import EvalConfig
from experiments.stages import (
    SFTConfig,
    TraceConfig,
    policy_traces,
    require_rl_run,
    root_base,
    run_model,
    sft,
    sft_experiment,
    stage_eval,
)


@dataclass(frozen=True)
class RejectionSFTExperiment(RunConfig):
    init_from: str = "runs/r1"  # the GRPO run to sample from
    base_dir: str = ""  # the model to fine-tune; default: root of init_from's init_from chain
    sample: TraceConfig = field(default_factory=TraceConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=40))
    eval: EvalConfig = field(default_factory=stage_eval)  # r1_zero's evaluation, every field explicit
    run_dir: str = ""
    name: str = "rejection_sft"
    progress: bool = True
    tensorboard: bool = True


def config() -> RejectionSFTExperiment:
    return RejectionSFTExperiment()


def main(exp: RejectionSFTExperiment) -> None:
    policy = require_rl_run(exp.init_from, "init_from")
    base = exp.base_dir or root_base(policy)
    traces = policy_traces(policy, r1_zero.TASK.train_records(), exp.sample,
                           os.path.join(exp.directory, "traces.jsonl"))
    sft(sft_experiment(exp.name, run_model(base), exp.directory, exp.sft, init_from=base, progress=exp.progress,
                       tensorboard=exp.tensorboard), traces, exp.eval)
