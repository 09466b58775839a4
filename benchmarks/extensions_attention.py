"""Per-example norms and DP clipped sums of a causal transformer LM, against a plain gradient.

Model: Embedding(96, 128) -> 2 pre-LN TransformerBlocks (4 heads, causal, rotary) ->
LayerNorm -> Dense(96); batch 32, T = 128 (``--time 512`` for the long run), float32,
``losses.causal_lm_loss``. Variants, timed in interleaved rounds in one process
(medians; ± half the interquartile range; CPU ms is the process's CPU time over all
threads):

- ``plain gradient``: jitted ``fbp.value_and_grad``.
- ``per-example norms``: ``extend.per_example_norms`` (per projection the Gram form
  ⟨A Aᵀ, Δ Δᵀ⟩ or the materialised Σ_t a_t δ_tᵀ, whichever is cheaper; no vmap).
- ``DP clipped sum (reweight)``: ``extend.dp.clipped_sum``: the norms, then
  Σ_b c_b g_b as Aᵀ(c ⊙ Δ) per projection from the same pass.
- ``DP clipped sum (second_backward)``: the norms, then a second ordinary backward
  seeded with c-scaled deltas.
- ``jax.vmap(jax.grad)``: per-example gradients by vmapping the autodiff gradient of
  one example's own loss term, then their norms and the clipped sum (the usual JAX way).

Temp memory is XLA's ``compiled.memory_analysis().temp_size_in_bytes`` of each jitted
function (deterministic). Targets (DESIGN.md): clipped sum ≤ 1.25x the plain gradient's
time and ≤ 1.3x its temp memory; norms alone ≤ 1.1x its time.

Usage:
  python benchmarks/extensions_attention.py             # T = 128
  python benchmarks/extensions_attention.py --time 512
  python benchmarks/extensions_attention.py --quick     # tiny sizes (smoke test)
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
from fbp import extend, losses, nn  # noqa: E402
from fbp.extend import dp  # noqa: E402

LOSS = losses.causal_lm_loss
TARGETS = {
    "per-example norms": ("time", 1.1),
    "DP clipped sum (reweight)": ("time", 1.25),
    "DP clipped sum (second_backward)": ("time", 1.25),
}
MEMORY_TARGET = 1.3


def lm(vocab: int, width: int, heads: int, blocks: int) -> nn.Sequential:
    """The causal LM: embedding, pre-LN blocks (causal, rotary), LayerNorm, Dense(vocab)."""
    body = [nn.TransformerBlock(heads, causal=True, rope=True) for _ in range(blocks)]
    return nn.Sequential([nn.Embedding(vocab, width), *body, nn.LayerNorm(), nn.Dense(vocab)])


def vmapped_clipped_sum(model, clip: float):
    """Per-example grads by jax.vmap(jax.grad) of each example's own term, then clipping."""

    def f(params, x, y):
        n_valid = jnp.sum(y != -1)
        batch = x.shape[0]

        def one(xb, yb):
            def term(p):
                pred = model.apply(p, xb[None])
                return batch * LOSS(pred, yb[None]) * jnp.sum(yb != -1) / n_valid

            return jax.grad(term)(params)

        g = jax.vmap(one)(x, y)
        sq = sum(jnp.sum(v * v, axis=tuple(range(1, v.ndim))) for v in jax.tree.leaves(g))
        norms = jnp.sqrt(sq)
        c = dp.clip_factors(norms, clip)
        return jax.tree.map(lambda v: jnp.einsum("b,b...->...", c, v), g), norms

    return f


def variants(quick: bool, time: int):
    vocab, width, heads, blocks, batch = (96, 32, 4, 2, 4) if quick else (96, 128, 4, 2, 32)
    model = lm(vocab, width, heads, blocks)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.randint(kx, (batch, time), 0, vocab, jnp.int32)
    y = jax.random.randint(ky, (batch, time), 0, vocab, jnp.int32)
    params = jax.jit(model.init)(kp, x)
    jits = {
        "plain gradient": jax.jit(fbp.value_and_grad(model, LOSS)),
        "per-example norms": jax.jit(extend.per_example_norms(model, LOSS)),
        "DP clipped sum (reweight)": jax.jit(dp.clipped_sum(model, LOSS, clip=1.0)),
        "DP clipped sum (second_backward)": jax.jit(
            dp.clipped_sum(model, LOSS, clip=1.0, method="second_backward")
        ),
        "jax.vmap(jax.grad)": jax.jit(vmapped_clipped_sum(model, 1.0)),
    }
    temp = {}
    for name, f in jits.items():
        analysis = f.lower(params, x, y).compile().memory_analysis()
        temp[name] = analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")
    ours, ref = (
        jits["DP clipped sum (reweight)"](params, x, y),
        jits["jax.vmap(jax.grad)"](params, x, y),
    )
    pairs = zip(jax.tree.leaves(ours.summed), jax.tree.leaves(ref[0]), strict=True)
    err = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in pairs)
    fns = {name: (lambda f=f: f(params, x, y)) for name, f in jits.items()}
    size = (vocab, width, heads, blocks, batch)
    return size, fns, temp, err


def _row(name, times, cpu, temp):
    base = "plain gradient"
    med, cmed = common.median(times[name]), common.median(cpu[name])
    ratio = med / common.median(times[base])
    cratio = cmed / common.median(cpu[base])
    mratio = temp[name] / temp[base]
    target = TARGETS.get(name)
    goal, verdict = "", ""
    if target is not None:
        mem_ok = name == "per-example norms" or mratio <= MEMORY_TARGET
        mem_goal = "" if name == "per-example norms" else f", mem <= {MEMORY_TARGET}x"
        goal = f"<= {target[1]}x{mem_goal}"
        verdict = "yes" if max(ratio, cratio) <= target[1] and mem_ok else "no"
    return [
        name,
        f"{1e3 * med:.1f} {common.spread(times[name])}",
        f"{1e3 * cmed:.1f}",
        f"{ratio:.2f}x",
        f"{cratio:.2f}x",
        f"{temp[name]:.1f} ({mratio:.2f}x)",
        goal,
        verdict,
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    ap.add_argument("--time", type=int, default=None, help="sequence length (default 128)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    time = args.time or (16 if args.quick else 128)
    rounds = args.rounds or (3 if args.quick else 15)
    size, fns, temp, err = variants(args.quick, time)
    load_before = common.load()
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(fns, rounds=rounds, warmup=2, cpu=cpu)
    vocab, width, heads, blocks, batch = size
    print(
        f"Causal LM: vocab {vocab}, width {width}, {heads} heads, {blocks} blocks (rotary), "
        f"T={time}, batch {batch}, float32, causal_lm_loss; median of {rounds} interleaved "
        f"rounds. JAX on {jax.devices()[0].platform}."
    )
    print(f"Machine: {common.machine()}; load before timing {load_before}.")
    print(f"Max relative |clipped sum - vmap(grad)'s|: {err:.1e}.\n")
    headers = ["variant", "ms", "CPU ms", "time ratio", "CPU-time ratio", "temp MB", "target"]
    rows = [_row(name, times, cpu, temp) for name in fns]
    print(common.table([*headers, "met?"], rows))
    return {"median_s": {k: common.median(v) for k, v in times.items()}, "temp_mb": temp}


if __name__ == "__main__":
    main()
