"""The runner's training loop: epochs of jitted chunks, bookkeeping, checkpoints, exact resume.

The loop is a fold over a ``ResumePosition``: everything a checkpoint stores (the
train state, the best parameters so far, the current epoch's order key and the
counters of ``Progress``). ``train`` advances it chunk by chunk (``Setup.chunk``,
the shuffle-and-scan core of ``fbp.train``) and epoch by epoch; ``Checkpointer``
writes it and ``load_position`` reads it back, so a run resumed from any checkpoint
takes the same steps as one never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from fbp import checkpoint as ckpt
from fbp import data as fbp_data
from fbp import train as fbp_train
from fbp.core import Array, Layer, Params, State
from fbp.data import Dataset
from fbp.distributed import cluster
from fbp.run import privacy, schedules
from fbp.run.metrics import MetricsLog
from fbp.run.options import RunOptions
from fbp.run.progress import Printer, StopFlag

EXIT_CODES: dict[int, int] = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 128 + int(signum))
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; checkpoint {checkpoint}")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter under ``nonfinite='halt'``."""


class WriteError(RuntimeError):
    """Writing the run's files failed (a full disk, an I/O error); the last checkpoint stands."""

    @classmethod
    def of(cls, error: OSError, last: Path | None) -> WriteError:
        what = f"{error.strerror}: {error.filename}" if error.strerror else str(error)
        then = (
            f"the last checkpoint {last.name} is intact; free space and continue with --resume."
            if last
            else "no checkpoint was written; free space and run again."
        )
        return cls(f"run: cannot write the run's files ({what}); {then}")


# ----------------------------------------------------------------------------- records


class OutOfMemory(RuntimeError):
    """The device ran out of memory during the run; the last checkpoint stands."""

    @staticmethod
    def caused_by(error: BaseException) -> bool:
        """Whether ``error`` is an allocation failure (host MemoryError, XLA RESOURCE_EXHAUSTED)."""
        if isinstance(error, MemoryError):
            return True
        return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)

    @classmethod
    def of(cls, error: BaseException, cfg: RunOptions, last: Path | None) -> OutOfMemory:
        """One line: what ran out, what to change, and where the run stands."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        bs = f"--batch-size than {cfg.batch_size}" if cfg.batch_size else "--batch-size"
        kept = (
            f"checkpoint {last} is kept (--resume continues)"
            if last is not None
            else "no checkpoint was written yet"
        )
        return cls(
            f"out of memory during training ({first}); use a smaller {bs} or window, or "
            f'memory="linear" / nn.Recompute in the model; {kept}.'
        )


class Setup(NamedTuple):
    """What the loop trains, built and checked from an experiment and its options."""

    dataset: Dataset
    model: Layer
    x: Array  # training inputs, shape (n, ...)
    y: Array  # training targets, shape (n, ...)
    batch_size: int
    steps_per_epoch: int
    optimizer: optax.GradientTransformation
    schedule: float | Callable  # the lr or an optax schedule of the step
    chunk: Callable  # (ts, x, y, order[, lengths]) -> (ts, metrics), jitted
    evaluate: Callable  # (params, state, x, y) -> {'loss', ['accuracy']}, jitted
    probe: Callable | None  # (ts, x, y) -> {name: scalar}, jitted
    val: tuple[Array, ...] | None  # validation (x, y[, lengths]), None when the split is empty
    privacy: Any = None  # DP-SGD's PrivacyAccountant (fbp.run.privacy), None for a plain run
    lengths: Array | None = None  # (n,) valid steps of padded training sequences, or None


class EpochSums(NamedTuple):
    """Running sums over the steps of the current epoch (non-finite steps left out)."""

    loss_sum: float = 0.0
    loss_n: int = 0
    gn_sum: float = 0.0
    skipped: int = 0
    seconds: float = 0.0

    def add(self, metrics: dict[str, Any], seconds: float) -> EpochSums:
        """These sums plus one chunk's per-step metrics (host arrays, shape (steps,))."""
        skipped = np.asarray(metrics["skipped"])
        ok = skipped == 0
        return EpochSums(
            self.loss_sum + float(np.sum(np.asarray(metrics["loss"], np.float64)[ok])),
            self.loss_n + int(ok.sum()),
            self.gn_sum + float(np.sum(np.asarray(metrics["grad_norm"], np.float64)[ok])),
            self.skipped + int(skipped.sum()),
            self.seconds + seconds,
        )


class Progress(NamedTuple):
    """The counters of a run (JSON in a checkpoint's manifest, under ``progress``)."""

    steps_per_epoch: int
    epoch: int = 0  # epochs completed
    pos: int = 0  # steps done in the next epoch
    acc: EpochSums = EpochSums()  # that epoch's sums so far
    best_val: float = math.inf  # best validation loss, at best_epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since best_epoch
    skipped_total: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    val_loss: float | None = None  # the last epoch's validation loss (ranks checkpoints)

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "acc": self.acc._asdict()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        known = {k: v for k, v in d.items() if k in cls._fields}
        return cls(**{**known, "acc": EpochSums(**d.get("acc", {}))})


class Best(NamedTuple):
    """The parameters with the best validation loss so far (the latest without one)."""

    params: Params
    model_state: State


class ResumePosition(NamedTuple):
    """Everything a checkpoint stores: the run continues exactly from here."""

    state: fbp_train.TrainState
    best: Best
    order_key: Array  # the current epoch's order key (fbp.train.epoch_keys)
    progress: Progress

    def arrays(self) -> dict[str, Any]:
        """The checkpoint's tensors: ``state/...``, ``best/...``, ``order_key``."""
        return {"state": self.state, "best": self.best._asdict(), "order_key": self.order_key}


def start_position(ts: fbp_train.TrainState, steps_per_epoch: int) -> ResumePosition:
    """The position of a run that has not taken a step."""
    return ResumePosition(
        ts, Best(ts.params, ts.model_state), jax.random.key(0), Progress(steps_per_epoch)
    )


# ----------------------------------------------------------------------------- checkpoints


def load_position(
    ckpt_dir: Path, template: ResumePosition, warn: Callable[[str], None]
) -> tuple[Path, ResumePosition]:
    """The newest checkpoint that verifies, as a position.

    Raises:
      CheckpointError: no checkpoint, none usable (each listed), or one of another model.
    """
    found = ckpt.load_latest(ckpt_dir, template.arrays(), warn=warn)
    if found is None:
        raise ckpt.CheckpointError(f"no checkpoint in {ckpt_dir} to resume from.")
    path, tree, meta = found
    position = ResumePosition(
        tree["state"],
        Best(**tree["best"]),
        tree["order_key"],
        Progress.from_json(meta["progress"]),
    )
    return path, position


@dataclasses.dataclass
class Checkpointer:
    """Writes positions to ``DIR/checkpoints`` (or nowhere when ``directory`` is None)."""

    directory: Path | None
    config: dict[str, Any]  # stored in every manifest (the saved config)
    keep: int
    log: MetricsLog | None
    last: Path | None = None  # the newest checkpoint written or resumed from
    writer: bool = True  # False: check, write nothing (processes other than 0 of a run)

    def save(self, position: ResumePosition) -> Path | None:
        """Commit ``position`` (metrics synced first); refuses non-finite parameters."""
        if self.directory is None:
            return None
        prog = position.progress
        if not bool(fbp_train.all_finite(position.state.params)):
            raise NonFiniteError(
                f"parameters became non-finite by epoch {prog.epoch}; not saved. Last good "
                f"checkpoint: {self.last}."
            )
        if not self.writer or self.log is None:
            return None
        self.log.sync()
        meta = {
            "config": self.config,
            "progress": prog.to_json(),
            "step": int(position.state.step),
            "val_loss": prog.best_val if math.isfinite(prog.best_val) else None,
            "epoch_val_loss": prog.val_loss,
        }
        self.last = ckpt.save(
            self.directory,
            position.arrays(),
            meta=meta,
            keep=self.keep,
            score=lambda m: m.get("epoch_val_loss"),
        )
        return self.last

    def holds(self, position: ResumePosition) -> bool:
        """Whether the newest checkpoint is this position already."""
        if self.last is None:
            return False
        meta = ckpt.read_manifest(self.last).get("meta", {})
        saved = (meta.get("progress", {}).get("epoch", -1), meta.get("step", -1))
        return saved == (position.progress.epoch, int(position.state.step))


# ----------------------------------------------------------------------------- the loop


_epoch_keys = jax.jit(fbp_train.epoch_keys)
_batch_order = jax.jit(fbp_data.batch_order, static_argnums=(1, 2))


def train(
    setup: Setup,
    cfg: RunOptions,
    position: ResumePosition,
    *,
    saver: Checkpointer,
    log: MetricsLog | None,
    printer: Printer,
    history: list[dict[str, Any]],
    handle_signals: bool,
    changes: list[dict[str, Any]] | None = None,
) -> ResumePosition:
    """Train from ``position`` to ``cfg.epochs`` (or early stop); rows go to ``history``.

    ``changes`` (a resume's changed options, ``fbp.run.runner.plan``) are written in
    the metrics row of the first epoch they apply to.

    Raises:
      Interrupted: SIGTERM/SIGINT, served at the next chunk boundary after a checkpoint.
      NonFiniteError: a non-finite step under ``nonfinite='halt'``.
    """
    every = cfg.checkpoint_every or max(1, cfg.epochs // 10)
    with StopFlag(handle_signals) as stop:
        while position.progress.epoch < cfg.epochs and not position.progress.stopped_early:
            position = _run_epoch_steps(setup, cfg, position, stop, saver, printer)
            position, row = _end_epoch(setup, cfg, position)
            if changes:
                row["changes"], changes = changes, None
            history.append(row)
            if log is not None:
                log.write(row)
            printer.epoch(row)
            if row["skipped"]:
                printer.line(
                    f"epoch {row['epoch']}: skipped {row['skipped']} steps with a "
                    "non-finite loss or gradient"
                )
            epoch = position.progress.epoch
            signum = cluster.first_signal(stop.signum)  # all processes stop together
            if signum is not None:
                raise Interrupted(signum, saver.save(position))
            if epoch % every == 0 and epoch < cfg.epochs:
                saver.save(position)
    if printer.tty:
        printer.line("")
    if not saver.holds(position):
        saver.save(position)
    return position


def _run_epoch_steps(
    setup: Setup,
    cfg: RunOptions,
    position: ResumePosition,
    stop: StopFlag,
    saver: Checkpointer,
    printer: Printer,
) -> ResumePosition:
    """The rest of the current epoch's steps, in chunks of at most ``cfg.chunk_steps``."""
    steps = setup.steps_per_epoch
    if position.progress.pos == 0:  # a new epoch: its order key and fresh sums
        key, order_key = _epoch_keys(position.state.key)
        position = position._replace(
            state=position.state._replace(key=key),
            order_key=order_key,
            progress=position.progress._replace(acc=EpochSums()),
        )
    order = _batch_order(position.order_key, setup.x.shape[0], setup.batch_size)
    if steps > cfg.chunk_steps:
        order = np.asarray(order)
    while position.progress.pos < steps:
        lo = position.progress.pos
        hi = min(lo + cfg.chunk_steps, steps)
        t0 = time.perf_counter()
        rows = order if hi - lo == steps else order[lo:hi]
        extra = () if setup.lengths is None else (setup.lengths,)
        ts, m = setup.chunk(position.state, setup.x, setup.y, rows, *extra)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        if cfg.nonfinite == "halt" and np.asarray(m["skipped"]).any():
            raise NonFiniteError(nonfinite_message(position, m, saver.last))
        prog = position.progress
        position = position._replace(
            state=ts,
            progress=prog._replace(
                acc=prog.acc.add(m, dt), train_seconds=prog.train_seconds + dt, pos=hi
            ),
        )
        if hi < steps and (signum := cluster.first_signal(stop.signum)) is not None:
            raise Interrupted(signum, saver.save(position))
        if hi < steps:
            printer.step(position.progress.epoch, hi)
    return position


def nonfinite_message(position: ResumePosition, m: dict[str, Any], last: Path | None) -> str:
    """The message of a run halted by a non-finite step (``m['skipped']`` per step)."""
    prog = position.progress
    batch = prog.pos + int(np.argmax(np.asarray(m["skipped"])))
    kept = f"the last good checkpoint {last.name} is kept." if last else "no checkpoint was saved."
    return (
        f"non-finite loss or gradient at step {prog.epoch * prog.steps_per_epoch + batch + 1} "
        f"(epoch {prog.epoch + 1}, batch {batch}); {kept}"
    )


def _end_epoch(
    setup: Setup, cfg: RunOptions, position: ResumePosition
) -> tuple[ResumePosition, dict[str, Any]]:
    """Close an epoch: its metrics row, the best parameters, the plateau, early stopping."""
    ts, prog = position.state, position.progress
    val = stats = None
    if setup.val is not None:
        val = jax.device_get(setup.evaluate(ts.params, ts.model_state, *setup.val))
    if setup.probe is not None:  # Experiment.probe: e.g. per-layer gradient statistics
        bs = setup.batch_size
        stats = jax.device_get(setup.probe(ts, setup.x[:bs], setup.y[:bs]))
    lr = schedules.lr_now(cfg, setup.schedule, ts.opt_state, ts.step)
    row = epoch_row(prog, int(ts.step), val, lr, stats)
    if setup.privacy is not None:  # DP-SGD: epsilon after the steps taken so far
        row["epsilon"] = privacy.epsilon(setup.privacy, int(ts.step))
    prog, improved = close_epoch(prog, row, has_val=setup.val is not None, patience=cfg.patience)
    best = Best(ts.params, ts.model_state) if improved else position.best
    monitor = row.get("val_loss", row["loss"])
    if cfg.schedule == "plateau" and monitor is not None:
        ts = ts._replace(opt_state=schedules.plateau_update(cfg, ts.opt_state, monitor))
    return ResumePosition(ts, best, position.order_key, prog), row


def epoch_row(
    prog: Progress,
    step: int,
    val: dict[str, Any] | None,
    lr: float,
    probe: dict[str, Any] | None,
) -> dict[str, Any]:
    """The metrics.jsonl row of the epoch that ``prog`` is in, from its sums and end values.

    Args:
      prog: the run's counters before the epoch is closed (``prog.acc`` its sums).
      step: optimizer steps taken at the end of the epoch.
      val: validation metrics (``loss``, ``accuracy``), None without a validation split.
      lr: the learning rate at the end of the epoch.
      probe: ``Experiment.probe``'s statistics, or None.
    """
    acc = prog.acc
    mean = acc.loss_sum / acc.loss_n if acc.loss_n else None
    row: dict[str, Any] = {"epoch": prog.epoch + 1, "step": step, "loss": mean}
    row.update({f"val_{k}": float(v) for k, v in (val or {}).items()})
    row["lr"] = lr
    row["grad_norm"] = acc.gn_sum / acc.loss_n if acc.loss_n else None
    row["skipped"] = acc.skipped
    row["seconds"] = acc.seconds
    row.update({k: float(v) for k, v in (probe or {}).items()})
    return row


def close_epoch(
    prog: Progress, row: dict[str, Any], *, has_val: bool, patience: int | None
) -> tuple[Progress, bool]:
    """The counters after an epoch with metrics ``row``, and whether its parameters are the best.

    The monitored loss is the validation loss (the training loss without a
    validation split); without a validation split the best parameters are the
    latest. ``patience`` epochs without a better validation loss stop the run.
    """
    prog = prog._replace(
        epoch=prog.epoch + 1,
        pos=0,
        skipped_total=prog.skipped_total + prog.acc.skipped,
        val_loss=row.get("val_loss"),
    )
    monitor = row.get("val_loss", row["loss"])
    improved = not has_val  # nothing to select on: the best parameters are the latest
    if has_val and monitor is not None and monitor < prog.best_val:
        prog = prog._replace(best_val=monitor, best_epoch=prog.epoch, bad_epochs=0)
        improved = True
    elif has_val:
        prog = prog._replace(bad_epochs=prog.bad_epochs + 1)
    if patience and has_val and prog.bad_epochs >= patience:
        prog = prog._replace(stopped_early=True)
    return prog, improved
