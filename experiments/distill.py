"""R1's distillation at laptop scale (R1 §2.4): SFT a smaller dense student on the RL teacher's verified traces.

    python -m experiments.run experiments/distill.py run_dir=runs/distill teacher=runs/r1

Data: the teacher's (a GRPO run directory's policy) verified traces on RL training prompts, exactly as in rejection
sampling (experiments/rejection_sft.py; `traces` reuses that stage's traces.jsonl, as R1 distils on the same 800k
samples), else sampled here with `sample` -> run_dir/traces.jsonl.
Student: a plain dense decoder (GQA + SwiGLU, no MLA / MoE / MTP), `student`, from `init_from` (a pretraining run
of the student: experiments/pipeline.py gives it a student base trained on the task's corpus, as R1 distils into
pretrained Qwen / Llama models) or, when empty, from a random init (then it has seen nothing but these traces).
SFT on the responses for `sft.steps`, no RL, then the held-out evaluation -> run_dir/eval.json.
"""

import dataclasses
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
    sft,
    sft_experiment,
    stage_eval,
)
from model.config import ModelConfig
from train.config import OptimConfig


def dense_student(**overrides) -> ModelConfig:
    """0.5M parameters (the base: 1.8M, 0.95M active): d 96, 4 layers, 4 heads (2 KV), SwiGLU 256, vocab 512."""
    return dataclasses.replace(ModelConfig(vocab_size=512, d_model=96, n_layers=4, n_heads=4, n_kv_heads=2,
                                           head_dim=24, mlp_dim=256, max_seq_len=512), **overrides)


@dataclass(frozen=True)
class DistillExperiment(RunConfig):
    teacher: str = "runs/r1"  # a GRPO run directory
    traces: str = ""  # a traces.jsonl to reuse (e.g. runs/rejection_sft/traces.jsonl); '' samples the teacher
    student: ModelConfig = field(default_factory=dense_student)
    init_from: str = ""  # the student's starting point: a pretraining run of `student` (a student base), '' = random
    sample: TraceConfig = field(default_factory=TraceConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(
        steps=300, optim=OptimConfig(lr=3e-3, warmup_steps=10, schedule="cosine", final_lr_frac=0.1)))
    eval: EvalConfig = field(default_factory=stage_eval)  # r1_zero's evaluation, every field explicit
    run_dir: str = ""
    name: str = "distill"
    progress: bool = True
    tensorboard: bool = True


def config() -> DistillExperiment:
    return DistillExperiment()


def main(exp: DistillExperiment) -> None:
    if exp.traces and not os.path.exists(exp.traces):
        raise FileNotFoundError(f"traces={exp.traces!r} does not exist; set traces='' to sample the teacher")
    path = exp.traces or os.path.join(exp.directory, "traces.jsonl")
    if not os.path.exists(path):
        require_rl_run(exp.teacher, "teacher")
    traces = policy_traces(exp.teacher, r1_zero.TASK.train_records(), exp.sample, path)
    sft(sft_experiment(exp.name, exp.student, exp.directory, exp.sft, init_from=exp.init_from, progress=exp.progress,
                       tensorboard=exp.tensorboard), traces, exp.eval)
