"""Will a sweep fit? Bytes a run needs, from shapes alone, against the device's free memory.

A sweep holds every run's train state at once, so before anything is built or
compiled the sweep estimates what one run needs: its train state twice (the
chunk's input and output) and its best parameters, its gradients and updates, the
residuals and deltas of one minibatch (``fbp.memory_report``), its epoch order
and, when runs have their own data split, its data. All from ``jax.eval_shape``:
nothing is allocated.

Examples:
  >>> check_fits(4, 10**9, 0, 5 * 10**9, "cpu")
  >>> try:
  ...     check_fits(8, 10**9, 0, 5 * 10**9, "cpu")
  ... except ValueError as e:
  ...     print(*str(e).split("; "), sep="\\n")
  sweep: 8 runs need about 8.0 GB (1.0 GB a run) but 5.0 GB is free on cpu
  at most 5 of the 8 runs fit. Sweep fewer --seeds or --sweep values.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from fbp.core import Layer
from fbp.memory import memory_report


class RunBytes(NamedTuple):
    """Bytes of one run of a sweep, and bytes all runs share (one data set)."""

    per_run: int
    shared: int


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs; a PRNG key as 8)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += 8 * int(np.prod(leaf.shape, dtype=np.int64))
        else:
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def run_bytes(
    model: Layer,
    state: Any,
    x: Any,
    batch_size: int,
    data_bytes: int,
    *,
    own_data: bool,
) -> RunBytes:
    """An estimate of one run's bytes in a sweep.

    Args:
      model: the model.
      state: the run's ``TrainState`` (ShapeDtypeStructs from ``jax.eval_shape``).
      x: training inputs or their ShapeDtypeStruct, shape (n, ...).
      batch_size: examples per step.
      data_bytes: bytes of the run's train and validation splits.
      own_data: each run has its own data split (seeds differ); else one copy is shared.
    """
    params = tree_bytes(state.params)
    xb = jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype)
    try:
        key = jax.random.key(0)
        acts = memory_report(model, state.params, xb, key=key, state=state.model_state or None)
        activations = acts.total_bytes
    except (TypeError, ValueError):  # a model memory_report cannot trace: count no activations
        activations = 0
    steps = max(int(x.shape[0]) // batch_size, 1)
    per_run = 2 * tree_bytes(state) + 3 * params + 2 * activations + 4 * steps * batch_size
    return RunBytes(per_run + (data_bytes if own_data else 0), 0 if own_data else data_bytes)


def available_bytes(device: Any = None) -> int | None:
    """Free memory of ``device`` (default the first): the accelerator's, or the host's on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(runs: int, per_run: int, shared: int, available: int | None, where: str) -> None:
    """Raise ValueError (saying how many runs would fit) unless ``runs`` fit in ``available``."""
    if available is None:
        return
    need = runs * per_run + shared
    if need <= available:
        return
    fit = max((available - shared) // per_run, 0) if per_run else runs
    raise ValueError(
        f"sweep: {runs} runs need about {_gb(need)} ({_gb(per_run)} a run) but {_gb(available)} "
        f"is free on {where}; at most {fit} of the {runs} runs fit. Sweep fewer --seeds or "
        "--sweep values."
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
