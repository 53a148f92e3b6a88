"""Evaluate a run's newest checkpoint on held-out problems: pass@1 (over k samples), pass@k, maj@k, format, length.

    python -m experiments.eval RUN_DIR [--k 8] [--n 64] [--max-new-tokens 48] [--temperature 0.6] [--top-p 0.95]
                                       [--seed 0] [--batch-size 64] [--exclude-seen] [--records FILE.jsonl]
                                       [--template '...{prompt}...'] [--samples] [--out RUN_DIR/eval.json]

RUN_DIR is a pretraining / SFT run (config.json of an `Experiment`: 'model' and 'data'; checkpoint state = the train
state) or a GRPO run (config.json of an `RLExperiment`: 'model', 'prompts', 'task'; checkpoint state =
{'train': train state, 'ref': reference params (when β > 0)}). Problems and their scoring: the run's task
(`rl/tasks/`; arithmetic when the config names none): for arithmetic `rl.tasks.held_out_problems`
(synthetic arithmetic from a seed stream disjoint from training; `--exclude-seen` also drops every expression of the
synthetic training sets the run (and its `init_from` base) drew from, ~13 s per 100k records); `--records` reads
JSONL records with 'prompt' (or the config's prompt field), 'answer' and optionally 'difficulty'. Prompts are rendered
with the run's chat template unless `--template` is given. Writes the metrics of `rl.evaluate.evaluate` plus run
metadata to --out (default RUN_DIR/eval.json); `--samples` also writes every completion to RUN_DIR/eval_samples.jsonl.
From Python, `evaluate_run(run_dir, records, k=..., ...)` does the same for any records (the R1 stages' eval.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

log = logging.getLogger("experiments.eval")


def dataclass_from_dict(cls, d: dict | None):
    """`cls(**d)` keeping only cls's fields (unknown keys are logged and dropped); lists become tuples."""
    if d is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        log.warning("%s: ignoring unknown config keys %s", cls.__name__, unknown)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def model_config_from_dict(d: dict):
    """A ModelConfig from its `dataclasses.asdict` form (as run loops save it): `model.config.config_from_dict`."""
    from model.config import config_from_dict
    return config_from_dict(d)


def task_from_dict(d: dict | None):
    """The task a run's config.json names ({'name', fields...}); runs saved without one are arithmetic's."""
    from rl.tasks import TASKS, Arithmetic
    if not d:
        return Arithmetic()
    d = dict(d)
    name = d.pop("name", "arithmetic")
    if name not in TASKS:
        raise ValueError(f"task: unknown {name!r} in the run's config.json; known: {sorted(TASKS)}")
    return dataclass_from_dict(TASKS[name], d)


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: not a run directory")
    with open(path) as fh:
        saved = json.load(fh)
    if "model" not in saved or not ({"prompts", "data"} & set(saved)):
        raise ValueError(f"{path}: expected a run config with 'model' and 'prompts' or 'data' (an HF checkpoint "
                         "directory is not supported here)")
    return saved


def load_run_params(run_dir: str, saved: dict, model_cfg, mesh, rules=None):
    """(params, checkpoint step) of the newest intact checkpoint of a pretraining / SFT or GRPO run directory.

    Only the policy params are read (train.checkpoint.Checkpointer.restore_params): from the state itself
    (pretraining / SFT) or from its 'train' entry (GRPO); optimizer moments and reference params are never loaded.
    """
    import jax

    from model import init_params
    from sharding import DEFAULT_RULES, param_shardings
    from sharding.rules import use_rules
    from train.checkpoint import Checkpointer

    rules = rules or DEFAULT_RULES
    ckdir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"{ckdir} does not exist: the run has saved no checkpoint")
    with use_rules(mesh, rules):
        shapes = jax.eval_shape(lambda: init_params(model_cfg, 0))
        shardings = param_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)
    ckpt = Checkpointer(ckdir)
    try:
        restored = ckpt.restore_params(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckdir}: no usable checkpoint")
    params, meta = restored
    return params, int(meta["step"])


def _seen_seeds(run_dir: str, saved: dict) -> list[tuple[int, int]]:
    """(seed, synthetic_size) of each synthetic training source of the run and of its init_from base run."""
    out = []
    for d in (saved.get("prompts"), saved.get("data")):
        if d and d.get("source") == "synthetic":
            out.append((int(d.get("seed", 0)), int(d.get("synthetic_size", 100_000))))
    base = saved.get("init_from") or ""
    for cand in (base, os.path.join(run_dir, base) if base and not os.path.isabs(base) else ""):
        if cand and os.path.exists(os.path.join(cand, "config.json")):
            try:
                out += _seen_seeds(cand, read_run_config(cand))
            except ValueError:
                pass
            break
    return sorted(set(out))


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_sampling(saved: dict, temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 0):
    """The held-out Sampling for a saved run: a GRPO run's own (`eval_sampling`: only temperature and top-p
    change), else the defaults with the run's BOS setting; `max_new_tokens` > 0 overrides the length."""
    from rl.evaluate import EVAL_SAMPLING, eval_sampling
    from rl.rollout import Sampling

    trained = (saved.get("grpo") or {}).get("sampling")
    if trained is not None:
        base = dataclass_from_dict(Sampling, trained)
    else:
        base = dataclasses.replace(EVAL_SAMPLING, add_bos=bool((saved.get("data") or {}).get("add_bos", True)))
    s = eval_sampling(base, temperature, top_p)
    return dataclasses.replace(s, max_new_tokens=max_new_tokens) if max_new_tokens > 0 else s


def evaluate_run(run_dir: str, records: list[dict], *, k: int = 8, max_new_tokens: int = 0,
                 temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, batch_size: int = 64,
                 max_prompt_len: int = 0, template: str | None = None, out: str = "", samples: bool = False,
                 meta: dict | None = None, task=None, sampling=None) -> dict:
    """Evaluate the newest checkpoint of a pretraining / SFT / GRPO run directory on `records` and write the metrics
    of `rl.evaluate.evaluate` plus run metadata to `out` (default RUN_DIR/eval.json); returns what it wrote.

    Prompts are rendered with the run's chat template unless `template` is given; `max_prompt_len` 0 uses the run's
    (GRPO) or the longest prompt; sampling is the run's own (`run_sampling`; `max_new_tokens` 0 keeps its length, or
    48 for a run that did not sample) with `jax.random.key(seed)`. `samples=True` also writes every completion to
    eval_samples.jsonl beside `out`. `meta` adds fields to the 'eval' entry. `task` (a `rl.tasks.Task` or name)
    judges the samples; default: the task the run's config.json names (arithmetic for runs without one).
    `sampling` (a `rl.rollout.Sampling`) replaces the run's own, so that runs of different kinds sample alike.
    """
    import jax

    from rl.evaluate import evaluate
    from sharding import make_mesh
    from sharding.mesh import MeshConfig
    from train.data import DataConfig, load_tokenizer, validate_vocab

    saved = read_run_config(run_dir)
    model_cfg = model_config_from_dict(saved["model"])
    data_cfg = dataclass_from_dict(DataConfig, saved.get("prompts") or saved["data"])
    tok = load_tokenizer(data_cfg.tokenizer)
    validate_vocab(tok, model_cfg.vocab_size)
    try:
        mesh = make_mesh(dataclass_from_dict(MeshConfig, saved.get("mesh") or {}))
    except ValueError as e:
        log.warning("saved mesh does not fit these devices (%s); using all devices as data-parallel", e)
        mesh = make_mesh(MeshConfig())
    t0 = time.perf_counter()
    params, step = load_run_params(run_dir, saved, model_cfg, mesh)
    t1 = time.perf_counter()
    sampling = sampling or run_sampling(saved, temperature, top_p, max_new_tokens)
    metrics = evaluate(model_cfg, params, tok, records, k=k, sampling=sampling,
                       max_prompt_len=max_prompt_len or saved.get("max_prompt_len") or None,
                       template=template, data_cfg=data_cfg if template is None else None,
                       rng=jax.random.key(seed), batch_size=batch_size, mesh=mesh, details=samples,
                       task=task if task is not None else task_from_dict(saved.get("task")))
    problems = metrics.pop("problems", None)
    result = {**metrics,
              "run_dir": run_dir, "checkpoint_step": step,
              "eval": {"k": k, "n": len(records), "sampling": dataclasses.asdict(sampling), "seed": seed,
                       "template": template if template is not None else data_cfg.chat_template, **(meta or {})},
              "time_eval_s": time.perf_counter() - t1, "time_total_s": time.perf_counter() - t0}
    path = out or os.path.join(run_dir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    if problems is not None:
        with open(os.path.join(os.path.dirname(path) or ".", "eval_samples.jsonl"), "w") as fh:
            fh.writelines(json.dumps(prob) + "\n" for prob in problems)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.eval", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--k", type=int, default=8, help="samples per problem")
    p.add_argument("--n", type=int, default=64, help="held-out problems")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the run's own (48 for a run that did not sample)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out problems and of sampling")
    p.add_argument("--batch-size", type=int, default=64, help="rows per generate call")
    p.add_argument("--max-prompt-len", type=int, default=0, help="0: the run's max_prompt_len, else the longest")
    p.add_argument("--exclude-seen", action="store_true", help="drop held-out problems found in training's sources")
    p.add_argument("--records", default="", help="JSONL problems instead of the run's task's held-out split")
    p.add_argument("--template", default=None, help="chat template with {prompt} (default: the run's)")
    p.add_argument("--samples", action="store_true", help="also write RUN_DIR/eval_samples.jsonl")
    p.add_argument("--out", default="", help="default RUN_DIR/eval.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every restore step at INFO

    from rl.tasks import Arithmetic, held_out_problems, seen_synthetic_prompts

    try:
        saved = read_run_config(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exclude = set()
    seen = _seen_seeds(args.run_dir, saved) if args.exclude_seen and not args.records else []
    for seed, size in seen:
        log.info("collecting the expressions of synthetic seed %d (%d records) to exclude", seed, size)
        exclude |= seen_synthetic_prompts(seed, size)
    task = task_from_dict(saved.get("task"))
    if args.records:
        records = _read_jsonl(args.records)[:args.n]
    elif isinstance(task, Arithmetic):
        records = held_out_problems(args.seed, args.n, exclude=exclude)
    else:
        records = task.held_out(args.n)
    metrics = evaluate_run(args.run_dir, records, k=args.k, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size, max_prompt_len=args.max_prompt_len, template=args.template,
                           out=args.out, samples=args.samples,
                           meta={"records": args.records or f"{task.name}_held_out",
                                 "excluded_seen_seeds": [s for s, _ in seen]})
    step, path = metrics["checkpoint_step"], args.out or os.path.join(args.run_dir, "eval.json")
    k = metrics["k"]
    print(f"step {step}: pass@1 {metrics['pass@1']:.3f}  pass@{k} {metrics['pass@k']:.3f}  "
          f"maj@{k} {metrics['maj@k']:.3f}  format {metrics['format_rate']:.3f}  think {metrics['think_usage']:.3f}  "
          f"len {metrics['response_len_mean']:.1f}  ({metrics['n_problems']} problems) -> {path}")
    for d, m in (metrics.get("by_difficulty") or {}).items():
        print(f"  difficulty {d}: n {m['n']}  pass@1 {m['pass@1']:.3f}  pass@{k} {m['pass@k']:.3f}  "
              f"maj@{k} {m['maj@k']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
