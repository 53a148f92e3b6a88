"""This process's batches of the data pipeline (train/data.py): its data shards' rows of every global batch, their
statistics, and the iterator state a checkpoint saves (per shard, gathered from every process).

    it = make_iterator(cfg, batch_size=32)   # cfg: train.data.DataConfig
    batch = next(it)                         # this process's rows [batch_size / process_count, seq_len]
    state = it.get_state()                   # JSON; it2.set_state(state) continues with identical batches
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from train.data import STATE_VERSION, DataConfig, _check, _is_int, build_dataset
from train.tokenizer import Tokenizer, load_tokenizer


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("utf-8")
    return x


class DataIterator:
    """Iterator of this process's rows of each global batch, with `get_state` / `set_state` for checkpoints.

    The process builds the pipelines of its data shards only (`shards`) and concatenates their rows. `stats` counts
    over this process's rows so far: batches, sequences (segments), loss_tokens, pad_tokens (padding positions in
    inputs), truncated and dropped SFT examples.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, tokenizer: Tokenizer, records=None,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        _check(_is_int(process_count) and process_count >= 1, "process_count", f"must be >= 1, got {process_count!r}")
        _check(_is_int(process_index) and 0 <= process_index < process_count, "process_index",
               f"must be in [0, {process_count}), got {process_index!r}")
        _check(_is_int(batch_size) and batch_size >= 1 and batch_size % process_count == 0, "batch_size",
               f"the global batch size {batch_size!r} must be a positive multiple of process_count {process_count}")
        n = cfg.num_shards or process_count
        _check(n % process_count == 0, "data.num_shards",
               f"{n} shards cannot be split evenly over {process_count} processes")
        _check(batch_size % n == 0, "batch_size",
               f"the global batch size {batch_size} must be a multiple of data.num_shards {n}")
        self.cfg, self.batch_size, self.tokenizer = cfg, batch_size, tokenizer
        self.process_index, self.process_count, self.num_shards = process_index, process_count, n
        local = n // process_count
        self.shards = tuple(range(process_index * local, (process_index + 1) * local))
        self._its = [iter(build_dataset(cfg, batch_size // n, tokenizer, records, s, n)) for s in self.shards]
        # Close prefetch threads / worker processes before interpreter teardown (grain's __del__ is noisy then).
        self._finalizer = weakref.finalize(self, _close_iterators, self._its)
        self._stats = [self._zero_stats() for _ in self.shards]

    @staticmethod
    def _zero_stats():
        return {"batches": 0, "sequences": 0, "loss_tokens": 0, "pad_tokens": 0, "truncated": 0, "dropped": 0}

    @property
    def stats(self) -> dict[str, int]:
        out = {k: sum(s[k] for s in self._stats) for k in self._zero_stats()}
        out["batches"] = self._stats[0]["batches"]
        return out

    def _fingerprint(self):
        c = self.cfg
        return {"kind": c.kind, "source": c.source, "seq_len": c.seq_len, "seed": c.seed, "shuffle": c.shuffle,
                "pack": c.pack, "num_workers": c.num_workers, "batch_size": self.batch_size,
                "num_shards": self.num_shards, "shuffle_window": c.shuffle_window}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        for it, s in zip(self._its, self._stats):
            g = next(it)
            seg = g["segment_ids"]
            s["batches"] += 1
            s["sequences"] += int(seg.max(axis=1).sum())
            s["loss_tokens"] += int(g["loss_mask"].sum())
            s["pad_tokens"] += int((seg == 0).sum())
            s["truncated"] += int(g["_truncated"])
            s["dropped"] += int(g["_dropped"])
            parts.append(g)
        if len(parts) == 1:
            return {k: v for k, v in parts[0].items() if not k.startswith("_")}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if not k.startswith("_")}

    def get_state(self) -> dict[str, Any]:
        """The state of every shard (JSON). On several processes this gathers the other processes' shards, so
        every process must call it (as every process takes part in a checkpoint save)."""
        shards = {str(i): {"pipeline": _jsonable(it.get_state()), "stats": dict(st)}
                  for i, it, st in zip(self.shards, self._its, self._stats)}
        if self.process_count > 1:
            from sharding.distributed import all_gather_json

            shards = {k: v for part in all_gather_json(shards) for k, v in part.items()}
        return {"version": STATE_VERSION, "config": self._fingerprint(), "shards": shards}

    def set_state(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        _check(version in (1, STATE_VERSION), "state", f"unknown data state version {version!r}")
        if version == 1:  # one pipeline of the global batch: the same as one shard
            state = {"config": {**state["config"], "num_shards": 1},
                     "shards": {"0": {"pipeline": state["pipeline"], "stats": state["stats"]}}}
        mine = self._fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        _check(not diff, "state", "saved with a different data setup (saved, now): "
               + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
               + ("; set data.num_shards to the saved value to resume on another number of processes"
                  if "num_shards" in diff else ""))
        for i, it in zip(self.shards, self._its):
            it.set_state(state["shards"][str(i)]["pipeline"])
        self._stats = [{**self._zero_stats(), **state["shards"][str(i)]["stats"]} for i in self.shards]

    def close(self):
        self._finalizer()


def _close_iterators(its):
    for it in its:
        _close_iterator(it)


def _close_iterator(it):
    close = getattr(it, "close", None)
    if close is not None:
        close()


def make_iterator(cfg: DataConfig, batch_size: int, tokenizer: Tokenizer | str | None = None, records=None,
                  process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """This process's batches: rows [i*B/n, (i+1)*B/n) of each global batch of `batch_size` rows, read and packed
    by this process's data shards alone.

    `tokenizer` defaults to `load_tokenizer(cfg.tokenizer)`; `records` feeds source 'memory'; process index and
    count default to jax.process_index() / jax.process_count().
    """
    tok = load_tokenizer(cfg.tokenizer if tokenizer is None else tokenizer)
    return DataIterator(cfg, batch_size, tok, records, process_index, process_count)
