"""digits-mlp training: fbp's scanned epochs vs scikit-learn's MLPClassifier.

Both train a 64-128-10 ReLU MLP with Adam (lr 1e-3, batch 32, 100 epochs, no weight
penalty) on the same standardised training split of ``fbp.data.load('digits', seed)``
and are scored on its test split. fbp runs the experiment file
experiments/digits_mlp.py through ``fbp.train.make_epoch`` (one jitted ``lax.scan``
per epoch); its first call (trace, compile, one discarded epoch) is timed apart.
scikit-learn runs ``MLPClassifier(solver='adam', alpha=0, n_iter_no_change=max_iter,
tol=0)`` so it trains all epochs. Differences that remain: scikit-learn also steps
on the last partial batch of an epoch, and initialises weights its own way.

Usage:
  python benchmarks/digits_vs_sklearn.py            # seeds 0 1 2
  python benchmarks/digits_vs_sklearn.py --quick    # 1 seed, 2 epochs (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from fbp import experiment, train  # noqa: E402

EXPERIMENT_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "digits_mlp.py"
)


def fbp_trainer(exp, ds, seed: int, epochs: int):
    """Compile the epoch ahead of time; return (first-call seconds, train function).

    First-call seconds cover tracing, compiling and one discarded epoch (the first
    execution of a compiled program pays one-off costs). The train function runs
    ``epochs`` epochs from the same initial state and returns (seconds, CPU seconds,
    test metrics).
    """
    model = exp.model(ds)
    steps = epochs * (ds.train.x.shape[0] // exp.batch_size)
    opt = exp.optimizer(exp.lr, steps)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    ts0 = train.init(model, opt, jax.random.key(seed), x)
    common.block(ts0)
    t0 = time.perf_counter()
    epoch = train.make_epoch(model, exp.loss, opt, batch_size=exp.batch_size)
    compiled = epoch.lower(ts0, x, y).compile()
    common.block(compiled(ts0, x, y))  # pure: ts0 is unchanged
    first_call = time.perf_counter() - t0

    def run() -> tuple[float, float, dict]:
        c0, t0 = time.process_time(), time.perf_counter()
        ts = ts0
        for _ in range(epochs):
            ts, metrics = compiled(ts, x, y)
        common.block(ts)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        test = train.evaluate(
            model, exp.loss, ts.params, jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
        )
        return seconds, cpu, test

    return first_call, run


def run_sklearn(exp, ds, seed: int, epochs: int) -> dict:
    clf = MLPClassifier(
        hidden_layer_sizes=(128,),
        activation="relu",
        solver="adam",
        alpha=0.0,
        batch_size=exp.batch_size,
        learning_rate_init=exp.lr,
        max_iter=epochs,
        n_iter_no_change=epochs,
        tol=0.0,
        shuffle=True,
        random_state=seed,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(ds.train.x, ds.train.y)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    acc = float(np.mean(clf.predict(ds.test.x) == ds.test.y))
    return {"train": train_s, "cpu": cpu_s, "acc": acc, "epochs": clf.n_iter_}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per seed (median)")
    args = ap.parse_args(argv)
    exp = experiment.get(EXPERIMENT_FILE)
    if exp.penalty is not None or exp.weight_decay:
        raise SystemExit(
            "digits_vs_sklearn: the experiment has a weight penalty; "
            "this comparison assumes none (scikit-learn alpha=0)."
        )
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = 2 if args.quick else exp.epochs
    repeats = args.repeats or (1 if args.quick else 3)
    rows, speedups, speedups_c, speedups_cpu = [], [], [], []
    for seed in seeds:
        ds = exp.data(seed)
        first_call, run = fbp_trainer(exp, ds, seed, epochs)
        f_s, s_s, f_c, s_c = [], [], [], []
        for _ in range(repeats):  # interleaved; each run is the same deterministic training
            seconds, cpu, test = run()
            f_s.append(seconds)
            f_c.append(cpu)
            sk = run_sklearn(exp, ds, seed, epochs)
            s_s.append(sk["train"])
            s_c.append(sk["cpu"])
        f_t, s_t = common.median(f_s), common.median(s_s)
        speedups_cpu.append(common.median(s_c) / common.median(f_c))
        speedups.append(s_t / f_t)
        speedups_c.append(s_t / (f_t + first_call))
        rows.append(
            [
                seed,
                f"{f_t:.3f}",
                f"{first_call:.2f}",
                f"{100 * test['accuracy']:.1f}%",
                f"{s_t:.2f}",
                f"{100 * sk['acc']:.1f}%",
                f"{speedups[-1]:.1f}x",
                f"{speedups_c[-1]:.1f}x",
                f"{speedups_cpu[-1]:.1f}x",
            ]
        )
    rows.append(
        [
            "median",
            "",
            "",
            "",
            "",
            "",
            f"{np.median(speedups):.1f}x",
            f"{np.median(speedups_c):.1f}x",
            f"{np.median(speedups_cpu):.1f}x",
        ]
    )
    print(
        f"digits-mlp ({exp.description}); train split {ds.train.x.shape[0]} examples, "
        f"test {ds.test.x.shape[0]}; {epochs} epochs. fbp: make_epoch, float32; "
        f"scikit-learn MLPClassifier(adam, alpha=0). Times are wall seconds of the "
        f"training loop, median of {repeats} interleaved runs per seed; fbp's first call "
        f"(trace + compile + one discarded epoch) is apart. The last column compares "
        f"process CPU seconds (all threads), steadier than wall time on a loaded machine.\n"
    )
    print(
        common.table(
            [
                "seed",
                "fbp train s",
                "fbp first call s",
                "fbp test acc",
                "sklearn train s",
                "sklearn test acc",
                "speed-up",
                "speed-up incl. first call",
                "speed-up by CPU time",
            ],
            rows,
        )
    )
    import sklearn

    print(f"\n- machine: {common.machine()}; scikit-learn {sklearn.__version__}")


if __name__ == "__main__":
    main()
