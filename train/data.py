"""Data pipelines (grain) for pretraining and SFT: sources, tokenisation, packing, per-process sharding, resume.

    cfg = DataConfig(kind="pretrain", source="synthetic", seq_len=128)
    it = make_iterator(cfg, batch_size=32, tokenizer=load_tokenizer(cfg.tokenizer))
    batch = next(it)          # numpy: inputs/targets/positions/segment_ids int32, loss_mask float32, each [rows, seq_len]
    state = it.get_state()    # JSON-serialisable; it2.set_state(state) continues with identical batches

Batch format (see train/losses.py): each row holds one or more sequences ("segments"); `segment_ids` are 1, 2, ...
per row for real tokens and 0 for padding; `positions` restart at 0 at each segment; `targets[i]` is the token after
`inputs[i]` in the same row; `loss_mask` is 1 where that target is a trained token of the same segment (0 on padding,
at segment ends where the next token starts another document, and on SFT prompt tokens).

Pipeline of one data shard (`num_shards`, one per process by default; a process builds only its own shards):

    records: random access (synthetic | memory | Arrow IPC, memory-mapped)       -- grain.MapDataset.source
               -> shuffle(seed), reshuffled each epoch -> repeat(num_epochs or forever) -> [shard::num_shards]
             or streamed (jsonl | parquet; train/streaming.py): blocks (row groups / 1 MiB byte ranges), shuffled,
               repeated, [shard::num_shards], read CYCLE_LENGTH at a time -> window shuffle (shuffle_window records)
      -> tokenise: pretrain [bos] text [eos], every token but the first is a target;
                   sft [bos] template(prompt) | sep response [eos], targets only on the response part (+ eos)
      -> fit to seq_len + 1 tokens (train/packing.py): pretrain documents that are too long are cut into chunks that overlap by one
         token (every next-token pair is trained exactly once; positions restart in each chunk); SFT examples are
         truncated from the response end (counted in stats 'truncated'), and dropped when the prompt leaves no
         room for a response token (stats 'dropped')
      -> grain.experimental.FirstFitPackIterDataset into rows of seq_len + 1 tokens (whole sequences, never split;
         `pack=False` sets max_sequences_per_bin=1: one sequence per row, padded)
      -> batch(batch_size / num_shards rows) -> shift into inputs/targets
      -> optional grain mp_prefetch (num_workers > 0)

Shard s fills rows [s*r, (s+1)*r) of every global batch (r = batch_size / num_shards), so process p of n holds the
contiguous rows of its shards, as `sharding.distributed.global_batch` expects. The global batches depend on
`num_shards`, not on the number of processes: with `num_shards` fixed, one process reproduces a multi-process run
batch for batch, and a run can resume on a different number of processes.

Packing uses grain's first-fit packer rather than concat-then-split so that short documents (and SFT examples)
stay whole; each row's last token is only a target, which costs nothing because sequences never cross rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import grain
import numpy as np

from train.sources import (  # noqa: F401
    _check,
    _needed_fields,
    load_records,
    stream_files,
)
from train.streaming import list_blocks, read_block, stream_records
from train.packing import ROW_KEYS, FitToRows, ToBatch
from train.tokenizer import Tokenizer, load_tokenizer, validate_vocab  # noqa: F401  (re-exported)

KINDS = ("pretrain", "sft", "prompts")  # prompts: RL prompt/answer records (no batching here)
SOURCES = ("synthetic", "memory", "jsonl", "parquet")
STATE_VERSION = 2  # 2: per-shard states; 1 (one global pipeline) still restores


@dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it becomes batches.

    Parameters:
        kind (`str`, *optional*, defaults to `"pretrain"`):
            `"pretrain"`: next-token prediction on whole documents, packed. `"sft"`: prompt/response pairs rendered
            with `chat_template`; only response tokens (and the final EOS) are trained.
        source (`str`, *optional*, defaults to `"synthetic"`):
            `"synthetic"`: seeded arithmetic documents (`rl.tasks.arithmetic.synthetic_example`); `"memory"`: the `records=` list given
            to `make_iterator` (strings or dicts); `"jsonl"`: one JSON object per line; `"parquet"`: Parquet or
            Arrow files as Hugging Face `datasets` writes them (`to_parquet`, hub `*.parquet`, `save_to_disk`
            `*.arrow`), read with pyarrow.
        path (`str`, *optional*, defaults to `""`):
            File or directory for `"jsonl"` / `"parquet"` sources. A directory is read as all its `*.jsonl`
            (resp. `*.parquet` and `*.arrow`, or the files listed in a `save_to_disk` `state.json`) in name order;
            subdirectories (e.g. DatasetDict splits) are not searched: point at the split's directory.
        text_field (`str`, *optional*, defaults to `"text"`):
            Record field holding a pretraining document (plain string records are documents themselves).
        prompt_field (`str`, *optional*, defaults to `"prompt"`):
            Record field holding the SFT prompt.
        response_field (`str`, *optional*, defaults to `"response"`):
            Record field holding the SFT response.
        tokenizer (`str`, *optional*, defaults to `"byte"`):
            `"byte"` or a path to a `tokenizer.json` (see `train.tokenizer.load_tokenizer`).
        seq_len (`int`, *optional*, defaults to `128`):
            Tokens per row of `inputs` (rows are packed from seq_len + 1 tokens, then shifted).
        shuffle (`bool`, *optional*, defaults to `True`):
            Shuffle records (a new permutation each epoch) and the rows of each packing round.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffles and of the synthetic generator; in [0, 2**32).
        chat_template (`str`, *optional*, defaults to `"User: {prompt}\\nAssistant:"`):
            SFT prompt format with one `{prompt}` field; it ends with the response prefix (R1 style).
        response_sep (`str`, *optional*, defaults to `" "`):
            Text between the rendered template and the response; it belongs to the (trained) response, so a
            generation prompt is exactly `render_prompt(cfg, prompt)`.
        add_bos (`bool`, *optional*, defaults to `True`):
            Start each document / example with the tokenizer's BOS (skipped when it has none).
        pack (`bool`, *optional*, defaults to `True`):
            Pack several sequences per row (first-fit). `False`: one sequence per row, padded.
        num_epochs (`int`, *optional*, defaults to `0`):
            Passes over the records; 0 repeats forever. With a finite count the iterator stops after the last full
            global batch.
        num_workers (`int`, *optional*, defaults to `0`):
            grain worker processes (`mp_prefetch`) per data shard of this process. Workers each pack their own slice
            of the records, so the batch order depends on this number: keep it fixed across a resume (the state
            records it).
        synthetic_size (`int`, *optional*, defaults to `100000`):
            Number of records of the synthetic source (one epoch).
        num_shards (`int`, *optional*, defaults to `0`):
            Data shards, each reading its own share of the records and packing its own rows of every global batch;
            a process reads only its shards. 0: one per process. A multiple of the process count that divides the
            batch size; set it to resume on a different number of processes, or to reproduce a multi-process run
            on one process.
        shuffle_window (`int`, *optional*, defaults to `4096`):
            Records shuffled together in a streamed (JSONL / Parquet) source, after the block order is shuffled;
            random-access sources are shuffled globally and ignore it. 1 turns the window shuffle off.
    """

    kind: str = "pretrain"
    source: str = "synthetic"
    path: str = ""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    tokenizer: str = "byte"
    seq_len: int = 128
    shuffle: bool = True
    seed: int = 0
    chat_template: str = "User: {prompt}\nAssistant:"
    response_sep: str = " "
    add_bos: bool = True
    pack: bool = True
    num_epochs: int = 0
    num_workers: int = 0
    synthetic_size: int = 100_000
    num_shards: int = 0
    shuffle_window: int = 4096

    def __post_init__(self):
        _check(self.kind in KINDS, "data.kind", f"must be one of {KINDS}, got {self.kind!r}")
        _check(self.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {self.source!r}")
        _check(isinstance(self.path, (str, os.PathLike)), "data.path", f"must be a string, got {self.path!r}")
        _check(self.source not in ("jsonl", "parquet") or bool(os.fspath(self.path)), "data.path",
               f"is required for source {self.source!r}")
        for name in ("text_field", "prompt_field", "response_field", "tokenizer"):
            v = getattr(self, name)
            _check(isinstance(v, str) and v != "", f"data.{name}", f"must be a non-empty string, got {v!r}")
        _check(_is_int(self.seq_len) and self.seq_len >= 2, "data.seq_len", f"must be an int >= 2, got {self.seq_len!r}")
        _check(isinstance(self.shuffle, bool), "data.shuffle", f"must be a bool, got {self.shuffle!r}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**32, "data.seed",
               f"must be an int in [0, 2**32), got {self.seed!r}")
        _check(isinstance(self.chat_template, str), "data.chat_template", "must be a string")
        try:
            self.chat_template.format(prompt="x")
            ok = "{prompt}" in self.chat_template
        except (KeyError, IndexError, ValueError):
            ok = False
        _check(ok, "data.chat_template",
               f"must be a format string whose only field is {{prompt}}, got {self.chat_template!r}")
        _check(isinstance(self.response_sep, str), "data.response_sep", "must be a string")
        _check(isinstance(self.add_bos, bool), "data.add_bos", f"must be a bool, got {self.add_bos!r}")
        _check(isinstance(self.pack, bool), "data.pack", f"must be a bool, got {self.pack!r}")
        _check(_is_int(self.num_epochs) and self.num_epochs >= 0, "data.num_epochs",
               f"must be an int >= 0, got {self.num_epochs!r}")
        _check(_is_int(self.num_workers) and self.num_workers >= 0, "data.num_workers",
               f"must be an int >= 0, got {self.num_workers!r}")
        _check(_is_int(self.synthetic_size) and self.synthetic_size >= 1, "data.synthetic_size",
               f"must be an int >= 1, got {self.synthetic_size!r}")
        _check(_is_int(self.num_shards) and self.num_shards >= 0, "data.num_shards",
               f"must be an int >= 0 (0: one per process), got {self.num_shards!r}")
        _check(_is_int(self.shuffle_window) and self.shuffle_window >= 1, "data.shuffle_window",
               f"must be an int >= 1, got {self.shuffle_window!r}")


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def render_prompt(cfg: DataConfig, prompt: str) -> str:
    """The SFT prompt text (without BOS) that precedes `cfg.response_sep + response`."""
    return cfg.chat_template.format(prompt=prompt)


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation and fitting to rows


class _Encode:
    """record -> {'tokens': int32 [n], 'mask': int32 [n]}; mask[j] = 1 when token j is a trained target."""

    def __init__(self, cfg: DataConfig, tok: Tokenizer):
        self.cfg, self.tok = cfg, tok
        self.bos = [tok.bos_id] if cfg.add_bos and tok.bos_id is not None else []

    def __call__(self, rec):
        cfg, tok = self.cfg, self.tok
        if not isinstance(rec, str):
            for k, name in _needed_fields(cfg).items():
                if not isinstance(rec.get(k), str):
                    raise ValueError(f"{name}: record field {k!r} must be a string, got {rec.get(k)!r:.80}")
        if cfg.kind == "pretrain":
            text = rec if isinstance(rec, str) else rec[cfg.text_field]
            ids = self.bos + tok.encode(text) + [tok.eos_id]
            mask = np.ones(len(ids), np.int32)
            mask[0] = 0
        else:
            prompt = self.bos + tok.encode(render_prompt(cfg, rec[cfg.prompt_field]))
            resp = tok.encode(cfg.response_sep + rec[cfg.response_field]) + [tok.eos_id]
            ids = prompt + resp
            mask = np.zeros(len(ids), np.int32)
            mask[len(prompt):] = 1
            mask[0] = 0
        return {"tokens": np.asarray(ids, np.int32), "mask": mask}


def _records(cfg: DataConfig, records, shard: int, num_shards: int) -> grain.IterDataset:
    """The raw records of one shard (see the module doc)."""
    files = stream_files(cfg)
    if files is not None:
        fields = _needed_fields(cfg)
        blocks = list_blocks(files, fields)
        # fail now, naming the field, rather than inside a prefetch thread; and an empty source would spin forever
        _check(any(read_block(b, fields) for b in blocks), "data.source",
               f"{cfg.source!r} gave no records ({cfg.path})")
        _check(not cfg.num_epochs or len(blocks) * cfg.num_epochs >= num_shards, "data.num_shards",
               f"{num_shards} shards but {cfg.path} holds {len(blocks)} blocks x {cfg.num_epochs} epochs: a shard "
               "would read nothing (fewer shards, more epochs, or smaller Parquet row groups)")
        return stream_records(blocks, fields, shard=shard, num_shards=num_shards, shuffle=cfg.shuffle,
                              seed=cfg.seed, num_epochs=cfg.num_epochs, shuffle_window=cfg.shuffle_window)
    ds = grain.MapDataset.source(load_records(cfg, records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs or None)[shard::num_shards]
    # One reader thread: grain's default (16 threads, 500 buffered) costs more in bookkeeping than it saves here.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=32))


def build_dataset(cfg: DataConfig, rows: int, tokenizer: Tokenizer, records: Sequence | None = None,
                  shard: int = 0, num_shards: int = 1) -> grain.IterDataset:
    """The grain pipeline of shard `shard` of `num_shards`: batches of its `rows` rows. See the module doc."""
    _check(_is_int(rows) and rows >= 1, "batch_size", f"must give an int >= 1 rows per shard, got {rows!r}")
    _check(tokenizer.eos_id is not None, "tokenizer", f"{tokenizer!r} has no EOS token")
    ds = _records(cfg, records, shard, num_shards).map(_Encode(cfg, tokenizer))
    length = cfg.seq_len + 1
    it = FitToRows(ds, length, chunk=cfg.kind == "pretrain")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={k: length for k in ROW_KEYS},
        num_packing_bins=max(rows, 32) if cfg.pack else rows,
        seed=cfg.seed + shard,
        shuffle_bins=cfg.shuffle,
        meta_features=ROW_KEYS[1:],
        padding_struct={"tokens": pad, "mask": 0, "trunc": 0, "drop": 0},
        max_sequences_per_bin=None if cfg.pack else 1,
    )
    it = it.batch(rows, drop_remainder=True).map(ToBatch())
    if cfg.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (jax-stack.md §4)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    else:  # prepare the next batches in a thread while the training step runs
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)
    return it


# The per-process iterator (shards, stats, checkpoint state) lives in train/data_iterator.py; re-exported here.
from train.data_iterator import DataIterator, make_iterator  # noqa: E402,F401
