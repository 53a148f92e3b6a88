"""R1-Zero at laptop scale: pretrain a tiny DeepSeek-V3-style base, then GRPO with rule rewards only.

    python -m experiments.run experiments/r1_zero.py run_dir=runs/r1_zero [base.steps=600 eval.k=8 steps=60]

Task: digit chains (rl/tasks/digit_chain.py), a worksheet of signed steps summed mod 10, 2-6 terms:
"3 +1=? -2=? +2=?  (mod 10)". Base (`base`, run_dir/base, reused when finished): a tiny DeepSeek-V3-style model
trained on `task.corpus_docs` problems of which `task.reason_prob` = 30 % carry worked reasoning
(`<think>3 +1=4 -2=2 +2=4</think> <answer>4</answer>`) and the rest only the answer
(`<think></think> <answer>4</answer>`): every written step is an easy fact whose inputs sit at fixed distances,
while a direct answer to a long chain is a guess, so reasoning pays and the base has pass@k >> pass@1.
RL: R1's prompt template without its preamble (rl.tasks.SHORT_TEMPLATE), format + accuracy rewards with equal
weight (the task's), G = 8, Dr.GRPO (mean-centred advantages, constant normaliser), no KL penalty (β = 0, TRL's
default; KL to the base is still measured, log_kl), clip 0.2 / 0.28, temperature 1.
The task's held-out problems (their own seed) are evaluated before and after RL: run_dir/eval_start.json,
eval_end.json (`eval.problems` × `eval.k` samples).
"""

import dataclasses

from experiments.config import CheckpointConfig, EvalConfig, Experiment, RLExperiment
from model.config import tiny_deepseek
from rl.grpo import GRPOConfig
from rl.rollout import Sampling
from rl.tasks import DigitChain
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig

TASK = DigitChain()


def config() -> RLExperiment:
    model = tiny_deepseek(vocab_size=512, max_seq_len=512)
    # routed experts computed densely (every expert on every token, zero gates for the unchosen): the same maths as
    # the sparse impls, but a different summation order, and this tiny base is sensitive to it. Measured
    # 2026-12-02 with the same seed: dense reproduces the documented base (final CE 0.153, held-out pass@1 0.32)
    # bit for bit; dropless reached CE 0.261 and pass@1 0.13, and RL from it stalled (0.17). At 16 experts,
    # top-4, dense also samples faster on CPU (1.0 s vs 1.5 s for 128 x 40 tokens).
    # The base's 600 steps: its cross-entropy drops from ~0.45 to ~0.2 in a late transition (the steps of the
    # worksheet learnt) whose timing moves with summation order. At 400 steps the transition came at ~250 with the
    # 3-D matmuls and not at all with the flat ones (model.layers.linear; CE 0.45, held-out pass@1 0.11, RL stalled
    # at 0.11); with 600 steps (a longer cosine) it came at 300-400 for seeds 0 and 1 and RL reached 0.92 / 1.00.
    model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, impl="dense"))
    return RLExperiment(
        name="r1_zero",
        model=model,
        task=TASK,
        base=Experiment(
            name="r1_zero_base", model=model, steps=600, batch_size=16,
            data=DataConfig(kind="sft", source="memory", tokenizer="byte", seq_len=256, seed=TASK.corpus_seed,
                            chat_template=TASK.template),
            mesh=MeshConfig(data=-1), optim=OptimConfig(lr=3e-3, warmup_steps=20, schedule="cosine",
                                                        final_lr_frac=0.1),
            checkpoint=CheckpointConfig(every=100, keep=1)),
        eval=EvalConfig(problems=96, k=8),
        prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template=TASK.template),
        grpo=GRPOConfig(num_generations=8, prompts_per_step=16,
                        sampling=Sampling(temperature=1.0, max_new_tokens=40),
                        advantage="dr_grpo", loss_agg="seq_mean_token_sum_norm", epsilon_low=0.2,
                        epsilon_high=0.28, beta=0.0, log_kl=True),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant", weight_decay=0.0),
        checkpoint=CheckpointConfig(every=20, keep=2),
        max_prompt_len=56, steps=60,
    )
