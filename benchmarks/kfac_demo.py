"""K-FAC from fbp's own backward rules against Adam and SGD on the digits MLP.

Model 64-128-10 ReLU (the ``digits-mlp`` experiment's), scikit-learn's 8x8 digits,
batch 32, the same shuffled batches for every optimizer. K-FAC is
``fbp.extend.kfac.optimizer``: Kronecker factors A = E[ā āᵀ], G = E[g gᵀ] from one
walked backward pass with one sampled target per example, running averages, damped
inverses refreshed every 10 steps, KL-clipped steps with momentum. Each optimizer's
step is one jitted call; the optimizers take their steps in lockstep on the same
batches (drift on a shared machine hits all alike), and the clock counts only the
steps, not the evaluations of the full training loss.
Learning rates were picked from small grids on the training loss after 5 epochs: SGD
{0.03, 0.1, 0.3}, Adam {1e-3, 3e-3, 1e-2}, K-FAC {0.03, 0.1, 0.3} x damping {1e-3,
1e-2} x KL bound {1e-3, 1e-2} x {MC, exact} factors. K-FAC's best there (lr 0.03,
damping 0.01) oscillated between 1e-5 and 1e-1 over 20 epochs, once its sampled G
factors shrank with confident predictions; of seven 20-epoch runs with more damping,
lr 0.1 with damping 0.1 (the default here) was the steadiest low one.

``kfac-jax`` (DeepMind) was tried on the same model: version 0.0.8 (the newest pip
offers here) installs but fails inside its graph tracer with jax 0.10.2
(``eqn.primitive.get_bind_params`` returns three values where it expects two), so it is
not compared.

Usage:
  python benchmarks/kfac_demo.py [--epochs 20] [--plot docs/figures/kfac_digits.png]
  python benchmarks/kfac_demo.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# LAPACK (the factors' eigendecompositions) on one thread: OpenBLAS's threads on small
# matrices slow down by an order of magnitude when the cores are shared (measured here).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fbp  # noqa: E402
from fbp import data, extend, losses, nn, train  # noqa: E402

LOSS = losses.softmax_cross_entropy


def model():
    return nn.Sequential([nn.Dense(128), nn.ReLU(), nn.Dense(10)])


def optax_runner(opt):
    """(init, step) with the K-FAC runner's signature, for an optax optimizer."""
    vg = fbp.value_and_grad(model(), LOSS)

    def init(params, x, y, key):
        return opt.init(params)

    def step(params, state, x, y, key):
        value, grads = vg(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return init, step


def runners(lr_sgd, lr_adam, lr_kfac, damping, inverse_every):
    net = model()
    return {
        f"SGD (lr {lr_sgd}, momentum 0.9)": optax_runner(optax.sgd(lr_sgd, momentum=0.9)),
        f"Adam (lr {lr_adam})": optax_runner(optax.adam(lr_adam)),
        f"K-FAC (lr {lr_kfac}, damping {damping})": extend.kfac.optimizer(
            net, LOSS, learning_rate=lr_kfac, damping=damping, inverse_every=inverse_every
        ),
    }


def run(opts, ds, epochs, batch, eval_every, seed=0):
    """Train every optimizer on the same batches, in lockstep (one step of each in turn,
    so drift on a shared machine hits all alike).

    Returns:
      name -> (log of (step, seconds, full training loss), test accuracy, s/step).
    """
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    net = model()
    full_loss = jax.jit(fbp.loss_fn(net, LOSS))
    p0 = net.init(jax.random.key(seed), x)
    live = {}
    for name, (init, step) in opts.items():
        state = init(p0, x[:batch], y[:batch], jax.random.key(seed + 1))
        step = jax.jit(step)
        jax.block_until_ready(step(p0, state, x[:batch], y[:batch], jax.random.key(0)))
        live[name] = [step, p0, state, 0.0, [(0, 0.0, float(full_loss(p0, x, y)))]]
    key = jax.random.key(seed + 2)
    n_steps, count = x.shape[0] // batch, 0
    for _ in range(epochs):
        key, k_perm = jax.random.split(key)
        order = np.asarray(jax.random.permutation(k_perm, x.shape[0]))[: n_steps * batch]
        for idx in order.reshape(n_steps, batch):
            key, k = jax.random.split(key)
            xb, yb = x[idx], y[idx]
            count += 1
            for entry in live.values():
                step, params, state, clock, log = entry
                t0 = time.perf_counter()
                params, state, value = step(params, state, xb, yb, k)
                jax.block_until_ready(value)
                entry[1:4] = [params, state, clock + time.perf_counter() - t0]
                if count % eval_every == 0:
                    log.append((count, entry[3], float(full_loss(params, x, y))))
    tx, ty = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    out = {}
    for name, (_, params, _, clock, log) in live.items():
        out[name] = (log, train.evaluate(net, LOSS, params, tx, ty)["accuracy"], clock / count)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-sgd", type=float, default=0.1)
    ap.add_argument("--lr-adam", type=float, default=1e-2)
    ap.add_argument("--lr-kfac", type=float, default=0.1)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--inverse-every", type=int, default=10)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--quick", action="store_true", help="1 epoch (smoke test)")
    args = ap.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    ds = data.load("digits", seed=0)
    opts = runners(args.lr_sgd, args.lr_adam, args.lr_kfac, args.damping, args.inverse_every)
    results = run(opts, ds, epochs, args.batch, eval_every=5)
    rows = []
    for name, (log, acc, per_step) in results.items():
        steps_to = next((s for s, _, v in log if v < 0.05), None)
        rows.append(
            [
                name,
                f"{log[-1][2]:.1e}",
                "-" if steps_to is None else str(steps_to),
                f"{1e3 * per_step:.2f}",
                f"{100 * acc:.1f}%",
            ]
        )
    print(
        f"digits MLP 64-128-10, batch {args.batch}, {epochs} epochs "
        f"({log[-1][0]} steps), seed 0; {common.machine()}.\n"
    )
    headers = ["optimizer", "final train loss", "steps to loss < 0.05", "ms/step", "test acc"]
    print(common.table(headers, rows))
    if args.plot:
        plot(results, args.plot)
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (log, _, _) in results.items():
        steps, secs, vals = map(np.array, zip(*log, strict=True))
        a.plot(steps, vals, label=name)
        b.plot(secs, vals, label=name)
    for ax, xl in ((a, "step"), (b, "wall time of the steps (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (full train set)")
        ax.legend()
    a.set_title("digits MLP: loss against steps")
    b.set_title("loss against wall time")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
