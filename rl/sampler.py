"""Batched generation with a KV cache, on the same `model.forward` as training.

    from rl.sampler import generate
    out = generate(cfg, params, prompts, prompt_lens, max_new_tokens=64, temperature=1.0, rng=jax.random.key(0))
    # out.tokens int32 [batch, max_new_tokens], out.logprobs float32 [batch, max_new_tokens],
    # out.lengths int32 [batch], out.truncated bool [batch]

Prompts arrive right-padded with their lengths; they are shifted to the right edge (left padding, pad
slots at position -1, which attention never sees), so every row writes its next token into the same cache
slot. Prefill is one forward over the prompts; decoding is a `lax.while_loop` inside the same jit that
stops early once every row has finished (EOS or a stop sequence), in phases over a growing cache
(`decode_phases`). Log-probs are those of the sampled
token under softmax(logits / temperature) over the full vocabulary — what a teacher-forced pass at the
same temperature computes (`rl.logprobs`), whatever top-k/top-p filtering chose the token. The pieces,
`prefill`, `sample_token` and `decode_step`, are public so that benchmarks time them without a copy.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model import forward, grow_cache, init_cache
from model.config import ModelConfig
from sharding.rules import use_rules


class SampleOutput(NamedTuple):
    tokens: jax.Array  # int32 [batch, max_new_tokens], pad_id after the end
    logprobs: jax.Array  # float32 [batch, max_new_tokens], 0 after the end
    lengths: jax.Array  # int32 [batch], generated tokens including EOS / the stop sequence
    truncated: jax.Array  # bool [batch], True if max_new_tokens ran out first
    # with_routing (MoE): int32 [batch, P + max_new_tokens, n_moe_layers, k], the experts each input token chose,
    # laid out as the teacher-forced pass sees its inputs: [left-aligned prompt | completion]
    routing: jax.Array | None = None
    # the sampling filter (top-k / top-p / vocab limit) of each step as a floor: the kept tokens are those whose
    # logit / temperature >= floor (float32 [batch, max_new_tokens]; -inf when nothing was filtered by value), and
    # the sampled token's log-prob renormalised over them (float32 [batch, max_new_tokens])
    floors: jax.Array | None = None
    kept_logprobs: jax.Array | None = None


def left_align(prompts, prompt_lens):
    """Right-padded prompts [batch, P] -> (left-padded tokens, positions with -1 on pads)."""
    b, p = prompts.shape
    shift = p - prompt_lens  # [batch]
    idx = (jnp.arange(p)[None, :] - shift[:, None]) % p
    tokens = jnp.take_along_axis(prompts, idx, axis=1)
    positions = jnp.arange(p)[None, :] - shift[:, None]
    return tokens, jnp.where(positions >= 0, positions, -1).astype(jnp.int32)


def filter_logits(logits, top_k: int, top_p: float, vocab_limit: int | None = None):
    """Mask logits outside the top-k and the top-p nucleus (and ids >= vocab_limit) with -inf.

    logits [batch, vocab] float32.
    """
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _ends_with(history, i, seq):
    """Whether the generated tokens up to step i (inclusive) end with `seq`. history [batch, N]."""
    n = len(seq)
    idx = i - n + 1 + jnp.arange(n)
    got = jnp.take(history, jnp.clip(idx, 0, history.shape[1] - 1), axis=1)
    return (i + 1 >= n) & jnp.all(got == jnp.asarray(seq, jnp.int32)[None, :], axis=1)


def prefill(cfg, params, prompts, prompt_lens, max_new_tokens: int, with_aux: bool = False):
    """Left-align right-padded prompts int32 [batch, P], run one forward over them into a fresh P-slot cache and
    grow it to P + max_new_tokens slots (`model.grow_cache`). Returns (float32 logits of the last position
    [batch, vocab], cache) (and the forward's aux with `with_aux`)."""
    b, p = prompts.shape
    tokens, positions = left_align(prompts, prompt_lens)
    # the prompt attends over its own P slots (not the whole cache); the cache then grows for the decode loop
    logits, cache, aux = forward(cfg, params, tokens, positions, init_cache(cfg, b, p), with_mtp=False,
                                 last_only=True)
    cache = grow_cache(cfg, cache, p + max_new_tokens)
    return (logits[:, -1].astype(jnp.float32), cache) + ((aux,) if with_aux else ())


def decode_phases(max_new_tokens: int) -> tuple[int, ...]:
    """The decode steps at which each phase ends, (n_1, ..., max_new_tokens): one phase per 32 new tokens, at
    most 8, of near-equal length.

    Shapes are static, so a step attends over every slot of its cache, filled or not. Phase j decodes steps
    n_{j-1}..n_j - 1 over a cache grown to P + n_j slots (`model.grow_cache`; one while loop, compiled, per
    phase), so the attention reads about half the slots a single P + max_new_tokens cache would make it read,
    for long generations. At 64 prompt + 128 new tokens (4 phases): small_qwen2 `generate` 5-7 % faster, the MLA
    tiny_deepseek 11 %, the same tokens; compile +1.1 / +1.7 s (docs/benchmarks.md). Below 64 new tokens: one.
    """
    k = max(1, min(8, max_new_tokens // 32))
    return tuple(sorted({-(-max_new_tokens * (j + 1) // k) for j in range(k)}))


def first_argmax(x):
    """jnp.argmax(x, axis=-1) for x [batch, vocab] without NaNs -> int32 [batch]: the first index of the row's max.

    As a max and a min over an iota: XLA:CPU runs argmax's (value, index) reduction at ~0.8 ms per decode step on
    [64, 512] logits (docs/benchmarks.md), two plain reductions in a fraction of that.
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def sample_token(last, keys, *, temperature: float, top_k: int, top_p: float, greedy: bool, vocab_limit):
    """Draw one token per row from float32 logits [batch, vocab] with one PRNG key per row (`keys` [batch]; a row's
    draw depends on its own key only, so it does not change with how rows are grouped into calls): (tokens int32
    [batch], their log-probs under softmax(logits / temperature) over the full vocabulary [batch], the filter's
    floor [batch] and the log-probs renormalised over the kept tokens [batch]; see SampleOutput)."""
    scaled = last / temperature
    kept = filter_logits(scaled, top_k, top_p, vocab_limit)
    if greedy:
        tok = first_argmax(filter_logits(last, 0, 1.0, vocab_limit))
    else:  # per row, jax.random.categorical's Gumbel-max draw, with the cheaper argmax
        noise = jax.vmap(lambda k: jax.random.gumbel(k, kept.shape[1:], kept.dtype))(keys)
        tok = first_argmax(kept + noise)
    tok = tok[:, None]
    lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok, axis=-1)[:, 0]
    # filter_logits hands back its input when no filter applies: then the kept-token log-prob is lp itself
    lp_kept = lp if kept is scaled else jnp.take_along_axis(jax.nn.log_softmax(kept, axis=-1), tok, axis=-1)[:, 0]
    floor = jnp.min(jnp.where(jnp.isfinite(kept), kept, jnp.inf), axis=-1)
    floor = jnp.where(top_k or top_p < 1.0, floor, -jnp.inf)  # a vocab limit alone is applied by id, not value
    return tok[:, 0], lp, floor, lp_kept


def decode_step(cfg, params, tok, positions, cache, with_aux: bool = False):
    """One cached forward of tokens int32 [batch] at positions int32 [batch]: (float32 next logits, cache) (and
    the forward's aux with `with_aux`)."""
    logits, cache, aux = forward(cfg, params, tok[:, None], positions[:, None].astype(jnp.int32), cache,
                                 with_mtp=False)
    return (logits[:, -1].astype(jnp.float32), cache) + ((aux,) if with_aux else ())


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "greedy",
                                   "eos_id", "stop_sequences", "pad_id", "vocab_limit", "with_routing"))
def _generate(cfg, params, prompts, prompt_lens, rng, first_row, *, max_new_tokens, temperature, top_k, top_p, greedy,
              eos_id, stop_sequences, pad_id, vocab_limit, with_routing=False):
    b, p = prompts.shape
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, first_row + jnp.arange(b))  # [b] keys
    ends = decode_phases(max_new_tokens)
    last, cache, aux = prefill(cfg, params, prompts, prompt_lens, ends[0], with_aux=True)
    if with_routing:  # the prompt's experts from prefill, each generated token's from its decode step
        routing = jnp.zeros((b, p + max_new_tokens) + aux["routing"].shape[2:], jnp.int32)
        routing = routing.at[:, :p].set(aux["routing"])
    else:
        routing = jnp.zeros((), jnp.int32)
    draw = partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                   vocab_limit=vocab_limit)

    def cond(carry):
        i, _, _, _, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, last, cache, out_tok, out_lp, done, lengths, routing, (floors, kept_lp) = carry
        tok, lp, floor, lp_kept = draw(last, jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i))
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        out_tok = out_tok.at[:, i].set(tok)
        out_lp = out_lp.at[:, i].set(jnp.where(done, 0.0, lp))
        floors = floors.at[:, i].set(jnp.where(done, -jnp.inf, floor))
        kept_lp = kept_lp.at[:, i].set(jnp.where(done, 0.0, lp_kept))
        lengths = lengths + (~done).astype(jnp.int32)
        finished = jnp.zeros_like(done)
        if eos_id is not None:
            finished = finished | (tok == eos_id)
        for seq in stop_sequences:
            finished = finished | _ends_with(out_tok, i, seq)
        done = done | finished
        last, cache, step_aux = decode_step(cfg, params, tok, prompt_lens + i, cache, with_aux=True)
        if with_routing:
            routing = jax.lax.dynamic_update_slice_in_dim(routing, step_aux["routing"], p + i, axis=1)
        return i + 1, last, cache, out_tok, out_lp, done, lengths, routing, (floors, kept_lp)

    zeros = jnp.zeros((b, max_new_tokens), jnp.float32)
    init = (jnp.int32(0), last, cache, jnp.full((b, max_new_tokens), pad_id, jnp.int32), zeros,
            jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), routing,
            (jnp.full((b, max_new_tokens), -jnp.inf, jnp.float32), zeros))
    carry = init
    for j, end in enumerate(ends):  # the cache grows between phases: a step attends over P + end slots
        if j:
            carry = carry[:2] + (grow_cache(cfg, carry[2], p + end),) + carry[3:]
        carry = jax.lax.while_loop(lambda c, end=end: cond(c) & (c[0] < end), body, carry)
    _, _, _, out_tok, out_lp, done, lengths, routing, (floors, kept_lp) = carry
    return SampleOutput(out_tok, out_lp, lengths, ~done, routing if with_routing else None, floors, kept_lp)


def generate(cfg: ModelConfig, params, prompts, prompt_lens, max_new_tokens: int, temperature: float = 1.0,
             rng=None, *, top_k: int = 0, top_p: float = 1.0, greedy: bool = False, eos_id: int | None = None,
             stop_sequences: tuple[tuple[int, ...], ...] = (), pad_id: int = 0, vocab_limit: int | None = None,
             mesh=None, rules=None, with_routing: bool = False, streams: int | None = None) -> SampleOutput:
    """Sample `max_new_tokens` continuations of right-padded `prompts` int32 [batch, P] with lengths
    `prompt_lens` int32 [batch].

    temperature > 0 scales the logits (log-probs are reported at this temperature); top_k (0 = off) and
    top_p (1 = off) filter the sampling distribution; greedy takes the argmax. Generation of a row ends
    after `eos_id` or after any token sequence in `stop_sequences`. `vocab_limit` keeps sampling to ids
    below it (a tokenizer smaller than the model's embedding table). With `mesh`, runs under its sharding
    rules (params and batch as placed by the caller, e.g. the training state). `with_routing` (MoE models) also
    returns the experts every input token chose (`SampleOutput.routing`), for routing replay in training.
    `streams` row groups are decoded concurrently (`resolve_streams`; None = auto: 2 on CPU, 1 on accelerators);
    row r samples with the key `fold_in(rng, r)`, so the tokens do not depend on `streams`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompts = jnp.asarray(prompts, jnp.int32)
    prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
    if prompts.ndim != 2 or prompt_lens.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be [batch, P] and prompt_lens [batch]; got {prompts.shape}, {prompt_lens.shape}")
    lens = np.asarray(prompt_lens)
    if lens.min() < 1 or lens.max() > prompts.shape[1]:
        raise ValueError(f"prompt_lens must be in [1, {prompts.shape[1]}], got min {lens.min()} max {lens.max()}")
    if prompts.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"model max_seq_len {cfg.max_seq_len}")
    rng = jax.random.key(0) if rng is None else rng
    stop = tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s))
    kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
              top_p=float(top_p), greedy=bool(greedy), eos_id=eos_id, stop_sequences=stop, pad_id=int(pad_id),
              vocab_limit=None if vocab_limit is None else int(vocab_limit), with_routing=bool(with_routing))
    if with_routing and cfg.moe is None:
        raise ValueError("with_routing: the model has no MoE layers (cfg.moe is None)")
    n = resolve_streams(streams, prompts.shape[0], mesh)

    def call(first: int, rows: int):
        group = [x if rows == x.shape[0] else x[first:first + rows] for x in (prompts, prompt_lens)]
        if mesh is None:
            return _generate(cfg, params, *group, rng, jnp.int32(first), **kw)
        from sharding import DEFAULT_RULES, batch_sharding
        r = rules or DEFAULT_RULES
        with use_rules(mesh, r):  # per thread: the active rules are thread-local
            group = [jax.device_put(x, batch_sharding(mesh, r, ndim=x.ndim)) for x in group]
            return _generate(cfg, params, *group, rng, jnp.int32(first), **kw)

    c = prompts.shape[0] // n
    if n == 1:
        return call(0, c)
    futures = [_stream_pool().submit(call, i * c, c) for i in range(1, n)]
    outs = [call(0, c)] + [f.result() for f in futures]  # the first on this thread: model/host_memory.py
    return SampleOutput(*(None if x[0] is None else jnp.concatenate(x) for x in zip(*outs)))


def resolve_streams(streams: int | None, batch: int, mesh=None) -> int:
    """How many row groups `generate` decodes concurrently, each its own call of the compiled sampler on its own
    host thread. None (auto): 2 on the CPU backend for an even batch of at least 8 rows on one device, else 1.

    Why: on one XLA:CPU device a decode step keeps only ~1.5 of 2 cores busy (its batched attention dots, softmax
    and sampling run on one thread), and XLA runs the ops of one program one after another, but two programs
    called from two threads run side by side (synchronous CPU dispatch runs each on its calling thread). Small
    config, batch 64, 64 + 128 tokens, Intel Xeon 2 cores (`python -m bench.rollout`): 0.96 s in one stream,
    0.59 s in two of 32 rows; four of 16 are no better (docs/benchmarks.md). Accelerators keep one stream (one
    device queue); so does a multi-device mesh, whose devices already run side by side. Rows draw from their own
    keys, so the samples do not depend on `n`.
    """
    if streams is None:
        one_device = mesh is None or mesh.size == 1
        return 2 if jax.default_backend() == "cpu" and one_device and batch % 2 == 0 and batch >= 8 else 1
    if not isinstance(streams, int) or streams < 1 or batch % streams:
        raise ValueError(f"streams must be a positive int dividing the batch ({batch} rows), got {streams!r}")
    if streams > 1 and mesh is not None and mesh.size > 1:
        raise ValueError(f"streams={streams} with a {mesh.size}-device mesh: the devices already decode side by "
                         f"side; use streams=1 (or None)")
    return streams


_POOL = None


def _stream_pool():
    """Worker threads for `generate`'s extra streams (created once, kept: their malloc arenas stay warm)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=7, thread_name_prefix="r1jax-sampler")
    return _POOL
