"""Train-step speed of an MLP: fbp's hand-written backprop vs jax.grad vs PyTorch eager.

MLP 784-512-512-10 with ReLU, batch 256, float32, softmax cross-entropy, Adam.
Variants, timed in interleaved rounds (A B C ... A B C ...) in one process:

- ``fbp make_step``: ``fbp.train.make_step`` (the library's step: key split,
  non-finite skip guard, metrics), gradients by ``fbp.value_and_grad``.
- ``jax.grad make_step``: the same ``make_step`` with ``grad_fn`` replaced by
  ``jax.value_and_grad(fbp.loss_fn(model, loss))``.
- ``fbp vg + adam`` / ``jax.grad + adam``: a bare jitted ``value_and_grad`` plus the
  optax Adam update, nothing else.
- ``torch``: ``nn.Sequential`` + ``torch.optim.Adam``, eager, all CPU threads
  (``torch.set_num_threads(os.cpu_count())``); also with 1 thread, which suffers less
  when other jobs share the cores.

FLOPs count three matmuls per layer (forward, dx, dw) less dx of the first layer.
The machine's matmul rate is measured in the same rounds on the same (m, k, n)
shapes: once with each product as its own jitted call (a chain of dependent
products, as in a step) and once with all of them in one call (independent
products may run concurrently).

The JAX platform comes from the environment (``JAX_PLATFORMS``); on a GPU, PyTorch
runs on CUDA when it can (no one-thread variant) and every timing waits for the
device. fbp's XLA:CPU setting for this model is applied first (``fbp.configure_cpu``).

Usage:
  python benchmarks/mlp.py           # two processes: glibc tunables off, then on
  python benchmarks/mlp.py --single  # this process's environment only
  python benchmarks/mlp.py --quick   # tiny sizes (smoke test)
  python benchmarks/mlp.py --json OUT.json   # this process only, results as JSON
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

import fbp  # noqa: E402
from fbp import losses, nn, train  # noqa: E402
from fbp.core import Aux  # noqa: E402


def jax_grad_fn(model, loss):
    """``jax.value_and_grad`` of the plain loss, in ``step_fn``'s ``grad_fn`` signature."""
    vg = jax.value_and_grad(fbp.loss_fn(model, loss))

    def f(params, x, y, *, key=None, state=None, train=True):
        value, grads = vg(params, x, y, key=key, state=state, train=train)
        return (value, Aux(None, None)), grads

    return f


def bare_step(vg, optimizer):
    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = vg(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def flop_shapes(sizes: list[int], batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul in a train step: forward, dw, and dx (not for layer 0)."""
    shapes = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        shapes.append((batch, a, b))  # y = x w
        shapes.append((a, batch, b))  # dw = xᵀ dy
        if i > 0:
            shapes.append((batch, b, a))  # dx = dy wᵀ
    return shapes


def step_flops(sizes: list[int], batch: int) -> int:
    """Matmul FLOPs of one train step, 2·m·k·n per product."""
    return sum(2 * m * k * n for m, k, n in flop_shapes(sizes, batch))


def mlp_model(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(
        [nn.Dense(sizes[1]), nn.ReLU(), nn.Dense(sizes[2]), nn.ReLU(), nn.Dense(sizes[3])]
    )


def torch_step(sizes, x_np, y_np, lr, device="cpu"):
    import torch

    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lossf = torch.nn.CrossEntropyLoss()
    x = torch.tensor(np.array(x_np)).to(device)
    y = torch.tensor(np.array(y_np)).long().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        value = lossf(model(x), y)
        value.backward()
        opt.step()
        return value

    return step, torch.__version__


def measure(
    quick: bool, rounds: int, steps: int, save: str | None = None, torch_threads=None
) -> dict:
    sizes, batch = ([32, 16, 16, 4], 8) if quick else ([784, 512, 512, 10], 256)
    lr = 1e-3
    model = mlp_model(sizes)
    fbp.configure_cpu(model=model)  # before the first JAX computation (no-op if too late)
    loss = losses.softmax_cross_entropy
    opt = optax.adam(lr)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, sizes[-1], jnp.int32)
    ts = train.init(model, opt, kp, x)

    s = {
        "fm": ts,
        "jm": ts,
        "fb": (ts.params, ts.opt_state),
        "jb": (ts.params, ts.opt_state),
    }
    fm = train.make_step(model, loss, opt)
    jm = train.make_step(model, loss, opt, grad_fn=jax_grad_fn(model, loss))
    fb = bare_step(fbp.value_and_grad(model, loss), opt)
    jb = bare_step(jax.value_and_grad(fbp.loss_fn(model, loss)), opt)

    def run_make(name, f):
        def go():
            for _ in range(steps):
                s[name], _ = f(s[name], x, y)
            return s[name]

        return go

    def run_bare(name, f):
        def go():
            for _ in range(steps):
                p, o, _ = f(*s[name], x, y)
                s[name] = (p, o)
            return s[name]

        return go

    import torch

    common.save_leaves(save, fbp.value_and_grad(model, loss)(ts.params, x, y)[1])
    compiled = fb.lower(ts.params, ts.opt_state, x, y).compile().as_text()
    device = common.torch_device()
    tstep, torch_version = torch_step(sizes, jax.device_get(x), jax.device_get(y), lr, device)

    def run_torch(threads):
        def go():
            torch.set_num_threads(threads)
            for _ in range(steps):
                tstep()
            if device == "cuda":
                torch.cuda.synchronize()

        return go

    shapes = flop_shapes(sizes, batch)
    mats = []
    for i, (m, k, n) in enumerate(shapes):
        ka, kb = jax.random.split(jax.random.key(i))
        mats.append(
            (jax.random.normal(ka, (m, k), jnp.float32), jax.random.normal(kb, (k, n), jnp.float32))
        )
    dot = jax.jit(jnp.dot)
    dots_one_call = jax.jit(lambda ps: [jnp.dot(a, b) for a, b in ps])

    def dots_each():
        for _ in range(steps):
            for a, b in mats:
                common.block(dot(a, b))

    def dots_all():
        for _ in range(steps):
            common.block(dots_one_call(mats))

    fns = {
        "fbp make_step": run_make("fm", fm),
        "jax.grad make_step": run_make("jm", jm),
        "fbp vg + adam": run_bare("fb", fb),
        "jax.grad + adam": run_bare("jb", jb),
        "torch": run_torch(os.cpu_count()),
        "torch, 1 thread": run_torch(1),
        "dots, one call each": dots_each,
        "dots, all in one call": dots_all,
    }
    if device == "cuda" or (torch_threads and 1 not in torch_threads):
        del fns["torch, 1 thread"]
    if device == "cpu" and torch_threads and os.cpu_count() not in torch_threads:
        del fns["torch"]
    t0 = time.perf_counter()
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(fns, rounds=rounds, warmup=2, cpu=cpu)
    return {
        "machine": common.machine(),
        "torch": torch_version,
        "sizes": sizes,
        "batch": batch,
        "steps_per_sample": steps,
        "rounds": rounds,
        "gflop": step_flops(sizes, batch) / 1e9,
        "ms": {k: 1e3 * common.median(v) / steps for k, v in times.items()},
        "spread": {k: common.spread(v) for k, v in times.items()},
        "cpu_ms": {k: 1e3 * common.median(v) / steps for k, v in cpu.items()},
        "seconds": time.perf_counter() - t0,
        "variants": {k: common.summary(times[k], cpu[k], per=steps) for k in times},
        "hlo": common.hlo_fingerprint(compiled),
        "library_fusions": common.library_fusions(compiled),
    }


def report(results: list[dict]) -> str:
    r0 = results[0]
    gflop = r0["gflop"]
    out = [
        f"MLP {'-'.join(map(str, r0['sizes']))} ReLU, batch {r0['batch']}, float32, "
        f"softmax cross-entropy, Adam; {gflop:.3f} GFLOP of matmuls per step. "
        f"Median of {r0['rounds']} interleaved samples of {r0['steps_per_sample']} steps "
        f"(± is half the interquartile range). CPU ms/step is process CPU time over all "
        f"threads: steadier than wall time on a loaded machine, but it counts spin-waiting. "
        f"jax {jax.__version__}, torch {r0['torch']}.",
        "",
    ]

    def rate(ms: float) -> str:
        return f"{gflop / ms * 1e3:.3g}"

    rows = []
    for r in results:
        ms = r["ms"]
        tun = "on" if "tunables ON" in r["machine"] else "off"
        each, allin = ms["dots, one call each"], ms["dots, all in one call"]
        cpu = r["cpu_ms"]
        for name in (
            "fbp make_step",
            "jax.grad make_step",
            "fbp vg + adam",
            "jax.grad + adam",
            "torch",
            "torch, 1 thread",
        ):
            if name not in ms:
                continue
            rows.append(
                [
                    tun,
                    name,
                    f"{ms[name]:.2f} {r['spread'][name]}",
                    f"{cpu[name]:.2f}",
                    rate(ms[name]),
                    f"{100 * each / ms[name]:.0f}%",
                    f"{100 * allin / ms[name]:.0f}%",
                ]
            )
        rows.append(
            [
                tun,
                "matmuls only, one call each",
                f"{each:.2f}",
                f"{cpu['dots, one call each']:.2f}",
                rate(each),
                "100%",
                "",
            ]
        )
        rows.append(
            [
                tun,
                "matmuls only, all in one call",
                f"{allin:.2f}",
                f"{cpu['dots, all in one call']:.2f}",
                rate(allin),
                "",
                "100%",
            ]
        )
    out.append(
        common.table(
            [
                "glibc tunables",
                "variant",
                "ms/step",
                "CPU ms/step",
                "GFLOP/s",
                "% of matmuls one-by-one",
                "% of matmuls in one call",
            ],
            rows,
        )
    )
    out.append("")
    rrows = []
    for r in results:
        ms = r["ms"]
        tun = "on" if "tunables ON" in r["machine"] else "off"
        cpu = r["cpu_ms"]
        rrows.append(
            [
                tun,
                f"{ms['fbp make_step'] / ms['jax.grad make_step']:.3f}",
                f"{cpu['fbp make_step'] / cpu['jax.grad make_step']:.3f}",
                f"{ms['fbp vg + adam'] / ms['jax.grad + adam']:.3f}",
                f"{ms['fbp make_step'] / ms['torch']:.3f}" if "torch" in ms else "",
                f"{ms['fbp make_step'] / ms['torch, 1 thread']:.3f}"
                if "torch, 1 thread" in ms
                else "",
            ]
        )
    out.append(
        common.table(
            [
                "glibc tunables",
                "fbp/jax.grad (make_step)",
                "same, CPU time",
                "fbp/jax.grad (bare)",
                "fbp make_step/torch",
                "fbp make_step/torch 1 thread",
            ],
            rrows,
        )
    )
    out.append("")
    for r in results:
        out.append(f"- machine: {r['machine']} (timed part {r['seconds']:.0f} s)")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    ap.add_argument("--single", action="store_true", help="only this process's environment")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per variant")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed sample")
    ap.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="this process only; JSON to PATH"
    )
    ap.add_argument("--save", metavar="PATH", help="save fbp's gradients (.npz)")
    ap.add_argument(
        "--torch-threads", type=int, nargs="+", help="PyTorch variants (default: all cores, 1)"
    )
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 40)
    steps = args.steps or (2 if args.quick else 5)
    if args.single or args.json:
        res = measure(args.quick, rounds, steps, args.save, args.torch_threads)
        if args.json == "-":  # the last line of stdout (run_both_allocators reads it)
            print(json.dumps(res))
            return
        print(report([res]))
        if args.json:
            common.write_json(args.json, common.record("mlp", **res))
        return
    args_ = [f"--rounds={rounds}", f"--steps={steps}"] + (["--quick"] if args.quick else [])
    results = common.run_both_allocators(__file__, args_)
    print(report(results))
    print("- each glibc setting ran as its own process, one after the other")


if __name__ == "__main__":
    main()
