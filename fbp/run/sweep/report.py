"""A sweep's summary: mean ± std of each grid point's final metrics, its table and one plot.

``summarize`` groups the runs by grid point (the seeds of one point together) and
gives each final metric's mean and sample standard deviation (n - 1; 0 for one
run). ``markdown`` renders it; ``write`` puts ``sweep.json`` (the table and each
run's test metrics), ``sweep.md`` and ``comparison.png`` in the sweep's directory.

Examples:
  >>> mean_std([0.5, 0.7])
  {'mean': 0.6, 'std': 0.1414}
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fbp import checkpoint as ckpt
from fbp.figures import save_figure
from fbp.run.experiment import RunResult
from fbp.run.sweep.grid import Point


def mean_std(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value), rounded for reading."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), digits), "std": round(std, digits)}


def summarize(
    points: Sequence[Point], results: Mapping[str, RunResult], stopped: Mapping[str, bool]
) -> list[dict[str, Any]]:
    """One row per grid point: its runs, the mean ± std of their final metrics and epochs,
    and how many stopped early (``stopped``: run name -> stopped early)."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    rows = []
    for group, members in groups.items():
        res = [results[p.name] for p in members]
        point = {k: v for k, v in members[0].overrides.items() if k != "seed"}
        metrics = sorted({k for r in res for k in r.test})
        row: dict[str, Any] = {"point": point, "group": group, "runs": [p.name for p in members]}
        row["test"] = {k: mean_std([r.test[k] for r in res if k in r.test]) for k in metrics}
        epochs = [r.history[-1]["epoch"] if r.history else 0 for r in res]
        row["epochs"] = mean_std(epochs, 1)
        row["stopped_early"] = sum(stopped[p.name] for p in members)
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table: grid point, runs, each test metric as mean ± std."""
    metrics = sorted({k for r in rows for k in r["test"]}, key=lambda k: (k != "accuracy", k))
    head = ["grid point", "runs", *[f"test {m}" for m in metrics], "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["group"] or "(all runs)", str(len(r["runs"]))]
        cells += [_pm(r["test"][m]) if m in r["test"] else "" for m in metrics]
        epochs = r["epochs"]
        cells.append(f"{epochs['mean']:g}" + (f" ± {epochs['std']:g}" if epochs["std"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(ms: dict[str, float]) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}"


def write(
    out: Path,
    spec: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    results: Mapping[str, RunResult],
    train_seconds: float,
) -> None:
    """``sweep.json`` (spec, table, each run's result), ``sweep.md`` and ``comparison.png``."""
    runs = {
        name: {
            "test": r.test,
            "epochs_completed": r.history[-1]["epoch"] if r.history else 0,
            "dir": name,
        }
        for name, r in results.items()
    }
    doc = {**spec, "table": list(rows), "results": runs, "train_seconds": train_seconds}
    ckpt.atomic_write(out / "sweep.json", json.dumps(doc, indent=1) + "\n")
    ckpt.atomic_write(out / "sweep.md", markdown(rows) + "\n")
    comparison_plot(out / "comparison.png", rows, results)


def comparison_plot(path: Path, rows: Sequence[dict[str, Any]], results: Mapping[str, RunResult]):
    """One plot of every grid point: validation accuracy (else validation or training loss)
    by epoch, the mean over its seeds as a line and ± one standard deviation as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    histories = [r.history for r in results.values()]
    key = next(
        (k for k in ("val_accuracy", "val_loss") if any(k in h[-1] for h in histories if h)),
        "loss",
    )
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        curves = [[r.get(key) for r in results[name].history] for name in row["runs"]]
        length = max((len(c) for c in curves), default=0)
        mean, lo, hi = [], [], []
        for e in range(length):
            at_e = (c[min(e, len(c) - 1)] for c in curves if c)
            vals = [v for v in at_e if v is not None]
            m = statistics.fmean(vals) if vals else math.nan
            s = statistics.stdev(vals) if len(vals) > 1 else 0.0
            mean.append(m)
            lo.append(m - s)
            hi.append(m + s)
        epochs = range(1, length + 1)
        label = row["group"] or "all runs"
        (line,) = ax.plot(epochs, mean, label=f"{label} (n={len(row['runs'])})")
        if len(row["runs"]) > 1:
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key.replace("_", " "))
    if key != "val_accuracy" and all(
        v > 0 for h in histories for r in h for v in [r.get(key) or 1]
    ):
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title("mean ± std over seeds; a stopped run holds its last value")
    return save_figure(fig, path)
