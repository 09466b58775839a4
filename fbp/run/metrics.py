"""The metrics file of a run, and what identifies its results (parameter hash, versions).

metrics.jsonl gets a line per logged epoch, flushed as it is written; it is read back
tolerating a torn last line (a kill mid-write).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fbp
from fbp import checkpoint as ckpt


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
