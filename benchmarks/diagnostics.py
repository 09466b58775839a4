"""What reading the backward costs, and what recomputing saves.

1. Deltas: a jitted ``fbp.value_and_grad`` on an MLP (784-512-512-10 ReLU and a
   10-layer 64-wide sigmoid MLP on 64 inputs, batch 256, float32) timed without
   deltas, with ``with_deltas=True`` plus ``diagnostics.layer_stats`` (the norms the
   runner logs), and with every delta returned as an output; interleaved medians.
2. Memory: a 16-layer 512-wide GELU MLP, batch 256: ``fbp.memory_report``'s residual
   bytes and XLA's compiled temp bytes (``memory_analysis().temp_size_in_bytes``) and
   the time of a jitted loss + gradient, plain vs ``nn.Recompute`` around each
   Dense+GELU pair vs around blocks of four pairs; as a reference, the temp bytes of
   ``jax.grad`` with ``jax.checkpoint`` on the same blocks.

Usage:
  python benchmarks/diagnostics.py          # full sizes
  python benchmarks/diagnostics.py --quick  # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fbp  # noqa: E402
from fbp import diagnostics, losses, nn  # noqa: E402

LOSS = losses.softmax_cross_entropy


def _batch(batch: int, features: int, classes: int):
    kx, ky = jax.random.split(jax.random.key(0))
    return (
        jax.random.normal(kx, (batch, features), jnp.float32),
        jax.random.randint(ky, (batch,), 0, classes),
    )


def deltas_cost(quick: bool, rounds: int) -> str:
    batch = 32 if quick else 256
    models = {
        "784-512-512-10 ReLU": (
            nn.Sequential([nn.Dense(512), nn.ReLU(), nn.Dense(512), nn.ReLU(), nn.Dense(10)]),
            784,
        ),
        "10x64 sigmoid": (
            nn.Sequential(
                [*[m for _ in range(10) for m in (nn.Dense(64), nn.Sigmoid())], nn.Dense(10)]
            ),
            64,
        ),
    }
    fns, flops = {}, {}
    for name, (model, features) in models.items():
        x, y = _batch(batch, features, 10)
        params = model.init(jax.random.key(1), x)
        plain = jax.jit(fbp.value_and_grad(model, LOSS))
        vg = fbp.value_and_grad(model, LOSS, with_deltas=True)

        @jax.jit
        def stats(p, xb, yb, vg=vg):
            (value, aux), grads = vg(p, xb, yb)
            return value, grads, diagnostics.layer_stats(p, grads, aux.deltas)

        everything = jax.jit(vg)
        for how, f in (
            ("grads only", plain),
            ("+ layer_stats", stats),
            ("+ all deltas out", everything),
        ):
            fns[f"{name} | {how}"] = lambda f=f, p=params, x=x, y=y: f(p, x, y)
            flops[f"{name} | {how}"] = _flops(f, params, x, y)
    times = common.interleaved(fns, rounds=rounds, warmup=3)
    rows = []
    for name, ts in times.items():
        model, _, how = name.partition(" | ")
        base = common.median(times[f"{model} | grads only"])
        rows.append(
            (
                model,
                how,
                f"{flops[name] / 1e6:.3f}",
                f"{common.median(ts) * 1e3:.3f}",
                common.spread(ts),
                f"{common.median(ts) / base:.3f}",
            )
        )
    return common.table(
        ["model", "jitted value_and_grad", "XLA MFLOP", "ms (median)", "IQR", "vs grads only"], rows
    )


def _flops(f, *args) -> float:
    """XLA's own count of the compiled function's floating-point operations."""
    cost = f.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def _deep(depth: int, width: int, block: int) -> nn.Sequential:
    pairs = [nn.Sequential([nn.Dense(width), nn.GELU()]) for _ in range(depth)]
    if block:
        pairs = [nn.Recompute(nn.Sequential(pairs[i : i + block])) for i in range(0, depth, block)]
    return nn.Sequential([*pairs, nn.Dense(10)])


def _checkpoint_temp(depth: int, width: int, block: int, x, y) -> int:
    """XLA temp bytes of ``jax.grad`` with ``jax.checkpoint`` on the same blocks (reference)."""
    model = _deep(depth, width, 0)
    params = model.init(jax.random.key(1), x)

    def loss(p):
        h = x
        for lo in range(0, depth, block or depth):
            idx = range(lo, min(lo + (block or depth), depth))

            def run(h, ps, idx=idx):
                for i, q in zip(idx, ps, strict=True):
                    h = model.layers[i].apply(q, h)
                return h

            ps = [p[str(i)] for i in idx]
            h = jax.checkpoint(run)(h, ps) if block else run(h, ps)
        return LOSS(model.layers[depth].apply(p[str(depth)], h), y)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def recompute_memory(quick: bool, rounds: int) -> str:
    depth, width, batch = (4, 64, 32) if quick else (16, 512, 256)
    x, y = _batch(batch, 64, 10)
    cases = {"plain": 0, "Recompute each pair": 1, "Recompute blocks of 4": 4}
    fns, mem = {}, {}
    for name, block in cases.items():
        model = _deep(depth, width, block)
        params = model.init(jax.random.key(1), x)
        f = jax.jit(fbp.value_and_grad(model, LOSS))
        temp = f.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes
        mem[name] = (
            fbp.memory_report(model, params, x).total_bytes,
            temp,
            _checkpoint_temp(depth, width, block, x, y),
        )
        fns[name] = lambda f=f, p=params: f(p, x, y)
    times = common.interleaved(fns, rounds=rounds, warmup=3)
    base = common.median(times["plain"])
    rows = [
        (
            name,
            f"{mem[name][0] / 1e6:.2f}",
            f"{mem[name][1] / 1e6:.2f}",
            f"{mem[name][2] / 1e6:.2f}",
            f"{common.median(times[name]) * 1e3:.2f}",
            common.spread(times[name]),
            f"{common.median(times[name]) / base:.2f}",
        )
        for name in cases
    ]
    title = f"{depth}x{width} GELU MLP, batch {batch}"
    return (
        title
        + "\n"
        + common.table(
            [
                "variant",
                "residual MB (memory_report)",
                "XLA temp MB",
                "jax.grad + jax.checkpoint temp MB",
                "ms (median)",
                "IQR",
                "time vs plain",
            ],
            rows,
        )
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per variant")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 40)
    print(common.machine())
    print(deltas_cost(args.quick, rounds))
    print(recompute_memory(args.quick, rounds))


if __name__ == "__main__":
    main()
