"""GRPO with rule-based rewards on synthetic arithmetic, from a tiny DeepSeek-V3-style base.

    python -m experiments.run experiments/grpo_arithmetic.py run_dir=runs/grpo steps=30

Stage 1, `base` (skipped when `init_from` names a base, reused when run_dir/base already holds a finished one):
SFT of a tiny MLA + MoE + MTP model on synthetic problems answered as
`<think>7*3=21, 12+21=33</think> <answer>33</answer>`, so that sampling has pass@k > 0 and the format.
Stage 2: GRPO, G = 8 samples for each of 8 prompts a step, format + accuracy rewards (equal weights),
Dr.GRPO-style constant normaliser, clip-higher (0.2 / 0.28), k3 KL β = 0.01 to a reference reset every
20 steps, 48 new tokens at temperature 1. Metrics per step in run_dir/metrics.jsonl; curves in
run_dir/curves.png. Task: arithmetic (rl/tasks/arithmetic.py; `accuracy` is its integer match).
"""

from experiments.config import CheckpointConfig, Experiment, RLExperiment
from model.config import tiny_deepseek
from rl.grpo import GRPOConfig
from rl.rollout import Sampling
from rl.tasks import Arithmetic
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig

TEMPLATE = Arithmetic.template


def config() -> RLExperiment:
    model = tiny_deepseek(vocab_size=512, max_seq_len=256)
    return RLExperiment(
        name="grpo_arithmetic",
        model=model,
        task=Arithmetic(),
        base=Experiment(  # SFT that gives the base its answer format
            name="grpo_arithmetic_base", model=model, steps=150, batch_size=16,
            data=DataConfig(kind="sft", source="synthetic", tokenizer="byte", seq_len=128, chat_template=TEMPLATE),
            mesh=MeshConfig(data=-1), optim=OptimConfig(lr=3e-3, warmup_steps=10, schedule="cosine",
                                                        final_lr_frac=0.1),
            checkpoint=CheckpointConfig(every=50, keep=1)),
        prompts=DataConfig(kind="prompts", source="synthetic", tokenizer="byte", chat_template=TEMPLATE, seed=1),
        grpo=GRPOConfig(num_generations=8, prompts_per_step=8,
                        sampling=Sampling(temperature=1.0, max_new_tokens=48),
                        advantage="grpo", loss_agg="seq_mean_token_sum_norm", epsilon_low=0.2, epsilon_high=0.28,
                        beta=0.01, ref_reset_every=20),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=5e-5, warmup_steps=5, schedule="constant", weight_decay=0.0),
        checkpoint=CheckpointConfig(every=10, keep=2),
        max_prompt_len=48, steps=30,
    )
