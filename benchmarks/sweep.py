"""Sweeps: an 8-seed digits-mlp sweep vs 8 sequential fbp runs vs 8 scikit-learn fits.

All three train experiments/digits_mlp.py (64-128-10 ReLU, Adam lr 1e-3, batch 32,
100 epochs) once per seed:

* **sweep**: ``fbp.run.sweep.run(exp, seeds=range(8), out=DIR)``, the code path of
  ``fbp train digits-mlp --seeds 0-7``: one vmapped program for all runs;
* **sequential**: ``fbp.run.runner.run(exp, seed=s, out=DIR/s)`` for each seed, the code
  path of ``fbp train digits-mlp --seed s``, one after the other in this process;
* **scikit-learn**: ``MLPClassifier`` fits with the matched configuration of
  benchmarks/digits_vs_sklearn.py (``run_sklearn``), one per seed.

Times are wall seconds of the whole call, including tracing, compilation,
checkpoints, metrics, plots and summaries (scikit-learn writes nothing). One
process: a warm-up round (1 epoch of each, same shapes) pays the one-off costs of a
process (imports, module-level jit caches, fonts), then ``--rounds`` interleaved
rounds (sweep, sequential, scikit-learn, ...); medians. The compile column is the
XLA compilation time JAX logs (``jax_log_compiles``) inside that wall time.

Usage:
  python benchmarks/sweep.py              # 8 seeds, 100 epochs, 3 rounds
  python benchmarks/sweep.py --quick      # 2 seeds, 2 epochs, 1 round (smoke test)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
from digits_vs_sklearn import EXPERIMENT_FILE, run_sklearn  # noqa: E402

from fbp.run import experiment, runner, sweep  # noqa: E402


class CompileLog(logging.Handler):
    """Sums the seconds of the XLA compilations JAX logs while it is installed."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def emit(self, record):
        m = re.search(r"Finished XLA compilation of .* in ([\d.e-]+) sec", record.getMessage())
        if m:
            self.seconds += float(m[1])


def timed(fn, log: CompileLog) -> dict:
    """Wall and CPU seconds of ``fn()`` and the compile seconds inside them."""
    log.seconds = 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return {
        "wall": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "compile": log.seconds,
        "result": result,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, 1 round")
    ap.add_argument("--seeds", type=int, default=None, help="runs (seeds 0..N-1), default 8")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    exp = experiment.get(EXPERIMENT_FILE)
    n = args.seeds or (2 if args.quick else 8)
    epochs = args.epochs or (2 if args.quick else exp.epochs)
    rounds = args.rounds or (1 if args.quick else 3)
    seeds = list(range(n))
    quiet = dict(print_fn=lambda line: None, experiment_path=EXPERIMENT_FILE)
    tmp = Path(tempfile.mkdtemp(prefix="fbp-sweep-bench-"))

    def do_sweep(e, tag):
        return sweep.run(exp, seeds=seeds, epochs=e, out=tmp / f"sweep-{tag}", **quiet)

    def do_sequential(e, tag):
        return [
            runner.run(exp, seed=s, epochs=e, out=tmp / f"seq-{tag}" / str(s), **quiet)
            for s in seeds
        ]

    def do_sklearn(e):
        return [run_sklearn(exp, exp.data(s), s, e) for s in seeds]

    log = CompileLog()
    jax.config.update("jax_log_compiles", True)
    jax_log = logging.getLogger("jax")
    jax_log.addHandler(log)
    jax_log.propagate = False  # the compile lines go to the counter, not to stderr
    load_before = common.load()
    try:
        do_sweep(1, "warm"), do_sequential(1, "warm"), do_sklearn(1)  # one-off process costs
        times = {"sweep": [], "sequential": [], "scikit-learn": []}
        for r in range(rounds):
            times["sweep"].append(timed(lambda r=r: do_sweep(epochs, r), log))
            times["sequential"].append(timed(lambda r=r: do_sequential(epochs, r), log))
            times["scikit-learn"].append(timed(lambda: do_sklearn(epochs), log))
    finally:
        jax_log.removeHandler(log)
        jax_log.propagate = True
        jax.config.update("jax_log_compiles", False)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = common.load()

    sweep_acc = [r.test["accuracy"] for r in times["sweep"][-1]["result"].runs.values()]
    seq_acc = [r.test["accuracy"] for r in times["sequential"][-1]["result"]]
    sk_acc = [r["acc"] for r in times["scikit-learn"][-1]["result"]]
    accs = {"sweep": sweep_acc, "sequential": seq_acc, "scikit-learn": sk_acc}
    med = {k: statistics.median(t["wall"] for t in v) for k, v in times.items()}
    rows = []
    for name, ts in times.items():
        rows.append(
            [
                name,
                f"{med[name]:.2f}",
                f"{statistics.median(t['cpu'] for t in ts):.2f}",
                f"{statistics.median(t['compile'] for t in ts):.2f}",
                f"{100 * statistics.fmean(accs[name]):.2f}%",
                f"{med[name] / med['sweep']:.1f}x",
            ]
        )
    print(
        f"digits-mlp, {n} seeds x {epochs} epochs (batch {exp.batch_size}); wall seconds of all "
        f"{n} runs including compilation and every file a run writes; median of {rounds} "
        f"interleaved rounds after a warm-up round. Load average before {load_before}, "
        f"after {load_after}.\n"
    )
    print(
        common.table(
            [
                "approach",
                "wall s",
                "CPU s",
                "of which XLA compile s",
                "mean test acc",
                "time / sweep's",
            ],
            rows,
        )
    )
    same = [a == b for a, b in zip(sweep_acc, seq_acc, strict=True)]
    print(
        f"\nSweep and sequential runs reach the same test accuracy in {sum(same)} of {n} seeds."
        f"\n- machine: {common.machine()}"
    )


if __name__ == "__main__":
    main()
