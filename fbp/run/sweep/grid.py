"""What a sweep runs: seeds and a grid of option values, parsed, checked and named.

A sweep is the product of a grid (``{'lr': [1e-3, 3e-3], 'weight_decay': [0, 1e-4]}``,
options marked ``sweepable`` in ``fbp.run.options``) and a list of seeds. Each run is a
``Point``: its directory name and its option values.

Examples:
  >>> parse_seeds("0-2,5")
  (0, 1, 2, 5)
  >>> parse_grid(["lr=1e-3,3e-3", "weight-decay=0,1e-4"])
  {'lr': (0.001, 0.003), 'weight_decay': (0.0, 0.0001)}
  >>> [p.name for p in points((0, 1), {"lr": (0.001, 0.003)})]
  ['lr-0.001_seed-0', 'lr-0.001_seed-1', 'lr-0.003_seed-0', 'lr-0.003_seed-1']
  >>> parse_seeds("0-3,2")
  Traceback (most recent call last):
  ...
  ValueError: sweep: --seeds gives seed 2 twice.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from fbp.run import options

_SEED = re.compile(r"^(\d+)(?:-(\d+))?$")


class Point(NamedTuple):
    """One run of a sweep."""

    name: str  # its directory under the sweep's: 'seed-3', 'lr-0.003', 'lr-0.003_seed-1'
    overrides: dict[str, Any]  # the options this run sets: {'lr': 0.003, 'seed': 1}
    group: str  # the grid point without the seed ('lr=0.003'); '' in a seed-only sweep


def value_text(v: Any) -> str:
    """A value (a number, or an array of shape ()) as names and tables show it, read back as it."""
    return repr(float(v)) if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- checks


def check_seeds(seeds: Sequence[int], what: str = "seeds") -> tuple[int, ...]:
    """``seeds`` as a tuple, or ValueError: not ints >= 0, empty, or a seed repeated."""
    out = tuple(seeds)
    if not out:
        raise ValueError(f"sweep: {what} is empty; give at least one seed.")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"sweep: {what} must be ints >= 0, got {s!r}.")
    for s in out:
        if out.count(s) > 1:
            raise ValueError(f"sweep: {what} gives seed {s} twice.")
    return out


def check_grid(grid: Mapping[str, Sequence[Any]], what: str = "grid") -> dict[str, tuple]:
    """``grid`` with each option checked: sweepable, values given, each valid and distinct."""
    out = {}
    for name, values in grid.items():
        field = _sweepable(name, what)
        values = tuple(values) if isinstance(values, (list, tuple, range)) else (values,)
        if not values:
            raise ValueError(f"sweep: {what} option {field.name} has no values.")
        for v in values:
            if v is None:
                raise ValueError(f"sweep: {what} option {field.name} has the value None.")
            options.check(field.name, v)  # 'run: lr must be > 0, got -1.0.'
        out[field.name] = tuple(float(v) if field.type is float else v for v in values)
        for v in out[field.name]:
            if out[field.name].count(v) > 1:
                raise ValueError(f"sweep: {what} option {field.name} gives {value_text(v)} twice.")
    return out


def _sweepable(name: str, what: str) -> options.Field:
    known = {f.name: f for f in options.fields()}
    ok = options.sweepable()
    f = known.get(name.replace("-", "_"))
    if f is None:
        raise ValueError(
            f"sweep: {what} names an unknown option {name!r}; sweepable: {', '.join(ok)}."
        )
    if f.name == "seed":
        raise ValueError(f"sweep: {what} cannot sweep seed; give the seeds with --seeds.")
    if not f.meta.sweepable:
        raise ValueError(
            f"sweep: {what} cannot sweep {f.name} (runs of one program share it); "
            f"sweepable: {', '.join(ok)}."
        )
    return f


# ----------------------------------------------------------------------------- command line


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: ranges and lists, ``0-7``, ``0,3,5``, ``0-3,8``."""
    seeds: list[int] = []
    for part in text.split(","):
        m = _SEED.match(part.strip())
        if not m:
            raise ValueError(
                f"sweep: --seeds {text!r}: {part.strip()!r} is not a seed or a range "
                "(e.g. 0-7, 0,3,5)."
            )
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"sweep: --seeds {text!r}: the range {part.strip()} is empty.")
        seeds.extend(range(lo, hi + 1))
    return check_seeds(seeds, "--seeds")


def parse_grid(items: Sequence[str]) -> dict[str, tuple]:
    """``--sweep NAME=V1,V2,...`` (repeatable) as ``{name: values}``."""
    grid: dict[str, tuple] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(
                f"sweep: --sweep {item!r} is not NAME=V1,V2,... (e.g. --sweep lr=1e-3,3e-3)."
            )
        field = _sweepable(name, "--sweep")
        if field.name in grid:
            raise ValueError(f"sweep: --sweep gives {field.name} twice; list its values once.")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"sweep: --sweep {field.name}= has no values.")
        grid[field.name] = tuple(_number(field, p) for p in parts)
    return check_grid(grid, "--sweep")


def _number(field: options.Field, text: str) -> Any:
    try:
        value = field.type(text)
    except ValueError:
        kind = "an int" if field.type is int else "a number"
        raise ValueError(f"sweep: --sweep {field.name}: {text!r} is not {kind}.") from None
    return value


# ----------------------------------------------------------------------------- runs


def points(seeds: Sequence[int] | None, grid: Mapping[str, Sequence[Any]]) -> list[Point]:
    """The runs of a sweep: every grid point (in the order given) times every seed.

    Args:
      seeds: the seeds, or None for the run's own seed alone (names then carry no seed).
      grid: checked option values (``check_grid``).
    """
    names = list(grid)
    out = []
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values, strict=True))
        parts = [f"{n.replace('_', '-')}-{value_text(v)}" for n, v in point.items()]
        group = " ".join(f"{n}={value_text(v)}" for n, v in point.items())
        for seed in seeds if seeds is not None else (None,):
            over = dict(point) if seed is None else {**point, "seed": seed}
            name = "_".join(parts + ([f"seed-{seed}"] if seed is not None else []))
            out.append(Point(name, over, group))
    return out
