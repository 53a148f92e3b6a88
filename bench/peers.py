"""The peers our benchmarks are timed against: Hugging Face transformers (PyTorch eager on CPU) built from our config
through `model.hf.config_to_hf`, and Tunix's sampler in a worker process.

- `hf_model(cfg, train=)`: the transformers model of `cfg` (Qwen2ForCausalLM for a Qwen2-style config,
  DeepseekV3ForCausalLM for MLA + MoE, ...), random weights, float32, SDPA attention;
- `HFTrain`: one AdamW training step of it (bench/train.py);
- `HFForward`: its forward and its greedy `generate` (bench/forward.py);
- `HFGenerate`: its sampling `generate` (bench/rollout.py);
- `Worker` / `Tunix`: a peer that times its own calls in another process (bench/rollout.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.common import Sample, n_cpus
from model.config import ModelConfig

# ---- Hugging Face transformers ----------------------------------------------------------------------------


def hf_model(cfg: ModelConfig, train: bool = False, attn: str = "sdpa", seed: int = 0):
    """The transformers model with our config's sizes (`config_to_hf`, as `save_hf` writes config.json), random
    weights (torch seed `seed`), float32, in train() or eval() mode. DeepSeek-V3: no MTP modules (transformers
    builds none; our benches run without MTP too)."""
    import torch
    import transformers

    from model.hf import config_to_hf
    d = config_to_hf(cfg)
    arch, model_type = d.pop("architectures")[0], d.pop("model_type")
    d.pop("torch_dtype", None)
    d.update(attention_dropout=0.0, use_cache=not train)
    if model_type == "deepseek_v3":
        d["num_nextn_predict_layers"] = 0
    hcfg = transformers.AutoConfig.for_model(model_type, **d)
    hcfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hcfg).to(torch.float32)
    return model.train() if train else model.eval()


class HFTrain:
    """One training step of the transformers model on a token batch [batch, seq + 1] (inputs / targets shifted by
    one, loss mask of ones): forward, masked token cross-entropy, backward, clip_grad_norm_, AdamW (decay on the
    ≥2-d non-embedding weights, as our optimizer), at the warm-up's first learning rate. `autocast`: the forward
    under torch.autocast('cpu', bfloat16) (PyTorch's mixed precision; the weights and the optimizer stay float32)."""

    def __init__(self, cfg: ModelConfig, tokens: np.ndarray, optim: dict, autocast: bool = False):
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch, self.clip, self.autocast = torch, optim["clip_norm"], autocast
        self.model = hf_model(cfg, train=True)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=optim["lr"] / optim["warmup_steps"], betas=(optim["b1"], optim["b2"]), eps=1e-8)
        t = torch.from_numpy(tokens.astype(np.int64))
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.mask = torch.ones(self.targets.shape, dtype=torch.float32)
        self.losses = []

    def step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):  # bf16 compute, fp32 weights
            logits = self.model(input_ids=self.inputs, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                self.targets.reshape(-1), reduction="none")
        loss = (nll * self.mask.reshape(-1)).sum() / self.mask.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.losses.append(float(loss.detach()))


class HFForward:
    """The transformers model on the same shapes: forward on [batch, seq]; greedy `generate` on the decode batch.

    Decode cost per step = (time of generate(n) - time of generate(1)) / (n - 1), which leaves out the prompt's
    prefill as the JAX decode timing does."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, dbatch: int, prompt_len: int, threads: int):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.model = hf_model(cfg)
        self.params = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        self.prompt = torch.randint(0, cfg.vocab_size, (dbatch, prompt_len), generator=g)
        self.mask = torch.ones_like(self.prompt)

    def forward(self):
        with self.torch.inference_mode():
            self.model(input_ids=self.tokens, use_cache=False, logits_to_keep=0)

    def generate(self, n: int) -> float:
        """Seconds for prefill + n greedy new tokens (no EOS)."""
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=self.prompt, attention_mask=self.mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
            dt = time.perf_counter() - t0
        assert out.shape[1] == self.prompt.shape[1] + n, out.shape
        return dt

    def decode_tokens(self, new: int, rounds: int, budget_s: float) -> int:
        """Warm up; the number of new tokens (<= new) whose decodes, `rounds` of them, fit in budget_s."""
        self.generate(2)
        per_token = max(self.generate(9) - self.generate(1), 1e-6) / 8
        if per_token * new * rounds <= budget_s:
            return new
        return max(9, min(new, int(budget_s / (per_token * rounds))))

    def decode_step_time(self, n: int) -> float:
        return max(self.generate(n) - self.generate(1), 1e-9) / (n - 1)


class HFGenerate:
    """transformers `generate(do_sample=True, temperature=1, top_k=0, top_p=1, min_new_tokens=max_new_tokens=new)`
    under inference_mode on right-aligned full-length prompts; EOS is the last id and min_new_tokens masks it."""

    name = "Hugging Face transformers generate (PyTorch eager)"

    def __init__(self, cfg: ModelConfig, prompts: np.ndarray, new: int):
        import torch
        torch.set_num_threads(n_cpus())
        self.torch, self.new = torch, new
        self.model = hf_model(cfg)
        self.ids = torch.from_numpy(prompts.astype(np.int64))
        self.mask = torch.ones_like(self.ids)
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


# ---- peers in their own process ----------------------------------------------------------------------------

class Worker:
    """A peer timed in its own process: it compiles, prints one JSON line, then times one call per stdin line and
    answers {"wall", "cpu", "others"} (as `bench.common.measure`)."""

    name, how = "", ""

    def start(self, argv: list[str], env: dict, cwd: str | None = None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=cwd)
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


class Tunix(Worker):
    """`tunix.generate.sampler.Sampler` over `tunix.models.qwen2.Qwen2` with our Qwen2-style config's sizes (random
    weights, float32, sharding off), in this interpreter if google-tunix is importable here, else under `python`
    (a separate venv with `pip install google-tunix`)."""

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
