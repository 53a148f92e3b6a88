"""Run any experiment file: `python -m experiments.run experiments/tiny_pretrain.py [key=value ...]`.

    python -m experiments.run experiments/tiny_pretrain.py run_dir=/tmp/r steps=200 mesh.data=2 optim.lr=1e-3

A run_dir that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from experiments.overrides import OverrideError, apply_overrides


def load_experiment(path: str, overrides: list[str]):
    """-> (module, Experiment) with overrides applied."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"experiment file {path!r} does not exist")
    name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (and pickling) look classes' modules up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise AttributeError(f"{path}: an experiment file must define config() -> Experiment")
    return module, apply_overrides(module.config(), overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        module, exp = load_experiment(argv[0], argv[1:])
    except (OverrideError, ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if hasattr(module, "main"):
        module.main(exp)
    else:
        from train.loop import pretrain
        pretrain(exp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
