"""Restore builds its target from shapes and shardings: the peak of live device bytes stays near one state.

What is measured: the bytes that live jax.Arrays occupy on all devices (each array's shard size x the number of
devices holding a shard; `jax.live_arrays()`), sampled every ~0.2 ms by a thread during the restore and once more
when it returns (so the fresh state the old code kept beside the restored one is counted), minus what was live
before. CPU devices report no `memory_stats()`, so this counts jax-owned buffers, not allocator high-water marks.
"""

import gc
import math
import threading
import time
import types

import jax
import numpy as np
import pytest

from model.config import tiny_deepseek
from sharding import MeshConfig, make_mesh
from train.checkpoint import Checkpointer
from train.config import LossConfig, OptimConfig
from train.loop import abstract_state, restore_or_init
from train.step import Trainer


def _device_bytes(arrays) -> int:
    total = 0
    for x in arrays:
        if x.is_deleted():
            continue
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize * len(x.sharding.device_set)
    return total


class _Peak:
    """Max of live device bytes over a block, sampled by a thread."""

    def __enter__(self):
        gc.collect()
        self.base = _device_bytes(jax.live_arrays())
        self.peak, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _device_bytes(jax.live_arrays()))
            time.sleep(2e-4)

    def sample(self):
        self.peak = max(self.peak, _device_bytes(jax.live_arrays()))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


@pytest.fixture(scope="module")
def trainer():
    cfg = tiny_deepseek(vocab_size=128, d_model=64, n_layers=3)
    return Trainer(cfg, OptimConfig(total_steps=10), LossConfig(), make_mesh(MeshConfig(data=2, fsdp=4)))


def test_abstract_state_matches_init_state(trainer):
    real = trainer.init_state(0)
    abstract = abstract_state(trainer)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), jax.tree_util.keystr(path)
        if b.committed:  # init_state's step counter is an uncommitted scalar; restored, it is replicated
            assert a.sharding.is_equivalent_to(b.sharding, len(b.shape)), jax.tree_util.keystr(path)
    assert abstract["step"].sharding.is_fully_replicated


def test_restore_peak_under_1_2x_state(trainer, tmp_path):
    state = trainer.init_state(0)
    state_bytes = _device_bytes(jax.tree.leaves(state))
    want = [np.asarray(x) for x in jax.tree.leaves(state)]
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, {"rng": [0, 0]})
    ckpt.wait()
    del state
    exp = types.SimpleNamespace(seed=0, init_from=None)

    def restore():
        nonlocal restored
        with _Peak() as peak:
            restored = restore_or_init(exp, trainer, ckpt)
            peak.sample()  # everything restore_or_init left alive, before the caller drops anything
        return peak.peak - peak.base

    restored = None
    grown = restore()
    assert restored[3] == 3 and all(np.array_equal(np.asarray(a), b)
                                    for a, b in zip(jax.tree.leaves(restored[0]), want))
    print(f"restore peak {grown / state_bytes:.3f}x the state ({state_bytes} B)")
    assert grown < 1.2 * state_bytes, f"restore peaked at {grown / state_bytes:.2f}x the state ({state_bytes} B)"

    # the measurement bites: the old way (a fresh init_state as the restore target) holds two states
    del restored
    with _Peak() as peak:
        fresh = trainer.init_state(0)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh)
        old = ckpt.restore(target)
        peak.sample()
    print(f"old way {(peak.peak - peak.base) / state_bytes:.3f}x")
    assert peak.peak - peak.base > 1.9 * state_bytes
    del fresh, old
    ckpt.close()
