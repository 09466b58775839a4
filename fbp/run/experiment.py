"""Experiments as data: the ``Experiment`` spec, a run's ``RunResult``, discovery of files.

An experiment file defines ``EXPERIMENT = Experiment(...)``: what data, which
model, loss and optimizer, for how long. It has no loop, logging or saving of its
own: ``fbp.run.runner.run`` (and ``fbp train NAME``) does that for every experiment
alike. This module is a leaf of types: it runs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optax

from fbp import train as fbp_train
from fbp.core import Layer
from fbp.data import Dataset
from fbp.run.options import TrainingOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment(TrainingOptions):
    """What to train: every field a value or a small function of the run's config.

    Besides the fields below, an experiment has every training option of
    ``fbp.run.options.TrainingOptions`` as a field (``epochs`` and ``lr`` required;
    ``batch_size``, ``seed``, ``patience``, ``clip``, ``weight_decay``, ``schedule``,
    ``plateau_factor``, ``plateau_patience``, ``nonfinite``, ``keep``,
    ``checkpoint_every``): its defaults, which the command line overrides.

    Args:
      name: the name ``fbp train`` knows it by (``digits-mlp``).
      description: one line for ``fbp list``.
      data: ``seed -> Dataset``.
      model: ``Dataset -> Layer``.
      loss: an fbp loss.
      optimizer: ``(lr, total_steps) -> optax.GradientTransformation``.
      penalty: optional weight penalty.
      log_every: epochs between printed progress lines.
      report: ``RunResult -> list[str]``: extra lines for the final report.
      features: the feature count the model expects; data with another is refused.
      grad_fn: ``(model, dataset) -> grad_fn`` replacing hand-written backprop in the
        train step (same signature as ``fbp.value_and_grad(..., has_aux=True)``), e.g.
        a learning rule of ``fbp.rules``.
      probe: ``(model, loss, optimizer) -> f(ts, x, y) -> dict of scalars``, evaluated
        at the end of every epoch on the first batch of the training set and logged
        with the epoch's metrics (``fbp.diagnostics.probe``: per-layer gradient flow).
      init: ``(model, dataset, seed) -> params`` replacing ``model.init``'s parameters
        (e.g. pretrained ones for fine-tuning).
      variants: ``{name: {field: value}}``: run the experiment once per variant with
        those fields replaced, in ``DIR/<name>``; ``report`` then gets a RunResult whose
        ``variants`` maps names to results (see ``fbp.run.variants``).
    """

    name: str
    description: str
    data: Callable[[int], Dataset]
    model: Callable[[Dataset], Layer]
    loss: Any
    optimizer: Callable[[optax.ScalarOrSchedule, int], optax.GradientTransformation]
    penalty: Any = None
    log_every: int = 1
    report: Callable[[RunResult], list[str]] | None = None
    features: int | None = None
    grad_fn: Callable[[Layer, Dataset], Callable] | None = None
    probe: Callable[[Layer, Any, optax.GradientTransformation], Callable] | None = None
    init: Callable[[Layer, Dataset, int], Any] | None = None
    variants: dict[str, dict[str, Any]] | None = None


@dataclasses.dataclass
class RunResult:
    """What a run produced."""

    experiment: Experiment
    config: dict[str, Any]  # the saved config (``RunOptions.to_config`` plus the experiment)
    model: Layer
    dataset: Dataset
    state: fbp_train.TrainState
    history: list[dict[str, float]]
    test: dict[str, float]
    train_seconds: float
    out: Path | None = None  # the run's output directory, when it has one (plots go there)
    variants: dict[str, RunResult] | None = None  # per-variant results (Experiment.variants)


# ----------------------------------------------------------------------------- discovery


def experiment_dirs() -> list[Path]:
    """Where experiments are looked up: $FBP_EXPERIMENTS, ./experiments, the repo's."""
    dirs = []
    if os.environ.get("FBP_EXPERIMENTS"):
        dirs += [Path(p) for p in os.environ["FBP_EXPERIMENTS"].split(os.pathsep)]
    dirs += [Path.cwd() / "experiments", Path(__file__).resolve().parents[2] / "experiments"]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


class ExperimentFileError(ValueError):
    """An experiment file that is missing, does not import, or defines no EXPERIMENT."""


def _where(path: Path, error: BaseException) -> str:
    """``path:LINE`` of the deepest frame of ``error``'s traceback inside ``path``."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _load_file(path: Path) -> Experiment:
    """Import an experiment file; every failure is one ExperimentFileError naming the file."""
    if not path.is_file():
        raise ExperimentFileError(f"{path}: no such experiment file.")
    spec = importlib.util.spec_from_file_location(f"fbp_experiment_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ExperimentFileError(f"{path}: cannot be imported as a Python file.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ExperimentFileError(f"{path}:{e.lineno}: SyntaxError: {e.msg}") from None
    except Exception as e:
        text = " ".join(str(e).split())
        raise ExperimentFileError(f"{_where(path, e)}: {type(e).__name__}: {text}") from e
    exp = getattr(module, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ExperimentFileError(
            f"{path}: defines no EXPERIMENT = fbp.run.experiment.Experiment(...)."
        )
    return exp


def candidates() -> dict[str, list[Path]]:
    """Experiment name -> every file of that name over ``experiment_dirs()``, in lookup order."""
    found: dict[str, list[Path]] = {}
    for d in experiment_dirs():
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_"):
                found.setdefault(path.stem.replace("_", "-"), []).append(path)
    return found


def available() -> dict[str, Path]:
    """Experiment name -> file, over ``experiment_dirs()`` (first found wins, see ``get``)."""
    return {name: paths[0] for name, paths in candidates().items()}


def check_unique(name: str, paths: list[Path], warn: Callable[[str], None]) -> None:
    """Two files of one name: refused in one directory, a warning when one shadows another.

    Raises:
      ExperimentFileError: two files in one directory give the same name (``a_b.py``
        and ``a-b.py``), naming both.
    """
    if len(paths) < 2:
        return
    first, other = paths[0], paths[1]
    if first.parent == other.parent:
        raise ExperimentFileError(
            f"experiment {name!r} is defined by two files, {first} and {other}; rename one."
        )
    warn(
        f"warning: experiment {name!r} is {first}, which shadows {other}; give a path "
        "(fbp train PATH.py) to run the other."
    )


def _stderr(line: str) -> None:
    print(f"fbp: {line}", file=sys.stderr)


def get(name: str, *, warn: Callable[[str], None] = _stderr) -> Experiment:
    """An experiment by name (``digits-mlp``) or by path to its ``.py`` file.

    Raises:
      ExperimentFileError: the file is missing, fails to import (the message names
        the file, its line and the error) or defines no EXPERIMENT; two files in one
        directory have the name (a file that shadows another is a warning).
      ValueError: no experiment has that name.
    """
    if name.endswith(".py"):
        return _load_file(Path(name))
    known = candidates()
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown experiment {name!r}; known: {names}.")
    check_unique(name, known[name], warn)
    return _load_file(known[name][0])
