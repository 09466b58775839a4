"""The sweep's training loop: the single-run loop's fold, over every run of a stacked state.

Each run keeps what a single run keeps on the host (``fbp.run.loop.Progress``, its
metrics history, ``MetricsLog`` and ``Checkpointer`` in its own directory); the
device holds the stacked train state, best parameters and order keys
(``Stacked``). A chunk trains the runs that are at the earliest position (all of
them, unless a resumed sweep's runs were saved at different epochs, in which case
the ones behind catch up first); epochs close with ``fbp.run.loop.epoch_row`` and
``fbp.run.loop.close_epoch``, the single run's own bookkeeping, so early stopping, best
parameters and the plateau schedule behave per run exactly as for a run alone.
A checkpoint of run ``i`` is its slice of the stack, in the layout of a single
run's checkpoint, so ``fbp eval``, ``fbp export`` and ``fbp train --resume`` read it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from fbp import train as fbp_train
from fbp.core import Array
from fbp.run import schedules
from fbp.run.loop import (
    Best,
    Checkpointer,
    EpochSums,
    Interrupted,
    NonFiniteError,
    Progress,
    ResumePosition,
    Setup,
    close_epoch,
    epoch_row,
    nonfinite_message,
)
from fbp.run.metrics import MetricsLog
from fbp.run.options import RunOptions
from fbp.run.progress import Printer, StopFlag
from fbp.run.sweep.grid import Point
from fbp.run.sweep.stack import Program, restructure, take, to_host


@dataclasses.dataclass
class Run:
    """One run of a sweep, on the host."""

    point: Point
    cfg: RunOptions
    config: dict[str, Any]  # its saved config (summary.json, checkpoints)
    setup: Setup  # its own data, schedule and evaluation
    treedef: Any  # the layout of its train state in a checkpoint (its own optimizer's)
    progress: Progress
    history: list[dict[str, Any]]
    out: Path | None
    log: MetricsLog | None = None
    saver: Checkpointer | None = None

    @property
    def done(self) -> bool:
        return self.progress.epoch >= self.cfg.epochs or self.progress.stopped_early

    @property
    def at(self) -> tuple[int, int]:
        return self.progress.epoch, self.progress.pos


class Stacked(NamedTuple):
    """The device side of a sweep: every leaf with a leading run axis."""

    state: fbp_train.TrainState  # in the sweep's optimizer layout
    best: Best
    order_key: Array  # each run's current epoch order key, shape (runs,)


class Data(NamedTuple):
    """What the chunks and evaluations read: per run (runs, n, ...) or shared (n, ...)."""

    hp: dict[str, Array]  # swept values, shape (runs,)
    x: Array
    y: Array
    val: tuple[Array, Array] | None


def position(runs: Sequence[Run], host: Stacked, i: int) -> ResumePosition:
    """Run ``i``'s position in its own layout, from a host copy of the stack (``to_host``)."""
    state = restructure(take(host.state, i), runs[i].treedef)
    best = Best(*take(tuple(host.best), i))
    return ResumePosition(state, best, take(host.order_key, i), runs[i].progress)


def save(runs: Sequence[Run], stacked: Stacked, which: Sequence[int], pool: ThreadPoolExecutor):
    """Checkpoint runs ``which`` (not those whose newest checkpoint is this position already).

    The stack comes to the host in one transfer; the writes run in threads, since each
    is mostly file writes and fsyncs, which overlap.
    """
    host = to_host(stacked)
    todo = [(i, position(runs, host, i)) for i in which]
    savers = {i: s for i in which if (s := runs[i].saver) is not None}
    todo = [(i, p) for i, p in todo if savers[i].directory and not savers[i].holds(p)]
    list(pool.map(lambda ip: savers[ip[0]].save(ip[1]), todo))


def train(
    runs: Sequence[Run],
    stacked: Stacked,
    program: Program,
    data: Data,
    *,
    printer: Printer,
    handle_signals: bool,
    sweep_dir: Path | None,
) -> Stacked:
    """Train every run to its epochs (or early stop); rows go to each run's history and log.

    Raises:
      Interrupted: SIGTERM/SIGINT, at the next chunk boundary, after checkpointing every run.
      NonFiniteError: a non-finite step in a run under ``nonfinite='halt'``.
    """
    cfg = runs[0].cfg
    every = cfg.checkpoint_every or max(1, cfg.epochs // 10)
    steps = runs[0].setup.steps_per_epoch
    order = None
    with StopFlag(handle_signals) as stop, ThreadPoolExecutor(min(len(runs), 8)) as pool:
        while live := [i for i, r in enumerate(runs) if not r.done]:
            epoch, pos = min(runs[i].at for i in live)
            group = [i for i in live if runs[i].at == (epoch, pos)]
            active = np.zeros(len(runs), bool)
            active[group] = True
            starting = active if pos == 0 else np.zeros_like(active)
            if pos == 0 or order is None:  # a new epoch for these runs: keys, order, sums
                state = stacked.state
                key, order_key, order = program.start_epoch(state.key, stacked.order_key, starting)
                stacked = stacked._replace(state=state._replace(key=key), order_key=order_key)
                for i in group if pos == 0 else ():
                    runs[i].progress = runs[i].progress._replace(acc=EpochSums())
                if steps > cfg.chunk_steps:  # sliced into chunks on the host
                    order = np.asarray(order)
            ahead = [runs[i].progress.pos for i in live if runs[i].at[0] == epoch]
            hi = min([pos + cfg.chunk_steps, steps] + [p for p in ahead if p > pos])
            t0 = time.perf_counter()
            rows = order if (pos, hi) == (0, steps) else order[:, pos:hi]
            state, m = program.chunk(stacked.state, data.hp, data.x, data.y, rows, active)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            if cfg.nonfinite == "halt":
                _halt_on_nonfinite(runs, group, m)
            stacked = stacked._replace(state=state)
            for i in group:
                prog = runs[i].progress
                mine = {k: v[i] for k, v in m.items()}
                runs[i].progress = prog._replace(
                    acc=prog.acc.add(mine, dt), train_seconds=prog.train_seconds + dt, pos=hi
                )
            if hi == steps:
                stacked = _end_epochs(runs, group, stacked, program, data, printer)
                due = [i for i in group if _due(runs[i], every)]
                if stop.signum is None and due:
                    save(runs, stacked, due, pool)
            else:
                printer.step(epoch, hi)
            if stop.signum is not None:
                save(runs, stacked, range(len(runs)), pool)
                raise Interrupted(stop.signum, sweep_dir)
        if printer.tty:
            printer.line("")
        save(runs, stacked, range(len(runs)), pool)
    return stacked


def _due(run: Run, every: int) -> bool:
    epoch = run.progress.epoch
    return epoch % every == 0 and epoch < run.cfg.epochs


def _halt_on_nonfinite(runs: Sequence[Run], group: Sequence[int], m: dict[str, Any]) -> None:
    for i in group:
        skipped = np.asarray(m["skipped"][i])
        if skipped.any():
            pos = ResumePosition._make((None, None, None, runs[i].progress))  # progress only
            mine = {"skipped": skipped}
            raise NonFiniteError(
                f"run {runs[i].point.name}: "
                + nonfinite_message(pos, mine, s.last if (s := runs[i].saver) else None)
            )


def _end_epochs(
    runs: Sequence[Run],
    group: Sequence[int],
    stacked: Stacked,
    program: Program,
    data: Data,
    printer: Printer,
) -> Stacked:
    """Close the epoch of the runs in ``group``: rows, best parameters, plateau, early stop."""
    state = stacked.state
    val = probe = None
    if data.val is not None:
        val = jax.device_get(program.evaluate(state.params, state.model_state, *data.val))
    if program.probe is not None:
        bs = runs[0].setup.batch_size
        x, y = (
            (data.x[:, :bs], data.y[:, :bs])
            if program.data_axis == 0
            else (data.x[:bs], data.y[:bs])
        )
        probe = jax.device_get(program.probe(state, data.hp, x, y))
    steps = jax.device_get(state.step)
    plateau_last = to_host(state.opt_state[-1]) if program.plateau is not None else None
    improved = np.zeros(len(runs), bool)
    monitors = np.zeros(len(runs), np.float32)
    has_monitor = np.zeros(len(runs), bool)
    closed = []
    for i in group:
        run = runs[i]
        opt_view = (take(plateau_last, i),) if plateau_last is not None else None
        lr = schedules.lr_now(run.cfg, run.setup.schedule, opt_view, steps[i])
        row = epoch_row(
            run.progress,
            int(steps[i]),
            {k: v[i] for k, v in val.items()} if val is not None else None,
            lr,
            {k: v[i] for k, v in probe.items()} if probe is not None else None,
        )
        run.progress, improved[i] = close_epoch(
            run.progress, row, has_val=data.val is not None, patience=run.cfg.patience
        )
        monitor = row.get("val_loss", row["loss"])
        if monitor is not None:
            monitors[i], has_monitor[i] = monitor, True
        _record(run, row)
        closed.append(row)
        if row["skipped"]:
            printer.line(
                f"{run.point.name}: epoch {row['epoch']}: skipped {row['skipped']} steps with a "
                "non-finite loss or gradient"
            )
    stacked = stacked._replace(best=program.keep_best(stacked.best, state, improved))
    if program.plateau is not None:
        opt_state = program.plateau(state.opt_state, monitors, has_monitor)
        stacked = stacked._replace(state=state._replace(opt_state=opt_state))
    printer.epoch(_mean_row(closed))
    return stacked


def _record(run: Run, row: dict[str, Any]) -> None:
    """Add ``row`` to ``run``'s history and metrics file, with the changes that took effect
    in its epoch (options changed on resume, accepted data: ``run.config["changes"]``)."""
    changes = [c for c in run.config.get("changes") or () if c.get("epoch") == row["epoch"]]
    if changes:
        row["changes"] = changes
    run.history.append(row)
    if run.log is not None:
        run.log.write(row)


def _mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The progress line's row: each metric's mean over the runs that closed this epoch."""
    out: dict[str, Any] = {"epoch": rows[0]["epoch"]}
    for k in ("loss", "val_loss", "val_accuracy"):
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = statistics.fmean(values)
    return out
