"""Figures drawn outside pyplot and written atomically; a run's loss and accuracy plots."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from fbp import checkpoint as ckpt


def write_plots(out: Path, history: list[dict[str, Any]]) -> list[Path]:
    """loss.png (train/validation loss) and metric.png (validation accuracy), atomically.

    The two figures are made once per process and redrawn with each run's data (a
    sweep writes these for every run): drawing a new figure's axes costs about twice
    as much as updating one.
    """
    written = []
    epochs = [r["epoch"] for r in history]
    panels = [("loss.png", "loss", [("loss", "train"), ("val_loss", "validation")])]
    if any("val_accuracy" in r for r in history):
        panels.append(("metric.png", "accuracy", [("val_accuracy", "validation")]))
    with _PLOT_LOCK:
        for fname, ylabel, series in panels:
            fig, ax, lines = _panel(fname, ylabel, series)
            for key, label in series:
                pts = [
                    (e, r[key])
                    for e, r in zip(epochs, history, strict=True)
                    if r.get(key) is not None
                ]
                lines[key].set_data(*(zip(*pts, strict=True) if pts else ([], [])))
                lines[key].set_label(label if pts else "_nolegend_")
            ax.relim()
            ax.autoscale_view()
            log = ylabel == "loss" and all(r.get("loss", 1) > 0 for r in history)
            ax.set_yscale("log" if log else "linear")
            ax.legend()
            written.append(save_figure(fig, out / fname, sync_dir=False))
    ckpt.fsync_dir(out)
    return written


_PLOT_LOCK = threading.Lock()
_PANELS: dict[str, tuple[Any, Any, dict[str, Any]]] = {}


def _panel(fname: str, ylabel: str, series: list[tuple[str, str]]) -> tuple[Any, Any, dict]:
    """The figure, axes and one line per series of a plot file, made on first use."""
    if fname not in _PANELS:
        fig = new_figure(figsize=(6, 4))
        ax = fig.add_subplot()
        lines = {key: ax.plot([], [], color=f"C{i}")[0] for i, (key, _) in enumerate(series)}
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _PANELS[fname] = fig, ax, lines
    return _PANELS[fname]


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` drawn by the Agg canvas, outside pyplot.

    Library code draws on these and never touches pyplot or ``matplotlib.use``: the
    caller's backend and open figures stay as they were, and nothing needs closing.

    Args:
      **kwargs: ``matplotlib.figure.Figure``'s (``figsize``, ``dpi``...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, *, sync_dir: bool = True) -> Path:
    """Write a matplotlib figure as PNG atomically (``fbp.checkpoint.atomic_write``).

    ``fig`` is best a ``new_figure()``; a pyplot figure works too.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    ckpt.atomic_write(path, buf.getvalue(), sync_dir=sync_dir)
    return Path(path)
