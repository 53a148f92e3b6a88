"""Pretrain a tiny DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP) on a synthetic arithmetic corpus.

    python -m experiments.run experiments/tiny_pretrain.py run_dir=runs/tiny steps=150

Model: d_model 128, 4 layers (first dense, then MoE with 1 shared + 16 routed experts, top-4 of 4 groups
limited to 2), MLA with q/kv compression, MTP depth 1 (λ = 0.3), aux-loss-free balancing (γ = 1e-3) plus the
sequence-wise balance loss (α = 1e-4). ~1.8M parameters, ~0.95M active per token. Byte-level tokens,
packed 128-token rows, batch 16. AdamW 3e-3, warmup 20, cosine to 10 %. Under 2 minutes on 2 cores.
"""

from experiments.config import CheckpointConfig, Experiment
from model.config import tiny_deepseek
from sharding.mesh import MeshConfig
from train.config import LossConfig, OptimConfig
from train.data import DataConfig


def config() -> Experiment:
    return Experiment(
        name="tiny_pretrain",
        model=tiny_deepseek(vocab_size=512, max_seq_len=512),
        data=DataConfig(kind="pretrain", source="synthetic", tokenizer="byte", seq_len=128, seed=0),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=20, schedule="cosine", final_lr_frac=0.1, weight_decay=0.1),
        loss=LossConfig(),
        checkpoint=CheckpointConfig(every=50, keep=3),
        steps=150,
        batch_size=16,
    )
