"""Where records come from: the synthetic arithmetic task's generator (rl/tasks/arithmetic.py) and the JSONL /
Parquet / Arrow file readers.

    recs = load_records(cfg)                 # random-access Sequence of strings or dicts, validated
    files = stream_files(cfg)                # JSONL / Parquet files that training pipelines stream instead

`load_records` checks that the records carry the fields `cfg.kind` needs (see `DataConfig`, train/data.py); it holds
a JSONL or Parquet source whole in memory, which suits prompt sets (rl/prompts.py), while the pretraining / SFT
pipeline streams those files block by block (train/streaming.py). Tokenisation, packing and batching live in
train/data.py.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from train.data import DataConfig


def _check(ok, name, msg):
    if not ok:
        raise ValueError(f"{name}: {msg}")


class _Synthetic(Sequence):
    def __init__(self, cfg: DataConfig):
        self._seed, self._n = cfg.seed, cfg.synthetic_size
        self._keys = {"text": cfg.text_field, "prompt": cfg.prompt_field, "response": cfg.response_field,
                      "answer": "answer"}

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        from rl.tasks.arithmetic import synthetic_example  # the task owns its generator
        if not 0 <= i < self._n:
            raise IndexError(i)
        return {self._keys[k]: v for k, v in synthetic_example(self._seed, i).items()}


# ----------------------------------------------------------------------------------------------------------------
# File sources


def _files(path: str, patterns: tuple[str, ...]) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data file or directory not found: {path}")
    state = os.path.join(path, "state.json")  # datasets.save_to_disk
    if ".arrow" in "".join(patterns) and os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f).get("_data_files", [])]
        if names:
            return [os.path.join(path, n) for n in names]
    files = sorted(f for p in patterns for f in glob.glob(os.path.join(path, p)))
    if not files:
        raise FileNotFoundError(f"no {' or '.join(patterns)} files in data directory: {path}")
    return files


def _read_jsonl(path: str, fields: dict[str, str]) -> list[dict]:
    from train.streaming import list_blocks, read_block

    files = _files(path, ("*.jsonl",))
    return [rec for block in list_blocks(files, fields) for rec in read_block(block, fields)]


def stream_files(cfg: DataConfig) -> list[str] | None:
    """The files a training pipeline streams in blocks (train/streaming.py): JSONL, and Parquet unless the
    directory holds Arrow IPC files, which are memory-mapped and read by random access. None for in-memory and
    synthetic sources."""
    if cfg.source not in ("jsonl", "parquet"):
        return None
    path = os.fspath(cfg.path)
    files = _files(path, ("*.jsonl",) if cfg.source == "jsonl" else ("*.parquet", "*.arrow"))
    if cfg.source == "parquet":
        kinds = {fn.endswith(".parquet") for fn in files}
        _check(len(kinds) == 1, "data.path", f"{path} mixes .parquet and .arrow files: point it at one kind")
        if not kinds.pop():
            return None
    return files


def _read_arrow_table(fn: str, fields: dict[str, str]):
    """The `fields` columns of a Parquet file or an Arrow IPC stream/file (memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fn.endswith(".parquet"):
        names = pq.read_schema(fn).names
    else:
        source = pa.memory_map(fn, "r")
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
        names = table.column_names
    for k, name in fields.items():
        _check(k in names, name, f"file {fn} has no column {k!r} (columns: {names})")
    return pq.read_table(fn, columns=list(fields)) if fn.endswith(".parquet") else table.select(list(fields))


class _ArrowRecords(Sequence):
    """Random access to the needed columns of a pyarrow Table; rows come back as dicts."""

    def __init__(self, path: str, fields: dict[str, str]):
        import pyarrow as pa

        tables = [_read_arrow_table(fn, fields) for fn in _files(path, ("*.parquet", "*.arrow"))]
        self._table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self._cols = {k: self._table.column(k) for k in fields}

    def __len__(self):
        return self._table.num_rows

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return {k: c[i].as_py() for k, c in self._cols.items()}


def _needed_fields(cfg: DataConfig) -> dict[str, str]:
    if cfg.kind == "pretrain":
        return {cfg.text_field: "data.text_field"}
    if cfg.kind == "prompts":
        return {cfg.prompt_field: "data.prompt_field", "answer": "answer"}
    return {cfg.prompt_field: "data.prompt_field", cfg.response_field: "data.response_field"}


def load_records(cfg: DataConfig, records: Sequence | None = None) -> Sequence:
    """The records of `cfg.source` as a random-access sequence (strings or dicts).

    Raises FileNotFoundError for a missing path and ValueError when records lack the configured fields.
    """
    fields = _needed_fields(cfg)
    if cfg.source == "memory":
        _check(records is not None, "records", "source 'memory' needs records=[...] (strings or dicts)")
        recs = records
    else:
        _check(records is None, "records", f"records= is only used with source 'memory', not {cfg.source!r}")
        if cfg.source == "synthetic":
            recs = _Synthetic(cfg)
        elif cfg.source == "jsonl":
            recs = _read_jsonl(os.fspath(cfg.path), fields)
        else:
            recs = _ArrowRecords(os.fspath(cfg.path), fields)
    _check(len(recs) > 0, "data.source", f"{cfg.source!r} gave no records" + (f" ({cfg.path})" if cfg.path else ""))
    if cfg.source == "memory":
        for i, rec in enumerate(recs):
            _check_record(cfg, rec, i)
    else:
        _check_record(cfg, recs[0], 0)
    return recs


def _check_record(cfg: DataConfig, rec, index):
    if isinstance(rec, str):
        _check(cfg.kind == "pretrain", "records", f"record {index} is a string; SFT needs dicts with "
               f"{cfg.prompt_field!r} and {cfg.response_field!r}")
        return
    _check(isinstance(rec, dict), "records", f"record {index} must be a string or dict, got {type(rec).__name__}")
    for k, name in _needed_fields(cfg).items():
        _check(k in rec, name, f"record {index} has no field {k!r} (fields: {sorted(rec)})")
        _check(isinstance(rec[k], str), name, f"record {index} field {k!r} must be a string, got "
               f"{type(rec[k]).__name__}")
