"""What a run shows while it trains (progress bar or periodic lines) and how it stops."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

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
    elapsed and an estimate of the time left (from this process's rate). Elsewhere (a
    log, a pipe) a long epoch gets a plain line with the same step, elapsed time and
    ETA at most every ``line_every_s`` seconds, so a log never stays silent for long.

    Args:
      print_fn: where lines go (the bar only when it is ``print`` on a terminal).
      total: the run's epochs.
      log_every: epochs between plain lines.
      steps_per_epoch: steps in an epoch (None: no step, elapsed or ETA shown).
      start: steps done before this process started (a resumed run).
      line_every_s: seconds between plain progress lines within an epoch (not a terminal).
    """

    def __init__(
        self,
        print_fn: Callable[[str], None],
        total: int,
        log_every: int,
        *,
        steps_per_epoch: int | None = None,
        start: int = 0,
        line_every_s: float = 10.0,
    ):
        self.print_fn = print_fn
        self.total = total
        self.log_every = max(1, log_every)
        self.tty = print_fn is print and sys.stdout.isatty()
        self.steps_per_epoch = steps_per_epoch
        self.start = start
        self.t0 = time.monotonic()
        self.last = 0.0
        self.line_every_s = line_every_s
        self.last_line = self.t0
        self.text = ""  # the last epoch's metrics

    def step(self, epoch: int, pos: int) -> None:
        """After a chunk: ``epoch`` epochs done, ``pos`` steps into the next one."""
        if self.tty:
            self._draw(epoch + 1, pos, force=False)
            return
        now = time.monotonic()
        if self.steps_per_epoch and now - self.last_line >= self.line_every_s:
            self.last_line = now
            self.print_fn(
                f"epoch {epoch + 1:>6}/{self.total}  step {pos}/{self.steps_per_epoch}  "
                f"{self._times(epoch + 1, pos, now)}"
            )

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
        spe = self.steps_per_epoch or 1  # set whenever this is called
        steps = (epoch - 1) * spe + pos
        elapsed = now - self.t0
        left = self.total * spe - steps
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
