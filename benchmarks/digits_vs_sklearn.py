"""digits-mlp training: fbp's scanned epochs vs scikit-learn's MLPClassifier.

Both train a 64-128-10 ReLU MLP with Adam (lr 1e-3, batch 32, 100 epochs, no weight
penalty) on the same standardised training split of ``fbp.data.load('digits', seed)``
and are scored on its test split. fbp runs the experiment file
experiments/digits_mlp.py through ``fbp.train.make_epoch`` (one jitted ``lax.scan``
per epoch); its compile time is measured apart by compiling ahead of time.
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


def run_fbp(exp, ds, seed: int, epochs: int) -> dict:
    """Train with ``make_epoch``; compile ahead of time so compile seconds are apart."""
    model = exp.model(ds)
    steps = epochs * (ds.train.x.shape[0] // exp.batch_size)
    opt = exp.optimizer(exp.lr, steps)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    ts = train.init(model, opt, jax.random.key(seed), x)
    t0 = time.perf_counter()
    epoch = train.make_epoch(model, exp.loss, opt, batch_size=exp.batch_size)
    compiled = epoch.lower(ts, x, y).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(epochs):
        ts, metrics = compiled(ts, x, y)
    common.block(ts)
    train_s = time.perf_counter() - t0
    test = train.evaluate(model, exp.loss, ts.params, jnp.asarray(ds.test.x),
                          jnp.asarray(ds.test.y))
    return {"compile": compile_s, "train": train_s, "acc": test["accuracy"],
            "skipped": int(metrics["skipped"].sum())}


def run_sklearn(exp, ds, seed: int, epochs: int) -> dict:
    clf = MLPClassifier(
        hidden_layer_sizes=(128,), activation="relu", solver="adam", alpha=0.0,
        batch_size=exp.batch_size, learning_rate_init=exp.lr, max_iter=epochs,
        n_iter_no_change=epochs, tol=0.0, shuffle=True, random_state=seed,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(ds.train.x, ds.train.y)
    train_s = time.perf_counter() - t0
    return {"train": train_s, "acc": float(np.mean(clf.predict(ds.test.x) == ds.test.y)),
            "epochs": clf.n_iter_}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    exp = experiment.get(EXPERIMENT_FILE)
    if exp.penalty is not None or exp.weight_decay:
        raise SystemExit("digits_vs_sklearn: the experiment has a weight penalty; "
                         "this comparison assumes none (scikit-learn alpha=0).")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = 2 if args.quick else exp.epochs
    rows, speedups, speedups_c = [], [], []
    for seed in seeds:
        ds = exp.data(seed)
        f = run_fbp(exp, ds, seed, epochs)
        s = run_sklearn(exp, ds, seed, epochs)
        speedups.append(s["train"] / f["train"])
        speedups_c.append(s["train"] / (f["train"] + f["compile"]))
        rows.append([
            seed, f"{f['train']:.2f}", f"{f['compile']:.2f}", f"{100 * f['acc']:.1f}%",
            f"{s['train']:.2f}", f"{100 * s['acc']:.1f}%",
            f"{speedups[-1]:.1f}x", f"{speedups_c[-1]:.1f}x",
        ])
    rows.append([
        "median", "", "", "", "", "", f"{np.median(speedups):.1f}x",
        f"{np.median(speedups_c):.1f}x",
    ])
    print(
        f"digits-mlp ({exp.description}); train split {ds.train.x.shape[0]} examples, "
        f"test {ds.test.x.shape[0]}; {epochs} epochs. fbp: make_epoch, float32; "
        f"scikit-learn MLPClassifier(adam, alpha=0). Times are wall seconds of the "
        f"training loop.\n"
    )
    print(common.table(
        ["seed", "fbp train s", "fbp compile s", "fbp test acc", "sklearn train s",
         "sklearn test acc", "speed-up", "speed-up incl. compile"], rows))
    import sklearn

    print(f"\n- machine: {common.machine()}; scikit-learn {sklearn.__version__}")


if __name__ == "__main__":
    main()
