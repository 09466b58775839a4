"""digits-dp: DP-SGD on scikit-learn's 8x8 digits at ε ∈ {1, 3, 8} (δ = 1e-5), next to
non-private training of the same 64-128-10 ReLU MLP.

DP-SGD with Poisson sampling, as the accountant assumes: at every step each training
example joins the batch with probability q = batch / n (a 0/1 weight per example over
the whole training set), its gradient is clipped to norm C, the sum gets Gaussian
noise of standard deviation σC and is divided by the expected batch size q·n
(``fbp.extend.dp.clipped_sum`` with ``weights=``, ``dp.add_noise``). σ is the smallest
noise multiplier whose run reaches the target ε (``accounting.noise_for_epsilon``,
RDP). Hyperparameters (SGD with momentum, learning rate, clip, epochs) were chosen on
the validation split; the table reports test accuracy, mean ± std over seeds.

Baselines: the same recipe without clipping or noise, and the ``digits-mlp``
experiment's recipe (Adam 1e-3, batch 32, 100 epochs).

This script stands in for ``fbp train digits-dp`` until the runner takes ``--dp-clip``
and ``--dp-noise``.

Usage:
  python benchmarks/digits_dp.py [--seeds 3] [--plot docs/figures/digits_dp.png]  # + .json
  python benchmarks/digits_dp.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fbp import data, losses, nn, train  # noqa: E402
from fbp.extend import accounting, dp  # noqa: E402

LOSS = losses.softmax_cross_entropy
DELTA = 1e-5


def model():
    return nn.Sequential([nn.Dense(128), nn.ReLU(), nn.Dense(10)])


def dp_train(ds, *, seed, epochs, batch, lr, clip, noise, split="test"):
    """DP-SGD with Poisson sampling; returns per-epoch test accuracies and final params."""
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    n = x.shape[0]
    q = batch / n
    steps = round(1 / q)  # steps per epoch
    net = model()
    opt = optax.sgd(lr, momentum=0.9)
    key_init, key = jax.random.split(jax.random.key(seed))
    params = net.init(key_init, x)
    opt_state = opt.init(params)
    summed = dp.clipped_sum(net, LOSS, clip=clip)

    @jax.jit
    def epoch(params, opt_state, key):
        def step(carry, k):
            params, opt_state = carry
            k_mask, k_noise = jax.random.split(k)
            mask = jax.random.bernoulli(k_mask, q, (n,)).astype(x.dtype)
            out = summed(params, x, y, weights=mask)
            g = dp.add_noise(out.summed, k_noise, clip=clip, noise=noise, n=batch)
            updates, opt_state = opt.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), out.value

        (params, opt_state), values = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, steps)
        )
        return params, opt_state, values

    accs = []
    for _ in range(epochs):
        key, sub = jax.random.split(key)
        params, opt_state, _ = epoch(params, opt_state, sub)
        accs.append(accuracy(net, params, getattr(ds, split)))
    return accs, params, steps


def accuracy(net, params, split):
    return train.evaluate(net, LOSS, params, jnp.asarray(split.x), jnp.asarray(split.y))["accuracy"]


def adam_baseline(ds, seed, epochs):
    """The digits-mlp recipe: Adam 1e-3, batch 32, shuffled epochs."""
    net, opt = model(), optax.adam(1e-3)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    ts = train.init(net, opt, jax.random.key(seed), x)
    epoch = train.make_epoch(net, LOSS, opt, batch_size=32)
    for _ in range(epochs):
        ts, _ = epoch(ts, x, y)
    return accuracy(net, ts.params, ds.test)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="expected batch size q·n")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    ap.add_argument("--split", default="test", choices=["val", "test"], help="evaluate on")
    ap.add_argument("--no-adam", action="store_true", help="skip the digits-mlp baseline")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    t0 = time.perf_counter()
    results: dict = {"eps": {}, "curves": {}}
    rows = []
    n = None
    for target in [*args.eps, None]:
        accs, curves, sigma, eps = [], [], 0.0, float("inf")
        for seed in range(args.seeds):
            ds = data.load("digits", seed=seed)
            n = ds.train.x.shape[0]
            q, steps = args.batch / n, round(n / args.batch) * args.epochs
            if target is not None:
                sigma = accounting.noise_for_epsilon(
                    target, sampling_rate=q, steps=steps, delta=DELTA
                )
                eps = accounting.PrivacyAccountant(sigma, q, DELTA).epsilon(steps)
            clip = args.clip if target is not None else 1e9  # 1e9: nothing is clipped
            curve, _, _ = dp_train(
                ds,
                seed=seed,
                epochs=args.epochs,
                batch=args.batch,
                lr=args.lr,
                clip=clip,
                noise=sigma,
                split=args.split,
            )
            accs.append(curve[-1])
            curves.append(curve)
        name = f"DP-SGD, ε = {target:g}" if target is not None else "same recipe, no clip/noise"
        results["eps"][name] = (eps, sigma, float(np.mean(accs)), float(np.std(accs)), target)
        results["curves"][name] = np.mean(curves, axis=0).tolist()
        eps_txt = f"{eps:.2f}" if target is not None else "∞"
        rows.append(
            [
                name,
                eps_txt,
                f"{sigma:.3f}" if target else "0",
                f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f}%",
            ]
        )
    adam = (
        []
        if args.no_adam
        else [
            adam_baseline(data.load("digits", seed=s), s, 2 if args.quick else 100)
            for s in range(args.seeds)
        ]
    )
    if adam:
        acc = f"{100 * np.mean(adam):.1f} ± {100 * np.std(adam):.1f}%"
        rows.append(["digits-mlp recipe (Adam, 100 epochs)", "∞", "0", acc])
        results["adam"] = (float(np.mean(adam)), float(np.std(adam)))
    print(
        f"digits (n_train = {n}), MLP 64-128-10, DP-SGD: Poisson sampling q = {args.batch}/{n}, "
        f"{args.epochs} epochs, clip {args.clip}, SGD lr {args.lr} momentum 0.9, δ = {DELTA:g}; "
        f"{args.split} accuracy over {args.seeds} seeds (data split and init). "
        f"{time.perf_counter() - t0:.0f} s; load {common.load()}.\n"
    )
    print(common.table(["run", "ε (RDP)", "σ", f"{args.split} accuracy"], rows))
    if args.plot:
        plot(results, args, args.plot)
        with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return results


def plot(results, args, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(v[4], v[2], v[3]) for k, v in results["eps"].items() if k.startswith("DP")]
    eps, acc, err = map(np.array, zip(*pts, strict=True))
    a.errorbar(eps, 100 * acc, yerr=100 * err, marker="o", capsize=3, label="DP-SGD")
    nodp = results["eps"]["same recipe, no clip/noise"]
    a.axhline(100 * nodp[2], color="gray", ls="--", label="same recipe, no clip/noise")
    if "adam" in results:
        a.axhline(100 * results["adam"][0], color="k", ls=":", label="digits-mlp (Adam)")
    a.set_xscale("log")
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_xticks(eps, [f"{e:g}" for e in eps])
    a.set_xlabel("ε (δ = 1e-5)")
    a.set_ylabel("test accuracy (%)")
    a.set_title("digits: accuracy against privacy")
    a.legend()
    for name, curve in results["curves"].items():
        b.plot(np.arange(1, len(curve) + 1), 100 * np.array(curve), label=name)
    b.set_xlabel("epoch")
    b.set_ylabel("test accuracy (%)")
    b.set_title(f"mean of {args.seeds} seeds")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
