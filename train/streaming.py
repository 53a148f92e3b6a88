"""JSONL and Parquet records as a stream: each data shard reads only its own blocks, in bounded memory, resumably.

A file source is cut into blocks, listed from file sizes and Parquet metadata alone (no record is read to plan):
a Parquet row group, or a byte range of `JSONL_BLOCK_BYTES` of a JSONL file (a block owns the lines that start in
its range, as Hadoop splits text). The records of one data shard (train/data.py; one per process by default) are

    blocks -> shuffle(seed), reshuffled each epoch -> repeat(num_epochs or forever) -> blocks[shard::num_shards]
      -> read each block -> interleave CYCLE_LENGTH blocks -> grain WindowShuffle(shuffle_window records)

which is MaxText's grain Parquet pipeline (files -> shuffle -> shard by host -> ParquetIterDataset -> interleave ->
window shuffle) with blocks in place of files, so that a single large file still spreads over every process. A
process holds at most CYCLE_LENGTH blocks and one shuffle window of records; the iterator state (which block, where
in it, the window's start) is grain's and JSON-serialisable. With `shuffle=False` the blocks are read in file order,
one at a time. Arrow IPC files (`datasets.save_to_disk`) are memory-mapped instead: random access costs no memory
beyond the OS page cache (train/sources.py).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import grain

JSONL_BLOCK_BYTES = 1 << 20
CYCLE_LENGTH = 8


@dataclass(frozen=True)
class Block:
    """One unit of reading: row group `index` of a Parquet file, or the lines of a JSONL file starting in
    bytes [start, end)."""

    path: str
    index: int = 0
    start: int = 0
    end: int = 0


def _check_columns(fn: str, names: list[str], fields: dict[str, str]) -> None:
    for k, name in fields.items():
        if k not in names:
            raise ValueError(f"{name}: file {fn} has no column {k!r} (columns: {names})")


def list_blocks(files: list[str], fields: dict[str, str]) -> list[Block]:
    """The blocks of `files` (all *.jsonl or all *.parquet), in file order. Parquet schemas are checked for
    `fields` ({column: config field name}) here, before any training starts."""
    blocks = []
    for fn in files:
        if fn.endswith(".parquet"):
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(fn).metadata
            _check_columns(fn, meta.schema.to_arrow_schema().names, fields)
            blocks += [Block(fn, index=g) for g in range(meta.num_row_groups) if meta.row_group(g).num_rows]
        else:
            size = os.path.getsize(fn)
            blocks += [Block(fn, start=s, end=min(s + JSONL_BLOCK_BYTES, size))
                       for s in range(0, size, JSONL_BLOCK_BYTES)]
    return blocks


def read_block(block: Block, fields: dict[str, str]) -> list[dict]:
    """The records of one block as dicts holding `fields`; a malformed line or missing field is a ValueError
    naming the file and byte offset."""
    if block.path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(block.path).read_row_group(block.index, columns=list(fields)).to_pylist()
    out = []
    with open(block.path, "rb") as f:
        if block.start:  # the line that straddles `start` belongs to the previous block
            f.seek(block.start - 1)
            f.readline()
        while (offset := f.tell()) < block.end:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            where = f"{block.path} (byte {offset})"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for k, name in fields.items():
                if not isinstance(rec.get(k), str):
                    raise ValueError(f"{name}: {where}: needs a string field {k!r} (fields: {sorted(rec)})")
            out.append({k: rec[k] for k in fields})
    return out


class _BlockIterator(grain.DatasetIterator):
    """The records of one block; read on first use, so that planning an interleave cycle costs no I/O."""

    def __init__(self, block: Block, fields: dict[str, str]):
        super().__init__()
        self._block, self._fields = block, fields
        self._records: list[dict] | None = None
        self._pos = 0

    def __next__(self):
        if self._records is None:
            self._records = read_block(self._block, self._fields)
        if self._pos >= len(self._records):
            raise StopIteration
        self._pos += 1
        return self._records[self._pos - 1]

    def get_state(self):
        return {"pos": self._pos}

    def set_state(self, state):
        self._pos = int(state["pos"])


class BlockRecords(grain.IterDataset):
    def __init__(self, block: Block, fields: dict[str, str]):
        super().__init__()
        self._block, self._fields = block, fields

    def __iter__(self):
        return _BlockIterator(self._block, self._fields)


def stream_records(blocks: list[Block], fields: dict[str, str], *, shard: int, num_shards: int, shuffle: bool,
                   seed: int, num_epochs: int, shuffle_window: int) -> grain.IterDataset:
    """The record stream of data shard `shard` of `num_shards` (see the module doc)."""
    ds = grain.MapDataset.source(blocks)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs or None)[shard::num_shards]
    ds = ds.map(functools.partial(BlockRecords, fields=fields))  # picklable, for grain worker processes
    it = grain.experimental.InterleaveIterDataset(ds, cycle_length=CYCLE_LENGTH if shuffle else 1)
    if shuffle and shuffle_window > 1:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed + shard)
    return it
