"""Experiments with variants: the same spec run several ways, then compared.

An ``Experiment`` with ``variants={'name': {field: value, ...}, ...}`` is run once
per variant, each as the experiment with those fields replaced (a different model,
learning rule, optimizer...), by the ordinary runner, in ``DIR/<name>/``. The
experiment's ``report`` hook then gets a ``RunResult`` whose ``variants`` maps each
name to its own ``RunResult``, so one hook can tabulate and plot the comparison;
``DIR/comparison.json`` holds every variant's test metrics and training time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fbp import checkpoint
from fbp.run.experiment import Experiment, RunResult


class RunOne(Protocol):
    """How one variant is run: ``fbp.run.runner.run_single``."""

    def __call__(
        self,
        exp: Experiment,
        *,
        out: str | os.PathLike | None,
        print_fn: Callable[[str], None],
        **kwargs: Any,
    ) -> RunResult: ...


def check(exp: Experiment) -> None:
    """Raise ValueError unless every variant names a dict of existing Experiment fields."""
    fields = {f.name for f in dataclasses.fields(exp)} - {"name", "variants"}
    for name, over in (exp.variants or {}).items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"{exp.name}: variant names must be non-empty strings without '/', got {name!r}."
            )
        if not isinstance(over, dict):
            raise ValueError(
                f"{exp.name}: variant {name!r} must be a dict of field overrides, "
                f"got {type(over).__name__}."
            )
        unknown = sorted(set(over) - fields)
        if unknown:
            raise ValueError(
                f"{exp.name}: variant {name!r} sets unknown field(s) {unknown}; "
                f"Experiment fields are {sorted(fields)}."
            )


def run(
    exp: Experiment,
    run_one: RunOne,
    *,
    out: str | os.PathLike | None = None,
    print_fn: Callable[[str], None] = print,
    **kwargs: Any,
) -> RunResult:
    """Run every variant of ``exp`` with ``run_one`` and report the comparison.

    ``fbp.run.runner.run`` calls this for an experiment with variants, handing it the
    runner of one experiment (``fbp.run.runner.run_single``); this module drives that
    runner and needs none of its internals.

    Args:
      exp: an Experiment with ``variants``.
      run_one: runs one experiment (``fbp.run.runner.run_single``).
      out: the parent directory (each variant gets ``out/<name>``), or None.
      print_fn: where progress and the report go.
      **kwargs: passed to ``run_one`` for every variant (resume, overwrite, epochs...).

    Returns:
      A ``RunResult`` for the whole experiment: ``variants`` holds the per-variant
      results; its model, data, state and config are the first variant's, its
      ``test`` is ``{'<variant>/<metric>': value}`` and ``train_seconds`` the sum.
    """
    check(exp)
    out_dir = Path(out) if out is not None else None
    results = {}
    for name, over in (exp.variants or {}).items():
        print_fn(f"=== {exp.name} / {name}")
        sub = dataclasses.replace(
            exp, **{"report": None, **over, "variants": None, "name": f"{exp.name}/{name}"}
        )
        results[name] = run_one(
            sub, out=out_dir / name if out_dir else None, print_fn=print_fn, **kwargs
        )
    first = next(iter(results.values()))
    test = {f"{n}/{k}": v for n, r in results.items() for k, v in r.test.items()}
    result = RunResult(
        exp,
        first.config,
        first.model,
        first.dataset,
        first.state,
        [],
        test,
        sum(r.train_seconds for r in results.values()),
        out_dir,
    )
    result.variants = results
    if out_dir is not None:
        table = {n: {"test": r.test, "train_seconds": r.train_seconds} for n, r in results.items()}
        checkpoint.atomic_write(out_dir / "comparison.json", json.dumps(table, indent=1) + "\n")
    print_fn(f"== {exp.name}: {exp.description}")
    for n, r in results.items():
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.test.items())
        print_fn(f"{n:<28} test {metrics}  ({r.train_seconds:.1f} s)")
    for line in exp.report(result) if exp.report else []:
        print_fn(line)
    return result
