"""Will a sweep fit? Bytes a run needs, from shapes alone, against the device's free memory.

The estimate of one run (``run_bytes``) lives in ``fbp.memory``, shared with single runs.

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

from fbp.memory import (  # the estimate itself is shared with single runs (fbp.memory)
    RunBytes,
    available_bytes,
    format_bytes,
    run_bytes,
    tree_bytes,
)

__all__ = ["RunBytes", "available_bytes", "check_fits", "run_bytes", "tree_bytes"]


def check_fits(runs: int, per_run: int, shared: int, available: int | None, where: str) -> None:
    """Raise ValueError (saying how many runs would fit) unless ``runs`` fit in ``available``."""
    if available is None:
        return
    need = runs * per_run + shared
    if need <= available:
        return
    fit = max((available - shared) // per_run, 0) if per_run else runs
    raise ValueError(
        f"sweep: {runs} runs need about {format_bytes(need)} ({format_bytes(per_run)} a run) "
        f"but {format_bytes(available)} is free on {where}; at most {fit} of the {runs} runs "
        "fit. Sweep fewer --seeds or --sweep values."
    )
