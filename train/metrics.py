"""Run metrics: `metrics.jsonl` (one object per step), TensorBoard events, a progress bar, PNG plots."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def _scalar(v):
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else None


class MetricsWriter:
    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, mininterval=0.5)
        self.t0 = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop them from the log."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as fh:
            fh.writelines(keep)

    def write(self, step: int, metrics: dict) -> dict:
        """metrics: name -> scalar (or array; arrays go to JSON as lists, TensorBoard as histograms)."""
        row = {"step": int(step)}
        for k, v in metrics.items():
            s = _scalar(v)
            row[k] = s if s is not None else np.asarray(v).tolist()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k == "step":
                    continue
                if isinstance(v, float):
                    self.tb.add_scalar(k, v, step)
                else:
                    self.tb.add_histogram(k, np.asarray(v), step)
        if self.bar is not None:
            self.bar.update(1)
            post = {k: row[k] for k in ("loss", "tokens_per_s", "mfu", "reward") if isinstance(row.get(k), float)}
            self.bar.set_postfix({k: (f"{v:.3g}" if k != "tokens_per_s" else f"{v:,.0f}") for k, v in post.items()},
                                 refresh=False)
        return row

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(run_dir: str, keys=None, filename: str = "curves.png") -> str | None:
    """Plot the scalar curves of metrics.jsonl into run_dir/filename; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    scalars = [k for k in rows[-1] if k != "step" and isinstance(rows[-1][k], float)]
    keys = [k for k in (keys or scalars) if any(isinstance(r.get(k), float) for r in rows)]
    if not keys:
        return None
    fig, axes = _panels(plt, keys)
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), float)]
        ax.plot(*zip(*pts), lw=1.2)
    path = os.path.join(run_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(plt, keys):
    """A grid of 3 panels a row, one per key (titled, x = step) -> (figure, the used axes).

    Fixed margins in inches rather than `tight_layout`, which measures every label by drawing it (a third of the
    plot's cost, paid at the end of every run)."""
    cols, rows = min(3, len(keys)), math.ceil(len(keys) / 3)
    w, h = 4.2 * cols, 2.8 * rows
    fig, axes = plt.subplots(rows, cols, figsize=(w, h), squeeze=False)
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.5 / h, top=1 - 0.3 / h, wspace=0.3, hspace=0.55)
    for ax, k in zip(axes.flat, keys):
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return fig, list(axes.flat)[:len(keys)]


def plot_runs(runs: dict[str, str], keys, path: str) -> str | None:
    """One panel per metric key, one line per run ({label: run_dir} with a metrics.jsonl) over steps -> path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {label: read_metrics(d) for label, d in runs.items() if os.path.exists(os.path.join(d, "metrics.jsonl"))}
    keys = [k for k in keys if any(isinstance(r.get(k), float) for rs in rows.values() for r in rs)]
    if not keys:
        return None
    fig, axes = _panels(plt, keys)
    for ax, k in zip(axes, keys):
        for label, rs in rows.items():
            pts = [(r["step"], r[k]) for r in rs if isinstance(r.get(k), float)]
            if pts:
                ax.plot(*zip(*pts), lw=1.2, label=label)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
