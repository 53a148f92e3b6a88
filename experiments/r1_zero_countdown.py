"""R1-Zero on Countdown at laptop scale: a tiny DeepSeek-V3-style base whose corpus carries a worked search, then
GRPO with rule rewards only (format + our AST-bounded Countdown checker).

    python -m experiments.run experiments/r1_zero_countdown.py run_dir=runs/r1_zero_countdown [steps=25 eval.k=8]

Task: Countdown (rl/tasks/countdown.py), reasoning-gym's generator at 3 numbers 1-9 and targets 1-9:
"Make 2 from 7 3 6.". Base (`base`, run_dir/base, reused when finished): the same tiny model as
experiments/r1_zero.py trained on `task.corpus_docs` problems of which `task.reason_prob` carry a worked search
(`<think>7+3>9 7-3=4 -6<1 7*3>9 7+6>9 7-6=1 +3=4 *3=3 7*6>9 6+3=9 -7=2</think> <answer>(6+3)-7</answer>`: pairs
and first operations in a fixed order, each value combined with the third number by what can still reach the
target, every step a fact about two single digits, the first hit ends the search) and the rest only the answer
(`<think></think> <answer>(6+3)-7</answer>`). The corpus, the RL prompts and the held-out problems are disjoint
classes of problems, so a direct answer to a held-out problem is a guess while the search finds one. RL as
experiments/r1_zero.py (R1's short template, G = 8, Dr.GRPO, β = 0, clip 0.2 / 0.28, temperature 1), with
responses long enough for ~97 % of searches.

Measured 2026-12-02 (2 cores shared with another job, so wall times ~2x an idle machine's): base 300 steps in 7.9 min
(1.57 s/step; the r1_zero base's 0.75 s/step idle at the same 4096 tokens/step suggests ~4 min idle), held-out pass@1
0.301, pass@8 0.635, think usage 0.63, 45 tokens; after 25 GRPO steps (16 prompts x 8, lr 1e-4; 5.2 min here)
pass@1 0.322, pass@8 0.458, think usage 0.85, 33 tokens: RL raises think usage but not accuracy. The base's written
steps are not reliable enough (first-pair facts 75 %, second steps 63 %, a written hit ends the search 61 % of the
time; its searches score 31 % vs 27 % for its direct guesses), and RL learns a short ritual trace whose values no
longer carry the answer (tiny-r1-zero-lessons.md, lesson 1). With 8 prompts a step and lr 2e-4 the same base went
0.301 -> 0.246 (think usage 1.0, pass@8 0.32).
"""

import dataclasses

from experiments import r1_zero
from experiments.config import CheckpointConfig, RLExperiment
from rl.tasks.countdown import Countdown

TASK = Countdown(reason_prob=0.6)


def config() -> RLExperiment:
    """experiments/r1_zero.py's model, base and GRPO recipe, on Countdown: a 300-step base on its corpus, responses up
    to 160 tokens (a search is longer than a digit chain's steps), prompts up to 40 tokens."""
    zero, rep = r1_zero.config(), dataclasses.replace
    return rep(zero, name="r1_zero_countdown", task=TASK,
               base=rep(zero.base, name="r1_zero_countdown_base", steps=300,
                        data=rep(zero.base.data, seed=TASK.corpus_seed, chat_template=TASK.template)),
               prompts=rep(zero.prompts, chat_template=TASK.template),
               grpo=rep(zero.grpo, sampling=rep(zero.grpo.sampling, max_new_tokens=160)),
               checkpoint=CheckpointConfig(every=25, keep=2), max_prompt_len=40, steps=25)
