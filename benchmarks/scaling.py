"""Data-parallel throughput (examples/s) against the device count, on fake CPU devices.

One process with ``--xla_force_host_platform_device_count=8``: every "device" is a
slice of the same CPU cores, so going from 1 to 8 devices cannot be faster here.
What this measures is the **overhead** of ``fbp.distributed.parallel`` (splitting each batch,
the all-reduce XLA inserts, per-device dispatch), not speedup; on real accelerators
each device brings its own compute.

Workload: MLP 64-256-256-10 (ReLU), softmax cross-entropy, Adam, float32, one
epoch of 8192 examples in global batches of 256 (32 steps, one jitted
``lax.scan``). Variants, timed in interleaved rounds in one process:
``fbp.train.make_epoch`` (no mesh) and ``fbp.distributed.parallel.make_epoch`` on 1, 2, 4, 8
devices. All see the same global batch, so they do the same arithmetic.

Usage:
  python benchmarks/scaling.py           # two processes: glibc tunables off, then on
  python benchmarks/scaling.py --single  # this process's environment only
  python benchmarks/scaling.py --quick   # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # must be set before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fbp import losses, nn, train  # noqa: E402
from fbp.distributed import parallel  # noqa: E402


def measure(quick: bool, rounds: int) -> dict:
    """Median epoch time per variant in this process, and the parameter drift per count."""
    n, batch, width = (512, 64, 32) if quick else (8192, 256, 256)
    counts = [c for c in (1, 2, 4, 8) if c <= len(jax.devices())]
    x = jax.random.normal(jax.random.key(0), (n, 64), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (n,), 0, 10)
    model = nn.Sequential([nn.Dense(width), nn.ReLU(), nn.Dense(width), nn.ReLU(), nn.Dense(10)])
    loss, opt = losses.softmax_cross_entropy, optax.adam(1e-3)
    ts0 = train.init(model, opt, jax.random.key(2), x)

    fns, drift = {}, {}
    ref_epoch = train.make_epoch(model, loss, opt, batch_size=batch)
    ref, _ = ref_epoch(ts0, x, y)
    fns["no mesh"] = lambda: ref_epoch(ts0, x, y)
    for c in counts:
        mesh = parallel.make_mesh(c)
        epoch = parallel.make_epoch(model, loss, opt, batch_size=batch, mesh=mesh)
        ts_c, xs, ys = parallel.replicate((ts0, x, y), mesh)
        out, _ = epoch(ts_c, xs, ys)
        drift[c] = max(
            float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            for a, b in zip(
                jax.tree.leaves(parallel.to_host(out.params)),
                jax.tree.leaves(parallel.to_host(ref.params)),
                strict=True,
            )
        )
        fns[f"{c} device{'s' if c > 1 else ''}"] = lambda epoch=epoch, ts_c=ts_c, xs=xs, ys=ys: (
            epoch(ts_c, xs, ys)
        )
    times = common.interleaved(fns, rounds=rounds, warmup=2)
    return {
        "n": n,
        "batch": batch,
        "width": width,
        "rounds": rounds,
        "machine": common.machine(),
        "tunables": bool(os.environ.get("GLIBC_TUNABLES")),
        "times": times,
        "drift": {str(c): v for c, v in drift.items()},
    }


def report(results: list[dict]) -> str:
    r0 = results[0]
    n, batch, width = r0["n"], r0["batch"], r0["width"]
    out = [
        "## Data parallel",
        "",
        f"`python benchmarks/scaling.py`: MLP 64-{width}-{width}-10 (ReLU), Adam, float32; one "
        f"epoch = {n} examples in global batches of {batch} ({n // batch} steps, one jitted "
        f"scan); median of {r0['rounds']} interleaved rounds. **The devices are fake CPU "
        f"devices (`--xla_force_host_platform_device_count=8`) sharing the same "
        f"{os.cpu_count()} cores, so this measures the overhead of splitting the batch and "
        "of the gradient all-reduce, NOT speedup**; on real accelerators each device adds "
        "its own compute.",
        "",
    ]
    rows = []
    for r in results:
        base = common.median(r["times"]["1 device"])
        for name, ts in r["times"].items():
            t = common.median(ts)
            c = name.split()[0]
            rows.append(
                [
                    "on" if r["tunables"] else "off",
                    name,
                    f"{t * 1e3:.1f} ms {common.spread(ts)}",
                    f"{n / t:,.0f}",
                    f"{base / t:.2f}",
                    "-" if name == "no mesh" else f"{r['drift'][c]:.1e}",
                ]
            )
    out.append(
        common.table(
            [
                "glibc tunables",
                "variant",
                "epoch time",
                "examples/s",
                "throughput vs 1 device",
                "param. drift vs no mesh after 1 epoch",
            ],
            rows,
        )
    )
    out.append("")
    out.append(
        "- param. drift: max |difference| / max |value| over the parameter leaves; "
        "float32 sums in a different order, amplified by Adam's normalisation."
    )
    for r in results:
        out.append(f"- machine: {r['machine']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    p.add_argument("--single", action="store_true", help="only this process's environment")
    p.add_argument("--rounds", type=int, default=None, help="timed epochs per variant")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    if args.single or args.json:
        res = measure(args.quick, rounds)
        print(json.dumps(res) if args.json else report([res]))
        return
    args_ = [f"--rounds={rounds}"] + (["--quick"] if args.quick else [])
    results = common.run_both_allocators(__file__, args_)
    print(report(results))
    print("- each glibc setting ran as its own process, one after the other")


if __name__ == "__main__":
    main()
