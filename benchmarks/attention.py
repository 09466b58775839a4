"""Causal self-attention, loss + all gradients: fbp's two residual modes vs jax.grad vs PyTorch.

Workload (design.md): head_dim 64, T in {128, 512, 2048}, batch 1, 4 heads, float32;
loss = Σ o ∘ g for a fixed random g, gradients with respect to q, k and v.
Variants, timed in interleaved rounds in one process (medians), per T:

* ``fbp standard``: ``nn.sdpa_forward(..., memory="standard")`` (keeps P) and
  ``nn.sdpa_backward``, one jitted function.
* ``fbp linear``: the same with ``memory="linear"``, ``block_size=128`` (keeps O and
  the row log-sum-exp; scans over key blocks in forward and backward).
* ``jax.grad naive``: ``jax.value_and_grad`` of textbook attention:
  ``softmax(where(causal, q kᵀ/√d, -inf)) v``.
* ``torch sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
  forward and ``backward()``, all CPU threads, or on the GPU when JAX runs on one
  (absent when torch is not installed). It is timed in its own rounds after the JAX
  variants: its OpenMP threads spin for a while after each call, which in interleaved
  rounds slowed (and was charged to the CPU time of) the variant timed next.

Times are wall-clock medians and, steadier on a shared machine, medians of this
process's CPU time per call (all threads; it counts spin-waiting too). Temporary
memory is XLA's ``compiled.memory_analysis().temp_size_in_bytes`` of each
jitted variant (the scratch the program needs besides its inputs and outputs). The
JAX platform comes from the environment (``JAX_PLATFORMS``), so the script runs
unchanged on a GPU. By default it runs itself twice, as two processes: without and
with the glibc allocator tunables of perf-notes.md.

Usage:
  python benchmarks/attention.py           # two processes: glibc tunables off, then on
  python benchmarks/attention.py --single  # this process's environment only
  python benchmarks/attention.py --quick   # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fbp import nn  # noqa: E402

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 4, 64, 128
TIMES = (128, 512, 2048)
QUICK_TIMES = (32,)
VARIANTS = ("fbp standard", "fbp linear", "jax.grad naive", "torch sdpa")


def naive_attention(q, k, v):
    """softmax(where(causal, q kᵀ/√d, -inf)) v on (batch, heads, T, d)."""
    t = q.shape[2]
    s = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, axis=-1), v)


def fbp_fn(memory: str, block: int):
    def f(q, k, v, g):
        o, res = nn.sdpa_forward(q, k, v, causal=True, memory=memory, block_size=block)
        return jnp.sum(o * g), nn.sdpa_backward(res, g)

    return jax.jit(f)


def jax_fn():
    def loss(q, k, v, g):
        return jnp.sum(naive_attention(q, k, v) * g)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def torch_fn(arrays):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    q, k, v, g = (torch.tensor(np.asarray(a), device=device) for a in arrays)
    q, k, v = (a.requires_grad_() for a in (q, k, v))

    def step():
        for a in (q, k, v):
            a.grad = None
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        loss = (o * g).sum()
        loss.backward()
        return loss.item()

    return step


def temp_mib(jitted, args) -> float:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def max_error(got, ref) -> float:
    return max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
    )


def measure_t(t: int, rounds: int, block: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(t), 4)
    shape = (BATCH, HEADS, t, HEAD_DIM)
    args = tuple(jax.random.normal(k, shape, jnp.float32) for k in keys)
    jitted = {
        "fbp standard": fbp_fn("standard", block),
        "fbp linear": fbp_fn("linear", block),
        "jax.grad naive": jax_fn(),
    }
    ref = jitted["jax.grad naive"](*args)
    rows = {}
    for name, f in jitted.items():
        rows[name] = {"temp_mib": temp_mib(f, args), "error": max_error(f(*args), ref)}
    fns = {name: (lambda f=f: f(*args)) for name, f in jitted.items()}
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(fns, rounds=rounds, warmup=2, cpu=cpu)
    step = torch_fn(args)
    if step is not None:  # own rounds: its OpenMP threads spin on after each call
        torch_cpu: dict[str, list[float]] = {}
        times.update(common.interleaved({"torch sdpa": step}, rounds=rounds, cpu=torch_cpu))
        cpu.update(torch_cpu)
        rows["torch sdpa"] = {"temp_mib": None, "error": None}
    out = []
    for name in VARIANTS:
        if name in rows:
            ts = times[name]
            out.append(
                {
                    "T": t,
                    "variant": name,
                    "ms": 1e3 * common.median(ts),
                    "spread": common.spread(ts),
                    "cpu_ms": 1e3 * common.median(cpu[name]),
                    **rows[name],
                }
            )
    return out


def measure(quick: bool, rounds: int | None, times: tuple[int, ...] | None = None) -> dict:
    times = times or (QUICK_TIMES if quick else TIMES)
    block = 16 if quick else BLOCK
    rows = []
    for t in times:
        r = rounds or (2 if quick else max(8, 80 * 128 // t))
        rows += measure_t(t, r, block)
    return {"machine": common.machine(), "rows": rows, "block": block}


def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def report(results: list[dict]) -> str:
    headers = [
        "glibc tunables",
        "T",
        "variant",
        "ms",
        "/ jax.grad",
        "CPU ms",
        "/ jax.grad",
        "temp MiB",
        "/ jax.grad",
        "max rel. error vs jax.grad",
    ]
    lines = []
    for res in results:
        tun = "on" if "tunables ON" in res["machine"] else "off"
        body = []
        for row in res["rows"]:
            ref = next(
                r for r in res["rows"] if r["T"] == row["T"] and r["variant"] == "jax.grad naive"
            )
            mem = row["temp_mib"]
            body.append(
                [
                    tun,
                    row["T"],
                    row["variant"],
                    f"{row['ms']:.2f} {row['spread']}",
                    _fmt_ratio(row["ms"] / ref["ms"]),
                    f"{row['cpu_ms']:.2f}",
                    _fmt_ratio(row["cpu_ms"] / ref["cpu_ms"]),
                    "–" if mem is None else f"{mem:.1f}",
                    "–" if mem is None else _fmt_ratio(mem / ref["temp_mib"]),
                    "–" if row["error"] is None else f"{row['error']:.1e}",
                ]
            )
        lines += [f"- {res['machine']}", "", common.table(headers, body), ""]
        lines += targets(res["rows"])
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The design targets, checked on one process's rows."""

    def get(t, name, key):
        return next((r[key] for r in rows if r["T"] == t and r["variant"] == name), None)

    ts = sorted({r["T"] for r in rows})
    out = []
    lin = [get(t, "fbp linear", "temp_mib") for t in ts]
    growth = ", ".join(f"T={t}: {m:.1f} MiB" for t, m in zip(ts, lin, strict=True))
    out.append(f"- linear temp memory by T: {growth}")
    big, mid = ts[-1], ts[len(ts) // 2]
    ratio = lin[-1] / get(big, "jax.grad naive", "temp_mib")
    out.append(f"- linear temp memory / jax.grad at T={big}: {ratio:.3f} (target <= 0.125)")
    for key, what in (("ms", "time"), ("cpu_ms", "CPU time")):
        r = get(mid, "fbp linear", key) / get(mid, "jax.grad naive", key)
        out.append(f"- linear {what} / jax.grad at T={mid}: {r:.2f} (target <= 1.5)")
        std = [get(t, "fbp standard", key) / get(t, "jax.grad naive", key) for t in ts]
        out.append(
            f"- standard {what} / jax.grad: "
            + ", ".join(f"T={t}: {x:.2f}" for t, x in zip(ts, std, strict=True))
            + " (target <= 1.0 at every T)"
        )
    return out + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    ap.add_argument("--single", action="store_true", help="only this process's environment")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per variant and T")
    ap.add_argument("--times", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    times = tuple(int(t) for t in args.times.split(",")) if args.times else None
    if args.single or args.json:
        res = measure(args.quick, args.rounds, times)
        print(json.dumps(res) if args.json else report([res]))
        return
    extra = ["--quick"] if args.quick else []
    extra += [f"--rounds={args.rounds}"] if args.rounds else []
    extra += [f"--times={args.times}"] if args.times else []
    print(report(common.run_both_allocators(__file__, extra)))
    print("- each glibc setting ran as its own process, one after the other")


if __name__ == "__main__":
    main()
