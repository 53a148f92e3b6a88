"""Fitting tokenised sequences to packed rows, and rows to training batches (the middle of train/data.py's pipeline).

`FitToRows` makes every sequence fit a row of seq_len + 1 tokens (pretraining documents cut into chunks that
overlap by one token, SFT examples truncated or dropped, with per-sequence counters); `ToBatch` shifts packed rows
[B, seq_len + 1] into inputs / targets / loss_mask / positions / segment_ids.
"""

from __future__ import annotations

import grain
import numpy as np


ROW_KEYS = ("tokens", "mask", "trunc", "drop")


class FitToRows(grain.IterDataset):
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


class ToBatch:
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
