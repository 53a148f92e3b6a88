"""Control: R1-Zero's GRPO with a reward that ignores correctness (Spurious Rewards, Shao et al. 2025).

    python -m experiments.run experiments/random_reward.py run_dir=runs/random_reward [rewards='("random:0.33",)']

Everything as experiments/r1_zero.py (base, task, model, G, clip, steps) except the reward: 1 with probability
`rate`, else 0, drawn independently per completion (rl.rewards.RandomReward; 'random:<rate>'). The rate is the
base's held-out pass@1 (0.33 here; experiments/pipeline.py sets the measured one), so the reward's mean matches
what the correctness reward would pay the base, but its advantage is noise. If held-out accuracy rises under it, the
gain comes from the optimiser, not from the reward: R1-Zero's gain counts only as far as it exceeds this control.
"""

import dataclasses

from experiments import r1_zero
from experiments.config import RLExperiment


def config(rate: float = 0.33) -> RLExperiment:
    return dataclasses.replace(r1_zero.config(), name="random_reward", rewards=(f"random:{rate:g}",))
