"""One process of the 2-process test: trains 2 steps of a tiny DeepSeek on a 4-device data x fsdp mesh.

usage: python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
With NUM_PROCESSES=1 it runs alone on 4 local devices (the reference).
"""

import json
import sys

import jax

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
local = 4 // nproc
if nproc > 1:
    from sharding.distributed import initialize
    initialize(f"127.0.0.1:{port}", nproc, pid, local_device_count=local)
else:
    jax.config.update("jax_num_cpu_devices", local)

import numpy as np  # noqa: E402

from model.config import tiny_deepseek  # noqa: E402
from sharding import MeshConfig, batch_sharding, make_mesh  # noqa: E402
from sharding.distributed import global_batch, process_slice  # noqa: E402
from train.config import LossConfig, OptimConfig  # noqa: E402
from train.step import Trainer  # noqa: E402

cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=1, mtp_depth=0)  # one dense MLA layer: fast to compile
mesh = make_mesh(MeshConfig(data=2, fsdp=2))
trainer = Trainer(cfg, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), LossConfig(), mesh)
state = trainer.init_state(0)
toks = np.random.RandomState(0).randint(0, 64, (8, 17)).astype(np.int32)
full = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
rows = process_slice(8)
batch = global_batch({k: v[rows] for k, v in full.items()}, batch_sharding(mesh))
losses = []
for _ in range(2):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
if pid == 0:
    with open(out, "w") as fh:
        json.dump({"losses": losses, "processes": jax.process_count(), "devices": jax.device_count()}, fh)
