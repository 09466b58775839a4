"""A run's report: the final parameters' test metrics, ``summary.json``, plots, printed lines.

The report evaluates the last parameters, or the best ones when early stopping
restored them, and says which (``(last parameters, epoch N)``); ``summary.json``
records the choice, and ``reported_parameters`` gives it to ``fbp eval`` and
``fbp export`` as their default, so all three agree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from fbp import checkpoint as ckpt
from fbp import train as fbp_train
from fbp.data import Dataset
from fbp.figures import write_plots
from fbp.run import privacy
from fbp.run.experiment import Experiment, RunResult
from fbp.run.loop import Progress, ResumePosition, Setup
from fbp.run.metrics import params_sha256, versions
from fbp.run.options import RunOptions


def report(
    exp: Experiment,
    cfg: RunOptions,
    config: dict[str, Any],
    setup: Setup,
    position: ResumePosition,
    history: list[dict[str, Any]],
    last_ckpt: Path | None,
    out_dir: Path | None,
    print_fn: Callable[[str], None],
    test: dict[str, float] | None = None,
) -> RunResult:
    """Final parameters, test metrics, ``summary.json``, plots and the printed report.

    ``test``: the final parameters' test metrics when the caller has them already
    (``fbp.run.sweep`` evaluates all its runs in one call); computed here otherwise.
    """
    prog = position.progress
    use_best = restores_best(cfg, setup, prog)
    final = position.state._replace(**position.best._asdict()) if use_best else position.state
    ds = setup.dataset
    if test is None:
        test = _test_metrics(exp, setup, final)
    result = RunResult(
        exp, config, setup.model, ds, final, history, test, prog.train_seconds, out_dir
    )
    if prog.stopped_early:
        print_fn(
            f"early stop at epoch {prog.epoch}: best validation loss "
            f"{prog.best_val:.4f} at epoch {prog.best_epoch} (parameters restored)"
        )
    if out_dir is not None:
        summary = _summary(exp, config, position, final.params, test, history, last_ckpt)
        summary.update(restored_best=use_best, evaluated="best" if use_best else "last")
        layout = getattr(setup.chunk, "layout", None)
        if layout is not None:  # devices, processes, bytes
            summary["parallel"] = layout.memory()
        if setup.privacy is not None:
            summary["privacy"] = privacy.summary(cfg, setup.privacy, int(position.state.step))
        ckpt.atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        if history:
            write_plots(out_dir, history)
    _print_report(exp, cfg, setup, position, test, use_best, out_dir, print_fn)
    for line in exp.report(result) if exp.report else []:
        print_fn(line)
    return result


def _test_metrics(exp: Experiment, setup: Setup, final: fbp_train.TrainState) -> dict[str, float]:
    """The final parameters' loss (and accuracy) on the test split, in eval mode."""
    ds = setup.dataset
    return fbp_train.evaluate(
        setup.model,
        exp.loss,
        final.params,
        jnp.asarray(ds.test.x),
        jnp.asarray(ds.test.y),
        state=final.model_state,
        lengths=None if ds.test.lengths is None else jnp.asarray(ds.test.lengths),
    )


def _print_report(
    exp: Experiment,
    cfg: RunOptions,
    setup: Setup,
    position: ResumePosition,
    test: dict[str, float],
    use_best: bool,
    out_dir: Path | None,
    print_fn: Callable[[str], None],
) -> None:
    """The printed report: data, test metrics and which parameters, time, privacy, outputs."""
    prog = position.progress
    print_fn(f"== {exp.name}: {exp.description}")
    print_fn(data_line(cfg, setup.dataset))
    which = "best" if use_best else "last"
    restored = ": early stopping restored them" if use_best else ""
    epoch = prog.best_epoch if use_best else prog.epoch
    print_fn(f"test {_fmt(test)}  ({which} parameters, epoch {epoch}{restored})")
    print_fn(
        f"training time {prog.train_seconds:.2f} s for {prog.epoch} epochs (includes compilation)"
    )
    if setup.privacy is not None:
        print_fn(_privacy_line(privacy.summary(cfg, setup.privacy, int(position.state.step))))
    if out_dir is not None:
        print_fn(f"outputs in {out_dir}")


def restores_best(cfg: RunOptions, setup: Setup, prog: Progress) -> bool:
    """Whether a run's final parameters are its best ones (early stopping with validation)."""
    return bool(cfg.patience) and setup.val is not None and prog.best_epoch > 0


def _privacy_line(p: dict[str, Any]) -> str:
    eps = "inf (no noise)" if p["epsilon"] is None else f"{p['epsilon']:.3g}"
    return (
        f"DP-SGD: epsilon {eps} at delta {p['delta']:g} after {p['steps']} steps "
        f"(clip {p['clip']:g}, noise {p['noise']:g}, sampling rate {p['sampling_rate']:.4g})"
    )


def data_line(cfg: RunOptions, ds: Dataset) -> str:
    """``data NAME: N train / N validation / N test examples``: the data actually used."""
    sizes = " / ".join(
        f"{len(getattr(ds, s).x)} {n}"
        for s, n in (("train", "train"), ("val", "validation"), ("test", "test"))
    )
    return f"data {cfg.data_file or ds.name}: {sizes} examples"


def reported_parameters(run_dir: str | os.PathLike) -> str:
    """``best`` or ``last``: the parameters a run's report evaluated (``summary.json``).

    ``fbp eval`` and ``fbp export`` default to them, so they agree with the report; a
    run with no summary (stopped before its report) gives ``last``.
    """
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return "last"
    return "best" if summary.get("restored_best") else "last"


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def _summary(exp, config, position, params, test, history, last_ckpt) -> dict[str, Any]:
    """summary.json's content."""
    prog = position.progress
    description = exp.description
    if config.get("data_file"):  # the experiment's text describes its own data, not this file
        description += f" (trained on {config['data_file']}, not the experiment's data)"
    return {
        "experiment": exp.name,
        "description": description,
        "config": config,
        "data": config.get("data"),  # what was trained on: fbp.run.fingerprint
        "changes": config.get("changes", []),  # options changed on resume, from their epoch
        "seed": config["seed"],
        "epochs_completed": prog.epoch,
        "steps": int(position.state.step),
        "stopped_early": prog.stopped_early,
        "best_epoch": prog.best_epoch or None,
        "best_val_loss": prog.best_val if math.isfinite(prog.best_val) else None,
        "skipped_steps": prog.skipped_total,
        "train_seconds": prog.train_seconds,
        "test": test,
        "last": history[-1] if history else None,
        "params_sha256": params_sha256(params),
        "checkpoint": last_ckpt.name if last_ckpt else None,
        "versions": versions(),
    }
