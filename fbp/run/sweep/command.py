"""``fbp train EXP --seeds 0-7 --sweep lr=1e-3,3e-3``: the sweep flags of ``fbp train``.

``add_arguments`` adds the flags; ``from_args`` turns them (or, for ``--resume``
without them, the sweep saved in ``--out``) into the call that trains, or None for
a single run.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

from fbp.run import options, sweep
from fbp.run.sweep import grid as grid_mod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--seeds`` and ``--sweep`` to ``fbp train``'s parser."""
    group = parser.add_argument_group(
        "sweeps", "many runs of the experiment trained as one vmapped program (fbp.run.sweep)"
    )
    group.add_argument(
        "--seeds", metavar="SEEDS", help="one run per seed: a range or list, e.g. 0-7 or 0,3,5"
    )
    group.add_argument(
        "--sweep",
        action="append",
        metavar="NAME=V1,V2,...",
        help="one run per value (repeatable: the product of all); sweepable options: "
        + ", ".join(options.sweepable()),
    )


def from_args(args: argparse.Namespace, out: Path | None) -> Callable | None:
    """``fbp.run.sweep.run`` with the parsed seeds and grid, or None when no sweep is asked for.

    ``--resume`` of a directory that holds a sweep continues that sweep without the flags.

    Raises:
      ValueError: a bad ``--seeds`` or ``--sweep`` (one line naming the flag).
    """
    seeds = grid_mod.parse_seeds(args.seeds) if args.seeds is not None else None
    grid = grid_mod.parse_grid(args.sweep) if args.sweep else {}
    if seeds is None and not grid:
        spec = sweep.saved_spec(out) if args.resume and out is not None else None
        if spec is None:
            return None
        seeds, grid = spec["seeds"], spec["grid"]
    return functools.partial(sweep.run, seeds=seeds, grid=grid)
