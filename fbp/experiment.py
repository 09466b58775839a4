"""Experiments: a declarative spec, discovery of ``experiments/*.py``, and the runner.

An experiment file defines ``EXPERIMENT = Experiment(...)``: what data, which
model, loss and optimizer, for how long. It has no loop, logging or saving of its
own: ``run`` (and ``fbp train NAME``) does that for every experiment alike.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optax

from fbp import train as fbp_train
from fbp.core import Layer
from fbp.data import Dataset


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What to train: every field a value or a small function of the run's config.

    Args:
      name: the name ``fbp train`` knows it by (``digits-mlp``).
      description: one line for ``fbp list``.
      data: ``seed -> Dataset``.
      model: ``Dataset -> Layer``.
      loss: an fbp loss.
      optimizer: ``(lr, total_steps) -> optax.GradientTransformation``.
      epochs, lr, batch_size: defaults, overridable from the command line;
        ``batch_size=None`` trains full-batch.
      penalty: optional weight penalty.
      log_every: epochs between printed progress lines.
      report: ``RunResult -> list[str]``: extra lines for the final report.
      seed: default seed.
      patience: early stopping after this many epochs without a better validation
        loss; the best parameters are restored (None: no early stopping).
      clip: clip gradients to this global norm (None: no clipping).
      weight_decay: ``weight_decay * params`` added to the gradient before the optimizer.
      schedule: ``constant``, ``cosine``, ``warmup-cosine``, ``linear`` (the optimizer
        gets an optax schedule as its ``lr``) or ``plateau`` (reduce-on-plateau on the
        validation loss).
      nonfinite: ``skip`` (drop and count non-finite steps) or ``halt`` (stop with an error).
      keep: checkpoints kept in a run's directory (plus the best by validation loss).
      checkpoint_every: epochs between checkpoints (None: a tenth of the epochs).
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
        ``variants`` maps names to results (see ``fbp.variants``).
    """

    name: str
    description: str
    data: Callable[[int], Dataset]
    model: Callable[[Dataset], Layer]
    loss: Any
    optimizer: Callable[[float, int], optax.GradientTransformation]
    epochs: int
    lr: float
    batch_size: int | None = None
    penalty: Any = None
    log_every: int = 1
    report: Callable[[RunResult], list[str]] | None = None
    seed: int = 0
    patience: int | None = None
    clip: float | None = None
    weight_decay: float = 0.0
    schedule: str = "constant"
    nonfinite: str = "skip"
    keep: int = 3
    checkpoint_every: int | None = None
    features: int | None = None
    grad_fn: Callable[[Layer, Dataset], Callable] | None = None
    probe: Callable[[Layer, Any, optax.GradientTransformation], Callable] | None = None
    init: Callable[[Layer, Dataset, int], Any] | None = None
    variants: dict[str, dict[str, Any]] | None = None


@dataclasses.dataclass
class RunResult:
    """What a run produced."""

    experiment: Experiment
    config: dict[str, Any]
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
    dirs += [Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _load_file(path: Path) -> Experiment:
    spec = importlib.util.spec_from_file_location(f"fbp_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exp = getattr(module, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ValueError(f"{path}: defines no EXPERIMENT = fbp.experiment.Experiment(...).")
    return exp


def available() -> dict[str, Path]:
    """Experiment name -> file, over ``experiment_dirs()`` (first found wins)."""
    found: dict[str, Path] = {}
    for d in experiment_dirs():
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_"):
                found.setdefault(path.stem.replace("_", "-"), path)
    return found


def get(name: str) -> Experiment:
    """An experiment by name (``digits-mlp``) or by path to its ``.py`` file."""
    if name.endswith(".py"):
        return _load_file(Path(name))
    known = available()
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown experiment {name!r}; known: {names}.")
    return _load_file(known[name])


# ----------------------------------------------------------------------------- running


def run(
    exp: Experiment,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    print_fn: Callable[[str], None] = print,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> RunResult:
    """Train ``exp`` and evaluate it on its test split; prints progress and a report.

    With ``out`` the run writes metrics, checkpoints, a summary and plots there and
    can be resumed; see ``fbp.runner.run`` for the options.
    """
    from fbp import runner

    return runner.run(
        exp,
        out=out,
        resume=resume,
        overwrite=overwrite,
        print_fn=print_fn,
        epochs=epochs,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        **options,
    )
