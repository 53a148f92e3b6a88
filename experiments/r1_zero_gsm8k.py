"""R1-Zero at cluster scale: GRPO with rule rewards only, from a Qwen2.5 base checkpoint, on GSM8K.

    python -m experiments.run experiments/r1_zero_gsm8k.py init_from=/ckpt/Qwen2.5-1.5B \\
        prompts.path=/data/gsm8k/train.parquet task.eval_path=/data/gsm8k/test.parquet run_dir=/shared/runs/r1z_gsm8k

Inputs (all local: a cluster node usually cannot reach the Hub; download beforehand, e.g.
`huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir /ckpt/Qwen2.5-1.5B` and the `openai/gsm8k` `main`
split files):
- `init_from`: a Hugging Face checkpoint directory (config.json + *.safetensors, single or sharded) of the
  Llama / Qwen2 / Qwen3 family; Qwen2.5-0.5B / 1.5B are the intended bases. The architecture is read from its
  config.json (`model_from_checkpoint`): of `model.*`, only `compute_dtype` (bfloat16 by default),
  `param_dtype` (float32 master weights) and `remat` are taken from the experiment; other `model.*` overrides
  are replaced by the checkpoint's values. `rl.loop.load_base_params` loads the weights (`model.hf.load_hf`).
- Tokenizer: the checkpoint's tokenizer.json (and its tokenizer_config.json for EOS/PAD) unless
  `prompts.tokenizer=/path/to/tokenizer.json` names another.
- `prompts.path`: GSM8K's train split, Parquet (as on the Hub) or JSONL (`{"question", "answer"}` per line),
  a file or a directory of such files. The file type follows the extension (.parquet/.arrow or .jsonl/.json);
  a directory is read as `prompts.source`. GSM8K's 'answer' is a worked solution ending in `#### 72`;
  `rl.tasks.gsm8k_gold` reduces it to the final number ('1,234' -> '1234'); a row without one is an error naming it.
- `task.eval_path`: the held-out split (GSM8K test), evaluated before the first and after the last step into
  run_dir/eval_start.json and eval_end.json (pass@1 averaged over `eval.k` = 4 samples at T = 0.6, top-p 0.95,
  unbiased pass@k, maj@k, response length, think usage): 1,319 × 4 generations each time. `eval.problems=N`
  keeps the first N rows (0 skips evaluation); `eval.k=16` tightens pass@1. A held-out answer is judged by the
  task's correctness, math-verify, as in training; maj@k votes by numeric value (rl/tasks/gsm8k.py).

Recipe (DeepSeek-R1 §2.2, with Dr.GRPO's unbiased objective; documented choices):
- R1's full template (the task's, rl.tasks.R1_TEMPLATE): the tags are asked for only there and taught by the format
  reward.
- Rewards: format (exactly `<think>…</think> <answer>…</answer>`) + math-verify accuracy of the last <answer>
  against the gold number, equal weights, as R1-Zero (no neural reward model).
- G = 8 samples for each of 64 prompts a step (512 rollouts), up to 1,024 new tokens at temperature 1,
  4 optimizer mini-batches per rollout batch (one pass, μ = 1), clip 0.2 / 0.28 (clip-higher, as r1_zero.py).
- β = 0: no KL term and no reference model, per Dr.GRPO (Liu et al. 2025) and TRL's default; it saves the
  reference copy and a scoring pass. Dr.GRPO's mean-only advantages and constant-normaliser aggregation
  remove GRPO's length and difficulty biases. DeepSeek's original objective is
  `grpo.advantage=grpo grpo.loss_agg=seq_mean_token_mean grpo.beta=0.001 grpo.ref_reset_every=400`.
- AdamW lr 1e-6, constant after 10 warm-up steps, no weight decay; 300 steps (~2.6 epochs of GSM8K's 7,473).

Cluster (docs/clusters.md): `rl.loop.grpo` calls `sharding.distributed.initialize()`, so the same command on
every host joins one job (SLURM's `srun`, or R1JAX_COORDINATOR / R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID);
every host reads the same files (a shared filesystem) and draws the same prompt order. The default mesh
is `fsdp=-1` (parameters, gradients and AdamW state sharded over all devices, the rollout batch split over
them); on several nodes, `mesh.data=<nodes> mesh.fsdp=<gpus per node>` keeps the parameter gathers within a
node. The rollout batch (prompts_per_step × G) and each mini-batch must divide over data × fsdp.

    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
    srun python -m experiments.run experiments/r1_zero_gsm8k.py init_from=/ckpt/Qwen2.5-1.5B \\
        prompts.path=/data/gsm8k/train.parquet task.eval_path=/data/gsm8k/test.parquet \\
        run_dir=/shared/runs/r1z_gsm8k mesh.data=2 mesh.fsdp=8

Runs resume from the newest checkpoint in run_dir (the same command again); eval_start.json is written only
by a fresh run. Memory levers: `grpo.mini_batches` (rollouts per optimizer step), `model.remat`,
`grpo.sampling.max_new_tokens`, `max_prompt_len`.
"""

import dataclasses
import json
import os

from experiments.config import CheckpointConfig, EvalConfig, RLExperiment
from model.config import ModelConfig, qwen2_5_0_5b
from rl.grpo import GRPOConfig
from rl.rollout import Sampling
from rl.tasks import GSM8K
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig

# prompts.tokenizer's default: the tokenizer.json of the `init_from` checkpoint directory
TOKENIZER_FROM_CHECKPOINT = "init_from"


def config() -> RLExperiment:
    return RLExperiment(
        name="r1_zero_gsm8k",
        # placeholder of the right family and size class: main() replaces the architecture with the checkpoint's
        model=qwen2_5_0_5b().replace(compute_dtype="bfloat16", param_dtype="float32", remat="block"),
        task=GSM8K(eval_path="data/gsm8k/test.parquet"),
        eval=EvalConfig(problems=1319, k=4),  # GSM8K's whole test split
        prompts=DataConfig(kind="prompts", source="parquet", path="data/gsm8k/train.parquet",
                           prompt_field=GSM8K.prompt_field, tokenizer=TOKENIZER_FROM_CHECKPOINT,
                           chat_template=GSM8K.template),
        grpo=GRPOConfig(num_generations=8, prompts_per_step=64,
                        sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=1024),
                        advantage="dr_grpo", loss_agg="seq_mean_token_sum_norm", epsilon_low=0.2,
                        epsilon_high=0.28, beta=0.0, mini_batches=4),
        mesh=MeshConfig(data=1, fsdp=-1),
        optim=OptimConfig(lr=1e-6, warmup_steps=10, schedule="constant", weight_decay=0.0, clip_norm=1.0),
        checkpoint=CheckpointConfig(every=25, keep=2),
        max_prompt_len=384,  # R1's template (~95 Qwen tokens) + GSM8K's longest questions (~200 tokens)
        steps=300,
    )


# ---- the run ------------------------------------------------------------------------------------------------------

def model_from_checkpoint(path: str, like: ModelConfig) -> ModelConfig:
    """The architecture of the HF checkpoint at `path`, with `like`'s dtypes and remat policy."""
    from model.hf_config import config_from_hf

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file) or not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(f"init_from={path!r}: not a Hugging Face checkpoint directory "
                                "(config.json and *.safetensors)")
    with open(cfg_file) as fh:
        hf = json.load(fh)
    cfg = config_from_hf(hf, param_dtype=like.param_dtype, compute_dtype=like.compute_dtype)
    return cfg.replace(remat=like.remat)


def resolve(exp: RLExperiment) -> RLExperiment:
    """The experiment as it runs: the checkpoint's architecture and tokenizer, prompts handed over in memory
    (`prompts.path` is kept in config.json as the record of where they came from)."""
    if not exp.init_from:
        raise ValueError("init_from: set it to a Hugging Face checkpoint directory, e.g. init_from=/ckpt/Qwen2.5-1.5B")
    p = exp.prompts
    tokenizer = exp.init_from if p.tokenizer == TOKENIZER_FROM_CHECKPOINT else p.tokenizer
    return dataclasses.replace(exp, model=model_from_checkpoint(exp.init_from, exp.model),
                               prompts=dataclasses.replace(p, source="memory", tokenizer=tokenizer))


def main(exp: RLExperiment) -> dict:
    """Resolve the checkpoint's architecture and tokenizer, then GRPO on GSM8K (train rows from prompts.path,
    held-out rows from task.eval_path)."""
    from rl.loop import grpo

    return grpo(resolve(exp))  # the task reads prompts.path itself (source 'memory' keeps the path)
