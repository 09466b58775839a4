"""Experiments: a declarative spec, discovery of ``experiments/*.py``, and the runner.

An experiment file defines ``EXPERIMENT = Experiment(...)``: what data, which
model, loss and optimizer, for how long. It has no loop, logging or saving of its
own: ``run`` (and ``fbp train NAME``) does that for every experiment alike.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
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
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(sorted(known)) or 'none'}.")
    return _load_file(known[name])


# ----------------------------------------------------------------------------- running


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def run(
    exp: Experiment,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> RunResult:
    """Train ``exp`` and evaluate it on its test split; prints progress and a report."""
    cfg = {
        "experiment": exp.name,
        "epochs": epochs if epochs is not None else exp.epochs,
        "seed": seed if seed is not None else exp.seed,
        "lr": lr if lr is not None else exp.lr,
        "batch_size": batch_size if batch_size is not None else exp.batch_size,
    }
    ds = exp.data(cfg["seed"])
    model = exp.model(ds)
    x, y = jax.numpy.asarray(ds.train.x), jax.numpy.asarray(ds.train.y)
    bs = cfg["batch_size"] or x.shape[0]
    total_steps = cfg["epochs"] * (x.shape[0] // bs)
    opt = exp.optimizer(cfg["lr"], total_steps)
    ts = fbp_train.init(model, opt, jax.random.key(cfg["seed"]), x)
    epoch_fn = fbp_train.make_epoch(model, exp.loss, opt, batch_size=bs, penalty=exp.penalty)

    history: list[dict[str, float]] = []
    seconds = 0.0
    for e in range(1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        ts, m = epoch_fn(ts, x, y)
        jax.block_until_ready(ts)
        seconds += time.perf_counter() - t0
        if e % exp.log_every and e != cfg["epochs"] and e != 1:
            continue
        row = {"epoch": e, "loss": float(np.mean(m["loss"]))}
        if len(ds.val.x):
            val = fbp_train.evaluate(model, exp.loss, ts.params, ds.val.x, ds.val.y,
                                     model_state=ts.model_state)
            row.update({f"val_{k}": v for k, v in val.items()})
        history.append(row)
        print_fn(f"epoch {e:>6}/{cfg['epochs']}  {_fmt({k: v for k, v in row.items() if k != 'epoch'})}")

    test = fbp_train.evaluate(model, exp.loss, ts.params, ds.test.x, ds.test.y,
                              model_state=ts.model_state)
    result = RunResult(exp, cfg, model, ds, ts, history, test, seconds)
    print_fn(f"== {exp.name}: {exp.description}")
    print_fn(f"test {_fmt(test)}")
    print_fn(f"training time {seconds:.2f} s for {cfg['epochs']} epochs (includes compilation)")
    for line in exp.report(result) if exp.report else []:
        print_fn(line)
    return result
