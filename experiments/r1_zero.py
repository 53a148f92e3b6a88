"""R1-Zero at laptop scale: pretrain a tiny DeepSeek-V3-style base, then GRPO with rule rewards only.

    python -m experiments.run experiments/r1_zero.py run_dir=runs/r1_zero

Task: digit chains (rl/tasks.py), a worksheet of signed steps summed mod 10, 2-6 terms:
"3 +1=? -2=? +2=?  (mod 10)". The base is trained on problems of which 30 % carry worked reasoning
(`<think>3 +1=4 -2=2 +2=4</think> <answer>4</answer>`) and the rest only the answer
(`<think></think> <answer>4</answer>`): every written step is an easy fact whose inputs sit at fixed distances,
while a direct answer to a long chain is a guess, so reasoning pays and the base has pass@k >> pass@1.
RL: R1's prompt template (shortened: see TEMPLATE), format + accuracy rewards with equal weight, G = 8,
Dr.GRPO (mean-centred advantages, constant normaliser), no KL penalty (β = 0, TRL's default; KL to the base is still
measured, log_kl), clip 0.2 / 0.28, temperature 1.
The held-out set (disjoint seed) is evaluated before and after RL: run_dir/eval_start.json, eval_end.json.
A finished base in run_dir/base is reused.
"""

import dataclasses
import os

from experiments.config import CheckpointConfig, Experiment, RLExperiment
from model.config import tiny_deepseek
from rl.grpo import GRPOConfig
from rl.rollout import Sampling
from rl.tasks import digit_chain_corpus, digit_chain_prompts
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig

# R1's template without its instruction preamble (~400 byte-level tokens a prompt for a tiny model);
# the tags are taught by the pretraining corpus instead (rl.tasks.R1_TEMPLATE has the full text)
TEMPLATE = "User: {prompt} Assistant:"
TRAIN_SEED, HELD_OUT_SEED = 1, 2
BASE_STEPS, BASE_DOCS, REASON_PROB = 400, 60_000, 0.3
EVAL_PROBLEMS, EVAL_K = 96, 8


def config() -> RLExperiment:
    return RLExperiment(
        name="r1_zero",
        model=tiny_deepseek(vocab_size=512, max_seq_len=512),
        prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template=TEMPLATE),
        grpo=GRPOConfig(num_generations=8, prompts_per_step=16,
                        sampling=Sampling(temperature=1.0, max_new_tokens=40),
                        advantage="dr_grpo", loss_agg="seq_mean_token_sum_norm", epsilon_low=0.2,
                        epsilon_high=0.28, beta=0.0, log_kl=True),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=1e-4, warmup_steps=5, schedule="constant", weight_decay=0.0),
        checkpoint=CheckpointConfig(every=20, keep=2),
        rewards=("format", "accuracy"), reward_weights=(1.0, 1.0),
        max_prompt_len=56, steps=60,
    )


def base_experiment(exp: RLExperiment, run_dir: str) -> Experiment:
    return Experiment(
        name="r1_zero_base", model=exp.model, run_dir=run_dir, steps=BASE_STEPS, batch_size=16,
        data=DataConfig(kind="sft", source="memory", tokenizer="byte", seq_len=256, seed=TRAIN_SEED,
                        chat_template=TEMPLATE),
        mesh=exp.mesh, optim=OptimConfig(lr=3e-3, warmup_steps=20, schedule="cosine", final_lr_frac=0.1),
        checkpoint=CheckpointConfig(every=100, keep=1), tensorboard=exp.tensorboard, progress=exp.progress)


def train_prompts() -> list[dict]:
    return digit_chain_prompts(TRAIN_SEED + 100, 20_000)


def held_out() -> list[dict]:
    return digit_chain_prompts(HELD_OUT_SEED, EVAL_PROBLEMS)


def ensure_base(exp: RLExperiment, base_dir: str | None = None) -> str:
    """Pretrain the base into base_dir (default run_dir/base), or resume / reuse a finished one there."""
    from train.loop import pretrain
    base_dir = base_dir or os.path.join(exp.directory, "base")
    corpus = digit_chain_corpus(TRAIN_SEED, BASE_DOCS, REASON_PROB)
    pretrain(base_experiment(exp, base_dir), records=corpus)
    return base_dir


def main(exp: RLExperiment) -> None:
    from rl.loop import grpo

    if not exp.init_from:
        exp = dataclasses.replace(exp, init_from=ensure_base(exp))
    grpo(exp, records=train_prompts(), eval_records=held_out(), eval_k=EVAL_K)
