"""Freezing that skips work: ``nn.Frozen`` vs computing the gradient and zeroing the update.

MLP 784-1024-1024-1024-10 with ReLU, batch 256, float32, softmax cross-entropy, one
jitted ``fbp.train.make_step`` (Adam through ``fbp.finetune.per_layer``, frozen
layers mapped to ``optax.set_to_zero``). Each case is timed three ways, in
interleaved rounds in one process (medians):

- ``all trainable``: nothing frozen (the reference cost of a step);
- ``compute + zero``: the full backward, the frozen layers' updates zeroed by optax;
- ``nn.Frozen``: the frozen layers wrapped in ``nn.Frozen``; their weight gradients
  are never computed, and below the lowest trainable layer nothing is.

Cases: the backbone (all three hidden layers) frozen, only the head trains; only the
first layer frozen; only the middle hidden layer frozen (dx still needed below it).

Usage:
  python benchmarks/freezing.py          # full sizes
  python benchmarks/freezing.py --quick  # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from fbp import finetune, losses, nn, train  # noqa: E402

LOSS = losses.softmax_cross_entropy
CASES = {  # case -> Dense indices (0, 1, 2 hidden; 3 head) that are frozen
    "backbone frozen (head trains)": (0, 1, 2),
    "first layer frozen": (0,),
    "middle layer frozen": (1,),
}


def build(sizes: list[int], frozen: tuple[int, ...], wrap: bool) -> nn.Sequential:
    layers = []
    for i, width in enumerate(sizes[1:]):
        dense = nn.Dense(width)
        layers.append(nn.Frozen(dense) if wrap and i in frozen else dense)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(layers)


def optimizer(frozen: tuple[int, ...]) -> optax.GradientTransformation:
    """Adam, with optax.set_to_zero for the frozen Dense layers (Sequential keys 0, 2, 4...)."""
    return finetune.per_layer({str(2 * i): None for i in frozen}, default=optax.adam(1e-3))


def measure(quick: bool, rounds: int) -> list[tuple[str, str, float, str]]:
    sizes = [64, 128, 128, 128, 10] if quick else [784, 1024, 1024, 1024, 10]
    batch = 32 if quick else 256
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])
    fns = {}

    def make(name, model, opt):
        step = train.make_step(model, LOSS, opt)
        ts = train.init(model, opt, jax.random.key(1), x)
        fns[name] = lambda: step(ts, x, y)

    make("all trainable", build(sizes, (), False), optax.adam(1e-3))
    for case, frozen in CASES.items():
        opt = optimizer(frozen)
        make(f"{case} | compute + zero", build(sizes, frozen, False), opt)
        make(f"{case} | nn.Frozen", build(sizes, frozen, True), opt)
    times = common.interleaved(fns, rounds=rounds, warmup=3)
    base = common.median(times["all trainable"])
    rows = []
    for name, ts in times.items():
        case, _, how = name.partition(" | ")
        rows.append((case, how or "-", common.median(ts) * 1e3, common.spread(ts), base))
    return rows


def report(rows) -> str:
    out = []
    for case, how, ms, spread, base in rows:
        zero = next((r[2] for r in rows if r[0] == case and r[1] == "compute + zero"), None)
        saved = f"{100 * (1 - ms / zero):.0f}%" if zero and how == "nn.Frozen" else ""
        out.append((case, how, f"{ms:.2f}", spread, f"{ms / (base * 1e3):.2f}", saved))
    headers = [
        "case",
        "how",
        "ms/step (median)",
        "IQR",
        "vs all trainable",
        "saved vs compute + zero",
    ]
    return common.table(headers, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per variant")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 30)
    print(common.machine())
    print(report(measure(args.quick, rounds)))


if __name__ == "__main__":
    main()
