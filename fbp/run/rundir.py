"""A run directory: what fbp owns in it, the check before writing, and its lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

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
        ckpt.atomic_write(out / LOCK, f"{os.getpid()}\n", sync_dir=False)

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
