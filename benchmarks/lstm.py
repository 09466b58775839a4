"""LSTM loss + all gradients: fbp's hand-written BPTT vs jax.grad through lax.scan vs PyTorch.

Workload (design.md): batch 64, T=100, input 32, hidden 256, float32, MSE on every
hidden state. Variants, timed in interleaved rounds in one process (medians):

* ``fbp``: ``fbp.value_and_grad`` (forward scan + hand-written reverse scan), jitted.
* ``jax.grad (same forward)``: ``jax.value_and_grad`` of ``fbp.loss_fn``: the very
  forward fbp runs, differentiated by JAX.
* ``jax.grad (textbook scan)``: a plain LSTM scan (projection inside the step, four
  sigmoid/tanh calls), differentiated by JAX.
* ``torch nn.LSTM``: PyTorch's fused CPU LSTM, ``torch.set_num_threads(cores)``.

Each variant's wall time (median) and the CPU seconds of this process during the call
(median; all cores together, less disturbed by other processes on a shared
machine) are reported as ratios to the faster JAX reference, the textbook scan.
The temporary memory of each jitted variant is XLA's compiled
``memory_analysis().temp_size_in_bytes``. The script runs itself twice, as two
processes: with the glibc allocator tunables of perf-notes.md and without them.

The JAX platform comes from the environment (``JAX_PLATFORMS``); on a GPU, PyTorch
runs on CUDA when it can and every timing waits for the device. fbp's XLA:CPU
setting for this model is applied first (``fbp.configure_cpu``).

Usage: ``python benchmarks/lstm.py [--rounds N]`` (``--child`` runs one setting in
this process; ``--json OUT.json`` with it writes the results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fbp  # noqa: E402
from benchmarks import common  # noqa: E402
from fbp import losses, nn  # noqa: E402

B, T, IN, H = 64, 100, 32, 256


def textbook_loss(params, x, target):
    """MSE of every hidden state of a plain LSTM scan (batch-major in and out)."""

    def step(carry, x_t):
        h, c = carry
        z = x_t @ params["w_ih"] + h @ params["w_hh"] + params["b"]
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
        h = jax.nn.sigmoid(zo) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], H), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return jnp.mean(jnp.square(jnp.swapaxes(hs, 0, 1) - target))


def jax_variants(params, x, target):
    model = nn.Sequential([nn.LSTM(H)])
    p = {"0": params}
    fns = {
        "fbp": jax.jit(fbp.value_and_grad(model, losses.mse)),
        "jax.grad (same forward)": jax.jit(jax.value_and_grad(fbp.loss_fn(model, losses.mse))),
        "jax.grad (textbook scan)": jax.jit(jax.value_and_grad(textbook_loss)),
    }
    args = {
        "fbp": (p, x, target),
        "jax.grad (same forward)": (p, x, target),
        "jax.grad (textbook scan)": (params, x, target),
    }
    return fns, args


def torch_variant(params, x, target, device="cpu", threads=None):
    import torch

    threads = threads or os.cpu_count()
    module = torch.nn.LSTM(IN, H, batch_first=True)
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.tensor(np.asarray(params["w_ih"]).T))
        module.weight_hh_l0.copy_(torch.tensor(np.asarray(params["w_hh"]).T))
        module.bias_ih_l0.copy_(torch.tensor(np.asarray(params["b"])))
        module.bias_hh_l0.zero_()
    module = module.to(device)
    xt = torch.tensor(np.asarray(x)).to(device)
    tt = torch.tensor(np.asarray(target)).to(device)

    def run():
        torch.set_num_threads(threads)
        module.zero_grad(set_to_none=True)
        y, _ = module(xt)
        loss = torch.mean((y - tt) ** 2)
        loss.backward()
        return None

    return common.torch_synced(run, device)


def child(
    rounds: int, json_path: str | None = None, save: str | None = None, torch_threads=None
) -> None:
    fbp.configure_cpu(model=nn.LSTM(H))  # before the first JAX computation
    kx, kt, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (B, T, IN), jnp.float32)
    target = jax.random.normal(kt, (B, T, H), jnp.float32)
    params = nn.LSTM(H).init(kp, x)
    fns, args = jax_variants(params, x, target)

    ref_v, ref_g = fns["jax.grad (same forward)"](*args["jax.grad (same forward)"])
    v, g = fns["fbp"](*args["fbp"])
    common.save_leaves(save, g)
    err = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True)
    )

    temp = {
        n: f.lower(*args[n]).compile().memory_analysis().temp_size_in_bytes for n, f in fns.items()
    }
    calls = {n: (lambda f=f, a=args[n]: f(*a)) for n, f in fns.items()}
    device = common.torch_device()
    for n in torch_threads or [os.cpu_count()]:
        name = "torch nn.LSTM" + ("" if n == os.cpu_count() or device != "cpu" else f", {n} thread")
        calls[name] = torch_variant(params, x, target, device, n)
    cpu: dict[str, list[float]] = {n: [] for n in calls}

    def with_cpu(name, fn):  # also record the process's CPU seconds (robust to contention)
        def run():
            t0 = time.process_time()
            common.block(fn())
            cpu[name].append(time.process_time() - t0)

        return run

    times = common.interleaved(
        {n: with_cpu(n, f) for n, f in calls.items()}, rounds=rounds, warmup=3
    )

    ref = "jax.grad (textbook scan)"
    base, base_cpu = common.median(times[ref]), common.median(cpu[ref][3:])
    rows = []
    for name, ts in times.items():
        mem = f"{temp[name] / 2**20:.1f}" if name in temp else "–"
        c = common.median(cpu[name][3:])  # the first 3 are the warm-up calls
        rows.append(
            [
                name,
                f"{1e3 * common.median(ts):.1f}",
                common.spread(ts),
                f"{common.median(ts) / base:.2f}",
                f"{1e3 * c:.1f}",
                f"{c / base_cpu:.2f}",
                mem,
            ]
        )
    compiled = fns["fbp"].lower(*args["fbp"]).compile().as_text()
    common.write_json(
        json_path,
        common.record(
            "lstm",
            rounds=rounds,
            variants={n: common.summary(times[n], cpu[n][3:]) for n in times},
            temp_mib={n: t / 2**20 for n, t in temp.items()},
            check={"fbp_vs_jax_grad": err},
            hlo=common.hlo_fingerprint(compiled),
            library_fusions=common.library_fusions(compiled),
        ),
    )
    print(common.machine())
    print(
        f"LSTM B={B} T={T} in={IN} H={H} float32, loss + all grads, {rounds} rounds; "
        f"fbp vs jax.grad max rel grad error {err:.1e}"
    )
    print(
        common.table(
            [
                "variant",
                "wall ms",
                "IQR",
                "wall / textbook jax.grad",
                "CPU ms",
                "CPU / textbook jax.grad",
                "temp MiB",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--child", action="store_true", help="run one setting in this process")
    parser.add_argument("--json", metavar="PATH", help="with --child: write results as JSON")
    parser.add_argument("--save", metavar="PATH", help="with --child: save fbp's gradients")
    parser.add_argument(
        "--torch-threads", type=int, nargs="+", help="PyTorch variants (default: all cores)"
    )
    args = parser.parse_args()
    if args.child:
        child(args.rounds, args.json, args.save, args.torch_threads)
        return
    for tunables in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = common.TUNABLES
        print(f"\n## process {'with' if tunables else 'without'} glibc tunables", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--child", "--rounds", str(args.rounds)], env=env, check=True
        )


if __name__ == "__main__":
    main()
