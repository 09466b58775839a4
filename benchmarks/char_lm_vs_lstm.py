"""Character LM: the char-lm transformer vs an LSTM of the same parameter count, same wall time.

Both models train on ``experiments/char_lm.py``'s data (windows of 128 characters of
``pydoc_data.topics``, the same shuffled batches of 32) with the same optimizer:
AdamW (b2 0.99, weight decay 0.01), gradients clipped to norm 1, a linear warmup
over the first 100 steps and then a constant learning rate (the run length is a
time budget, so no schedule can know its end). Gradients are fbp's hand-written
backprop for both (``fbp.value_and_grad``).

The LSTM is ``Embedding(vocab, 64) -> LSTM(H) -> Dense(vocab)`` with H chosen so that
its parameter count is the closest to the transformer's.

Fair timing on a shared machine: training alternates between the two models in
chunks of 10 steps (always advancing the one with less training time so far), so
both see the same machine conditions; each model's clock counts only its own
chunks (compilation and evaluation excluded). Validation bits per character are
measured every ``budget / 10`` seconds of each model's training.

Usage: ``python benchmarks/char_lm_vs_lstm.py [--budget SECONDS] [--lr LR] [--plot PNG]``
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fbp  # noqa: E402
from fbp import losses, nn  # noqa: E402

CHUNK, BATCH, WARMUP, EMBED = 10, 32, 100, 64


def _char_lm():
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "experiments" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lstm_like(vocab: int, target: int) -> tuple[nn.Sequential, int]:
    """Embedding(vocab, 64) -> LSTM(H) -> Dense(vocab), H with the closest parameter count."""

    def count(h):
        return vocab * EMBED + 4 * h * (EMBED + h) + 4 * h + h * vocab + vocab

    h = min(range(8, 2048), key=lambda h: abs(count(h) - target))
    return nn.Sequential([nn.Embedding(vocab, EMBED), nn.LSTM(h), nn.Dense(vocab)]), h


def make_trainer(model, lr: float):
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.linear_schedule(0.0, lr, WARMUP), b2=0.99, weight_decay=0.01),
    )
    vg = fbp.value_and_grad(model, losses.causal_lm_loss)

    @jax.jit
    def chunk(params, opt_state, xb, yb):  # xb, yb: (CHUNK, batch, T)
        def step(carry, batch):
            params, opt_state = carry
            loss, grads = vg(params, *batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), loss = jax.lax.scan(step, (params, opt_state), (xb, yb))
        return params, opt_state, jnp.mean(loss)

    @jax.jit
    def evaluate(params, x, y):  # mean nats per character over the windows (n, T)
        return losses.causal_lm_loss(model.apply(params, x), y)

    return opt, chunk, evaluate


def run(budget: float, lr: float, plot: str | None, print_fn=print) -> dict:
    cl = _char_lm()
    ds = cl.char_data(0)
    _, vocab = cl.corpus()
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    xv, yv = jnp.asarray(ds.val.x), jnp.asarray(ds.val.y)
    tf = cl.transformer(len(vocab))
    tf_params = tf.init(jax.random.key(0), x[:1])
    lstm, hidden = lstm_like(len(vocab), cl.n_params(tf_params))
    runs = {}
    for name, model, params in (
        ("transformer", tf, tf_params),
        (f"LSTM({hidden})", lstm, lstm.init(jax.random.key(0), x[:1])),
    ):
        opt, chunk, evaluate = make_trainer(model, lr)
        runs[name] = dict(
            model=model,
            params=params,
            opt_state=opt.init(params),
            chunk=chunk,
            evaluate=evaluate,
            seconds=0.0,
            steps=0,
            curve=[],
            next_eval=0.0,
        )
    order = np.random.default_rng(0)
    steps_per_epoch = len(x) // BATCH
    perm = order.permutation(len(x))
    batches = []  # one shared stream of batch indices, consumed at each model's own pace

    def batch_indices(i):
        nonlocal perm
        while len(batches) <= i:
            j = len(batches) % steps_per_epoch
            if j == 0 and batches:
                perm = order.permutation(len(x))
            batches.append(perm[j * BATCH : (j + 1) * BATCH])
        return batches[i]

    for r in runs.values():  # compile outside the clocks
        idx = np.stack([batch_indices(i) for i in range(CHUNK)])
        jax.block_until_ready(r["chunk"](r["params"], r["opt_state"], x[idx], y[idx]))
        r["evaluate"](r["params"], xv, yv).block_until_ready()
    print_fn(f"- {common.machine()}")
    while True:
        active = [r for r in runs.values() if r["seconds"] < budget]
        if not active:
            break
        r = min(active, key=lambda r: r["seconds"])
        if r["seconds"] >= r["next_eval"]:
            bpc = float(r["evaluate"](r["params"], xv, yv)) / math.log(2)
            r["curve"].append((r["seconds"], bpc))
            r["next_eval"] += budget / 10
        idx = np.stack([batch_indices(r["steps"] + i) for i in range(CHUNK)])
        xb, yb = x[idx], y[idx]
        t0 = time.perf_counter()
        r["params"], r["opt_state"], _ = jax.block_until_ready(
            r["chunk"](r["params"], r["opt_state"], xb, yb)
        )
        r["seconds"] += time.perf_counter() - t0
        r["steps"] += CHUNK
    rows = []
    for name, r in runs.items():
        bpc = float(r["evaluate"](r["params"], xv, yv)) / math.log(2)
        r["curve"].append((r["seconds"], bpc))
        tokens = r["steps"] * BATCH * x.shape[1]
        rows.append(
            [
                name,
                f"{cl.n_params(r['params']):,}",
                r["steps"],
                f"{r['seconds']:.0f}",
                f"{tokens / r['seconds']:.0f}",
                f"{bpc:.3f}",
            ]
        )
    headers = ["model", "parameters", "steps", "train s", "chars/s", "validation bpc"]
    print_fn(common.table(headers, rows))
    print_fn(f"- lr {lr}, batch {BATCH} x {x.shape[1]} characters, load {common.load()}")
    for name, r in runs.items():
        curve = ", ".join(f"{s:.0f} s: {b:.3f}" for s, b in r["curve"])
        print_fn(f"- {name} validation bpc over its training time: {curve}")
        prompt = jnp.asarray(ds.val.x[0])
        out = cl.sample(r["model"], r["params"], prompt, 200, jax.random.key(0))
        print_fn(f"- {name} sample: {''.join(vocab[int(i)] for i in np.asarray(out))!r}")
    if plot:
        curves = {name: r["curve"] for name, r in runs.items()}
        cl.plot_bpc(curves, plot, "training seconds (same machine, interleaved)")
        print_fn(f"- plot: {plot}")
    return {name: r["curve"][-1][1] for name, r in runs.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per model")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--plot", default=None, help="write the validation-bpc curves here (PNG)")
    args = ap.parse_args(argv)
    run(args.budget, args.lr, args.plot)


if __name__ == "__main__":
    main()
