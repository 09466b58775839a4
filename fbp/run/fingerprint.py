"""What a run was trained on, and whether it is still there: data fingerprints.

A run's saved config (``summary.json``, every checkpoint) holds ``data``: a
description of the data set actually used (name, classes, examples per split,
feature shape) and its fingerprint:

* a ``--data`` file: its absolute path, size in bytes and SHA-256;
* an experiment's own data (scikit-learn's bundled sets, generated data): the
  SHA-256 of its split arrays and the versions that made them (scikit-learn, numpy).

``fbp train --resume``, ``fbp eval``, ``fbp export`` and sweeps compare it with the
data they read (``check``): a changed data set is refused with one line saying what
changed and how to proceed (``--accept-changed-data``, which is recorded in the run's
``changes`` with the epoch it took effect). A file that moved is found at its recorded
absolute path, or given again with ``--data``.

Examples:
  >>> a = {"kind": "file", "path": "/d/x.csv", "size": 10, "sha256": "ab" * 32}
  >>> b = dict(a, size=12, sha256="cd" * 32)
  >>> difference(a, b)
  'size 10 -> 12 bytes, sha256 abababababab... -> cdcdcdcdcdcd...'
  >>> difference(a, dict(a)) is None
  True
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fbp.data import Dataset

FINGERPRINT_KEYS = ("sha256", "size", "versions")


class DataChanged(ValueError):
    """The data a run was trained on has changed since (refused unless accepted)."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def arrays_sha256(ds: Dataset) -> str:
    """SHA-256 over every split's arrays (x, y, lengths: dtype, shape and bytes)."""
    h = hashlib.sha256()
    for s in (ds.train, ds.val, ds.test):
        for a in (s.x, s.y, s.lengths):
            if a is None:
                h.update(b"none")
                continue
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(ds: Dataset, data_file: str | None) -> dict[str, Any]:
    """The saved ``data`` entry of a run: what ``ds`` is and its fingerprint.

    Args:
      ds: the data set the run trains on (after the experiment's preparation).
      data_file: the ``--data`` file it was read from (absolute), or None.
    """
    d: dict[str, Any] = {
        "name": ds.name,
        "classes": ds.classes,
        "examples": {k: len(getattr(ds, k).x) for k in ("train", "val", "test")},
        "x_shape": list(np.shape(ds.train.x)[1:]),
    }
    if data_file is not None:
        path = Path(data_file)
        d.update(kind="file", path=str(path), size=path.stat().st_size)
        d["sha256"] = file_sha256(path)
        return d
    d.update(kind="experiment", sha256=arrays_sha256(ds))
    d["versions"] = {"scikit-learn": _version("scikit-learn"), "numpy": np.__version__}
    return d


def difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What changed between two ``describe`` entries (one phrase), or None when the same.

    The versions that made an experiment's data are information: they count only
    when the data's hash changed too (a newer scikit-learn with the same arrays is
    the same data).
    """
    if saved.get("sha256") == now.get("sha256") and saved.get("size") == now.get("size"):
        return None
    parts = []
    if saved.get("size") != now.get("size"):
        parts.append(f"size {saved.get('size')} -> {now.get('size')} bytes")
    if saved.get("sha256") != now.get("sha256"):
        a, b = str(saved.get("sha256"))[:12], str(now.get("sha256"))[:12]
        parts.append(f"sha256 {a}... -> {b}...")
    if saved.get("versions") != now.get("versions"):
        parts.append(f"versions {saved.get('versions')} -> {now.get('versions')}")
    return ", ".join(parts) or None


def recorded(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The data a run's config says it uses now: the last accepted change's, else ``data``."""
    latest = config.get("data")
    for c in config.get("changes") or ():
        if c.get("option") == "data":
            latest = c.get("to")
    return latest


def data_file(saved_path: str | None, given: str | None, where: str) -> str | None:
    """The data file to read: ``--data`` when given (absolute), else the recorded path.

    Raises:
      DataChanged: the recorded file is gone and no ``--data`` says where it went.
    """
    if given is not None:
        return str(Path(given).resolve())
    if saved_path is None:
        return None
    if not Path(saved_path).exists():
        raise DataChanged(
            f"{where}: the run's data file {saved_path} is missing; if it moved, give its new "
            "place with --data FILE."
        )
    return saved_path


def check(
    saved: Mapping[str, Any] | None, now: Mapping[str, Any], *, where: str, accept: bool
) -> str | None:
    """Compare the recorded data with the data read now.

    Args:
      saved: the run's recorded ``data`` entry (None: a run from before fingerprints).
      now: ``describe`` of the data read now.
      where: who is checking, for the message (``run``, ``fbp eval``...).
      accept: ``--accept-changed-data`` was given.

    Returns:
      None when unchanged; the difference (to record) when changed and accepted.

    Raises:
      DataChanged: changed and not accepted: one line, what changed and how to proceed.
    """
    if saved is None:
        return None
    diff = difference(saved, now)
    if diff is None or accept:
        return diff
    what = now.get("path") or now.get("name")
    raise DataChanged(
        f"{where}: the data changed since this run was trained ({diff}, {what}); pass "
        "--accept-changed-data to use it anyway (recorded in the run), or restore the data."
    )
