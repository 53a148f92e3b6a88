"""Tokenizers: a tiny built-in byte tokenizer and Hugging Face `tokenizer.json` files.

Every tokenizer follows the `Tokenizer` protocol:

- `encode(text) -> list[int]` never adds BOS/EOS (the data pipeline adds them);
- `decode(ids, skip_special_tokens=False) -> str`;
- `vocab_size`, `bos_id`, `eos_id`, `pad_id` (`None` where the vocabulary has no such token);
- `special`: ids of the R1 tags '<think>', '</think>', '<answer>', '</answer>' that are single tokens in the vocabulary.

`load_tokenizer('byte')` gives the `ByteTokenizer`; `load_tokenizer(path)` loads a `tokenizer.json` (or a directory
holding one) through the `tokenizers` library.
"""

from __future__ import annotations

import json
import os
import re
from typing import Protocol, runtime_checkable

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special: dict[str, int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then <pad>=256, <bos>=257, <eos>=258, <think>=259, </think>=260, <answer>=261,
    </answer>=262; vocab_size 263.

    `encode` maps the four tag strings in the text to their single ids; '<pad>', '<bos>' and '<eos>' written in text
    stay plain bytes (control tokens never come from text). `decode` writes every special token as its string
    (`skip_special_tokens=True` leaves out <pad>/<bos>/<eos>, never the tags); invalid UTF-8 becomes U+FFFD.
    """

    CONTROL = ("<pad>", "<bos>", "<eos>")

    def __init__(self):
        names = self.CONTROL + TAGS
        self._id_to_str = {256 + i: s for i, s in enumerate(names)}
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.special = {s: 256 + len(self.CONTROL) + i for i, s in enumerate(TAGS)}
        self.vocab_size = 256 + len(names)
        self._tag_re = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._tag_re.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for t in ids:
            t = int(t)
            if 0 <= t < 256:
                buf.append(t)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if t not in self._id_to_str:
                raise ValueError(f"token id {t} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
            s = self._id_to_str[t]
            if not (skip_special_tokens and s in self.CONTROL):
                out.append(s)
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self):
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<bos>", "<s>", "[BOS]", "<|startoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "</s>", "[EOS]", "<|im_end|>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library.

    BOS/EOS/PAD come from the arguments, else from a `tokenizer_config.json` beside the file (`bos_token`,
    `eos_token`, `pad_token`), else from common token names (DeepSeek's '<｜begin▁of▁sentence｜>', '<s>', '</s>',
    '<|endoftext|>', ...). `encode` never adds the post-processor's special tokens. `vocab_size` counts added tokens.
    """

    def __init__(self, path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None):
        from tokenizers import Tokenizer as _HF

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self._tok = _HF.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        cfg = self._read_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self.bos_id = self._pick("bos", bos, cfg.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._pick("eos", eos, cfg.get("eos_token"), _EOS_NAMES)
        self.pad_id = self._pick("pad", pad, cfg.get("pad_token"), _PAD_NAMES)
        self.special = {t: i for t in TAGS if (i := self._tok.token_to_id(t)) is not None}

    @staticmethod
    def _read_config(path):
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        out = {}
        for k in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        return out

    def _pick(self, what, explicit, configured, names):
        if explicit is not None:
            i = self._tok.token_to_id(explicit)
            if i is None:
                raise ValueError(f"{what} token {explicit!r} is not in the vocabulary of {self.path}")
            return int(i)
        for name in ((configured,) if configured else ()) + names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec) -> Tokenizer:
    """'byte' -> ByteTokenizer; a path to a tokenizer.json (or a directory with one) -> HFTokenizer;
    a tokenizer object is returned as is."""
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, Tokenizer):
            return spec
        raise ValueError(f"tokenizer: expected 'byte', a path or a Tokenizer, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def validate_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can produce ids the model's embedding table does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size "
                         f"{model_vocab_size}; use a model with vocab_size >= {tokenizer.vocab_size}")
