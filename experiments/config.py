"""The typed configuration of an experiment: model, mesh, data, optimizer, loss, checkpoints, run length.

An experiment file defines `config() -> Experiment` (and optionally `main(exp)` for a pipeline other than
plain pretraining). Every field can be overridden from the command line with a dotted `key=value`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.config import ModelConfig
from sharding.mesh import MeshConfig
from train.config import LossConfig, OptimConfig
from rl.grpo import GRPOConfig
from train.data import DataConfig


class RunConfig:
    """What every experiment config shares: its run directory (`run_dir`, default runs/<name>) and its JSON form."""

    @property
    def directory(self) -> str:
        return self.run_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
class RLExperiment(RunConfig):
    """GRPO from a base model: prompts with gold answers, rule-based rewards, the GRPO family's knobs."""

    name: str
    model: ModelConfig
    prompts: DataConfig  # records with data.prompt_field and 'answer'; rendered with data.chat_template
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant",
                                                                   weight_decay=0.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=20))
    rewards: tuple[str, ...] = ("format", "accuracy")  # names in rl.rewards.REWARDS
    reward_weights: tuple[float, ...] = (1.0, 1.0)
    init_from: str = ""  # a pretraining / SFT or GRPO run_dir (newest checkpoint; a GRPO run's policy), an HF dir, or ''
    max_prompt_len: int = 64  # prompt tokens (left-truncated); fixed so rollouts compile once
    run_dir: str = ""
    steps: int = 50
    seed: int = 0
    max_bad_steps: int = 5
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if len(self.rewards) != len(self.reward_weights):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} rewards")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len: must be >= 1, got {self.max_prompt_len}")
