"""CNN train step: fbp's hand-written backward vs jax.grad vs PyTorch, one process.

Model (float32, batch 128, 28x28x1 input): Conv2D(32, 3x3, SAME) - ReLU -
Conv2D(64, 3x3, SAME) - ReLU - MaxPool2D(2) - Flatten - Dense(128) - ReLU - Dense(10),
softmax cross-entropy. Each variant computes the loss and all parameter gradients:

* fbp:      ``jax.jit(fbp.value_and_grad(model, loss))``
* jax.grad: ``jax.jit(jax.value_and_grad(fbp.loss_fn(model, loss)))`` (same forward)
* PyTorch:  the same network in NCHW, ``loss.backward()`` (eager, its own threads)

Variants run in interleaved rounds; medians (wall and process CPU time) and their
ratios are printed, with the machine. On a CPU PyTorch runs with all cores and
with one thread (the one-thread peer suffers less when other jobs share the cores).
``--hlo`` also prints the convolutions of both compiled JAX programs (dimension
numbers and layouts), to compare what XLA runs.

The JAX platform comes from the environment (``JAX_PLATFORMS``); on a GPU, PyTorch
runs on CUDA when it can and every timing waits for the device. fbp's XLA:CPU
setting for this model is applied first (``fbp.configure_cpu``; ``FBP_XLA=off`` or
your own ``XLA_FLAGS`` to change it).

Run: ``python benchmarks/cnn.py [--rounds 30] [--hlo] [--json OUT.json]``
(``GLIBC_TUNABLES=...`` from benchmarks/common.py for the allocator-tuned numbers).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fbp  # noqa: E402
from benchmarks import common  # noqa: E402
from fbp import losses, nn  # noqa: E402

BATCH, SIZE, CLASSES = 128, 28, 10


def fbp_model() -> nn.Sequential:
    return nn.Sequential(
        [
            nn.Conv2D(32, 3),
            nn.ReLU(),
            nn.Conv2D(64, 3),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(128),
            nn.ReLU(),
            nn.Dense(CLASSES),
        ]
    )


def torch_step(params, x, y, device="cpu"):
    """The same network in PyTorch with fbp's initial weights; returns a step callable."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * (SIZE // 2) ** 2, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, CLASSES),
    )
    with torch.no_grad():
        for i, j in ((0, "0"), (2, "2")):  # HWIO -> OIHW
            w = np.array(params[j]["w"]).transpose(3, 2, 0, 1).copy()
            net[i].weight.copy_(torch.from_numpy(w))
            net[i].bias.copy_(torch.from_numpy(np.array(params[j]["b"])))
        # fbp flattens NHWC; PyTorch flattens NCHW: permute the dense rows to match.
        w = np.asarray(params["6"]["w"]).reshape(SIZE // 2, SIZE // 2, 64, 128)
        net[6].weight.copy_(torch.from_numpy(w.transpose(2, 0, 1, 3).reshape(-1, 128).T.copy()))
        net[6].bias.copy_(torch.from_numpy(np.array(params["6"]["b"])))
        net[8].weight.copy_(torch.from_numpy(np.asarray(params["8"]["w"]).T.copy()))
        net[8].bias.copy_(torch.from_numpy(np.array(params["8"]["b"])))
    net = net.to(device)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)
    yt = torch.from_numpy(np.asarray(y).astype(np.int64)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        return loss.item()  # waits for the device

    return step


def torch_threads(n, step):
    """``step`` run with PyTorch limited to ``n`` intra-op threads."""
    import torch

    def run():
        torch.set_num_threads(n)
        return step()

    return run


def conv_lines(compiled_text: str) -> list[str]:
    """The convolution instructions of a compiled HLO module, shortened."""
    out = []
    for line in compiled_text.splitlines():
        if " convolution(" in line:
            line = re.sub(r", metadata=\{.*?\}", "", line.strip())
            out.append(line[:220])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hlo", action="store_true", help="print the compiled convolutions")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--save", metavar="PATH", help="save fbp's gradients (.npz)")
    ap.add_argument(
        "--torch-threads", type=int, nargs="+", help="PyTorch variants (default: all cores, 1)"
    )
    args = ap.parse_args(argv)

    model, loss = fbp_model(), losses.softmax_cross_entropy
    fbp.configure_cpu(model=model)  # before the first JAX computation
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, SIZE, SIZE, 1), jnp.float32)
    y = jax.random.randint(ky, (BATCH,), 0, CLASSES)
    params = model.init(kp, x)

    ours = jax.jit(fbp.value_and_grad(model, loss))
    ref = jax.jit(jax.value_and_grad(fbp.loss_fn(model, loss)))
    (v1, g1), (_, g2) = ours(params, x, y), ref(params, x, y)
    common.save_leaves(args.save, g1)
    err = max(
        fbp.testing.rel_error(a, b)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
    )
    compiled = ours.lower(params, x, y).compile().as_text()
    fns = {"fbp": lambda: ours(params, x, y), "jax.grad": lambda: ref(params, x, y)}
    torch_err = None
    if not args.no_torch:
        device = common.torch_device()
        step = torch_step(params, x, y, device)
        torch_err = abs(step() - float(v1)) / abs(float(v1))
        if device == "cpu":
            for n in args.torch_threads or (os.cpu_count(), 1):
                name = "PyTorch" if n == os.cpu_count() else f"PyTorch, {n} thread(s)"
                fns[name.replace("1 thread(s)", "1 thread")] = torch_threads(n, step)
        else:
            fns["PyTorch"] = step

    cpu: dict[str, list[float]] = {}
    times = common.interleaved(fns, rounds=args.rounds, warmup=3, cpu=cpu)
    med = {k: common.median(t) for k, t in times.items()}
    cmed = {k: common.median(t) for k, t in cpu.items()}
    print(f"# CNN train step (loss + grads), batch {BATCH}, {SIZE}x{SIZE}x1, float32")
    print(f"machine: {common.machine()}")
    print(f"fbp vs jax.grad: max relative gradient difference {err:.1e} (float32)")
    if torch_err is not None:
        print(f"fbp vs PyTorch: relative loss difference {torch_err:.1e}")
    rows = [
        [
            k,
            f"{1e3 * m:.1f}",
            common.spread(times[k]),
            f"{m / med['fbp']:.2f}",
            f"{1e3 * cmed[k]:.1f}",
            f"{cmed[k] / cmed['fbp']:.2f}",
        ]
        for k, m in med.items()
    ]
    print(common.table(["variant", "median ms", "IQR", "time / fbp", "CPU ms", "CPU / fbp"], rows))
    print(
        f"fbp / jax.grad = {med['fbp'] / med['jax.grad']:.3f}"
        + "".join(f";  fbp / {k} = {med['fbp'] / med[k]:.3f}" for k in med if "PyTorch" in k)
    )
    common.write_json(
        args.json,
        common.record(
            "cnn",
            rounds=args.rounds,
            variants={k: common.summary(times[k], cpu[k]) for k in times},
            check={"fbp_vs_jax_grad": err, "fbp_vs_torch_loss": torch_err},
            hlo=common.hlo_fingerprint(compiled),
            library_fusions=common.library_fusions(compiled),
        ),
    )
    if args.hlo:
        for name, f in (("fbp", ours), ("jax.grad", ref)):
            print(f"\n## convolutions compiled for {name}")
            for line in conv_lines(f.lower(params, x, y).compile().as_text()):
                print(line)


if __name__ == "__main__":
    main()
