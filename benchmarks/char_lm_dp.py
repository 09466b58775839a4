"""DP fine-tuning of a character-level transformer LM: validation bits per character at
ε ∈ {1, 3, 8} (δ = 1e-5), next to non-private fine-tuning and no fine-tuning.

Text: ``pydoc_data.topics`` (the ``char-lm`` experiment's corpus, topics in sorted
order), cut by position: the first 60% pretrains the model (non-private; the "public"
part), the next 30% is the "private" fine-tuning set, the next 5% validates (the same
region as ``char-lm``'s validation split, so it follows the private part's topics).
Windows of T characters, stride T.

Model: Embedding -> 2 causal pre-LN transformer blocks (rope) -> LayerNorm -> Dense,
small enough for two shared CPU cores (width 64, 4 heads, T = 64 by default).

DP-SGD with Poisson sampling, as the accountant assumes: each step every private
window joins with probability q = batch / n. The selected windows are gathered into a
fixed-capacity batch (the expected size plus six standard deviations; the
probability of more is below 1e-8 and the overflow would be dropped), the empty slots
get weight 0, every per-example gradient is clipped to norm C in one backward pass
(``fbp.extend.dp.clipped_sum`` with ``weights=``; the attention layers' per-example
rules, no vmap), Gaussian noise σC is added and the sum divided by q·n
(``dp.add_noise``); Adam then takes the step. σ is the smallest noise multiplier
whose run reaches the target ε (``accounting.noise_for_epsilon``, RDP). The
non-private fine-tune uses the same steps, batches and optimizer without clipping
or noise. Hyperparameters were set once, not tuned on the validation split.

Usage:
  python benchmarks/char_lm_dp.py [--plot docs/char_lm_dp_bpc.png]   # + .json next to it
  python benchmarks/char_lm_dp.py --quick                              # smoke test
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

from fbp import losses, nn, train  # noqa: E402
from fbp.extend import accounting, dp  # noqa: E402

LOSS = losses.causal_lm_loss
DELTA = 1e-5
CUTS = (0.6, 0.9, 0.95)  # pretrain | private fine-tune | validation


def _char_lm():
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "experiments" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def splits(time_steps: int):
    """(pretrain, private, validation) windows, each a ``fbp.data.Split``, and the vocab size."""
    lm = _char_lm()
    text, vocab = lm.corpus()
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], np.int32)
    a, b, c = (int(f * len(ids)) for f in CUTS)
    parts = (ids[:a], ids[a:b], ids[b:c])
    return tuple(lm.windows(p, time_steps) for p in parts), len(vocab)


def model(vocab: int, width: int, blocks: int) -> nn.Sequential:
    layers = [nn.TransformerBlock(4, causal=True, rope=True) for _ in range(blocks)]
    return nn.Sequential([nn.Embedding(vocab, width), *layers, nn.LayerNorm(), nn.Dense(vocab)])


def bpc(net, params, split) -> float:
    """Validation loss in bits per character."""
    x, y = jnp.asarray(split.x), jnp.asarray(split.y)
    return train.evaluate(net, LOSS, params, x, y, batch_size=256)["loss"] / math.log(2)


def pretrain(net, split, *, steps, batch, lr, seed):
    """Non-private Adam on the public windows; returns the parameters."""
    opt = optax.adam(lr)
    x, y = jnp.asarray(split.x), jnp.asarray(split.y)
    ts = train.init(net, opt, jax.random.key(seed), x[:batch])
    step = train.make_step(net, LOSS, opt)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, x.shape[0], batch)
        ts, _ = step(ts, x[i], y[i])
    return ts.params


def capacity(n: int, q: float) -> int:
    """Expected batch q·n plus six standard deviations of the Poisson-binomial count."""
    return int(math.ceil(q * n + 6 * math.sqrt(q * n * (1 - q)))) + 1


def finetune_step(net, opt, x, y, *, q, clip, noise, private):
    """One jitted step ``(params, opt_state, key) -> (params, opt_state, loss)``."""
    n = x.shape[0]
    cap = capacity(n, q)
    summed = dp.clipped_sum(net, LOSS, clip=clip if private else 1e30)

    @jax.jit
    def step(params, opt_state, key):
        k_mask, k_noise = jax.random.split(key)
        chosen = jax.random.bernoulli(k_mask, q, (n,))
        (idx,) = jnp.nonzero(chosen, size=cap, fill_value=0)
        weights = (jnp.arange(cap) < jnp.sum(chosen)).astype(jnp.float32)
        out = summed(params, x[idx], y[idx], weights=weights)
        g = dp.add_noise(out.summed, k_noise, clip=clip, noise=noise if private else 0.0, n=q * n)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out.value

    return step


def finetune(net, params, split, val, *, steps, batch, lr, clip, noise, private, seed, every):
    """Fine-tune from ``params``; returns [(step, validation bpc)] every ``every`` steps."""
    x, y = jnp.asarray(split.x), jnp.asarray(split.y)
    q = batch / x.shape[0]
    opt = optax.adam(lr)
    opt_state = opt.init(params)
    step = finetune_step(net, opt, x, y, q=q, clip=clip, noise=noise, private=private)
    key = jax.random.key(seed + 1000)
    curve = [(0, bpc(net, params, val))]
    for s in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sub)
        if s % every == 0 or s == steps:
            curve.append((s, bpc(net, params, val)))
    return curve


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fbp.figures import save_figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, r in results["runs"].items():
        ax.plot(*zip(*r["curve"], strict=True), marker="o", ms=3, label=name)
    ax.axhline(results["pretrained_bpc"], color="gray", ls=":", label="pretrained, no fine-tune")
    ax.set(xlabel="fine-tuning step", ylabel="validation bits per character")
    ax.set_title("DP fine-tuning of a char transformer (pydoc topics)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=int, default=64, help="window length T")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=64, help="expected batch size q·n")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--every", type=int, default=50, help="evaluate every this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write the figure here (PNG) and .json next")
    ap.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.time, args.width, args.pretrain_steps, args.steps, args.every = 16, 16, 3, 2, 1
        args.eps = [8.0]
    t0 = time.perf_counter()
    (pub, priv, val), vocab = splits(args.time)
    net = model(vocab, args.width, args.blocks)
    params = pretrain(
        net, pub, steps=args.pretrain_steps, batch=args.batch, lr=3e-3, seed=args.seed
    )
    n = priv.x.shape[0]
    q = args.batch / n
    results: dict = {"pretrained_bpc": bpc(net, params, val), "n_private": n, "q": q, "runs": {}}
    for target in [*args.eps, None]:
        sigma, eps = 0.0, math.inf
        if target is not None:
            sigma = accounting.noise_for_epsilon(target, sampling_rate=q, steps=args.steps)
            eps = accounting.PrivacyAccountant(sigma, q, DELTA).epsilon(args.steps)
        curve = finetune(
            net, params, priv, val, steps=args.steps, batch=args.batch, lr=args.lr,
            clip=args.clip, noise=sigma, private=target is not None, seed=args.seed,
            every=args.every,
        )  # fmt: skip
        name = "non-private" if target is None else f"ε = {target:g} (σ = {sigma:.2f})"
        results["runs"][name] = {"eps": eps, "sigma": sigma, "curve": curve, "bpc": curve[-1][1]}
        print(f"{name:24s} validation bpc {curve[-1][1]:.3f}", flush=True)
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = common.machine()
    results["args"] = vars(args)
    print(f"pretrained only: {results['pretrained_bpc']:.3f} bpc; {results['seconds']:.0f} s")
    if args.plot:
        plot(results, args.plot)
        common.write_json(str(Path(args.plot).with_suffix(".json")), results)
    return results


if __name__ == "__main__":
    main()
