"""Float64 gradient parity of every layer-registry case on this machine's JAX backend.

Runs ``fbp.testing.check_layer`` (the hand-written backward against ``jax.vjp`` of
``apply``, plus a finite-difference check) on every case of ``tests/layer_cases.py``,
the slow ones included, and prints one row per case and the largest and median relative
errors. The test suite asserts the same on the CPU; this script gives the numbers, on any
backend (``JAX_PLATFORMS=cuda python benchmarks/parity.py`` on a GPU).

Usage:
  python benchmarks/parity.py [--json PATH] [--only ID ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import common  # noqa: E402
from layer_cases import CASES  # noqa: E402

from fbp import testing  # noqa: E402


def check(case) -> dict:
    """Parity of one registry case: its largest relative error and the check's seconds."""
    t0 = time.perf_counter()
    layer, x, params, kw = case.setup()
    report = testing.check_layer(layer, x, params=params, rtol=case.rtol, frozen=case.frozen, **kw)
    return {
        "case": case.id,
        "max_error": report.max_error,
        "fd_error": report.fd_error,
        "ok": report.ok,
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--only", nargs="+", metavar="ID", help="these case ids only")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.id in args.only]
    print(f"Machine: {common.machine()}; device {jax.devices()[0].device_kind}\n")
    print("| case | max rel. error | finite-diff. error | ok |\n| --- | --- | --- | --- |")
    rows = []
    for c in cases:  # one row at a time, so a run stopped early still shows its rows
        r = check(c)
        rows.append(r)
        ok = "yes" if r["ok"] else "NO"
        print(f"| {c.id} | {r['max_error']:.1e} | {r['fd_error']:.1e} | {ok} |", flush=True)
    errors = [r["max_error"] for r in rows]
    print(
        f"\n{sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance; "
        f"largest error {max(errors):.1e}, median {statistics.median(errors):.1e}, "
        f"{sum(r['seconds'] for r in rows):.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": common.machine(), "rows": rows}))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
