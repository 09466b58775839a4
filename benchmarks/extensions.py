"""Cost of the backward-pass extensions (fbp.extend) against a plain gradient.

MLP 784-512-512-10 ReLU, batch 256, float32, softmax cross-entropy. Variants, timed in
interleaved rounds in one process (medians; ± half the interquartile range; CPU ms is
the process's CPU time over all threads, steadier than wall time on a shared machine;
a target counts as met when both ratios meet it). The variants that write per-example
gradients (and Opacus) are timed in a second interleaved group with the plain gradient
(and torch step) beside them, and their ratios are to those:

- ``plain gradient``: jitted ``fbp.value_and_grad``.
- ``per-example norms``: ``extend.per_example_norms`` (‖x_b‖²‖δ_b‖² per Dense layer;
  no per-example gradient is formed).
- ``per-example grads``: ``extend.per_example_grads`` (each layer's x_b δ_bᵀ, a
  (256, in, out) array per weight).
- ``jax.vmap(jax.grad)``: per-example gradients by vmapping the autodiff gradient of
  one example (the usual JAX way).
- ``plain step`` / ``DP step``: ``fbp.train.make_step`` with SGD, without and with the
  DP-SGD gradient (``extend.dp.grad_fn``, clip 1, noise 1; ``reweight`` forms the
  clipped sum as Xᵀ(c ⊙ Δ) from the same pass, ``second_backward`` runs a second
  backward seeded with c-scaled deltas); ``noise 0`` isolates the clipping: the rest
  of a DP step's extra time is drawing the Gaussian noise (one normal per parameter,
  threefry on the CPU).
- ``Opacus DP step`` / ``torch step``: PyTorch (CPU, one thread by default: on the
  shared 2-core machine more threads only spin) with Opacus's GradSampleModule +
  DPOptimizer (same clip and noise, SGD), and the plain torch SGD step.

The JAX platform is whatever JAX picks (``JAX_PLATFORMS`` decides), so the script runs
unchanged on a GPU; PyTorch always runs on the CPU here.

Usage:
  python benchmarks/extensions.py          # full size
  python benchmarks/extensions.py --quick  # tiny sizes (smoke test)
  python benchmarks/extensions.py --no-torch
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fbp  # noqa: E402
from fbp import extend, losses, nn, train  # noqa: E402

TARGETS = {
    "per-example norms": ("plain gradient", 1.3),
    "per-example grads": ("plain gradient", 2.0),
    "DP step (reweight)": ("plain step", 1.5),
    "DP step (second_backward)": ("plain step", 1.5),
    "DP step, noise 0 (clipping alone)": ("plain step", 1.5),
}


def opacus_steps(sizes, x_np, y_np, clip, noise, threads):
    """(DP step, plain step) closures for the same MLP in PyTorch + Opacus, on the CPU."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    def mlp():
        torch.manual_seed(0)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    torch.set_num_threads(threads)
    x, y = torch.tensor(np.array(x_np)), torch.tensor(np.array(y_np)).long()
    x_dp = x.clone().requires_grad_(True)  # Opacus' full backward hooks want an input grad
    lossf = torch.nn.CrossEntropyLoss()
    gsm = GradSampleModule(mlp())
    dpo = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.01),
        noise_multiplier=noise,
        max_grad_norm=clip,
        expected_batch_size=x.shape[0],
    )
    plain = mlp()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.01)

    def dp_step():
        dpo.zero_grad(set_to_none=True)
        lossf(gsm(x_dp), y).backward()
        dpo.step()

    def plain_step():
        sgd.zero_grad(set_to_none=True)
        lossf(plain(x), y).backward()
        sgd.step()

    return dp_step, plain_step, torch.__version__


def variants(quick: bool, with_torch: bool, torch_threads: int = 1):
    sizes, batch = ([64, 32, 32, 10], 16) if quick else ([784, 512, 512, 10], 256)
    model = nn.Sequential(
        [nn.Dense(sizes[1]), nn.ReLU(), nn.Dense(sizes[2]), nn.ReLU(), nn.Dense(sizes[3])]
    )
    loss = losses.softmax_cross_entropy
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, sizes[-1], jnp.int32)
    opt = optax.sgd(0.01)
    ts = train.init(model, opt, kp, x)
    params = ts.params

    grad = jax.jit(fbp.value_and_grad(model, loss))
    norms = jax.jit(extend.per_example_norms(model, loss))
    per_ex = jax.jit(extend.per_example_grads(model, loss))
    one = fbp.loss_fn(model, loss)
    vmapped = jax.jit(jax.vmap(jax.grad(lambda p, a, b: one(p, a[None], b[None])), (None, 0, 0)))
    steps = {
        "plain step": train.make_step(model, loss, opt),
        "DP step (reweight)": extend.dp.make_step(model, loss, opt, clip=1.0, noise=1.0),
        "DP step (second_backward)": extend.dp.make_step(
            model, loss, opt, clip=1.0, noise=1.0, method="second_backward"
        ),
        "DP step, noise 0 (clipping alone)": extend.dp.make_step(
            model, loss, opt, clip=1.0, noise=0.0
        ),
    }
    state = dict.fromkeys(steps, ts)

    def stepper(name):
        def go():
            state[name], m = steps[name](state[name], x, y)
            return m

        return go

    fns = {
        "plain gradient": lambda: grad(params, x, y),
        "per-example norms": lambda: norms(params, x, y),
        "per-example grads": lambda: per_ex(params, x, y),
        "jax.vmap(jax.grad)": lambda: vmapped(params, x, y),
        **{name: stepper(name) for name in steps},
    }
    torch_version = None
    if with_torch:
        dp_step, plain_step, torch_version = opacus_steps(
            sizes, jax.device_get(x), jax.device_get(y), 1.0, 1.0, torch_threads
        )
        fns["Opacus DP step (torch CPU)"] = dp_step
        fns["torch step (CPU)"] = plain_step
    # correctness check before timing: the per-example grads are vmap(grad)'s
    a, b = per_ex(params, x, y)[1], vmapped(params, x, y)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    err = max(float(jnp.max(jnp.abs(u - v))) for u, v in pairs)
    return sizes, batch, fns, torch_version, err


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch/Opacus")
    ap.add_argument(
        "--torch-threads", type=int, default=1, help="1 suffers least on a shared machine"
    )
    args = ap.parse_args(argv)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import opacus  # noqa: F401
        except ImportError:
            with_torch = False
    rounds = args.rounds or (3 if args.quick else 40)
    sizes, batch, fns, torch_version, err = variants(args.quick, with_torch, args.torch_threads)
    load_before = common.load()
    # Two groups, each interleaved with its baselines: the variants that write a
    # per-example gradient (hundreds of MB) would evict everything between the cheap
    # ones and distort their times.
    heavy = {"per-example grads", "jax.vmap(jax.grad)", "Opacus DP step (torch CPU)"}
    groups = [
        {k: f for k, f in fns.items() if k not in heavy},
        {k: f for k, f in fns.items() if k in heavy | {"plain gradient", "torch step (CPU)"}},
    ]
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for i, group in enumerate(groups):
        c: dict[str, list[float]] = {}
        t = common.interleaved(group, rounds=rounds if i == 0 else max(3, rounds // 4), cpu=c)
        for k in group:
            if k not in times:
                times[k], cpu[k] = t[k], c[k]
        if i == 1:  # ratios of the heavy variants are to the baselines timed beside them
            heavy_base = {k: (t[k], c[k]) for k in ("plain gradient", "torch step (CPU)") if k in t}
    med = {k: common.median(v) for k, v in times.items()}
    cmed = {k: common.median(v) for k, v in cpu.items()}
    rows = []
    for name, ts in times.items():
        ref = TARGETS.get(name, ("plain step" if "step" in name else "plain gradient", None))
        base = "torch step (CPU)" if name.startswith("Opacus") else ref[0]
        if name in heavy:
            bt, bc = (common.median(v) for v in heavy_base[base])
        else:
            bt, bc = med[base], cmed[base]
        ratio, cratio = med[name] / bt, cmed[name] / bc
        target = ref[1]
        verdict = "" if target is None else ("yes" if max(ratio, cratio) <= target else "no")
        if name == "per-example grads":
            vm = cmed[name] / cmed["jax.vmap(jax.grad)"]
            verdict += f" ({vm:.2f}x vmap(grad): {'faster' if vm < 1 else 'not faster'})"
        rows.append(
            [
                name,
                f"{1e3 * med[name]:.3f} {common.spread(ts)}",
                f"{1e3 * cmed[name]:.3f}",
                f"{ratio:.2f}x {base}",
                f"{cratio:.2f}x",
                "" if target is None else f"<= {target}x",
                verdict.strip(),
            ]
        )
    print(
        f"MLP {'-'.join(map(str, sizes))} ReLU, batch {batch}, float32, softmax CE; "
        f"median of {rounds} interleaved rounds ({max(3, rounds // 4)} for the per-example "
        f"gradient group). JAX on {jax.devices()[0].platform}"
        + (
            f"; torch {torch_version} with Opacus on the CPU, {args.torch_threads} thread(s)."
            if torch_version
            else "."
        )
    )
    print(f"Machine: {common.machine()}; load before timing {load_before}.")
    print(f"Max |per-example grads - vmap(grad)|: {err:.1e}.\n")
    headers = ["variant", "ms", "CPU ms", "ratio", "CPU-time ratio", "target", "met?"]
    print(common.table(headers, rows))
    return {"median_s": med, "load": common.load()}


if __name__ == "__main__":
    main()
