"""Control: R1-Zero's GRPO with the format reward alone (no correctness signal).

    python -m experiments.run experiments/format_only.py run_dir=runs/format_only

Everything as experiments/r1_zero.py except the rewards: ('format',). The base already writes the tags almost
always (format rate ~0.99), so this reward is nearly constant and its advantages mostly zero; any accuracy gain over
the base is what shaping the output format alone buys. `accuracy` in metrics.jsonl is still the task's correctness.
"""

import dataclasses

from experiments import r1_zero
from experiments.config import RLExperiment


def config() -> RLExperiment:
    return dataclasses.replace(r1_zero.config(), name="format_only", rewards=("format",))
