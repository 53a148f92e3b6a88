"""One rollout path: encode prompts, sample with the shared forward, decode, extract answers.

    from rl.rollout import Sampling, rollout
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=48)
    out = rollout(cfg, params, ["...User: 3 +1=? ... Assistant:"], s, tokenizer, rng=key, repeat=8)
    out.texts[i], out.answers[i], out.tokens [n * repeat, max_new_tokens], out.logprobs, out.lengths, out.truncated

The GRPO loop (rl/loop.py), held-out evaluation (rl/evaluate.py) and trace collection (rl/traces.py) all call
`rollout`, so what evaluation scores is what training optimises: the same BOS, stop strings, think prefix and
decoding. A completion's text is the decoded tokens after the rendered prompt, EOS removed, with `think_prefix`
prepended when the rendered prompt itself ends with it (a template that opens the <think> for the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from rl.reward_inputs import extract_answer
from rl.sampler import generate
from sharding.distributed import to_host

__all__ = ["PendingRollout", "Rollout", "Sampling", "encode_prompts", "finish_rollout", "launch_rollout", "rollout"]


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled. temperature > 0 (log-probs are reported at it); top_p 1 and top_k 0 are off;
    greedy takes the argmax. Generation stops at EOS or after any of `stop` (strings, encoded by the tokenizer);
    `add_bos` prepends the tokenizer's BOS to each prompt; `think_prefix` is prepended to a completion whose
    rendered prompt ends with it ('' never). `streams`: row groups decoded side by side on host threads
    (`rl.sampler.resolve_streams`; None = auto: 2 on CPU, 1 on accelerators; the samples do not depend on it)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    stop: tuple[str, ...] = ("</answer>",)
    think_prefix: str = "<think>"
    add_bos: bool = True
    greedy: bool = False
    streams: int | None = None

    def __post_init__(self):
        def check(ok, name, msg):
            if not ok:
                raise ValueError(f"sampling.{name}: {msg}")
        check(self.temperature > 0, "temperature", f"must be > 0 (greedy=True for argmax), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", f"must be non-empty strings, got {self.stop}")
        check(self.streams is None or (isinstance(self.streams, int) and self.streams >= 1), "streams",
              f"must be None (auto) or an int >= 1, got {self.streams!r}")


@dataclass
class Rollout:
    """Sampled completions, one row per (record, repeat): row r belongs to record r // repeat."""

    prompts: np.ndarray  # int32 [rows, max_prompt_len], right-padded
    prompt_lens: np.ndarray  # int32 [rows]
    tokens: np.ndarray  # int32 [rows, max_new_tokens], pad after the end
    logprobs: np.ndarray  # float32 [rows, max_new_tokens], at the sampling temperature, 0 after the end
    lengths: np.ndarray  # int32 [rows], generated tokens including EOS / the stop sequence
    truncated: np.ndarray  # bool [rows]
    texts: list[str]  # the completions as scored
    answers: list[str | None]  # extracted answers
    routing: np.ndarray | None = None  # with_routing: int32 [rows, P + max_new_tokens, n_moe_layers, k]
    floors: np.ndarray | None = None  # float32 [rows, max_new_tokens]: the sampling filter (SampleOutput.floors)
    kept_logprobs: np.ndarray | None = None  # float32 [rows, max_new_tokens], renormalised over the kept tokens


def encode_prompts(tokenizer, texts: Sequence[str], width: int, bos: bool = True):
    """Right-padded int32 [len(texts), width] and lengths; prompts longer than `width` keep their end."""
    ids = [([tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []) + tokenizer.encode(t) for t in texts]
    ids = [x[-width:] for x in ids]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = np.full((len(ids), width), pad, np.int32)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x
    return out, np.asarray([len(x) for x in ids], np.int32)


def _batch_multiple(mesh, rules) -> int:
    """Rows per call must divide over the mesh's batch axes."""
    if mesh is None:
        return 1
    from sharding import DEFAULT_RULES
    from sharding.rules import spec_for
    spec = spec_for(("batch",), rules or DEFAULT_RULES, mesh)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(math.prod(mesh.shape[a] for a in axes))


def _streams(streams: int | None, rows: int) -> int | None:
    """sampling.streams for a call of `rows` rows: a fixed count that does not divide them falls back to the largest
    one that does (the last call is padded to the same size, so this is the same for every call)."""
    return streams if streams is None else max(s for s in range(1, streams + 1) if rows % s == 0)


def rollout(cfg, params, prompt_texts: Sequence[str], sampling: Sampling, tokenizer, *, rng=None, repeat: int = 1,
            max_prompt_len: int | None = None, batch_size: int | None = None, mesh=None, rules=None,
            extract: Callable[[Any], str | None] = extract_answer, with_routing: bool = False) -> Rollout:
    """`repeat` samples of each rendered prompt in `prompt_texts`.

    Prompts are right-padded to `max_prompt_len` tokens (default: the longest; longer ones keep their end). Rows go
    through `rl.sampler.generate` `batch_size` at a time (default all at once), the last call padded so every call
    has one shape and compiles once; with `mesh`, the call size is rounded up to a multiple of the data-parallel
    size. `rng` (default key 0) is folded with the call index when there are several calls. `with_routing` (MoE)
    keeps the experts every token chose (`rl.sampler.SampleOutput.routing`).
    """
    return finish_rollout(launch_rollout(cfg, params, prompt_texts, sampling, tokenizer, rng=rng, repeat=repeat,
                                         max_prompt_len=max_prompt_len, batch_size=batch_size, mesh=mesh,
                                         rules=rules, extract=extract, with_routing=with_routing))


@dataclass
class PendingRollout:
    """Sampling dispatched to the devices and not yet waited for (JAX dispatches asynchronously): `finish_rollout`
    blocks on it. Lets the GRPO loop sample step k+1 while step k trains (grpo.off_policy_steps). On one CPU
    device dispatch is synchronous (model/host_memory.py), so the sampling has already run when this returns."""

    outs: list  # per generate call: a SampleOutput of device arrays
    takes: list[int]
    texts: list[str]
    rows: np.ndarray
    prompts: np.ndarray
    lens: np.ndarray
    sampling: Sampling
    tokenizer: Any
    extract: Callable


def launch_rollout(cfg, params, prompt_texts: Sequence[str], sampling: Sampling, tokenizer, *, rng=None,
                   repeat: int = 1, max_prompt_len: int | None = None, batch_size: int | None = None, mesh=None,
                   rules=None, extract: Callable[[Any], str | None] = extract_answer,
                   with_routing: bool = False) -> PendingRollout:
    """`rollout`'s first half: encode and dispatch every generate call, without waiting for any."""
    texts = list(prompt_texts)
    if not texts:
        raise ValueError("rollout: no prompts")
    if repeat < 1:
        raise ValueError(f"rollout: repeat must be >= 1, got {repeat}")
    bos = sampling.add_bos
    if max_prompt_len is None:
        max_prompt_len = max(len(tokenizer.encode(t)) for t in texts) + int(bos and tokenizer.bos_id is not None)
    prompts, lens = encode_prompts(tokenizer, texts, int(max_prompt_len), bos=bos)
    rows = np.repeat(np.arange(len(texts)), repeat)
    n_rows = len(rows)
    mult = _batch_multiple(mesh, rules)
    bs = -(-min(int(batch_size or n_rows), n_rows) // mult) * mult
    rng = jax.random.key(0) if rng is None else rng
    stop = tuple(tuple(tokenizer.encode(s)) for s in sampling.stop)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outs, takes = [], []
    for b, start in enumerate(range(0, n_rows, bs)):
        idx = rows[start:start + bs]
        idx = np.concatenate([idx, np.full(bs - len(idx), idx[-1])])  # pad the last call: same shape every call
        key = rng if bs >= n_rows else jax.random.fold_in(rng, b)
        outs.append(generate(cfg, params, prompts[idx], lens[idx], sampling.max_new_tokens, sampling.temperature,
                             key, top_k=sampling.top_k, top_p=sampling.top_p, greedy=sampling.greedy,
                             eos_id=tokenizer.eos_id, stop_sequences=stop, pad_id=pad,
                             vocab_limit=tokenizer.vocab_size, mesh=mesh, rules=rules, with_routing=with_routing,
                             streams=_streams(sampling.streams, bs)))
        takes.append(min(bs, n_rows - start))
    return PendingRollout(outs, takes, texts, rows, prompts, lens, sampling, tokenizer, extract)


def finish_rollout(p: PendingRollout) -> Rollout:
    """`rollout`'s second half: wait for the samples, decode them, extract the answers."""
    parts = [[None if x is None else np.asarray(x)[:take] for x in to_host(out)] for out, take in zip(p.outs, p.takes)]
    tokens, logprobs, lengths, truncated, routing, floors, kept = (
        None if x[0] is None else np.concatenate(x) for x in zip(*parts))
    tok, sampling, rows, texts = p.tokenizer, p.sampling, p.rows, p.texts
    eos = tok.eos_id
    prefix = [sampling.think_prefix if sampling.think_prefix and t.rstrip().endswith(sampling.think_prefix) else ""
              for t in texts]
    decoded = [prefix[rows[r]] + tok.decode([int(t) for t in tokens[r][:lengths[r]] if t != eos],
                                            skip_special_tokens=False) for r in range(len(rows))]
    # np.array copies: device_get's arrays are read-only, and dynamic sampling overwrites groups in place
    return Rollout(prompts=np.array(p.prompts[rows]), prompt_lens=np.array(p.lens[rows]), tokens=np.array(tokens),
                   logprobs=np.array(logprobs, np.float32), lengths=np.array(lengths),
                   truncated=np.array(truncated), texts=decoded, answers=[p.extract(c) for c in decoded],
                   routing=None if routing is None else np.array(routing),
                   floors=None if floors is None else np.array(floors, np.float32),
                   kept_logprobs=None if kept is None else np.array(kept, np.float32))
