"""Data pipelines (grain) for pretraining and SFT: sources, tokenisation, packing, per-process sharding, resume.

    cfg = DataConfig(kind="pretrain", source="synthetic", seq_len=128)
    it = make_iterator(cfg, batch_size=32, tokenizer=load_tokenizer(cfg.tokenizer))
    batch = next(it)          # numpy: inputs/targets/positions/segment_ids int32, loss_mask float32, each [rows, seq_len]
    state = it.get_state()    # JSON-serialisable; it2.set_state(state) continues with identical batches

Batch format (see train/losses.py): each row holds one or more sequences ("segments"); `segment_ids` are 1, 2, ...
per row for real tokens and 0 for padding; `positions` restart at 0 at each segment; `targets[i]` is the token after
`inputs[i]` in the same row; `loss_mask` is 1 where that target is a trained token of the same segment (0 on padding,
at segment ends where the next token starts another document, and on SFT prompt tokens).

Pipeline (the same for every process; each process keeps its slice of the global batch):

    records (synthetic | memory | jsonl | parquet/arrow)  -- grain.MapDataset.source
      -> shuffle(seed) per epoch (reshuffled each epoch) -> repeat(num_epochs or forever)
      -> tokenise: pretrain [bos] text [eos], every token but the first is a target;
                   sft [bos] template(prompt) | sep response [eos], targets only on the response part (+ eos)
      -> fit to seq_len + 1 tokens: pretrain documents that are too long are cut into chunks that overlap by one
         token (every next-token pair is trained exactly once; positions restart in each chunk); SFT examples are
         truncated from the response end (counted in stats 'truncated'), and dropped when the prompt leaves no
         room for a response token (stats 'dropped')
      -> grain.experimental.FirstFitPackIterDataset into rows of seq_len + 1 tokens (whole sequences, never split;
         `pack=False` sets max_sequences_per_bin=1: one sequence per row, padded)
      -> batch(global batch) -> shift into inputs/targets
      -> optional grain mp_prefetch (num_workers > 0)

Packing uses grain's first-fit packer rather than concat-then-split so that short documents (and SFT examples)
stay whole; each row's last token is only a target, which costs nothing because sequences never cross rows.
"""

from __future__ import annotations

import glob
import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from train.tokenizer import Tokenizer, load_tokenizer, validate_vocab  # noqa: F401  (re-exported)

KINDS = ("pretrain", "sft", "prompts")  # prompts: RL prompt/answer records (no batching here)
SOURCES = ("synthetic", "memory", "jsonl", "parquet")
STATE_VERSION = 1


def _check(ok, name, msg):
    if not ok:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it becomes batches.

    Parameters:
        kind (`str`, *optional*, defaults to `"pretrain"`):
            `"pretrain"`: next-token prediction on whole documents, packed. `"sft"`: prompt/response pairs rendered
            with `chat_template`; only response tokens (and the final EOS) are trained.
        source (`str`, *optional*, defaults to `"synthetic"`):
            `"synthetic"`: seeded arithmetic documents (`synthetic_example`); `"memory"`: the `records=` list given
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
            grain worker processes (`mp_prefetch`). Workers each pack their own slice of the records, so the batch
            order depends on this number: keep it fixed across a resume (the state records it).
        synthetic_size (`int`, *optional*, defaults to `100000`):
            Number of records of the synthetic source (one epoch).
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


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def render_prompt(cfg: DataConfig, prompt: str) -> str:
    """The SFT prompt text (without BOS) that precedes `cfg.response_sep + response`."""
    return cfg.chat_template.format(prompt=prompt)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic arithmetic

_OPS = "+-*"


def _operand(rng, op):
    return int(rng.integers(0, 13)) if op == "*" else int(rng.integers(0, 100))


def _apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def synthetic_problem(rng) -> tuple[str, list[str], int]:
    """(expression, reasoning steps, value) of a random 2- or 3-term integer expression with + - *."""
    n = 2 if rng.random() < 0.5 else 3
    ops = [_OPS[int(rng.integers(0, 3))] for _ in range(n - 1)]
    nums = [_operand(rng, ops[0])] + [_operand(rng, op) for op in ops]
    expr = "".join(f"{x}{op}" for x, op in zip(nums, ops)) + str(nums[-1])
    if n == 2:
        v = _apply(nums[0], ops[0], nums[1])
        return expr, [f"{expr}={v}"], v
    a, b, c = nums
    o1, o2 = ops
    if o2 == "*" and o1 != "*":  # precedence: b*c first
        t = b * c
        v = _apply(a, o1, t)
        return expr, [f"{b}*{c}={t}", f"{a}{o1}{t}={v}"], v
    t = _apply(a, o1, b)
    v = _apply(t, o2, c)
    return expr, [f"{a}{o1}{b}={t}", f"{t}{o2}{c}={v}"], v


def synthetic_example(seed: int, index: int) -> dict[str, str]:
    """Record `index` of the synthetic source: deterministic in (seed, index).

    Keys: 'text' (1-8 lines like 'Q: 12+7*3=? A: 33'), 'prompt' ('What is 12+7*3?'),
    'response' ('<think>7*3=21, 12+21=33</think> <answer>33</answer>') and 'answer' ('33').
    """
    rng = np.random.default_rng([int(seed), int(index)])
    lines = []
    for _ in range(int(rng.integers(1, 9))):
        expr, _, v = synthetic_problem(rng)
        lines.append(f"Q: {expr}=? A: {v}")
    expr, steps, v = synthetic_problem(rng)
    return {"text": "\n".join(lines), "prompt": f"What is {expr}?",
            "response": f"<think>{', '.join(steps)}</think> <answer>{v}</answer>", "answer": str(v)}


class _Synthetic(Sequence):
    def __init__(self, cfg: DataConfig):
        self._seed, self._n = cfg.seed, cfg.synthetic_size
        self._keys = {"text": cfg.text_field, "prompt": cfg.prompt_field, "response": cfg.response_field,
                      "answer": "answer"}

    def __len__(self):
        return self._n

    def __getitem__(self, i):
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
    out = []
    for fn in _files(path, ("*.jsonl",)):
        with open(fn, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{fn}:{lineno}: invalid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{fn}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                for k, name in fields.items():
                    _check(isinstance(rec.get(k), str), name,
                           f"{fn}:{lineno}: needs a string field {k!r} (fields: {sorted(rec)})")
                out.append({k: rec[k] for k in fields})
    return out


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


_ROW_KEYS = ("tokens", "mask", "trunc", "drop")


class _FitIterDataset(grain.IterDataset):
    """Makes every sequence fit a row of `length` tokens (see module doc); adds per-sequence counters 'trunc' and
    'drop' as arrays that are zero but for their first element, so they survive packing and batching."""

    def __init__(self, parent, length: int, chunk: bool):
        super().__init__(parent)
        self._length, self._chunk = length, chunk

    def __iter__(self):
        return _FitIterator(self._parent.__iter__(), self._length, self._chunk)


class _FitIterator(grain.DatasetIterator):
    def __init__(self, parent, length, chunk):
        super().__init__(parent)
        self._length, self._chunk = length, chunk
        self._pending: list[dict] = []
        self._doc_state = None  # parent state before the document whose pieces are pending
        self._taken = 0

    def _pieces(self, el):
        tokens, mask, n, L = el["tokens"], el["mask"], len(el["tokens"]), self._length
        if n <= L:
            spans, trunc = [(0, n)], 0
        elif self._chunk:  # chunks overlap by one token: the last target of one is the first input of the next
            spans, trunc = [(s, min(s + L, n)) for s in range(0, n - 1, L - 1)], 0
        else:
            spans, trunc = [(0, L)], 1
        out = []
        for s, e in spans:
            m = mask[s:e].copy()
            m[0] = 0
            if not m.any():
                continue
            z = np.zeros(e - s, np.int32)
            t = z.copy()
            t[0] = trunc
            out.append({"tokens": tokens[s:e], "mask": m, "trunc": t, "drop": z})
        return out

    def __next__(self):
        dropped = 0
        while not self._pending:
            self._doc_state = self._parent.get_state()
            self._taken = 0
            self._pending = self._pieces(next(self._parent))
            dropped += not self._pending
        piece = self._pending.pop(0)
        self._taken += 1
        if dropped:
            piece["drop"] = piece["drop"].copy()
            piece["drop"][0] = dropped
        return piece

    def get_state(self):
        if self._pending:
            return {"parent": self._doc_state, "taken": self._taken}
        return {"parent": self._parent.get_state(), "taken": 0}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending, self._taken, self._doc_state = [], 0, state["parent"]
        if state["taken"]:
            self._pending = self._pieces(next(self._parent))[state["taken"]:]
            self._taken = state["taken"]


class _ToBatch:
    """Packed rows [B, seq_len + 1] -> the training batch dict (global)."""

    def __call__(self, b):
        tokens, seg, pos = b["tokens"], b["tokens_segment_ids"], b["tokens_positions"]
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
        return {
            "inputs": np.ascontiguousarray(tokens[:, :-1], np.int32),
            "targets": np.ascontiguousarray(tokens[:, 1:], np.int32),
            "loss_mask": (b["mask"][:, 1:] * same).astype(np.float32),
            "positions": np.ascontiguousarray(pos[:, :-1], np.int32),
            "segment_ids": np.ascontiguousarray(seg[:, :-1], np.int32),
            "_truncated": np.asarray(b["trunc"].sum(), np.int64),
            "_dropped": np.asarray(b["drop"].sum(), np.int64),
        }


def build_dataset(cfg: DataConfig, batch_size: int, tokenizer: Tokenizer,
                  records: Sequence | None = None) -> grain.IterDataset:
    """The grain pipeline of global batches (every process builds the same one). See the module doc."""
    _check(_is_int(batch_size) and batch_size >= 1, "batch_size", f"must be an int >= 1, got {batch_size!r}")
    _check(tokenizer.eos_id is not None, "tokenizer", f"{tokenizer!r} has no EOS token")
    recs = load_records(cfg, records)
    ds = grain.MapDataset.source(recs)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs or None).map(_Encode(cfg, tokenizer))
    length = cfg.seq_len + 1
    # One reader thread: grain's default (16 threads, 500 buffered) costs more in bookkeeping than it saves here.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=32))
    it = _FitIterDataset(ds, length, chunk=cfg.kind == "pretrain")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={k: length for k in _ROW_KEYS},
        num_packing_bins=max(batch_size, 32) if cfg.pack else batch_size,
        seed=cfg.seed,
        shuffle_bins=cfg.shuffle,
        meta_features=_ROW_KEYS[1:],
        padding_struct={"tokens": pad, "mask": 0, "trunc": 0, "drop": 0},
        max_sequences_per_bin=None if cfg.pack else 1,
    )
    it = it.batch(batch_size, drop_remainder=True).map(_ToBatch())
    if cfg.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (jax-stack.md §4)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    else:  # prepare the next batches in a thread while the training step runs
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=2)
    return it


# ----------------------------------------------------------------------------------------------------------------
# The iterator


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

    `stats` (also part of the state) counts over the global batches so far: batches, sequences (segments),
    loss_tokens, pad_tokens (padding positions in inputs), truncated and dropped SFT examples.
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
        self.cfg, self.batch_size, self.tokenizer = cfg, batch_size, tokenizer
        self.process_index, self.process_count = process_index, process_count
        rows = batch_size // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)
        self._dataset = build_dataset(cfg, batch_size, tokenizer, records)
        self._it = iter(self._dataset)
        # Close prefetch threads / worker processes before interpreter teardown (grain's __del__ is noisy then).
        self._finalizer = weakref.finalize(self, _close_iterator, self._it)
        self.stats = self._zero_stats()

    @staticmethod
    def _zero_stats():
        return {"batches": 0, "sequences": 0, "loss_tokens": 0, "pad_tokens": 0, "truncated": 0, "dropped": 0}

    def _fingerprint(self):
        c = self.cfg
        return {"kind": c.kind, "source": c.source, "seq_len": c.seq_len, "seed": c.seed, "shuffle": c.shuffle,
                "pack": c.pack, "num_workers": c.num_workers, "batch_size": self.batch_size}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        g = next(self._it)
        seg = g["segment_ids"]
        s = self.stats
        s["batches"] += 1
        s["sequences"] += int(seg.max(axis=1).sum())
        s["loss_tokens"] += int(g["loss_mask"].sum())
        s["pad_tokens"] += int((seg == 0).sum())
        s["truncated"] += int(g["_truncated"])
        s["dropped"] += int(g["_dropped"])
        return {k: v[self._rows] for k, v in g.items() if not k.startswith("_")}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self._fingerprint(), "stats": dict(self.stats),
                "pipeline": _jsonable(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        _check(state.get("version") == STATE_VERSION, "state", f"unknown data state version {state.get('version')!r}")
        mine = self._fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        _check(not diff, "state", "saved with a different data setup (saved, now): "
               + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._it.set_state(state["pipeline"])
        self.stats = {**self._zero_stats(), **state["stats"]}

    def close(self):
        self._finalizer()


def _close_iterator(it):
    close = getattr(it, "close", None)
    if close is not None:
        close()


def make_iterator(cfg: DataConfig, batch_size: int, tokenizer: Tokenizer | str | None = None, records=None,
                  process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """This process's batches: rows [i*B/n, (i+1)*B/n) of each global batch of `batch_size` rows.

    `tokenizer` defaults to `load_tokenizer(cfg.tokenizer)`; `records` feeds source 'memory'; process index and
    count default to jax.process_index() / jax.process_count().
    """
    tok = load_tokenizer(cfg.tokenizer if tokenizer is None else tokenizer)
    return DataIterator(cfg, batch_size, tok, records, process_index, process_count)
