"""bfloat16 mixed precision against float32: steady train-step times and accuracy.

Per model, in one process and interleaved rounds (medians):

* ``fbp f32`` and ``fbp bf16-mixed``: ``fbp.train.step_fn(..., precision=...)``, jitted,
  plain SGD (the step is the gradient plus one multiply-add per parameter);
* ``jax.grad bf16-mixed``: the same step with ``jax.value_and_grad`` of
  ``fbp.loss_fn(..., precision="bf16-mixed")``, the same bfloat16-cast forward, as the
  gradient (what autodiff gives from the same model);
* ``torch f32`` and ``torch autocast``: a PyTorch equivalent (MLP, LSTM) eager, SGD,
  with and without ``torch.autocast(device, torch.bfloat16)`` (on CUDA when JAX runs on a
  GPU, with PyTorch's default float32 products: no TF32).

Models: ``mlp`` (64-1024-1024-10 ReLU, batch 256), ``char-lm`` (the char-lm
experiment's transformer, batch 32 x 128 tokens), ``lstm`` (H=256, batch 64, T=100,
input 32), ``digits-cnn`` (the experiment's CNN, batch 32). ``--accuracy`` trains
digits-mlp (and digits-cnn) with ``fbp.run.runner`` under both precisions over seeds.

Usage:
  python benchmarks/precision.py [--models mlp char-lm lstm digits-cnn] [--rounds 10]
  python benchmarks/precision.py --accuracy [--seeds 0 1 2] [--epochs 30]
  python benchmarks/precision.py --quick      # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fbp  # noqa: E402
from fbp import losses, nn, train  # noqa: E402
from fbp.core import Aux  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


def _experiment_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(name: str, quick: bool) -> tuple[nn.Layer, object, jax.Array, jax.Array]:
    """(model, loss, x, y) of benchmark ``name``; tiny shapes when ``quick``."""
    key = jax.random.key(0)
    if name == "mlp":
        b, sizes = (16, [8, 32, 32, 10]) if quick else (256, [64, 1024, 1024, 10])
        layers = [m for s in sizes[1:-1] for m in (nn.Dense(s), nn.ReLU())]
        model = nn.Sequential([*layers, nn.Dense(sizes[-1])])
        x = jax.random.normal(key, (b, sizes[0]))
        return model, losses.softmax_cross_entropy, x, jnp.arange(b) % sizes[-1]
    if name == "lstm":
        b, t, i, h = (4, 5, 3, 8) if quick else (64, 100, 32, 256)
        model = nn.Sequential([nn.LSTM(h), nn.Dense(1)])
        x = jax.random.normal(key, (b, t, i))
        return model, losses.mse, x, jnp.zeros((b, t, 1))
    if name == "char-lm":
        vocab, (b, t) = 64, ((2, 8) if quick else (32, 128))
        model = _experiment_module("char_lm").transformer(vocab)
        ids = jax.random.randint(key, (b, t + 1), 0, vocab)
        return model, losses.softmax_cross_entropy, ids[:, :-1], ids[:, 1:]
    if name == "digits-cnn":
        b = 4 if quick else 32
        model = _experiment_module("digits_cnn").model(types.SimpleNamespace(classes=10))
        x = jax.random.normal(key, (b, 8, 8, 1))
        return model, losses.softmax_cross_entropy, x, jnp.arange(b) % 10
    raise ValueError(f"precision benchmark: unknown model {name!r}")


def jax_grad_fn(model, loss, precision: str) -> Callable:
    """``jax.value_and_grad`` of ``fbp.loss_fn(..., precision=)`` as a ``step_fn`` grad_fn."""
    vg = jax.value_and_grad(fbp.loss_fn(model, loss, precision=precision))

    def f(params, x, y, *, key=None, state=None, train=True, **kw):
        value, grads = vg(params, x, y, key=key, state=state, train=train, **kw)
        return (value, Aux(None, state)), grads

    return f


def fbp_steps(name: str, quick: bool) -> dict[str, Callable[[], object]]:
    """name -> zero-argument callable running one jitted train step of model ``name``."""
    model, loss, x, y = case(name, quick)
    opt = optax.sgd(LR)
    out = {}
    variants = {
        "fbp f32": dict(precision="f32"),
        "fbp bf16-mixed": dict(precision="bf16-mixed"),
        "jax.grad bf16-mixed": dict(grad_fn=jax_grad_fn(model, loss, "bf16-mixed")),
    }
    for label, kw in variants.items():
        ts = train.init(model, opt, jax.random.key(1), x, precision="f32")
        step = jax.jit(train.step_fn(model, loss, opt, **kw))
        out[label] = lambda step=step, ts=ts: step(ts, x, y)
    return out


def torch_steps(name: str, quick: bool) -> dict[str, Callable[[], object]]:
    """PyTorch f32 and autocast-bf16 steps for ``mlp`` and ``lstm`` (others: none)."""
    if name not in ("mlp", "lstm"):
        return {}
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    device = common.torch_device()
    _, _, x, y = case(name, quick)
    xt = torch.tensor(np.asarray(x, np.float32), device=device)
    if name == "mlp":
        sizes = [x.shape[1], *([32, 32] if quick else [1024, 1024]), 10]
        layers = [
            m
            for a, b in zip(sizes[:-2], sizes[1:-1], strict=True)
            for m in (torch.nn.Linear(a, b), torch.nn.ReLU())
        ]
        module = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))
        yt = torch.tensor(np.asarray(y), device=device).long()
        lossf = torch.nn.CrossEntropyLoss()
        forward = module
    else:
        lstm, head = torch.nn.LSTM(x.shape[2], 8 if quick else 256, batch_first=True), None
        head = torch.nn.Linear(lstm.hidden_size, 1)
        module = torch.nn.ModuleList([lstm, head])
        yt = torch.tensor(np.asarray(y, np.float32), device=device)
        lossf = torch.nn.MSELoss()

        def forward(v):
            return head(lstm(v)[0])

    module.to(device)
    opt = torch.optim.SGD(module.parameters(), lr=LR)

    def step(autocast: bool):
        opt.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            loss = lossf(forward(xt).float(), yt)
        loss.backward()
        opt.step()

    return {
        "torch f32": common.torch_synced(lambda: step(False), device),
        "torch autocast": common.torch_synced(lambda: step(True), device),
    }


def measure(name: str, quick: bool, rounds: int) -> dict:
    """Interleaved step times of every variant of model ``name``."""
    fns = {**fbp_steps(name, quick), **torch_steps(name, quick)}
    times = common.interleaved(fns, rounds=rounds, warmup=2)
    return {k: common.summary(v) for k, v in times.items()}


def step_table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        f32 = r["fbp f32"]["ms"]
        bf = r["fbp bf16-mixed"]["ms"]
        jg = r["jax.grad bf16-mixed"]["ms"]
        t32, tac = (r.get(k, {}).get("ms") for k in ("torch f32", "torch autocast"))
        rows.append(
            [
                name,
                f"{f32:.2f} {r['fbp f32']['spread']}",
                f"{bf:.2f} {r['fbp bf16-mixed']['spread']}",
                f"**{f32 / bf:.2f}x**",
                f"{jg:.2f}",
                f"{jg / bf:.2f}x",
                f"{t32:.2f}" if t32 else "–",
                f"{tac:.2f}" if tac else "–",
                f"{t32 / tac:.2f}x" if t32 else "–",
                f"{bf / tac:.2f}" if tac else "–",
            ]
        )
    headers = [
        "model",
        "fbp f32 ms",
        "fbp bf16-mixed ms",
        "f32 / bf16-mixed",
        "jax.grad bf16 ms",
        "jax.grad / fbp (bf16)",
        "torch f32 ms",
        "torch autocast ms",
        "torch f32 / autocast",
        "fbp bf16 / torch autocast",
    ]
    return common.table(headers, rows)


def _by_variant(test: dict) -> dict[str, dict]:
    """A run's test metrics as {variant: {metric: value}} ("" without variants)."""
    out: dict[str, dict] = {}
    for key, value in test.items():
        variant, _, metric = key.rpartition("/")
        out.setdefault(variant, {})[metric] = float(value)
    return out


def accuracy(seeds: list[int], epochs: int | None, models: list[str]) -> str:
    """Test accuracy (and test loss) of experiments under f32 and bf16-mixed, per seed.

    Cells are "accuracy% (test loss)"; for char-lm the loss is in bits per character.
    An experiment with variants (adding-problem: LSTM and SimpleRNN) has a row per variant.
    """
    from fbp.run import experiment, runner

    rows = []
    pct = lambda a: "–" if np.isnan(a) else f"{a:.2f}%"  # noqa: E731 (no accuracy: LMs)
    for name in models:
        exp = experiment.get(name)
        per_char = 1 / np.log(2) if name == "char-lm" else 1.0  # nats -> bits per character
        for precision in ("f32", "bf16-mixed"):
            kw = {"epochs": epochs} if epochs else {}
            kw.update(precision=precision, print_fn=lambda s: None)
            runs = [_by_variant(runner.run(exp, seed=seed, **kw).test) for seed in seeds]
            for variant in runs[0]:
                accs = [100 * r[variant].get("accuracy", np.nan) for r in runs]
                losses = [per_char * r[variant]["loss"] for r in runs]
                cells = [f"{pct(a)} ({t:.3f})" for a, t in zip(accs, losses, strict=True)]
                mean = f"{pct(np.mean(accs))} ({np.mean(losses):.3f})"
                label = f"{name} ({variant})" if variant else name
                rows.append([label, precision, *cells, mean])
    headers = ["experiment", "precision", *(f"seed {s}" for s in seeds), "mean"]
    return common.table(headers, rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "char-lm", "lstm", "digits-cnn"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke test)")
    p.add_argument("--accuracy", action="store_true", help="train digits under both precisions")
    p.add_argument("--accuracy-models", nargs="+", default=["digits-mlp"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the experiment's)")
    args = p.parse_args(argv)
    print(common.machine())
    if args.accuracy:
        print(accuracy(args.seeds, args.epochs, args.accuracy_models))
        return
    rounds = 2 if args.quick else args.rounds
    results = {m: measure(m, args.quick, rounds) for m in args.models}
    print(step_table(results))


if __name__ == "__main__":
    main()
