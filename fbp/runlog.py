"""Run bookkeeping on the host: metrics.jsonl, plots, the run directory, signals, progress.

Everything here is plain Python and NumPy around the jitted training in
``fbp.runner``: files are written atomically (``fbp.checkpoint.atomic_write``),
metrics are appended a line per epoch and read back tolerating a torn last line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fbp
from fbp import checkpoint as ckpt

OWNED = (
    "metrics.jsonl",
    "summary.json",
    "eval.json",
    "loss.png",
    "metric.png",
    "checkpoints",
    "export",
)


def params_sha256(params: Any) -> str:
    """SHA-256 over the parameter leaves' bytes, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "optax": optax.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "fbp": fbp.__version__,
        "platform": platform.platform(),
        "backend": jax.default_backend(),
    }


# ----------------------------------------------------------------------------- files


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a truncated or garbled last line (a kill mid-write) is dropped."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(s.strip() for s in lines[i + 1 :]):
                raise ValueError(f"{p}: line {i + 1} is not JSON.") from None
    return rows


class MetricsLog:
    """Append-only metrics.jsonl: a line per epoch, flushed; fsynced on ``sync``.

    The file is made by the first row (a run that fails before its first epoch leaves
    none); given ``rows`` (a resumed run's, up to its checkpoint), it is rewritten
    with them first, atomically.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]]):
        self.path = path
        self.f = None
        if rows or path.exists():
            ckpt.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
            self.f = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        if self.f is None:
            self.f = open(self.path, "a")
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def sync(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None and not self.f.closed:
            try:
                self.sync()
            finally:
                self.f.close()


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
    """Write a matplotlib figure as PNG atomically (temporary name, fsync, rename).

    ``fig`` is best a ``new_figure()``; a pyplot figure works too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        ckpt.fsync_dir(path.parent)
    return path


def prepare_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a non-empty DIR unless resuming or overwriting (read-only check)."""
    if resume and overwrite:
        raise ValueError("run: --resume and --overwrite exclude each other.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"run: {out} exists and is not a directory.")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (resume or overwrite):
        raise ValueError(
            f"run: {out} already exists and is not empty; pass --resume to continue it or "
            "--overwrite to start again."
        )


def clear_owned(out: Path) -> None:
    """Remove what a previous run wrote in ``out`` (only fbp's own files)."""
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ----------------------------------------------------------------------------- locking

LOCK = ".lock"  # in a run directory while a process trains there: that process's id


class RunDirInUse(ValueError):
    """Another live process is training in the run directory."""


class RunLock:
    """One process per run directory: ``flock`` on the directory, held while the run lives.

    The operating system drops the lock when its process dies, however it dies, so
    a killed run never blocks the next one. ``DIR/.lock`` names the holder's process
    id for the refusal message; it is removed on release (a killed run leaves it, and
    the next run overwrites it). Where the filesystem has no locks (some network
    filesystems), ``unsupported`` says why and the run goes on unlocked.

    Args:
      out: the run directory; created (with its parents) if missing.
    """

    def __init__(self, out: Path):
        self.out = out
        self.created = not out.exists()
        if out.exists() and not out.is_dir():
            raise ValueError(f"run: {out} exists and is not a directory.")
        out.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(out, os.O_RDONLY)
        self.unsupported: str | None = None  # why the filesystem gave no lock, if it did not
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.unsupported = os.strerror(e.errno) if e.errno else str(e)  # NFS: ENOLCK
                return
            os.close(self.fd)
            raise RunDirInUse(
                f"run: {out} is in use by process {self._holder()} (another fbp train); wait "
                "for it to end or choose another --out."
            ) from None
        atomic_write_text(out / LOCK, f"{os.getpid()}\n")

    def _holder(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return str(int((self.out / LOCK).read_text().strip()))
        return "(unknown id)"

    def release(self, *, remove_dir: bool = False) -> None:
        """Drop the lock (and, with ``remove_dir``, the directory if this run made it empty)."""
        with contextlib.suppress(OSError):
            (self.out / LOCK).unlink()
        if remove_dir and self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()
        os.close(self.fd)  # closing the last descriptor releases the flock


def atomic_write_text(path: Path, text: str) -> None:
    """``fbp.checkpoint.atomic_write`` without the directory fsync (small bookkeeping files)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- signals


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop serves at the next chunk boundary."""

    def __init__(self, enabled: bool):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- progress


class Printer:
    """A progress bar on a terminal, plain lines every ``log_every`` epochs otherwise.

    On a terminal the bar is redrawn after every chunk of steps (at most ten times a
    second): epoch, the last epoch's metrics, the step within the epoch, the time
    elapsed and an estimate of the time left (from this process's rate).

    Args:
      print_fn: where lines go (the bar only when it is ``print`` on a terminal).
      total: the run's epochs.
      log_every: epochs between plain lines.
      steps_per_epoch: steps in an epoch (None: no step, elapsed or ETA shown).
      start: steps done before this process started (a resumed run).
    """

    def __init__(
        self,
        print_fn: Callable[[str], None],
        total: int,
        log_every: int,
        *,
        steps_per_epoch: int | None = None,
        start: int = 0,
    ):
        self.print_fn = print_fn
        self.total = total
        self.log_every = max(1, log_every)
        self.tty = print_fn is print and sys.stdout.isatty()
        self.steps_per_epoch = steps_per_epoch
        self.start = start
        self.t0 = time.monotonic()
        self.last = 0.0
        self.text = ""  # the last epoch's metrics

    def step(self, epoch: int, pos: int) -> None:
        """After a chunk: ``epoch`` epochs done, ``pos`` steps into the next one."""
        if self.tty:
            self._draw(epoch + 1, pos, force=False)

    def epoch(self, row: dict[str, Any]) -> None:
        e = row["epoch"]
        text = "  ".join(
            f"{k} {row[k]:.4g}"
            for k in ("loss", "val_loss", "val_accuracy", "lr")
            if row.get(k) is not None
        )
        if "epsilon" in row:  # DP-SGD runs
            eps = row["epsilon"]
            text += "  epsilon " + ("inf" if eps is None else f"{eps:.4g}")
        if row.get("skipped"):
            text += f"  skipped {row['skipped']}"
        self.text = text
        if self.tty:
            self._draw(e, self.steps_per_epoch or 0, force=e == self.total)
            return
        if e == 1 or e % self.log_every == 0 or e == self.total:
            self.print_fn(f"epoch {e:>6}/{self.total}  {text}")

    def _draw(self, epoch: int, pos: int, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last <= 0.1:
            return
        self.last = now
        spe = self.steps_per_epoch or 1
        fraction = ((epoch - 1) * spe + (pos if self.steps_per_epoch else 1)) / (
            self.total * spe or 1
        )
        done = int(30 * min(fraction, 1.0))
        line = f"\r[{'#' * done}{'.' * (30 - done)}] {epoch}/{self.total}  {self.text}"
        if self.steps_per_epoch:
            line += f"  step {pos}/{self.steps_per_epoch}  {self._times(epoch, pos, now)}"
        sys.stdout.write(line + "  ")
        sys.stdout.flush()

    def _times(self, epoch: int, pos: int, now: float) -> str:
        """``M:SS elapsed  ETA M:SS`` (the ETA from this process's steps per second)."""
        steps = (epoch - 1) * self.steps_per_epoch + pos
        elapsed = now - self.t0
        left = self.total * self.steps_per_epoch - steps
        rate = (steps - self.start) / elapsed if elapsed > 0 else 0.0
        eta = _clock(left / rate) if rate > 0 else "?"
        return f"{_clock(elapsed)} elapsed  ETA {eta}"

    def line(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\n")
            self.last = 0.0
        self.print_fn(text)


def _clock(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
