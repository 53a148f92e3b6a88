"""Rollout (sampling) throughput of `rl.sampler.generate` on CPU, side by side with Hugging Face `generate` and
Tunix's `Sampler`.

    python -m bench.rollout [--batch 64 --prompt 64 --new 128] [--rounds 5] [--budget 120] [--max-others 0.1]
                            [--quiet-wait 5] [--no-torch] [--no-tunix] [--tunix-python /tmp/tunix_venv/bin/python]
                            [--also-devices 2] [--devices 1] [--profile] [--xla-sweep] [--what-if]

Workload: the small config (`small_qwen2()`: Qwen2-style, vocab 512, d 256, 6 layers, 8 heads / 2 KV heads,
head_dim 32, MLP 768), random weights, `batch` prompts of `prompt` random tokens (all full length), `new` new tokens
sampled at temperature 1 over the full vocabulary, no EOS (every row generates every token).
tokens/s = batch * new / median wall time of one call (prefill + decode + getting the tokens to the host).

- ours: `rl.sampler.generate(cfg, params, prompts, lens, new, 1.0, key)` (eos_id=None), blocked on the output;
  the first call compiles and is not timed; every timed call uses a new key.
- transformers: `Qwen2ForCausalLM` with the same config (model.hf_config.config_to_hf), random weights, float32,
  eager PyTorch on CPU, `torch.set_num_threads(cpu count)`, `generate(do_sample=True, temperature=1, top_k=0,
  top_p=1, min_new_tokens=max_new_tokens=new)` under `torch.inference_mode()`.
- tunix: `tunix.generate.sampler.Sampler` over `tunix.models.qwen2.Qwen2` configured to the same sizes (random
  weights, float32), `Sampler(prompt strings, max_generation_steps=new, max_prompt_length=prompt, temperature=1,
  top_p=1, top_k=None, eos_tokens=[vocab] (never sampled), seed)`; the cache holds prompt + new slots, as ours.
  google-tunix is an optional peer: it is imported in this process if it is installed here, otherwise it runs in a
  persistent worker process under `--tunix-python` (default /tmp/tunix_venv/bin/python, a separate venv with
  `pip install google-tunix`), which times its own calls; without either, tunix is reported as nan.
- ours on N devices (`--also-devices 2`, 0 = off): the same call in a worker process started with
  XLA_FLAGS=--xla_force_host_platform_device_count=N and `mesh=` a data=N mesh, so the batch is split and each
  XLA CPU device decodes its half on its own thread. Reported in the table, not in RESULT (it needs the env var).
  `--devices N` runs ours itself that way (the env var must then be set by the caller).

Rounds are interleaved (ours, transformers, tunix, ours, ...). Shared machines: each timed call also reads
/proc/stat and is *clean* if other processes (and steal) used less than --max-others of the machine's CPU capacity
meanwhile; medians are over clean samples when there are at least 3 (else over all, flagged "contended"), and
rounds go on (up to --budget seconds) until --rounds clean samples per implementation are in; before each call the
script waits up to --quiet-wait seconds for a quiet half second.

`--profile`: where our decode time goes: prefill alone, one jitted decode step (forward + sampling) and its parts
(forward only, the step's matmuls alone, attention over the cache alone) times `new`, against the whole call; and
a jax.profiler trace of one call, per-HLO-op time grouped by kind.
`--xla-sweep`: re-runs ours (only) in subprocesses under several XLA_FLAGS thread settings.
`--what-if`: re-runs ours in subprocesses with candidate fixes monkeypatched in (`apply_patches`: q/k/v projection
layout, decode attention as multiply+reduce, Gumbel-max without argmax, prefill on the prompt slots / last logits
only) and on 2 devices; the token checksum (fixed key) shows the samples do not change.

Prints markdown tables, the command line, and as its last line
`RESULT speedup_vs_transformers=<ratio> speedup_vs_tunix=<ratio or nan>` (ours tokens/s over theirs).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import hlo_op_meta, machine_busy_s, n_cpus
from model import init_cache, init_params
from model.config import ModelConfig, small_qwen2

MAX_OTHERS = 0.10
TUNIX_PYTHON = "/tmp/tunix_venv/bin/python"


# ---- measuring on a shared machine (as bench/train.py) ---------------------------------------------------



@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # CPU-seconds of the measured process, all threads
    others: float  # fraction of the machine's CPU capacity used by other processes (and steal) meanwhile

    def clean(self, max_others: float) -> bool:
        return not self.others > max_others  # nan counts as clean


def measure(fn) -> Sample:
    b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    fn()
    t, c, b = time.perf_counter() - t0, time.process_time() - c0, machine_busy_s() - b0
    return Sample(t, c, max(0.0, (b - c) / ((os.cpu_count() or 1) * t)))


def wait_quiet(max_wait: float, window: float = 0.5, max_busy: float = MAX_OTHERS) -> bool:
    """Wait (at most max_wait seconds) until the machine was < max_busy busy for one `window`; True if so."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0 = machine_busy_s()
        time.sleep(window)
        if (machine_busy_s() - b0) / ((os.cpu_count() or 1) * window) < max_busy:
            return True
        if time.perf_counter() > deadline:
            return False


def pick(samples: list[Sample], need: int, max_others: float) -> tuple[list[Sample], bool]:
    clean = [x for x in samples if x.clean(max_others)]
    return (clean, True) if len(clean) >= max(need, 1) else (samples, False)


# ---- the workload -----------------------------------------------------------------------------------------

def make_prompts(cfg: ModelConfig, batch: int, prompt: int, seed: int = 0) -> np.ndarray:
    """Random prompt tokens in [1, vocab) (0 is kept for padding), int32 [batch, prompt]."""
    return np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, prompt)).astype(np.int32)


class Ours:
    name = "ours: rl.sampler.generate (JAX)"

    def __init__(self, cfg: ModelConfig, prompts: np.ndarray, new: int, devices: int = 1):
        from rl.sampler import generate
        self.cfg, self.new, self.generate = cfg, new, generate
        self.params = init_params(cfg, 0)
        self.prompts = jnp.asarray(prompts)
        self.lens = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
        self.calls, self.mesh = 0, None
        if devices > 1:  # data parallel over `devices` CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)
            from sharding import make_mesh
            from sharding.mesh import MeshConfig
            from sharding.rules import param_shardings
            if jax.device_count() < devices:
                raise SystemExit(f"--devices {devices}: only {jax.device_count()} JAX devices; set "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
            self.mesh = make_mesh(MeshConfig(data=devices), jax.devices()[:devices])
            self.params = jax.device_put(self.params, param_shardings(self.params, self.mesh))
            self.name = f"ours: rl.sampler.generate (JAX), {devices} CPU devices, batch split"

    def run(self):
        out = self.generate(self.cfg, self.params, self.prompts, self.lens, self.new, 1.0,
                            jax.random.key(self.calls), mesh=self.mesh)
        self.calls += 1
        tokens = jax.device_get(out.tokens)  # to the host, as a rollout needs
        assert tokens.shape == (self.prompts.shape[0], self.new)
        return out


def hf_model(cfg: ModelConfig):
    import torch
    import transformers

    from model.hf_config import config_to_hf
    d = config_to_hf(cfg)
    d.pop("architectures", None), d.pop("model_type", None), d.pop("torch_dtype", None)
    hcfg = transformers.Qwen2Config(**d)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(hcfg).eval()


class Torch:
    name = "Hugging Face transformers generate (PyTorch eager)"

    def __init__(self, cfg: ModelConfig, prompts: np.ndarray, new: int):
        import torch
        torch.set_num_threads(n_cpus())
        self.torch, self.new = torch, new
        self.model = hf_model(cfg)
        self.ids = torch.from_numpy(prompts.astype(np.int64))
        self.mask = torch.ones_like(self.ids)
        # EOS = an id outside the vocabulary: never sampled (min_new_tokens also masks it)
        self.kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                       eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
        self.calls = 0

    def run(self):
        torch = self.torch
        torch.manual_seed(self.calls)
        self.calls += 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, **self.kw)
        assert out.shape == (self.ids.shape[0], self.ids.shape[1] + self.new), out.shape
        return out


# ---- tunix: in-process when importable, else a worker process in its own venv ------------------------------

TUNIX_WORKER = r'''
import json, os, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
import jax, jax.numpy as jnp
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.qwen2 import model as qwen2_lib

HZ = os.sysconf("SC_CLK_TCK")
def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / HZ

class Tok:  # ids written as decimal strings: encode/decode are exact and free of any vocabulary
    def encode(self, text, **kw): return [int(t) for t in text.split()]
    def decode(self, ids, **kw): return " ".join(str(int(i)) for i in ids)
    def bos_id(self): return 0  # falsy: no BOS is prepended
    def eos_id(self): return cfg["vocab"]
    def pad_id(self): return 0

import dataclasses
_d = qwen2_lib.ShardingConfig.get_default_sharding(is_sampling=True)
none = qwen2_lib.ShardingConfig(**{f.name: tuple(None for _ in getattr(_d, f.name))  # one device: no sharding
                                   for f in dataclasses.fields(qwen2_lib.ShardingConfig)})
mc = qwen2_lib.ModelConfig(num_layers=cfg["layers"], vocab_size=cfg["vocab"], embed_dim=cfg["d"], hidden_dim=cfg["mlp"],
                           num_heads=cfg["heads"], head_dim=cfg["head_dim"], num_kv_heads=cfg["kv_heads"],
                           rope_theta=cfg["theta"], norm_eps=cfg["eps"], use_tied_embedding=False, shd_config=none)
model = qwen2_lib.Qwen2(mc, rngs=nnx.Rngs(0))
sampler = sampler_lib.Sampler(model, Tok(), sampler_lib.CacheConfig(cache_size=cfg["prompt"] + cfg["new"],
                              num_layers=cfg["layers"], num_kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"]))
prompts = [" ".join(map(str, row)) for row in np.asarray(cfg["prompts"])]
def call(seed):
    out = sampler(prompts, max_generation_steps=cfg["new"], max_prompt_length=cfg["prompt"], temperature=1.0,
                  top_p=1.0, top_k=None, eos_tokens=[cfg["vocab"]], seed=seed)
    n = [len(t) for t in out.tokens]
    assert len(n) == len(prompts) and min(n) == max(n) == cfg["new"], (min(n), max(n))
t1 = time.perf_counter(); call(0); compile_s = time.perf_counter() - t1
print(json.dumps({"ready": True, "import_s": t1 - t0, "first_call_s": compile_s, "version": __import__("importlib.metadata").metadata.version("google-tunix")}), flush=True)
for line in sys.stdin:
    seed = int(line)
    b0, c0, w0 = busy(), time.process_time(), time.perf_counter()
    call(seed)
    w, c, b = time.perf_counter() - w0, time.process_time() - c0, busy() - b0
    print(json.dumps({"wall": w, "cpu": c, "others": max(0.0, (b - c) / ((os.cpu_count() or 1) * w))}), flush=True)
'''


class Worker:
    """A peer timed in its own process: it compiles, prints one JSON line, then times one call per stdin line."""

    name, how = "", ""

    def start(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.calls = 1

    def ready(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker failed:\n{self.proc.stderr.read()[-3000:]}")
        self.info = json.loads(line)
        return self.info

    def sample(self) -> Sample:
        self.proc.stdin.write(f"{self.calls}\n")
        self.proc.stdin.flush()
        self.calls += 1
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died:\n{self.proc.stderr.read()[-3000:]}")
        d = json.loads(line)
        return Sample(d["wall"], d["cpu"], d["others"])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Tunix(Worker):
    name = "Tunix Sampler (tunix.models.qwen2)"

    def __init__(self, cfg: ModelConfig, prompts: np.ndarray, new: int, python: str):
        spec = {"layers": cfg.n_layers, "vocab": cfg.vocab_size, "d": cfg.d_model, "mlp": cfg.mlp_dim,
                "heads": cfg.n_heads, "head_dim": cfg.head_dim, "kv_heads": cfg.n_kv_heads,
                "theta": int(cfg.rope.theta), "eps": cfg.norm_eps, "prompt": int(prompts.shape[1]), "new": new,
                "prompts": prompts.tolist()}
        try:
            import tunix  # noqa: F401
            exe = sys.executable  # importable here: same interpreter, still its own process (own XLA state)
        except ImportError:
            exe = python
        if not os.path.exists(exe):
            raise RuntimeError(f"google-tunix is not importable here and {exe} does not exist")
        self.how = "this venv" if exe == sys.executable else exe
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        self.start([exe, "-c", TUNIX_WORKER, json.dumps(spec)], env)


class OursDevices(Worker):
    """Ours, data-parallel over N XLA CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, mesh data=N:
    the batch is split, each device runs its half of the while loop on its own thread)."""

    def __init__(self, args, devices: int):
        self.name = f"ours, {devices} XLA CPU devices (batch split; env XLA_FLAGS + mesh)"
        self.how = f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        self.start([sys.executable, "-m", "bench.rollout", "--worker-devices", str(devices), "--batch", str(args.batch),
                    "--prompt", str(args.prompt), "--new", str(args.new)], env)


def worker_main(args, cfg, prompts):
    """--worker-devices N: serve timed calls of ours on N devices (see OursDevices)."""
    ours = Ours(cfg, prompts, args.new, args.worker_devices)
    t0 = time.perf_counter()
    ours.run()
    print(json.dumps({"ready": True, "first_call_s": time.perf_counter() - t0}), flush=True)
    for _ in sys.stdin:
        x = measure(ours.run)
        print(json.dumps({"wall": x.wall, "cpu": x.cpu, "others": x.others}), flush=True)


# ---- profiling our decode -----------------------------------------------------------------------------------

QUIET_WAIT = 0.0  # set from --quiet-wait: profiling waits for a quiet machine before each timed call


def _time_calls(fn, n: int, warmup: int = 2) -> float:
    """Median seconds of fn() over n calls (fn blocks)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        if QUIET_WAIT:
            wait_quiet(QUIET_WAIT)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile_parts(ours: Ours) -> list[tuple[str, float, str]]:
    """(what, seconds per call, note): the whole call against its parts, each jitted alone."""
    from model import forward
    from model.attention import attend, attention_mask
    from rl.sampler import filter_logits
    cfg, params, new = ours.cfg, ours.params, ours.new
    b, p = ours.prompts.shape
    total = p + new
    rows = []

    @jax.jit
    def prefill(params, tokens):
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        logits, cache, _ = forward(cfg, params, tokens, pos, init_cache(cfg, b, total), with_mtp=False)
        return logits[:, -1], cache

    last, cache = jax.block_until_ready(prefill(params, ours.prompts))
    t_pre = _time_calls(lambda: jax.block_until_ready(prefill(params, ours.prompts)), 5)
    rows.append(("prefill alone (forward over the prompts into a fresh cache)", t_pre, f"{b}x{p} tokens"))

    def sample_part(last, key):
        tok = jax.random.categorical(key, filter_logits(last, 0, 1.0, None), axis=-1)
        lp = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tok[:, None], axis=-1)[:, 0]
        return tok.astype(jnp.int32), lp

    def half_full(c):  # the cache as in the middle of decoding: prompt + new/2 slots filled
        k = p + new // 2
        return {**c, "index": jnp.int32(k),
                "pos": jnp.broadcast_to(jnp.where(jnp.arange(total) < k, jnp.arange(total), -1), (b, total))
                .astype(jnp.int32)}

    def steps_timed(step, n=16):
        """Median seconds of one call of `step(cache) -> cache` with the cache donated (updated in place)."""
        ts = []
        for _ in range(3):
            c = jax.block_until_ready(half_full(jax.tree.map(jnp.copy, cache)))
            c = jax.block_until_ready(step(c))  # warm up
            if QUIET_WAIT:
                wait_quiet(QUIET_WAIT)
            for _ in range(n):
                t0 = time.perf_counter()
                c = jax.block_until_ready(step(c))
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    key = jax.random.key(1)
    tok = jnp.ones((b, 1), jnp.int32)

    @partial(jax.jit, donate_argnums=(1,))
    def step_full(params, c, last):
        t, _ = sample_part(last, key)
        pos = jnp.broadcast_to(c["index"], (b, 1)).astype(jnp.int32)
        logits, c, _ = forward(cfg, params, t[:, None], pos, c, with_mtp=False)
        return c, logits[:, -1]

    @partial(jax.jit, donate_argnums=(1,))
    def step_fwd(params, c):
        pos = jnp.broadcast_to(c["index"], (b, 1)).astype(jnp.int32)
        return forward(cfg, params, tok, pos, c, with_mtp=False)[1]

    t_step = steps_timed(lambda c: step_full(params, c, last)[0])
    rows.append((f"one decode step, jitted alone, cache donated (sample + forward of 1 token) x {new}", t_step * new,
                 f"{t_step * 1e3:.2f} ms/step incl. dispatch"))
    t_fwd = steps_timed(lambda c: step_fwd(params, c))
    rows.append((f"  forward of 1 token with the cache x {new}", t_fwd * new, f"{t_fwd * 1e3:.2f} ms/step"))
    t_samp = _time_calls(lambda: jax.block_until_ready(jax.jit(sample_part)(last, key)), 50)
    rows.append((f"  sampling alone (categorical + log_softmax over [{b}, {cfg.vocab_size}]) x {new}",
                 t_samp * new, f"{t_samp * 1e3:.3f} ms/step incl. dispatch"))

    # the step's matmuls alone: per layer x@Wq, x@Wk, x@Wv, o@Wo, x@Wgate, x@Wup, h@Wdown, then the lm_head
    d, f, h, kv, hd, v = cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    ws = [jnp.ones((d, (h + 2 * kv) * hd)) * 0.01, jnp.ones((h * hd, d)) * 0.01, jnp.ones((d, 2 * f)) * 0.01,
          jnp.ones((f, d)) * 0.01]
    head = jnp.ones((d, v)) * 0.01

    @jax.jit
    def matmuls(x):
        for _ in range(cfg.n_layers):
            qkv = x @ ws[0]
            x = x + qkv[:, : h * hd] @ ws[1]
            gu = x @ ws[2]
            x = x + gu[:, :f] @ ws[3]
        return x @ head

    x = jnp.ones((b, d))
    t_mm = _time_calls(lambda: jax.block_until_ready(matmuls(x)), 30)
    flops = 2 * b * (cfg.n_layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f) + d * v)
    rows.append((f"  its matmuls alone (fused q/k/v, o, gate/up, down x {cfg.n_layers} layers + lm_head) x {new}",
                 t_mm * new, f"{t_mm * 1e3:.2f} ms/step, {flops / t_mm / 1e9:.0f} GFLOP/s"))

    kc = jnp.ones((b, kv, total, hd)) * 0.1
    q = jnp.ones((b, h, 1, hd)) * 0.1
    qpos = jnp.full((b, 1), p + new // 2, jnp.int32)
    kvpos = jnp.broadcast_to(jnp.where(jnp.arange(total) <= p + new // 2, jnp.arange(total), -1), (b, total))

    @jax.jit
    def attn(q, k, vv):
        m = attention_mask(qpos, kvpos)
        o = q
        for _ in range(cfg.n_layers):
            o = attend(o, k, vv, m, cfg.attn_scale)
        return o

    t_att = _time_calls(lambda: jax.block_until_ready(attn(q, kc, kc)), 30)
    rows.append((f"  attention over the {total}-slot cache alone (x {cfg.n_layers} layers) x {new}", t_att * new,
                 f"{t_att * 1e3:.2f} ms/step"))
    whole = _time_calls(ours.run, 5, warmup=1)
    t_one = _time_calls(lambda: jax.device_get(ours.generate(cfg, params, ours.prompts, ours.lens, 1, 1.0, key).tokens), 5)
    rows.append(("generate with 1 new token (prefill + 1 sample; cache of prompt + 1 slots)", t_one,
                 f"in-loop step = (whole - this) / {new - 1} = {(whole - t_one) / (new - 1) * 1e3:.2f} ms"))
    rows.append(("whole generate call (timed again here)", whole, f"{(whole - t_pre) / new * 1e3:.2f} ms/step "
                 "after prefill"))
    return rows


def profile_trace(ours: Ours, calls: int = 1) -> list[tuple[str, float, str]]:
    """Per-HLO-op time (ms per call, summed over threads) from a jax.profiler trace of generate."""
    from rl.sampler import _generate
    kw = dict(max_new_tokens=ours.new, temperature=1.0, top_k=0, top_p=1.0, greedy=False, eos_id=None,
              stop_sequences=(), pad_id=0, vocab_limit=None)
    args = (ours.cfg, ours.params, ours.prompts, ours.lens, jax.random.key(0))
    hlo = _generate.lower(*args, **kw).compile().as_text()
    meta = hlo_op_meta(hlo)
    ours.run()
    d = tempfile.mkdtemp(prefix="bench_rollout_")
    if QUIET_WAIT:
        wait_quiet(QUIET_WAIT)
    with jax.profiler.trace(d):
        for _ in range(calls):
            ours.run()
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(files[0])
    per_op, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in meta:
                    per_op[ev.name] += ev.duration_ns
                    count[ev.name] += 1
    return [(name, ns / calls / 1e6, f"{count[name] // calls}x  " + meta[name][1] + "  " + meta[name][0])
            for name, ns in per_op.most_common()]


def kind_of(name: str, desc: str) -> str:
    on = desc.lower()
    if "gumbel" in on or "uniform" in on or "threefry" in on or "iota_reduce" in name or "log_softmax" in on:
        k = "sampling (RNG, argmax of the Gumbel trick, log_softmax)"
    elif name.startswith(("copy", "transpose")) and on.split("  ")[1].strip() in ("", "reshape"):
        k = "layout copies of loop-invariant weights / activations"
    elif "dynamic-update-slice" in name or "dynamic_update_slice" in on or "scatter" in on:
        k = "cache / buffer writes (dynamic-update-slice, scatter)"
    elif "bkgt" in on or "bksd" in on or (re.search(r"\[\d+,\d+,\d+,\d+", desc) and any(
            w in on for w in ("select_n", "reduce_max", "reduce_sum", "exp", "sub", "div"))):
        k = "attention core (scores, mask, softmax, weighted sum)"
    elif "dot_general" in on or name.startswith("dot"):
        k = "matmuls (q/k/v/o projections, MLP, lm_head)"
    else:
        k = "other elementwise (norms, rope, residuals, glue)"
    return k


def print_trace(ops, wall: float, new: int, top: int = 15):
    """ops: (name, ms per call, 'COUNTx  op_name  shape'); ops run once per call are prefill (and setup)."""
    total = sum(ms for _, ms, _ in ops)
    kinds = collections.Counter()
    for name, ms, desc in ops:
        phase = "prefill" if desc.startswith("1x") else "decode loop"
        kinds[phase, kind_of(name, desc)] += ms
    phases = collections.Counter()
    for (ph, _), ms in kinds.items():
        phases[ph] += ms
    print(f"\n### generate: per-op time from jax.profiler (ms per call; total {total:.0f} ms of ops vs {wall * 1e3:.0f} ms "
          "wall untraced)\n")
    print("| phase | kind | ms | share |\n|---|---|---|---|")
    for ph in ("prefill", "decode loop"):
        print(f"| **{ph}** | all | **{phases[ph]:.0f}** | **{phases[ph] / total:.0%}** |")
        for (p2, k), ms in kinds.most_common():
            if p2 == ph:
                print(f"| | {k} | {ms:.0f} | {ms / total:.0%} |")
    print(f"\nTop {top} ops:\n\n| op | ms | calls, op_name, shape |\n|---|---|---|")
    for name, ms, desc in ops[:top]:
        print(f"| {name} | {ms:.1f} | `{desc[:140]}` |")


# ---- what-if: candidate fixes, monkeypatched into this process only (nothing in the library changes) ---------

def apply_patches(names: set[str]):
    """proj: q/k/v projections as [b, t, h, k] (a plain matmul) then a transpose of the activation, instead of the
    'btd,dhk->bhtk' einsum that XLA lowers as W^T x^T with a copy of each weight every decode step.
    attn: decode attention (q_len 1) as multiply + reduce instead of a batched dot_general of 128 tiny matmuls.
    samp: Gumbel-max as max + first index of the max instead of argmax (a slow variadic reduce on XLA:CPU); the
    samples are identical to jax.random.categorical's.
    pre: prefill computes the lm_head on the last position only and attends over the prompt slots only, not the
    whole prompt + max_new_tokens cache."""
    import types

    import model.attention as A
    import model.transformer as T
    import rl.sampler as S
    if "proj" in names:
        def _proj(self, x, w, bias_name):
            y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(x.dtype))
            if self.cfg.qkv_bias:
                y = y + getattr(self, bias_name)[...].astype(x.dtype)[None, None]
            return jnp.swapaxes(y, 1, 2)
        A.Attention._proj = _proj
    if "attn" in names:
        dense = A.attend

        def attend(q, k, v, mask, scale):
            b, h, t, dk = q.shape
            if t != 1:
                return dense(q, k, v, mask, scale)
            kvh = k.shape[1]
            qg = q.reshape(b, kvh, h // kvh, dk)
            s = jnp.sum(qg[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) * scale
            s = jnp.where(mask[:, None, :, :], s, A.MASKED)
            p = jax.nn.softmax(s, axis=-1)
            return jnp.sum(p[..., None] * v[:, :, None, :, :], axis=-2).reshape(b, h, 1, v.shape[-1])
        A.attend = attend
    if "pre" in names:
        head, inner = T.Transformer.head, A.attend
        T.Transformer.head = lambda self, h: head(self, h[:, -1:] if h.shape[1] > 1 else h)

        def attend_pre(q, k, v, mask, scale):
            t = q.shape[2]
            if t > 1 and k.shape[2] > t:  # prefill from an empty cache: the prompt sits in slots [0, t)
                k, v, mask = k[:, :, :t], v[:, :, :t], mask[..., :t]
            return inner(q, k, v, mask, scale)
        A.attend = attend_pre
    if "samp" in names:
        def categorical(key, logits, axis=-1):
            g = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
            m = jnp.max(g, axis=-1, keepdims=True)
            return jnp.min(jnp.where(g == m, jnp.arange(g.shape[-1]), g.shape[-1]), axis=-1)
        rand = types.SimpleNamespace(**{k: getattr(jax.random, k) for k in dir(jax.random) if not k.startswith("__")})
        rand.categorical = categorical
        S.jax = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if not k.startswith("__")})
        S.jax.random = rand  # only rl.sampler's `jax` name is shadowed


WHAT_IF = ["base", "proj", "attn", "samp", "pre", "proj+attn+samp+pre", "2dev", "2dev+proj+attn+samp+pre"]


def what_if(args):
    rows = []
    for combo in WHAT_IF:
        names = set(combo.split("+")) - {"base"}
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        devices = 1
        if "2dev" in names:
            env["XLA_FLAGS"], devices = "--xla_force_host_platform_device_count=2", 2
        cmd = [sys.executable, "-m", "bench.rollout", "--no-torch", "--no-tunix", "--also-devices", "0",
               "--rounds", str(args.sweep_rounds), "--budget", "60", "--batch", str(args.batch), "--prompt",
               str(args.prompt), "--new", str(args.new), "--max-others", str(args.max_others), "--quiet-wait",
               str(args.quiet_wait), "--devices", str(devices), "--patch", "+".join(sorted(names - {"2dev"})) or "none"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        m = re.search(r"^OURS tok_s=([\d.nan]+) ms=([\d.nan]+) cpu_s=([\d.nan]+) clean=(\w+) tokens=(\d+)",
                      r.stdout, re.M)
        if not m:
            print(r.stdout[-1500:], r.stderr[-1500:], file=sys.stderr)
            rows.append((combo, float("nan"), float("nan"), float("nan"), "failed", ""))
        else:
            rows.append((combo, float(m.group(1)), float(m.group(2)), float(m.group(3)), m.group(4), m.group(5)))
    base = rows[0][1]
    print("\n### What-if: candidate fixes monkeypatched into ours (each in its own process; see apply_patches)\n")
    print("| patches | new tok/s | ms per call | CPU-s per call | vs base | clean | token checksum |")
    print("|---|---|---|---|---|---|---|")
    for combo, tps, ms, cpu, clean, ck in rows:
        print(f"| {combo} | {tps:,.0f} | {ms:,.0f} | {cpu:.2f} | {tps / base:.2f}x | {clean} | {ck} |")


# ---- main ----------------------------------------------------------------------------------------------------

XLA_VARIANTS = [  # (label, XLA_FLAGS, --devices)
    ("default (no XLA_FLAGS)", None, 1),
    ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
     "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", 1),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
     "--xla_cpu_enable_concurrency_optimized_scheduler=false", 1),
    ("--xla_cpu_use_xnnpack=false", "--xla_cpu_use_xnnpack=false", 1),
    ("--xla_force_host_platform_device_count=2, batch split over 2 devices (mesh data=2)",
     "--xla_force_host_platform_device_count=2", 2),
]


def xla_sweep(args):
    rows = []
    for label, flags, devices in XLA_VARIANTS:
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        if flags:
            env["XLA_FLAGS"] = flags
        cmd = [sys.executable, "-m", "bench.rollout", "--no-torch", "--no-tunix", "--rounds", str(args.sweep_rounds),
               "--budget", "60", "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
               "--max-others", str(args.max_others), "--quiet-wait", str(args.quiet_wait), "--devices", str(devices),
               "--also-devices", "0"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        m = re.search(r"^OURS tok_s=([\d.nan]+) ms=([\d.nan]+) cpu_s=([\d.nan]+) clean=(\w+)", r.stdout, re.M)
        if not m:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            rows.append((label, float("nan"), float("nan"), float("nan"), "failed"))
        else:
            rows.append((label, float(m.group(1)), float(m.group(2)), float(m.group(3)), m.group(4)))
    print("\n### ours under XLA_FLAGS thread settings (each in its own process)\n")
    print("| XLA_FLAGS | new tok/s | ms per call | CPU-s per call | clean |\n|---|---|---|---|---|")
    for label, tps, ms, cpu, clean in rows:
        print(f"| `{label}` | {tps:,.0f} | {ms:,.0f} | {cpu:.2f} | {clean} |")


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
    ap.add_argument("--also-devices", type=int, default=2,
                    help="also time ours over N XLA CPU devices in a worker process (0 = off)")
    ap.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--patch", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--what-if", action="store_true", help="time candidate fixes (monkeypatched), each in a subprocess")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--xla-sweep", action="store_true")
    ap.add_argument("--sweep-rounds", type=int, default=4)
    args = ap.parse_args(argv)
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait
    command = "python -m bench.rollout " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    cfg = small_qwen2()
    prompts = make_prompts(cfg, args.batch, args.prompt)
    if args.patch != "none":
        apply_patches(set(args.patch.split("+")))
    if args.worker_devices:
        return worker_main(args, cfg, prompts)
    ntok = args.batch * args.new
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {n_cpus()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
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
    ours = Ours(cfg, prompts, args.new, args.devices)
    t0 = time.perf_counter()
    ours.run()
    print(f"ours: first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
    peers = [("ours", ours)]
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
        th = Torch(cfg, prompts, args.new)
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
        wall = statistics.median(x.wall for x in chosen)
        cpu = statistics.median(x.cpu for x in chosen)
        res[k] = dict(name=impl.name, tps=ntok / wall, wall=wall, cpu=cpu, n=len(chosen), total=len(samples[k]),
                      clean=clean, spread=(min(x.wall for x in chosen), max(x.wall for x in chosen)))
    o = res["ours"]
    checksum = int(np.asarray(ours.generate(cfg, ours.params, ours.prompts, ours.lens, args.new, 1.0, jax.random.key(123),
                                            mesh=ours.mesh).tokens).sum())  # same key: patches must keep the samples
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
        rows = profile_parts(ours)
        print(f"\n### Where our decode time goes (each part jitted alone; seconds per {args.new}-token call)\n")
        print("| part | s per call | note |\n|---|---|---|")
        for what, s, note in rows:
            print(f"| {what} | {s:.2f} | {note} |")
        print_trace(profile_trace(ours), o["wall"], args.new)
    if args.xla_sweep:
        xla_sweep(args)
    if args.what_if:
        what_if(args)

    print(f"\ncommand: {command}")
    if tunix_note:
        print(tunix_note)
    sp_t = o["tps"] / res["transformers"]["tps"] if "transformers" in res else float("nan")
    sp_x = o["tps"] / res["tunix"]["tps"] if "tunix" in res else float("nan")
    print(f"RESULT speedup_vs_transformers={sp_t:.3f} speedup_vs_tunix={sp_x:.3f}")


if __name__ == "__main__":
    main()
