"""One GRPO iteration's time, phase by phase: rollout (generation), reward scoring on the host, reference / old
log-probs, and the policy update.

    python -m bench.grpo [--iters 3] [--generations 8 --prompts 8 --new 64] [--beta 0.04] [--mu 2 --mini-batches 2]
                         [--max-prompt-len 64] [--template short|r1] [--rewards format,accuracy] [--data 1]
                         [--off-policy-steps 1 --tis-cap 2.0] [--layers 6] [--trl]

Setup: `experiments.config.RLExperiment` with model `small_qwen2(vocab_size=512)` (random weights), prompts from the
synthetic arithmetic source through the byte tokenizer rendered with a short R1-style template (`--template r1`:
rl.tasks.R1_TEMPLATE, left-truncated to --max-prompt-len tokens), `GRPOConfig(num_generations, prompts_per_step,
max_new_tokens, beta, num_iterations=mu, mini_batches)`, a one-device mesh (`--data N` with
XLA_FLAGS=--xla_force_host_platform_device_count=N: data parallel over N CPU devices). State, reference and RNG are built as
`rl.loop.grpo` builds them (`trainer.init_state`, `jax.tree.map(jnp.copy, params)`, `jax.random.key(seed)`), then
`rl.loop.GRPO(exp).iteration(state, ref, rng)` runs 1 + --iters times; the first compiles and is not counted.

Phases (medians over the timed iterations):
- rollout = the loop's `time_rollout`, split here into generation (the loop's launch of `rl.rollout.launch_rollout`:
  prompt encoding and `rl.sampler.generate`, blocked on its output), detokenisation, reward scoring (the
  experiment's combined reward function on the decoded texts) and the rest (host copies). Each is timed by
  wrapping that attribute of this bench's own `GRPO` object (no library module is patched);
- log-probs = `time_score`: old log-probs (μ > 1 or several mini-batches) and reference log-probs (β > 0), two
  teacher-forced forward passes over prompt + completion;
- update = `time_update`: μ x mini_batches optimizer steps (forward + backward + AdamW);
- the remainder of the wall time (advantages, metrics, host glue).
Each reward component is also timed alone on the last rollout's texts. With `--off-policy-steps N` (pipelined
rollouts, grpo.off_policy_steps) generation runs while the update trains, so it is not timed on its own: `rollout`
is then the time spent waiting for the rollout launched N steps earlier (plus scoring), and the iteration time is
the figure to compare with N = 0 on the same machine. On a CPU, sampling and training share the same cores, so the
overlap buys little; on an accelerator the host work (decoding, rewards) overlaps the device's.

Starts with the CPU model and the kernel libraries (bench.common.header); prints a markdown table, the command line,
and as its last line
`RESULT iteration_s=<median> rollout_s=<..> reward_s=<..> logprobs_s=<..> update_s=<..>`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bench.common import command, header, measure

SHORT_TEMPLATE = "Think in <think> </think>, answer in <answer> </answer>. User: {prompt} Assistant:"


def build(args):
    from experiments.config import RLExperiment
    from model.config import small_qwen2
    from rl.grpo import GRPOConfig
    from rl.rollout import Sampling
    from rl.tasks import R1_TEMPLATE
    from sharding.mesh import MeshConfig
    from train.data import DataConfig
    template = R1_TEMPLATE if args.template == "r1" else SHORT_TEMPLATE
    rewards = tuple(r for r in args.rewards.split(",") if r)
    return RLExperiment(
        name="bench_grpo", model=small_qwen2(vocab_size=512, n_layers=args.layers), run_dir="",
        prompts=DataConfig(kind="prompts", source="synthetic", tokenizer="byte", chat_template=template),
        grpo=GRPOConfig(num_generations=args.generations, prompts_per_step=args.prompts,
                        sampling=Sampling(max_new_tokens=args.new),
                        beta=args.beta, num_iterations=args.mu, mini_batches=args.mini_batches,
                        off_policy_steps=args.off_policy_steps,
                        tis_cap=args.tis_cap if args.off_policy_steps else None),
        mesh=MeshConfig(data=args.data), rewards=rewards, reward_weights=(1.0,) * len(rewards),
        max_prompt_len=args.max_prompt_len, progress=False, tensorboard=False)


class Clock:
    """Wraps a callable and accumulates its wall time (optionally blocking on what `block(result)` returns)."""

    def __init__(self, fn, block=None):
        self.fn, self.block, self.total = fn, block, 0.0

    def __call__(self, *a, **kw):
        self.last = (a, kw)
        t0 = time.perf_counter()
        out = self.fn(*a, **kw)
        if self.block is not None:
            jax.block_until_ready(self.block(out))
        self.total += time.perf_counter() - t0
        return out

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after one compiling iteration)")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--mu", type=int, default=2, help="num_iterations (passes over each rollout batch)")
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6, help="small_qwen2's depth (6; 1 in the test's smoke run)")
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--template", choices=("short", "r1"), default="short")
    ap.add_argument("--rewards", default="format,accuracy")
    ap.add_argument("--off-policy-steps", type=int, default=0, help="pipelined rollouts (grpo.off_policy_steps)")
    ap.add_argument("--tis-cap", type=float, default=2.0, help="truncated importance sampling cap when pipelined")
    ap.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer on the same iteration "
                    "(bench/trl_grpo.py) and print the ratio")
    ap.add_argument("--data", type=int, default=1, help="mesh data axis: >1 needs "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N (the batch is split over N CPU devices)")
    args = ap.parse_args(argv)
    cmd = command("bench.grpo", argv)

    import rl.loop as loop
    from rl.rewards import REWARDS
    from rl.tasks import R1_TEMPLATE

    exp = build(args)
    g = exp.grpo
    algo = loop.GRPO(exp)
    # time generation (blocked on its output; blocking would undo the pipelined overlap), scoring and
    # detokenisation inside the loop's own rollout, through this GRPO object's attributes
    gen_clock = Clock(algo._launch, block=None if args.off_policy_steps else (lambda out: out[1].outs))
    algo._launch = gen_clock
    reward_clock = Clock(algo.reward)
    algo.reward = reward_clock
    dec_clock = Clock(algo.tok.decode)
    algo.tok.decode = dec_clock

    trainer = algo.trainer
    state = trainer.init_state(exp.seed)
    ref = jax.tree.map(jnp.copy, state["params"]) if g.beta > 0 else None
    rng = jax.random.key(exp.seed)
    header("bench.grpo", torch=args.trl)
    print(f"small_qwen2, {args.layers} layers ({sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.2f}M params), batch {algo.batch} = "
          f"{g.prompts_per_step} prompts x {g.num_generations}, prompt {exp.max_prompt_len}, {g.sampling.max_new_tokens} new "
          f"tokens, beta {g.beta}, mu {g.num_iterations}, {g.mini_batches} mini-batches, rewards {exp.rewards}, "
          f"off_policy_steps {g.off_policy_steps}",
          flush=True)

    def blocked(out):  # (state, rng, metrics, rollout): wait for the new state
        jax.block_until_ready(out[0])
        return out

    rows, roll = [], None
    for it in range(args.iters + 1):
        x = measure(lambda: blocked(algo.iteration(state, ref, rng, it)))
        state, rng, m, roll = x.value
        wall, others = x.wall, x.others
        r = {"wall": wall, "rollout": m["time_rollout"], "generate": gen_clock.take(), "reward": reward_clock.take(),
             "detok": dec_clock.take(), "logprobs": m["time_score"], "update": m["time_update"],
             "len": m["response_len_mean"], "reward_mean": m["reward"], "others": others}
        r["rollout_other"] = r["rollout"] - r["generate"] - r["reward"] - r["detok"]
        r["other"] = wall - r["rollout"] - r["logprobs"] - r["update"]
        print(f"iteration {it}{' (compiles)' if it == 0 else ''}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        if it:
            rows.append(r)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    contended = max(r["others"] for r in rows) > 0.1
    (texts,), fields = reward_clock.last  # the last rollout's texts and per-completion fields (answers, ...)
    from rl.tasks.arithmetic import synthetic_example
    gold = [synthetic_example(exp.prompts.seed, i) for i in range(len(texts))]
    gold_texts, gold_fields = [r["response"] for r in gold], {"answer": [r["answer"] for r in gold]}

    def per_call(fn, t, kw, n=5):
        fn(t, **kw)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(t, **kw)
        return (time.perf_counter() - t0) / n

    per_reward = [(name, per_call(REWARDS[name], texts, fields), per_call(REWARDS[name], gold_texts, gold_fields))
                  for name in exp.rewards]

    steps = g.num_iterations * g.mini_batches
    mb_tokens = algo.batch // g.mini_batches * (exp.max_prompt_len + g.sampling.max_new_tokens)
    print(f"\n### One GRPO iteration (small_qwen2, batch {algo.batch} = {g.prompts_per_step} x {g.num_generations}, "
          f"prompt {exp.max_prompt_len} + {g.sampling.max_new_tokens} new, beta {g.beta}, mu {g.num_iterations}, "
          f"{g.mini_batches} mini-batches; median of {len(rows)} iterations"
          f"{'; CONTENDED: other processes used > 10 % of the CPUs meanwhile' if contended else ''})\n")
    print("| phase | s | share of the iteration | note |\n|---|---|---|---|")
    W = med["wall"]

    def row(name, s, note=""):
        shown = f"{s:.3f}" if s >= 0.01 else f"{s:.5f}"
        print(f"| {name} | {shown} | {s / W:.1%} | {note} |")

    row("**rollout** (`time_rollout`)", med["rollout"])
    row("  generation (`launch_rollout`: prompt encoding, `rl.sampler.generate`)", med["generate"],
        f"{algo.batch * g.sampling.max_new_tokens / med['generate']:,.0f} new tok/s (slots, incl. rows that stopped early); "
        f"mean length {med['len']:.1f}")
    row("  reward scoring on the host", med["reward"], f"{exp.rewards} on {algo.batch} texts")
    row("  detokenisation", med["detok"])
    row("  the rest (host copies)", med["rollout_other"])
    row("**reference / old log-probs** (`time_score`)", med["logprobs"],
        f"{(g.num_iterations > 1 or g.mini_batches > 1) + (g.beta > 0)} teacher-forced forward(s) over "
        f"{algo.batch} x {exp.max_prompt_len + g.sampling.max_new_tokens}")
    row("**update** (`time_update`)", med["update"],
        f"{steps} optimizer steps of {algo.batch // g.mini_batches} sequences; "
        f"{steps * mb_tokens / med['update']:,.0f} tok/s (prompt + completion)")
    row("other (advantages, metrics, glue)", med["other"])
    row("**iteration**", W)
    print(f"\nEach reward component alone on {len(texts)} texts (ms per batch): " +
          ", ".join(f"{name} {a * 1e3:.2f} (the last rollout's) / {b * 1e3:.2f} (well-formed synthetic gold "
                    "responses)" for name, a, b in per_reward))
    peer = ""
    if args.trl:
        from bench.trl_grpo import time_trl
        trl = time_trl(argparse.Namespace(**{**vars(args), "iters": max(args.iters, 2)}),
                       R1_TEMPLATE if args.template == "r1" else SHORT_TEMPLATE)
        # the ratio of the times as printed (3 decimals), so that the line agrees with itself at any iteration time
        speedup = round(trl["median"], 3) / max(round(W, 3), 1e-3)
        print(f"\nTRL GRPOTrainer, the same iteration (bench/trl_grpo.py; its prompts are not truncated to "
              f"{exp.max_prompt_len} tokens): rounds " + ", ".join(f"{r:.2f}" for r in trl["rounds"])
              + f" s; median {trl['median']:.3f} s against our {W:.3f} s: **{speedup:.2f}x** faster")
        peer = f" trl_iteration_s={trl['median']:.3f} speedup_vs_trl={speedup:.2f}"
    print(f"\ncommand: {cmd}")
    print(f"RESULT iteration_s={W:.3f} rollout_s={med['rollout']:.3f} generate_s={med['generate']:.3f} "
          f"reward_s={med['reward']:.4f} logprobs_s={med['logprobs']:.3f} update_s={med['update']:.3f}{peer}")


if __name__ == "__main__":
    main()
