"""Tasks: one module each, owning records, held-out split, template, answer check and rewards (rl/tasks/base.py).

    from rl.tasks import get_task, DigitChain
    task = get_task("countdown")                  # registered: arithmetic, digit_chain, countdown, gsm8k
"""

from rl.tasks.base import R1_TEMPLATE, SHORT_TEMPLATE, TASKS, Task, get_task, register
from rl.tasks.arithmetic import Arithmetic, held_out_problems, seen_synthetic_prompts, synthetic_example
from rl.tasks.countdown import Countdown, countdown_prompts
from rl.tasks.digit_chain import DigitChain, digit_chain, digit_chain_corpus, digit_chain_prompts, digit_chain_steps
from rl.tasks.gsm8k import GSM8K, gsm8k_gold, gsm8k_records

__all__ = [
    "R1_TEMPLATE", "SHORT_TEMPLATE", "TASKS", "Task", "get_task", "register",
    "Arithmetic", "held_out_problems", "seen_synthetic_prompts", "synthetic_example",
    "Countdown", "countdown_prompts",
    "DigitChain", "digit_chain", "digit_chain_corpus", "digit_chain_prompts", "digit_chain_steps",
    "GSM8K", "gsm8k_gold", "gsm8k_records",
]
