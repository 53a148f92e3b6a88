"""Reading untrusted reward inputs: batch-field coercion, the never-raise reward wrapper, answer extraction.

Shared by every reward (`rl.rewards`, `rl.verifiers`) and the scoring worker (`rl.sandbox`). A completion may be a str,
a chat message {'content': str} or a list of messages; batch fields may be per completion or shared by the batch
(see `_column`). Everything here is linear-time and total: garbage in gives None / 0.0, never an exception.
"""

from __future__ import annotations

import logging
import math

__all__ = ["ANSWER_WINDOW", "SandboxError", "extract_answer"]

logger = logging.getLogger(__name__)

ANSWER_WINDOW = 10_000  # extract_answer looks only at the last this many characters




class SandboxError(RuntimeError):
    """The scoring sandbox could not be set up (a resource limit or the audit hook failed). The one error a reward
    raises instead of scoring 0.0: a run must not train on rewards that nothing scored."""


# ----------------------------------------------------------------------------------------------------------------
# Input coercion


def _text(c) -> str | None:
    """The completion's text: a str, a chat message {'content': str}, or a list of messages (the last one counts)."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        c = c.get("content")
        return c if isinstance(c, str) else None
    if isinstance(c, (list, tuple)) and c:
        return _text(c[-1])
    return None


def _completions(completions) -> list:
    if completions is None or isinstance(completions, (str, bytes, dict)):
        return [completions] if completions is not None else []
    try:
        return list(completions)
    except Exception:
        return []


def _is_seq(x) -> bool:
    return not isinstance(x, (str, bytes, dict)) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _column(value, n: int, *, nested: bool = False) -> list:
    """`value` as one entry per completion: a per-completion sequence of length n is used as is; a scalar (or, when
    `nested`, a flat sequence of scalars) is shared by all; a length-1 sequence is broadcast; anything else -> None."""
    if value is None:
        return [None] * n
    if not _is_seq(value):
        return [value] * n
    try:
        seq = list(value)
    except Exception:
        return [None] * n
    if nested and not any(_is_seq(v) for v in seq):
        return [seq] * n
    if len(seq) == n:
        return seq
    if len(seq) == 1:
        return seq * n
    return [None] * n


def _finite(x) -> float:
    try:
        x = float(x)
    except Exception:
        return 0.0
    return x if math.isfinite(x) else 0.0


def _guarded(fn):
    """Make a reward never raise: any exception gives 0.0 for the whole batch; outputs become finite floats."""

    def wrapper(completions, *args, **kwargs):
        items = _completions(completions)
        try:
            out = fn(items, *args, **kwargs)
            out = [_finite(v) for v in out]
            if len(out) != len(items):
                raise ValueError(f"{fn.__name__} returned {len(out)} values for {len(items)} completions")
            return out
        except SandboxError:
            raise
        except Exception:
            logger.warning("reward %s failed; scoring the batch 0.0", getattr(fn, "__name__", fn), exc_info=True)
            return [0.0] * len(items)

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction


def extract_answer(text) -> str | None:
    """Stripped content of the LAST complete `<answer>...</answer>` within the last `ANSWER_WINDOW` characters of
    `text`; None if there is none (or `text` is not a str). Linear time (two `rfind`s, no regex)."""
    text = _text(text)
    if text is None:
        return None
    s = text[-ANSWER_WINDOW:]
    end = s.rfind("</answer>")
    if end < 0:
        return None
    start = s.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return s[start + len("<answer>"):end].strip()
