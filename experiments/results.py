"""The pipeline's report: results.json, results.md, rl_curves.png and pass_by_length.png from its run directories.

    python -m experiments.results RUN_DIR        # rewrite the report of a (finished or partial) pipeline run

results.json:
    {"stages": {stage: {split: {"pass@1": mean, "pass@1_std": std, "pass@k": ..., "maj@k": ..., "response_len_mean":
     ..., "think_usage": ..., "format_rate": ... (each with its _std), "n_seeds": n, "pass@1_by_length": {terms: mean},
     "pass@1_by_length_std": {...}}, "wall_s": mean seconds per seed (training + its evaluations)}},
     "seeds": [...], "splits": [...], "k": k, "n_problems": n, "random_reward_rate": p, "rl_student_steps": steps,
     "cpu": "...", "wall_s_total": ...}
Means and standard deviations (ddof 1) are over seeds; the shared bases are one run (std 0). A stage missing from
the run directory (not run, or not finished) is absent.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

METRICS = ("pass@1", "pass@k", "maj@k", "response_len_mean", "think_usage", "format_rate")
LABELS = {"base": "base (pretrained)", "student_base": "student base (pretrained, dense)",
          "r1_zero": "R1-Zero (GRPO from base)", "cold_start": "cold-start SFT", "r1": "R1 (cold start + GRPO)",
          "rejection_sft": "rejection-sampling SFT", "distill_student": "distilled student",
          "rl_student": "RL student (same compute)", "random_reward": "control: random reward",
          "format_only": "control: format reward only"}
RL_STAGES = ("r1_zero", "r1", "rl_student", "random_reward", "format_only")
CURVES = ("reward", "accuracy", "response_len_mean", "think_rate")


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def base_rate(base_dir: str) -> float:
    """The base's in-distribution held-out pass@1 (the random-reward control's rate)."""
    m = _read(os.path.join(base_dir, "eval_in_distribution.json"))
    if m is None:
        raise FileNotFoundError(f"{base_dir}/eval_in_distribution.json: the base has not been evaluated")
    return float(m["pass@1"])


def run_dirs(root: str, stage: str, seeds, base_dir: str = "", countdown: bool = False) -> list[str]:
    """Where a stage's runs live: the shared bases once, every other stage once per seed."""
    top = os.path.join(root, "countdown") if countdown else root
    if stage == "base":
        return [os.path.join(top, "base") if countdown else (base_dir or os.path.join(root, "base"))]
    if stage == "student_base":
        return [os.path.join(root, "student_base")]
    return [os.path.join(top, stage, f"seed{s}") for s in seeds]


def _stats(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(evals: list[dict]) -> dict:
    """Mean and std over seeds of each metric, and pass@1 by chain length (the eval files' 'by_difficulty')."""
    out = {"n_seeds": len(evals)}
    for key in METRICS:
        vals = [e[key] for e in evals if e.get(key) is not None]
        if vals:
            out[key], out[f"{key}_std"] = _stats(vals)
    lengths = sorted({int(d) for e in evals for d in e.get("by_difficulty", {})})
    by = {d: [e["by_difficulty"][str(d)]["pass@1"] for e in evals if str(d) in e.get("by_difficulty", {})]
          for d in lengths}
    out["pass@1_by_length"] = {str(d): _stats(v)[0] for d, v in by.items()}
    out["pass@1_by_length_std"] = {str(d): _stats(v)[1] for d, v in by.items()}
    return out


def collect(root: str, seeds, splits, base_dir: str = "") -> dict:
    """{"stages": {stage: {split: summary, "wall_s": ...}}} from the eval files and timings.json under root."""
    times = _read(os.path.join(root, "timings.json")) or {}
    stages = {}
    for stage in LABELS:
        for countdown, names in ((False, splits), (True, ("countdown",))):
            if countdown and stage not in ("base", "r1_zero"):
                continue
            dirs = run_dirs(root, stage, seeds, base_dir, countdown)
            for split in names:
                evals = [m for d in dirs if (m := _read(os.path.join(d, f"eval_{split}.json"))) is not None]
                if evals:
                    entry = stages.setdefault(stage, {})
                    entry[split] = summarize(evals)
                    keys = [os.path.relpath(d, root) for d in dirs]
                    walls = [t["train_s"] + t["eval_s"] for key in keys if (t := times.get(key))]
                    if walls:
                        entry[split]["wall_s"] = float(np.mean(walls))
                        if not countdown:
                            entry["wall_s"] = float(np.mean(walls))
    runs = [t for t in times.values() if "train_s" in t]
    # the pipeline's own clock when it recorded one (its runs may overlap in parallel workers), else the runs' sum
    total = times.get("pipeline_wall_s", {}).get("wall_s") or sum(t["train_s"] + t["eval_s"] for t in runs)
    return {"stages": stages, "wall_s_total": total}


def _cell(entry: dict, key: str, fmt: str = "{:.3f}") -> str:
    if key not in entry:
        return "—"
    mean, std = entry[key], entry.get(f"{key}_std", 0.0)
    return fmt.format(mean) + (" ± " + fmt.format(std) if entry.get("n_seeds", 1) > 1 else "")


def markdown(res: dict, root: str) -> str:
    k, seeds = res.get("k", "k"), res["seeds"]
    lines = [f"# R1 recipe at laptop scale: {root}", "",
             f"CPU: {res.get('cpu', '?')}. {res.get('n_problems', '?')} held-out problems per split, k = {k} samples "
             f"each (T 0.6, top-p 0.95, one sampling key for every model); pass@1 is the mean over the k samples. "
             f"Mean ± std over seeds {list(seeds)} (the bases are one run). Random-reward rate "
             f"{res.get('random_reward_rate', float('nan')):.3f} (the base's pass@1); the RL student ran "
             f"{res.get('rl_student_steps', '?')} GRPO steps (the distillation's compute). Total wall time "
             f"{res['wall_s_total'] / 60:.1f} min.", ""]
    for split in res["splits"] + (["countdown"] if any("countdown" in e for e in res["stages"].values()) else []):
        rows = [(st, e[split], e.get("wall_s") if split != "countdown" else e[split].get("wall_s"))
                for st, e in res["stages"].items() if split in e]
        if not rows:
            continue
        lines += [f"## {split}", "", f"| stage | pass@1 | pass@{k} | maj@{k} | think usage | response length | "
                  "wall per seed (min) |", "|---|---|---|---|---|---|---|"]
        for st, e, wall in rows:
            lines.append(f"| {LABELS.get(st, st)} | {_cell(e, 'pass@1')} | {_cell(e, 'pass@k')} | {_cell(e, 'maj@k')} | "
                         f"{_cell(e, 'think_usage', '{:.2f}')} | {_cell(e, 'response_len_mean', '{:.1f}')} | "
                         f"{'—' if wall is None else f'{wall / 60:.1f}'} |")
        lines.append("")
    lengths = sorted({int(d) for e in res["stages"].values() for sp in res["splits"] if sp in e
                      for d in e[sp]["pass@1_by_length"]})
    if lengths:
        lines += ["## pass@1 by chain length (terms; beyond the trained maximum = the hard split)", "",
                  "| stage | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
        for st, e in res["stages"].items():
            by = {int(d): v for sp in res["splits"] if sp in e for d, v in e[sp]["pass@1_by_length"].items()}
            if by:
                lines.append(f"| {LABELS.get(st, st)} | " + " | ".join(
                    f"{by[d]:.2f}" if d in by else "—" for d in lengths) + " |")
        lines.append("")
    lines += ["![RL curves, mean and seed range](rl_curves.png)", "", "![pass@1 by chain length](pass_by_length.png)",
              ""]
    return "\n".join(lines)


def _curves(root: str, seeds, path: str) -> str | None:
    """Per-stage RL curves: mean over seeds with a band from the lowest to the highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.metrics import read_metrics
    runs = {st: run_dirs(root, st, seeds) for st in RL_STAGES}
    runs["countdown r1_zero"] = run_dirs(root, "r1_zero", seeds, countdown=True)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2), squeeze=False)
    drawn = False
    for st, dirs in runs.items():
        logs = [read_metrics(d) for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
        for ax, key in zip(axes[0], CURVES):
            series = [{r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))} for rows in logs]
            series = [s for s in series if s]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            y = np.asarray([[s[t] for t in steps] for s in series])
            line, = ax.plot(steps, y.mean(0), lw=1.3, label=LABELS.get(st, st))
            ax.fill_between(steps, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, key in zip(axes[0], CURVES):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_length(res: dict, path: str, trained_max: int | None) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for st, e in res["stages"].items():
        by = {int(d): (v, e[sp]["pass@1_by_length_std"][d]) for sp in res["splits"] if sp in e
              for d, v in e[sp]["pass@1_by_length"].items()}
        if by:
            xs = sorted(by)
            ax.errorbar(xs, [by[x][0] for x in xs], yerr=[by[x][1] for x in xs], marker="o", ms=3, lw=1.2,
                        capsize=2, label=LABELS.get(st, st))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if trained_max:
        ax.axvline(trained_max + 0.5, color="grey", ls="--", lw=1)
        ax.text(trained_max + 0.6, 0.95, "hard split", fontsize=8, color="grey")
    ax.set_xlabel("chain length (terms)")
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(root: str, exp, base_dir: str = "", **extra) -> str:
    """results.json, results.md and the two plots under root, for the pipeline config `exp`; returns results.md."""
    from bench.common import cpu_name

    splits = list(exp.zero.task.splits(1))
    res = {**collect(root, exp.seeds, splits, base_dir), "seeds": list(exp.seeds), "splits": splits,
           "k": exp.eval.k, "n_problems": exp.eval.problems, "cpu": cpu_name(),
           **{("random_reward_rate" if key == "rate" else key): v for key, v in extra.items()}}
    with open(os.path.join(root, "results.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    _curves(root, exp.seeds, os.path.join(root, "rl_curves.png"))
    _by_length(res, os.path.join(root, "pass_by_length.png"), getattr(exp.zero.task, "max_terms", None))
    path = os.path.join(root, "results.md")
    with open(path, "w") as fh:
        fh.write(markdown(res, root))
    return path


def main(argv: list[str] | None = None) -> int:
    from experiments.overrides import apply_overrides
    from experiments import pipeline

    root = (argv or sys.argv[1:] or [""])[0]
    saved = _read(os.path.join(root, "config.json"))
    if saved is None:
        print(f"error: {root}/config.json not found: not a pipeline run directory", file=sys.stderr)
        return 2
    exp = apply_overrides(pipeline.config(), [f"seeds={tuple(saved['seeds'])}", f"eval.k={saved['eval']['k']}",
                                              f"eval.problems={saved['eval']['problems']}",
                                              f"zero.task.slots={saved['zero']['task'].get('slots', 0)}"])
    base = saved.get("base_dir") or ""
    extra = {}  # what the pipeline computed while running: kept from its last report
    old = _read(os.path.join(root, "results.json")) or {}
    if "rl_student_steps" in old:
        extra["rl_student_steps"] = old["rl_student_steps"]
    if os.path.exists(os.path.join(base or os.path.join(root, "base"), "eval_in_distribution.json")):
        extra["rate"] = base_rate(base or os.path.join(root, "base"))
    print(write_results(root, exp, base, **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
