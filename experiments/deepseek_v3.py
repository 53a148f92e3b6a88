"""DeepSeek-V3 (671B total / 37B active) pretraining on 2,048 GPUs: the published model, for planning.

    python -m experiments.plan experiments/deepseek_v3.py --tokens 14.8e12

This file exists to set our planner's figures beside the V3 technical report (arXiv:2412.19437); it is not
meant to be run here (data is a synthetic placeholder, and a run needs 2,048 accelerators).

Model: `model.config.deepseek_v3_671b()` as published (61 layers, first 3 dense; d 7168; 128 heads; MLA
d_c 512 / d'_c 1536 / rope 64; 1 shared + 256 routed experts of FFN 2048, top-8 in 4 of 8 groups; MTP D=1;
float32 master parameters, bf16 compute), planned at max_seq_len=4096: its RoPE carries the released YaRN
(factor 40) config, which at a 4K context is off (`RopeConfig.active`), as V3 pretrained at 4K without the
extension (§4.3); YaRN changes neither the parameter count nor the FLOPs. Remat: 'block'
(keep each layer's input, recompute the layer in the backward). V3 (§3.2.3) recomputes only RMSNorm and the
MLA up-projections, but it holds 4 layers per pipeline stage; without a pipeline axis every device holds all
61 layers' activations, and the planner puts 'dots' at ~119 GiB per device against ~57 GiB in all for
'block' (11 GiB of activations: the kept layer inputs plus one layer recomputed with its gradients; figures
with the preset's dtypes as of this writing, float32 master parameters and moments), under the H800's 80 GB
with room for the XLA temporaries the planner does not model.

MoE: impl='capacity' with capacity_factor 1.25 over all-to-all (model/expert_parallel.py). V3 itself drops no
tokens, but our exact dropless path under expert parallelism needs worst-case static buffers (n slots per
expert: 107 GiB per device, does not fit) and 'dense' computes all 256 experts on every token (86 GiB, 32x
the routed FLOPs); with 1.25 slack per expert and the aux-loss-free balancing keeping loads near the mean,
few pairs drop (the train step reports the fraction as 'moe_dropped').

Mesh (2,048 devices = 256 nodes x 8 H800). V3 used 16-way pipeline parallelism, 64-way expert parallelism
across 8 nodes and ZeRO-1 data parallelism, no tensor parallelism (§3.2). Our axes are data, fsdp, tensor,
expert (no pipeline axis), so: expert=64 (routed experts 256/64 = 4 per device, as in V3), fsdp=16 and
tensor=2 in place of pipeline x ZeRO (parameters and optimizer state sharded along `embed`, heads 2-way);
data=-1 resolves to 1. The batch is sharded over data·fsdp·expert = 1,024 devices. Tensor=2 costs
tensor-parallel collectives V3 avoided, but with tensor=1 the `heads`-sharded MLA up-projections (q_b_proj,
kv_b_proj) are replicated on every device (12.6 GiB with float32 parameters, 3x that with their moments), and
`mesh.fsdp=32 mesh.tensor=1 batch_size=16384 loss.micro_batches=8` plans at ~92 GiB: it does not fit.

Batch: V3 ramps 3,072 -> 15,360 sequences of 4K over the first 469B tokens; we use the final 15,360 (62.9M
tokens) in 15 micro-batches of one sequence per batch-parallel device (the accumulation holds a second
gradient tree, which the planner counts). Optimizer (§4.2): AdamW β (0.9, 0.95), weight decay 0.1, peak lr
2.2e-4 after 2K warmup steps, clip 1.0; V3 holds the peak to 10T tokens then decays by cosine to 2.2e-5 —
our 'cosine' schedule with final_lr_frac 0.1 over the whole run is the nearest built-in shape. Steps: 14.8T
tokens / 62.9M.
"""

PLAN_ONLY = True  # experiments.run refuses it: python -m experiments.plan experiments/deepseek_v3.py

import math

from experiments.config import CheckpointConfig, Experiment
import dataclasses

from model.config import deepseek_v3_671b
from sharding.mesh import MeshConfig
from train.config import LossConfig, OptimConfig
from train.data import DataConfig

SEQ_LEN = 4096
BATCH_SIZE = 15360  # sequences: V3's batch, 15 micro-batches of one sequence on 1,024 batch-parallel devices
TOKENS = 14.8e12

# What the V3 technical report states, for the planner to print beside its own figures.
REFERENCE = {
    "source": "DeepSeek-V3 Technical Report (arXiv:2412.19437), Table 1 and §1, §4.2",
    "total_params": 671e9,
    "active_params": 37e9,
    "tokens": 14.8e12,
    "gpu_hours": 2.664e6,  # H800 GPU-hours, pre-training
    "total_gpu_hours": 2.788e6,  # incl. 119K context extension + 5K post-training
    "fp8_gpu_flops": 1979e12,  # H800 SXM5 FP8 dense peak: V3 ran most GEMMs in FP8
}


def _model():
    # Pretraining context 4K: at or below YaRN's original 4096 RopeConfig.active turns YaRN off, as V3 (§4.3)
    # pretrained without the extension (the preset's 163840 is the extended context).
    cfg = deepseek_v3_671b(max_seq_len=SEQ_LEN)
    return cfg.replace(remat="block", moe=dataclasses.replace(cfg.moe, impl="capacity", capacity_factor=1.25))


def config() -> Experiment:
    return Experiment(
        name="deepseek_v3",
        model=_model(),
        data=DataConfig(kind="pretrain", source="synthetic", tokenizer="byte", seq_len=SEQ_LEN, seed=0),
        mesh=MeshConfig(data=-1, fsdp=16, tensor=2, expert=64),
        optim=OptimConfig(lr=2.2e-4, warmup_steps=2000, schedule="cosine", final_lr_frac=0.1, b1=0.9, b2=0.95,
                          weight_decay=0.1, clip_norm=1.0),
        loss=LossConfig(micro_batches=15),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        steps=math.ceil(TOKENS / (BATCH_SIZE * SEQ_LEN)),
        batch_size=BATCH_SIZE,
    )
