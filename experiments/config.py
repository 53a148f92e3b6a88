"""The typed configuration of an experiment: model, mesh, data, optimizer, loss, checkpoints, run length.

An experiment file defines `config()`: an `Experiment` pretrains / fine-tunes; an `RLExperiment` runs its base
stage (`base`, when set and no `init_from` is given) and then GRPO on its task; a multi-stage pipeline's config is
its own dataclass and the file defines `main(exp)`. Every field can be overridden from the command line with a
dotted `key=value` (`base.steps=100`, `eval.k=16`, `task.max_terms=8`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import os

from model.config import ModelConfig
from rl.grpo import GRPOConfig
from rl.tasks import Arithmetic, Task
from sharding.mesh import MeshConfig
from train.config import LossConfig, OptimConfig
from train.data import DataConfig


def _as_dict(obj):
    """`dataclasses.asdict`, with each task's registered name beside its fields (config.json names the task)."""
    if isinstance(obj, Task):
        return {"name": obj.name, **{f.name: _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if dataclasses.is_dataclass(obj):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_dict(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    return obj


class RunConfig:
    """What every experiment config shares: its run directory (`run_dir`, default runs/<name>) and its JSON form."""

    @property
    def directory(self) -> str:
        return self.run_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return _as_dict(self)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end); 0 saves only at the end
    keep: int = 3  # keep the last K
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint.every: must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class Experiment(RunConfig):
    name: str
    model: ModelConfig
    data: DataConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = ""  # default: runs/<name>
    steps: int = 200
    batch_size: int = 16  # global, in sequences
    seed: int = 0
    init_from: str = ""  # a fresh run starts from: a pretraining / SFT / GRPO run_dir, an HF dir, or '' (random)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: the task's first `problems` held-out problems, `k` samples each at R1's T 0.6 / top-p 0.95
    (pass@1 averaged over the k, unbiased pass@k, maj@k), otherwise sampled as the RL run samples."""

    problems: int = 0  # 0 skips evaluation
    k: int = 8
    seed: int = 7  # the sampling key, jax.random.key(seed): every stage scored with the same draws
    max_new_tokens: int = 0  # 0: the RL run's grpo.sampling.max_new_tokens
    max_prompt_len: int = 0  # 0: the RL run's max_prompt_len

    def __post_init__(self):
        for name in ("problems", "max_new_tokens", "max_prompt_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}: must be >= 0, got {getattr(self, name)}")
        if self.k < 1:
            raise ValueError(f"eval.k: must be >= 1, got {self.k}")


@dataclass(frozen=True)
class RLExperiment(RunConfig):
    """GRPO on a task from a base model: prompts with gold answers, rule-based rewards, the GRPO family's knobs.

    `base`: the stage that makes the base model, pretrained into `base.run_dir` (default run_dir/base) when the run
    has no `init_from`; a finished base there is reused. It trains this experiment's model on this experiment's
    mesh (`model` and `mesh` are copied into `base`), on the task's corpus when its data source is 'memory'.
    """

    name: str
    model: ModelConfig
    prompts: DataConfig  # records with data.prompt_field and 'answer'; rendered with data.chat_template
    task: Task = field(default_factory=Arithmetic)  # records, held-out split, correctness (rl/tasks/)
    base: Experiment | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant",
                                                                   weight_decay=0.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=20))
    rewards: tuple[str, ...] = ()  # names in rl.rewards.REWARDS; () = the task's rewards
    reward_weights: tuple[float, ...] = ()  # () = 1.0 each
    init_from: str = ""  # a pretraining / SFT or GRPO run_dir (newest checkpoint; a GRPO run's policy), an HF dir, or ''
    max_prompt_len: int = 64  # prompt tokens (left-truncated); fixed so rollouts compile once
    run_dir: str = ""
    steps: int = 50
    seed: int = 0
    max_bad_steps: int = 5
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.reward_weights and len(self.reward_weights) != len(self.reward_names):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_names)} rewards")
        if self.grpo.keep_routing and self.model.moe is None:
            raise ValueError("grpo.keep_routing: the model has no MoE layers (model.moe is None): nothing to replay")
        if not isinstance(self.task, Task):
            raise ValueError(f"task: must be a rl.tasks.Task, got {type(self.task).__name__}")
        if self.base is not None and (self.base.model, self.base.mesh) != (self.model, self.mesh):
            object.__setattr__(self, "base", dataclasses.replace(self.base, model=self.model, mesh=self.mesh))
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len: must be >= 1, got {self.max_prompt_len}")

    @property
    def reward_names(self) -> tuple[str, ...]:
        return self.rewards or self.task.rewards

    @property
    def weights(self) -> tuple[float, ...]:
        return self.reward_weights or (1.0,) * len(self.reward_names)

    def base_run(self, base_dir: str = "") -> Experiment:
        """The base stage as it runs: in `base_dir`, else base.run_dir, else run_dir/base; progress as this run."""
        if self.base is None:
            raise ValueError(f"{self.name}: base: no base stage configured; set init_from to a base run or checkpoint")
        run_dir = base_dir or self.base.run_dir or os.path.join(self.directory, "base")
        return dataclasses.replace(self.base, run_dir=run_dir, progress=self.progress, tensorboard=self.tensorboard)

    def evaluation(self) -> EvalConfig:
        """`eval` with its 0 = "as the run" fields resolved (so SFT stages can be scored exactly alike)."""
        return dataclasses.replace(self.eval, max_new_tokens=self.eval.max_new_tokens or
                                   self.grpo.sampling.max_new_tokens,
                                   max_prompt_len=self.eval.max_prompt_len or self.max_prompt_len)
