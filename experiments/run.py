"""Run any experiment file: `python -m experiments.run experiments/tiny_pretrain.py [key=value ...]`.

    python -m experiments.run experiments/tiny_pretrain.py run_dir=/tmp/r steps=200 mesh.data=2 optim.lr=1e-3

A run_dir that holds a checkpoint resumes from it. The type of the file's `config()` decides what runs: an
`Experiment` pretrains / fine-tunes; an `RLExperiment` runs its base stage (when it has one and no init_from) and
then GRPO on its task. A file that defines `main(exp)` runs that instead: a multi-stage pipeline (its config is
its own dataclass), or a run that must resolve something first (r1_zero_gsm8k: the checkpoint's architecture). A multi-host job joins `jax.distributed` here, once per process (SLURM, or R1JAX_COORDINATOR /
R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID). Errors a user can fix (a config field, a mesh that does not fit the
devices, a missing file, an incompatible checkpoint) print as one line; `verbose=true` shows the traceback and
third-party INFO logging (orbax, absl, jax), which is otherwise off.
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


_OURS = ("experiments", "model", "rl", "sharding", "train", "bench", "__main__")


def setup_logging(verbose: bool) -> None:
    """Our INFO lines always; everyone else's only with verbose (orbax alone logs ~220 lines in the main job)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    for name in _OURS:
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        for name in ("absl", "orbax", "jax", "grain", "tensorstore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _user_errors() -> tuple:
    """What a user can fix, at any point of a run (a ValueError only while the config is built: later it is a bug)."""
    from rl.reward_inputs import SandboxError
    from sharding.mesh import ShardingError
    from train.run import RunError
    return (OverrideError, FileNotFoundError, ShardingError, RunError, SandboxError)


def run(module, exp) -> None:
    """Dispatch on what the experiment file defines (see the module docstring)."""
    from experiments.config import Experiment, RLExperiment
    from train.run import RunError
    if getattr(module, "PLAN_ONLY", False):
        raise RunError(f"{module.__file__} is a plan, not a run: "
                         f"python -m experiments.plan {os.path.relpath(module.__file__)}")
    if hasattr(module, "main"):
        module.main(exp)
    elif isinstance(exp, RLExperiment):
        from rl.loop import run_rl
        run_rl(exp)
    elif isinstance(exp, Experiment):
        from train.loop import pretrain
        pretrain(exp)
    else:
        raise RunError(f"{module.__file__}: config() returned a {type(exp).__name__}, which is neither an Experiment "
                       "nor an RLExperiment, and the file defines no main(exp) to run it")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    verbose = any(a in ("verbose=true", "verbose=True", "verbose=1") for a in argv[1:])
    argv = [a for a in argv if not a.startswith("verbose=")]
    setup_logging(verbose)
    try:
        from sharding.distributed import initialize
        initialize()  # once per process, before anything touches a device
        try:
            module, exp = load_experiment(argv[0], argv[1:])
        except (ValueError, AttributeError) as e:  # a config field that does not validate, a file without config()
            raise OverrideError(str(e)) from e
        run(module, exp)
    except _user_errors() as e:
        if verbose:
            raise
        print(f"error: {e}  (verbose=true for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
