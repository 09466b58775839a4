"""Character-level transformer language model on the Python documentation topics.

Text: ``pydoc_data.topics`` (shipped with every CPython; ~465 K characters, ~100
distinct ones), the topics joined in sorted order. Fixed split by position: the
first 90% trains, the next 5% validates, the last 5% tests. Windows of T = 128
characters (stride 128); the target is the next character at every position
(``losses.causal_lm_loss``). Validation loss is logged each epoch in nats per
character; the report converts it to bits per character (bpc = nats / ln 2), plots
it (``bpc.png``) and prints samples generated from a validation prompt.

Model: token embedding -> 3 pre-LN transformer blocks (128 wide, 4 heads, causal,
rotary positions) -> LayerNorm -> Dense(vocab); AdamW, warmup + cosine.
``benchmarks/char_lm_vs_lstm.py`` trains it against an LSTM of the same parameter
count for the same wall time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbp import losses, nn
from fbp.data import Dataset, Split
from fbp.run import Experiment

T, WIDTH, HEADS, LAYERS = 128, 128, 4, 3
SPLIT = (0.9, 0.05)  # train, validation fractions; the rest is test


def corpus() -> tuple[str, list[str]]:
    """The documentation text and its sorted character vocabulary."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    return text, sorted(set(text))


def windows(ids: np.ndarray, time: int = T) -> Split:
    """Non-overlapping windows: x = ids[i : i + time], y = ids[i + 1 : i + time + 1]."""
    n = (len(ids) - 1) // time
    x = ids[: n * time].reshape(n, time)
    y = ids[1 : n * time + 1].reshape(n, time)
    return Split(x.astype(np.int32), y.astype(np.int32))


def char_data(seed: int) -> Dataset:
    """The fixed split (``seed`` is unused: the split is by position)."""
    del seed
    text, vocab = corpus()
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], np.int32)
    a, b = (int(f * len(ids)) for f in (SPLIT[0], SPLIT[0] + SPLIT[1]))
    parts = (ids[:a], ids[a:b], ids[b:])
    return Dataset(*(windows(p) for p in parts), classes=None, name=f"pydoc-topics-{len(vocab)}")


def transformer(vocab: int) -> nn.Sequential:
    blocks = [nn.TransformerBlock(HEADS, causal=True, rope=True) for _ in range(LAYERS)]
    return nn.Sequential([nn.Embedding(vocab, WIDTH), *blocks, nn.LayerNorm(), nn.Dense(vocab)])


def n_params(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=(0, 3))
def sample(model: nn.Layer, params, prompt: jax.Array, steps: int, key, temperature=0.8):
    """Continue ``prompt`` (T,) int by ``steps`` sampled characters, window of the last T."""

    def step(window, k):
        logits = model.apply(params, window[None])[0, -1] / temperature
        nxt = jax.random.categorical(k, logits).astype(window.dtype)
        return jnp.concatenate([window[1:], nxt[None]]), nxt

    _, out = jax.lax.scan(step, prompt, jax.random.split(key, steps))
    return out


def bpc_history(history) -> list[tuple[int, float]]:
    return [(r["epoch"], r["val_loss"] / math.log(2)) for r in history if "val_loss" in r]


def plot_bpc(curves: dict[str, list[tuple[float, float]]], path, xlabel: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fbp.figures import save_figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, pts in curves.items():
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
    ax.set(xlabel=xlabel, ylabel="validation bits per character")
    low = min(b for pts in curves.values() for _, b in pts)
    ax.set_ylim(max(0.0, low - 0.2), max(low + 0.5, 4.0))  # the first points are ~7 bits
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def report(result) -> list[str]:
    _, vocab = corpus()
    hist = bpc_history(result.history)
    test_bpc = result.test["loss"] / math.log(2)
    lines = [
        f"parameters: {n_params(result.state.params):,}; vocabulary {len(vocab)}",
        "validation bpc by epoch: " + ", ".join(f"{e}: {b:.3f}" for e, b in hist),
        f"test bpc {test_bpc:.3f} (uniform over the vocabulary: {math.log2(len(vocab)):.2f})",
    ]
    prompt = jnp.asarray(result.dataset.val.x[0])
    out = sample(result.model, result.state.params, prompt, 300, jax.random.key(0))
    text = "".join(vocab[int(i)] for i in np.asarray(prompt)[-60:])
    gen = "".join(vocab[int(i)] for i in np.asarray(out))
    lines += [
        "sample (prompt's last 60 characters, then 300 sampled at temperature 0.8):",
        repr(text),
        repr(gen),
    ]
    if result.out is not None:
        plot_bpc({"transformer": hist}, result.out / "bpc.png", "epoch")
        lines.append(f"plot: {result.out / 'bpc.png'}")
    return lines


EXPERIMENT = Experiment(
    name="char-lm",
    description="character-level transformer LM on pydoc_data.topics; validation bits per char",
    data=char_data,
    model=lambda ds: transformer(len(corpus()[1])),
    loss=losses.causal_lm_loss,
    optimizer=lambda lr, steps: optax.adamw(lr, b2=0.99, weight_decay=0.01),
    epochs=4,
    lr=2e-3,
    batch_size=32,
    schedule="warmup-cosine",
    clip=1.0,
    log_every=1,
    report=report,
)
