"""Rollout (sampling) throughput of `rl.sampler.generate` on CPU, side by side with Hugging Face `generate` and
Tunix's `Sampler`.

    python -m bench.rollout [--batch 64 --prompt 64 --new 128] [--rounds 5] [--budget 120] [--max-others 0.1]
                            [--quiet-wait 5] [--no-torch] [--no-tunix] [--tunix-python /tmp/tunix_venv/bin/python]
                            [--streams N] [--also-streams 1] [--also-devices 0] [--devices 1] [--profile]
                            [--xla-sweep] [--what-if]

Workload: the small config (`small_qwen2()`: Qwen2-style, vocab 512, d 256, 6 layers, 8 heads / 2 KV heads,
head_dim 32, MLP 768), random weights, `batch` prompts of `prompt` random tokens (all full length), `new` new tokens
sampled at temperature 1 over the full vocabulary, no EOS (every row generates every token).
tokens/s = batch * new / median wall time of one call (prefill + decode + getting the tokens to the host).

- ours: `rl.sampler.generate(cfg, params, prompts, lens, new, 1.0, key)` (eos_id=None), blocked on the output;
  the first call compiles and is not timed; every timed call uses a new key. `streams` is the library's default
  (`rl.sampler.resolve_streams`: on CPU two row groups decoded side by side on two host threads) unless
  `--streams N` is given; `--also-streams 1` (the default; 0 = off) adds a row for ours with that many streams,
  timed in the same rounds, so the table shows what the streams gain on this machine.
- transformers (bench.peers.HFGenerate): `Qwen2ForCausalLM` with the same config (`model.hf.config_to_hf`), random
  weights, float32, eager PyTorch on CPU, `torch.set_num_threads(cpu count)`, `generate(do_sample=True,
  temperature=1, top_k=0, top_p=1, min_new_tokens=max_new_tokens=new)` under `torch.inference_mode()`.
- tunix (bench.peers.Tunix): `tunix.generate.sampler.Sampler` over `tunix.models.qwen2.Qwen2` configured to the same
  sizes (random weights, float32), `Sampler(prompt strings, max_generation_steps=new, max_prompt_length=prompt,
  temperature=1, top_p=1, top_k=None, eos_tokens=[vocab] (never sampled), seed)`; the cache holds prompt + new
  slots, as ours. google-tunix is an optional peer: it is imported in this process if it is installed here,
  otherwise it runs in a persistent worker process under `--tunix-python` (default /tmp/tunix_venv/bin/python, a
  separate venv with `pip install google-tunix`), which times its own calls; without either, tunix is nan.
- ours on N devices (`--also-devices 2`; default 0 = off): the same call in a worker process started with
  XLA_FLAGS=--xla_force_host_platform_device_count=N and `mesh=` a data=N mesh, so the batch is split and each
  XLA CPU device decodes its half on its own thread. Reported in the table, not in RESULT (it needs the env var).
  `--devices N` runs ours itself that way (the env var must then be set by the caller).

Rounds are interleaved (ours, transformers, tunix, ours, ...). Shared machines: each timed call also reads
/proc/stat and is *clean* if other processes (and steal) used less than --max-others of the machine's CPU capacity
meanwhile; medians are over clean samples when there are at least 3 (else over all, flagged "contended"), and
rounds go on (up to --budget seconds) until --rounds clean samples per implementation are in; before each call the
script waits up to --quiet-wait seconds for a quiet half second.

`--profile` (bench.profile): where our decode time goes: the sampler's own `prefill`, one decode step
(`sample_token` + `decode_step`) and its parts (`decode_step` alone, `sample_token` alone, the step's matmuls alone,
attention over the cache alone) times `new`, against the whole call; and a jax.profiler trace of one `generate`
call, per-HLO-op time grouped by kind.
`--xla-sweep` (bench.rollout_variants): re-runs ours (only) in subprocesses under several XLA_FLAGS settings.
`--what-if` (bench.rollout_variants): re-runs ours in subprocesses with a what-if variant of generate's loop (a
local variant built from the sampler's own `prefill` and `decode_step`, never patched into the library), on 1 and
2 devices. The what-ifs inside the model that earlier versions monkeypatched in (q/k/v projection layout, decode
attention as multiply + reduce, prefill head on the last position only) were dropped: measure such a change by
making it in the library and running this bench before and after.

Starts with the CPU model and the kernel libraries each side runs (bench.common.header); prints markdown tables,
the command line, and as its last line
`RESULT speedup_vs_transformers=<ratio> speedup_vs_tunix=<ratio or nan>` (ours tokens/s over theirs).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import rl.sampler as S
from bench.common import MAX_OTHERS, REPO_ROOT, command, header, measure, med, n_cpus, pick, wait_quiet
from bench.peers import HFGenerate, Tunix, Worker
from bench.profile import decode_parts, generate_hlo, print_rollout_profile, trace_ops
from bench.rollout_variants import WHATIF_SAMPLERS, what_if, whatif_generate, xla_sweep
from model import init_params
from model.config import ModelConfig, small_qwen2

TUNIX_PYTHON = "/tmp/tunix_venv/bin/python"


# ---- ours ---------------------------------------------------------------------------------------------------

def make_prompts(cfg: ModelConfig, batch: int, prompt: int, seed: int = 0) -> np.ndarray:
    """Random prompt tokens in [1, vocab) (0 is kept for padding), int32 [batch, prompt]."""
    return np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, prompt)).astype(np.int32)


class Ours:
    name = "ours: rl.sampler.generate (JAX)"

    def __init__(self, cfg: ModelConfig, prompts: np.ndarray, new: int, devices: int = 1, variant: str = "none",
                 streams: int | None = None):
        self.cfg, self.new, self.streams = cfg, new, streams
        self.params = init_params(cfg, 0)
        self.prompts = jnp.asarray(prompts)
        self.lens = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
        self.calls, self.mesh, self.rules = 0, None, None
        if devices > 1:  # data parallel over `devices` CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)
            from sharding import DEFAULT_RULES, make_mesh
            from sharding.mesh import MeshConfig
            from sharding.rules import param_shardings
            if jax.device_count() < devices:
                raise SystemExit(f"--devices {devices}: only {jax.device_count()} JAX devices; set "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
            self.mesh, self.rules = make_mesh(MeshConfig(data=devices), jax.devices()[:devices]), DEFAULT_RULES
            self.params = jax.device_put(self.params, param_shardings(self.params, self.mesh))
            self.name = f"ours: rl.sampler.generate (JAX), {devices} CPU devices, batch split"
        else:
            n = S.resolve_streams(streams, prompts.shape[0])
            self.name = f"ours: rl.sampler.generate (JAX), {n} stream{'s' * (n > 1)}{' (auto)' * (streams is None)}"
        self.whatif = None if variant == "none" else whatif_generate(self.cfg, new, WHATIF_SAMPLERS[variant])
        if self.whatif is not None:
            self.name = f"what-if {variant}: {WHATIF_SAMPLERS[variant].__doc__.splitlines()[0]}"

    def tokens(self, key) -> np.ndarray:
        """One call: the new tokens [batch, new] on the host, as a rollout needs them."""
        if self.whatif is None:
            out = S.generate(self.cfg, self.params, self.prompts, self.lens, self.new, 1.0, key, mesh=self.mesh,
                             streams=self.streams)
            return jax.device_get(out.tokens)
        if self.mesh is None:
            return jax.device_get(self.whatif(self.params, self.prompts, self.lens, key)[0])
        from sharding import batch_sharding
        from sharding.rules import use_rules
        with use_rules(self.mesh, self.rules):  # as generate(mesh=) runs
            prompts = jax.device_put(self.prompts, batch_sharding(self.mesh, self.rules))
            lens = jax.device_put(self.lens, batch_sharding(self.mesh, self.rules, ndim=1))
            return jax.device_get(self.whatif(self.params, prompts, lens, key)[0])

    def run(self):
        tokens = self.tokens(jax.random.key(self.calls))
        self.calls += 1
        assert tokens.shape == (self.prompts.shape[0], self.new)
        return tokens


class OursDevices(Worker):
    """Ours, data-parallel over N XLA CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, mesh data=N:
    the batch is split, each device runs its half of the while loop on its own thread)."""

    def __init__(self, args, devices: int):
        self.name = f"ours, {devices} XLA CPU devices (batch split; env XLA_FLAGS + mesh)"
        self.how = f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        self.start([sys.executable, "-m", "bench.rollout", "--worker-devices", str(devices), "--batch", str(args.batch),
                    "--prompt", str(args.prompt), "--new", str(args.new)], env, cwd=REPO_ROOT)


def worker_main(args, cfg, prompts):
    """--worker-devices N: serve timed calls of ours on N devices (see OursDevices)."""
    ours = Ours(cfg, prompts, args.new, args.worker_devices)
    t0 = time.perf_counter()
    ours.run()
    print(json.dumps({"ready": True, "first_call_s": time.perf_counter() - t0}), flush=True)
    for _ in sys.stdin:
        x = measure(ours.run)
        print(json.dumps({"wall": x.wall, "cpu": x.cpu, "others": x.others}), flush=True)


# ---- main ----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="clean timed calls wanted per implementation")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of timed rounds at most")
    ap.add_argument("--max-others", type=float, default=MAX_OTHERS)
    ap.add_argument("--quiet-wait", type=float, default=5.0,
                    help="before each timed call, wait up to this many seconds for the machine to go quiet")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-tunix", action="store_true")
    ap.add_argument("--tunix-python", default=TUNIX_PYTHON)
    ap.add_argument("--devices", type=int, default=1,
                    help="run ours data-parallel over N CPU devices (needs --xla_force_host_platform_device_count)")
    ap.add_argument("--streams", type=int, default=None,
                    help="generate(streams=): row groups decoded concurrently (default: the library's auto)")
    ap.add_argument("--also-streams", type=int, default=1,
                    help="also time ours with this many streams, in this process (0 = off)")
    ap.add_argument("--also-devices", type=int, default=0,
                    help="also time ours over N XLA CPU devices in a worker process (0 = off)")
    ap.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="none", choices=["none", *WHATIF_SAMPLERS], help=argparse.SUPPRESS)
    ap.add_argument("--what-if", action="store_true", help="time what-if variants (whatif_generate), each in a "
                    "subprocess")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--xla-sweep", action="store_true")
    ap.add_argument("--sweep-rounds", type=int, default=4)
    args = ap.parse_args(argv)
    cmd = command("bench.rollout", argv)

    cfg = small_qwen2()
    prompts = make_prompts(cfg, args.batch, args.prompt)
    if args.worker_devices:
        return worker_main(args, cfg, prompts)
    ntok = args.batch * args.new
    header("bench.rollout", torch=not args.no_torch)
    print(f"workload: small_qwen2, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, sampling T=1, "
          "no EOS", flush=True)

    tunix, tunix_note = None, ""
    if not args.no_tunix:
        try:
            tunix = Tunix(cfg, prompts, args.new, args.tunix_python)  # starts compiling in its own process
        except Exception as e:  # noqa: BLE001
            tunix_note = f"tunix not measured: {e}"
    dev = None
    if args.also_devices > 1 and args.devices == 1:
        dev = OursDevices(args, args.also_devices)  # compiles in its own process meanwhile
    ours = Ours(cfg, prompts, args.new, args.devices, args.variant, args.streams)
    t0 = time.perf_counter()
    ours.run()
    print(f"ours: first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
    peers = [("ours", ours)]
    also = args.also_streams
    if also and args.devices == 1 and args.variant == "none" and also != S.resolve_streams(args.streams, args.batch):
        peers.append((f"ours_{also}streams", Ours(cfg, prompts, args.new, streams=also)))
        peers[-1][1].run()
    if dev is not None:
        try:
            info = dev.ready()
            print(f"{dev.name}: first call {info['first_call_s']:.1f} s", flush=True)
            peers.append((f"ours_{args.also_devices}dev", dev))
        except Exception as e:  # noqa: BLE001
            print(f"ours on {args.also_devices} devices not measured: {str(e)[-500:]}", flush=True)
            dev.close()
            dev = None
    if not args.no_torch:
        th = HFGenerate(cfg, prompts, args.new)
        t0 = time.perf_counter()
        th.run()
        print(f"transformers: first call {time.perf_counter() - t0:.1f} s", flush=True)
        peers.append(("transformers", th))
    if tunix is not None:
        try:
            info = tunix.ready()
            print(f"tunix {info['version']} ({tunix.how}): import {info['import_s']:.1f} s, first call "
                  f"{info['first_call_s']:.1f} s", flush=True)
            peers.append(("tunix", tunix))
        except Exception as e:  # noqa: BLE001
            tunix_note = f"tunix not measured: {str(e)[-500:]}"
            tunix.close()
            tunix = None
    if tunix_note:
        print(tunix_note, flush=True)

    samples = {k: [] for k, _ in peers}
    t_start = time.perf_counter()
    while True:
        for k, impl in peers:
            time.sleep(0.2)  # let the previous peer's worker threads go idle
            if args.quiet_wait > 0:
                wait_quiet(args.quiet_wait, max_busy=args.max_others)
            samples[k].append(impl.sample() if isinstance(impl, Worker) else measure(impl.run))
            x = samples[k][-1]
            print(f"  {k}: {x.wall:.2f} s, {x.cpu:.2f} CPU-s, others {x.others:.0%}"
                  f"{'' if x.clean(args.max_others) else ' (contended)'}", flush=True)
        done = all(sum(s.clean(args.max_others) for s in v) >= args.rounds for v in samples.values())
        if done or (time.perf_counter() - t_start > args.budget and min(map(len, samples.values())) >= args.rounds):
            break
    for w in (tunix, dev):
        if w is not None:
            w.close()

    res = {}
    for k, impl in peers:
        chosen, clean = pick(samples[k], 3, args.max_others)
        wall, cpu = med([x.wall for x in chosen]), med([x.cpu for x in chosen])
        res[k] = dict(name=impl.name, tps=ntok / wall, wall=wall, cpu=cpu, n=len(chosen), total=len(samples[k]),
                      clean=clean, spread=(min(x.wall for x in chosen), max(x.wall for x in chosen)))
    o = res["ours"]
    checksum = int(ours.tokens(jax.random.key(123)).sum())  # same key: what-if variants must keep the samples
    print(f"OURS tok_s={o['tps']:.1f} ms={o['wall'] * 1e3:.1f} cpu_s={o['cpu']:.2f} clean={o['clean']} "
          f"tokens={checksum}")

    print(f"\n### Rollout: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens (small_qwen2, float32, "
          f"{n_cpus()} CPUs)\n")
    print("| implementation | new tok/s | s per call (median) | min–max | CPU-s per call | samples | ours / it |")
    print("|---|---|---|---|---|---|---|")
    for k, r in res.items():
        flag = "" if r["clean"] else " (contended)"
        print(f"| {r['name']} | {r['tps']:,.0f} | {r['wall']:.2f} | {r['spread'][0]:.2f}–{r['spread'][1]:.2f} | "
              f"{r['cpu']:.2f} | {r['n']}/{r['total']}{flag} | {o['tps'] / r['tps']:.2f}x |")
    for k in ("transformers", "tunix"):
        if k not in res:
            print(f"| {k} | nan | | | | not measured | |")
    d = res.get(f"ours_{args.also_devices}dev")
    if d is not None:
        vs = ", ".join(f"{d['tps'] / res[k]['tps']:.2f}x {k}" for k in ("transformers", "tunix") if k in res)
        print(f"\nours on {args.also_devices} XLA CPU devices: {d['tps']:,.0f} new tok/s = {d['tps'] / o['tps']:.2f}x ours "
              f"on one device{', ' + vs if vs else ''} (not in RESULT: it needs the env var and a mesh)")

    if args.profile:
        rows = decode_parts(ours, args.quiet_wait)
        print(f"\n### Where our decode time goes (each part jitted alone; seconds per {args.new}-token call)\n")
        print("| part | s per call | note |\n|---|---|---|")
        for what, s, note in rows:
            print(f"| {what} | {s:.2f} | {note} |")
        ops = trace_ops(ours.run, generate_hlo(ours), 1, "rollout", counts=True, quiet_wait=args.quiet_wait)
        print_rollout_profile(ops, o["wall"])
    if args.xla_sweep:
        xla_sweep(args)
    if args.what_if:
        what_if(args)

    print(f"\ncommand: {cmd}")
    if tunix_note:
        print(tunix_note)
    sp_t = o["tps"] / res["transformers"]["tps"] if "transformers" in res else float("nan")
    sp_x = o["tps"] / res["tunix"]["tps"] if "tunix" in res else float("nan")
    print(f"RESULT speedup_vs_transformers={sp_t:.3f} speedup_vs_tunix={sp_x:.3f}")


if __name__ == "__main__":
    main()
