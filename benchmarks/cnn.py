"""CNN train step: fbp's hand-written backward vs jax.grad vs PyTorch, one process.

Model (float32, batch 128, 28x28x1 input): Conv2D(32, 3x3, SAME) - ReLU -
Conv2D(64, 3x3, SAME) - ReLU - MaxPool2D(2) - Flatten - Dense(128) - ReLU - Dense(10),
softmax cross-entropy. Each variant computes the loss and all parameter gradients:

* fbp:      ``jax.jit(fbp.value_and_grad(model, loss))``
* jax.grad: ``jax.jit(jax.value_and_grad(fbp.loss_fn(model, loss)))`` (same forward)
* PyTorch:  the same network in NCHW, ``loss.backward()`` (eager, its own threads)

Variants run in interleaved rounds; medians and their ratios are printed, with the
machine. ``--hlo`` also prints the convolutions of both compiled JAX programs
(dimension numbers and layouts), to compare what XLA runs.

Run: ``python benchmarks/cnn.py [--rounds 30] [--hlo]``
(``GLIBC_TUNABLES=...`` from benchmarks/common.py for the allocator-tuned numbers).
"""

from __future__ import annotations

import argparse
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


def torch_step(params, x, y):
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
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(np.asarray(y).astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        return loss.item()

    return step


def conv_lines(compiled_text: str) -> list[str]:
    """The convolution instructions of a compiled HLO module, shortened."""
    out = []
    for line in compiled_text.splitlines():
        if " convolution(" in line:
            line = re.sub(r", metadata=\{.*?\}", "", line.strip())
            out.append(line[:220])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hlo", action="store_true", help="print the compiled convolutions")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    model, loss = fbp_model(), losses.softmax_cross_entropy
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, SIZE, SIZE, 1), jnp.float32)
    y = jax.random.randint(ky, (BATCH,), 0, CLASSES)
    params = model.init(kp, x)

    ours = jax.jit(fbp.value_and_grad(model, loss))
    ref = jax.jit(jax.value_and_grad(fbp.loss_fn(model, loss)))
    (v1, g1), (_, g2) = ours(params, x, y), ref(params, x, y)
    err = max(
        fbp.testing.rel_error(a, b)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
    )
    fns = {"fbp": lambda: ours(params, x, y), "jax.grad": lambda: ref(params, x, y)}
    if not args.no_torch:
        step = torch_step(params, x, y)
        torch_err = abs(step() - float(v1)) / abs(float(v1))
        fns["PyTorch"] = step

    times = common.interleaved(fns, rounds=args.rounds, warmup=3)
    med = {k: common.median(t) for k, t in times.items()}
    print(f"# CNN train step (loss + grads), batch {BATCH}, {SIZE}x{SIZE}x1, float32")
    print(f"machine: {common.machine()}")
    print(f"fbp vs jax.grad: max relative gradient difference {err:.1e} (float32)")
    if "PyTorch" in fns:
        print(f"fbp vs PyTorch: relative loss difference {torch_err:.1e}")
    rows = [
        [k, f"{1e3 * m:.1f}", common.spread(times[k]), f"{m / med['fbp']:.2f}"]
        for k, m in med.items()
    ]
    print(common.table(["variant", "median ms", "IQR", "time / fbp"], rows))
    print(
        f"fbp / jax.grad = {med['fbp'] / med['jax.grad']:.3f}"
        + (f";  fbp / PyTorch = {med['fbp'] / med['PyTorch']:.3f}" if "PyTorch" in med else "")
    )
    if args.hlo:
        for name, f in (("fbp", ours), ("jax.grad", ref)):
            print(f"\n## convolutions compiled for {name}")
            for line in conv_lines(f.lower(params, x, y).compile().as_text()):
                print(line)


if __name__ == "__main__":
    main()
