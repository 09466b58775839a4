"""Per-layer error signals and gradient statistics: gradient flow, read from the open backward.

``fbp.value_and_grad(model, loss, with_deltas=True)`` returns each layer's error
signal (delta = dL/d(layer output)) next to the gradients; the chain rule computes
these values anyway, so keeping them costs nothing but their norms. This module
turns (params, grads, deltas, updates) into per-layer scalars, inside jit:

    delta_norm/i    ||dL/d out_i||_F            (every layer; mean-loss scale, so ~1/batch)
    grad_norm/i     ||dL/dw_i||_F               (layers with a 'w')
    w_norm/i        ||w_i||_F
    update_ratio/i  ||Δw_i||_F / ||w_i||_F      (when the optimizer's updates are given)

and plots them over training (``plot_gradient_flow``).

Examples:
  >>> import jax, jax.numpy as jnp, fbp
  >>> from fbp import nn, losses, diagnostics
  >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
  >>> x, labels = jnp.ones((8, 2)), jnp.arange(8) % 3
  >>> params = model.init(jax.random.key(0), x)
  >>> f = fbp.value_and_grad(model, losses.softmax_cross_entropy, with_deltas=True)
  >>> (value, aux), grads = f(params, x, labels)
  >>> [d.shape for d in aux.deltas]
  [(8, 4), (8, 4), (8, 3)]
  >>> stats = diagnostics.layer_stats(params, grads, aux.deltas)
  >>> sorted(stats)[:3]
  ['delta_norm/0', 'delta_norm/1', 'delta_norm/2']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fbp.core import Array, Layer, LossFunction, Params, PenaltyFunction, value_and_grad
from fbp.figures import new_figure, save_figure

STATS = ("delta_norm", "grad_norm", "w_norm", "update_ratio")


def _norm(a: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32))))


def layer_stats(
    params: Params,
    grads: Params,
    deltas: Sequence[Array],
    updates: Params | None = None,
) -> dict[str, Array]:
    """Per-layer norms of the error signal, the weight gradient, the weight and the update.

    Pure and jit-safe: every value is a float32 scalar array.

    Args:
      params: a ``Sequential``'s parameters, ``{'0': {...}, '1': {}, ...}``.
      grads: gradients with ``params``' tree.
      deltas: ``aux.deltas`` of ``value_and_grad(..., with_deltas=True)``; ``deltas[i]``
        has the shape of layer i's output, e.g. (batch, out).
      updates: optional optimizer updates with ``params``' tree (``optimizer.update``'s
        first output); gives ``update_ratio``.

    Returns:
      ``{'delta_norm/i': ..., 'grad_norm/i': ..., 'w_norm/i': ..., 'update_ratio/i': ...}``;
      the weight statistics for every params dict with a ``'w'``, keyed by its path
      (``'3'``, or ``'3.0'`` inside a nested Sequential; ``'0'`` for a single layer).
    """
    out = {}
    for i, d in enumerate(deltas):
        out[f"delta_norm/{i}"] = _norm(d)
    for path in _weight_paths(params):
        k = ".".join(path) or "0"
        w_norm = _norm(_at(params, path)["w"])
        out[f"grad_norm/{k}"] = _norm(_at(grads, path)["w"])
        out[f"w_norm/{k}"] = w_norm
        if updates is not None:
            out[f"update_ratio/{k}"] = _norm(_at(updates, path)["w"]) / jnp.maximum(w_norm, 1e-30)
    return out


def _layer_order(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _weight_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths of every params dict holding a ``'w'`` array, in layer order.

    A nested container (``nn.Recompute(nn.Sequential(...))``) gives paths like ('2', '0').
    """
    if not isinstance(tree, dict):
        return []
    if "w" in tree and not isinstance(tree["w"], dict):
        return [prefix]
    out = []
    for k in sorted(tree, key=lambda k: _layer_order(str(k))):
        out += _weight_paths(tree[k], (*prefix, k))
    return out


def _at(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def stats_fn(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation | None = None,
    *,
    penalty: PenaltyFunction | None = None,
) -> Callable:
    """A jitted probe ``(ts, x, y) -> dict[str, Array]`` of ``layer_stats`` on one batch.

    Runs the hand-written forward and backward once (with deltas) on the batch and,
    when ``optimizer`` is given, the update the optimizer would make from ``ts``
    (without applying it). The runner calls it at logged epochs.

    Args:
      model, loss, penalty: as for ``fbp.value_and_grad``.
      optimizer: the run's optax transformation, for ``update_ratio``.

    Returns:
      ``probe(ts, x, y)`` with ``ts`` an ``fbp.train.TrainState``, x: (batch, ...),
      y: (batch, ...).
    """
    vg = value_and_grad(model, loss, penalty=penalty, with_deltas=True)

    @jax.jit
    def probe(ts, x, y):
        state = ts.model_state if ts.model_state else None
        (_, aux), grads = vg(ts.params, x, y, state=state, train=False)
        updates = None
        if optimizer is not None:
            updates, _ = optimizer.update(grads, ts.opt_state, ts.params)
        return layer_stats(ts.params, grads, aux.deltas, updates)

    return probe


def probe(model: Layer, loss: LossFunction, optimizer: optax.GradientTransformation) -> Callable:
    """``stats_fn(model, loss, optimizer)``: the shape the runner's ``probe`` field takes."""
    return stats_fn(model, loss, optimizer)


def report(result: Any) -> list[str]:
    """A runner ``report`` hook: ``gradient_flow.png`` in the run's directory, and a summary.

    Use with ``probe=diagnostics.probe`` in an Experiment; prints the first and last
    weighted layer's gradient norm at the last logged epoch.
    """
    if not result.history:
        return []
    last = result.history[-1]
    grads = sorted(
        (k for k in last if k.startswith("grad_norm/")), key=lambda k: _layer_order(k[10:])
    )
    if not grads:
        return []
    lines = [
        f"gradient norm, layer {grads[0][10:]}: {last[grads[0]]:.3e}; "
        f"layer {grads[-1][10:]}: {last[grads[-1]]:.3e} (epoch {last.get('epoch')})"
    ]
    if result.out is not None:
        path = plot_gradient_flow(result.history, Path(result.out) / "gradient_flow.png")
        lines.append(f"gradient flow plot: {path}")
    return lines


def to_floats(stats: dict[str, Array]) -> dict[str, float]:
    """Host floats of a stats dict of scalars, shape () each (for metrics.jsonl)."""
    return {k: float(v) for k, v in stats.items()}


def _series(history: Sequence[dict[str, Any]], stat: str) -> dict[str, tuple[list, list]]:
    """layer key -> (epochs, values) of ``stat/<key>`` over the history rows that have it."""
    out: dict[str, tuple[list, list]] = {}
    for step, row in enumerate(history):
        for k, v in row.items():
            if k.startswith(stat + "/"):
                xs, ys = out.setdefault(k.split("/", 1)[1], ([], []))
                xs.append(row.get("epoch", step))
                ys.append(v)
    return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))


def plot_gradient_flow(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "gradient flow",
) -> Path:
    """PNG of per-layer gradient norms over training and delta norms by depth.

    Left: ``grad_norm/i`` of every weighted layer against the epoch (log scale).
    Right: ``delta_norm/i`` against the layer index at the first and last logged epoch.

    Args:
      history: rows as the runner logs them, ``{'epoch': e, 'grad_norm/0': ..., ...}``.
      path: where the PNG goes.
      title: figure title.

    Raises:
      ValueError: no row of ``history`` has layer statistics.
    """
    import matplotlib

    grads, deltas = _series(history, "grad_norm"), _series(history, "delta_norm")
    if not grads and not deltas:
        raise ValueError(
            "plot_gradient_flow: history has no 'grad_norm/<i>' or 'delta_norm/<i>' entries; "
            "run with the layer-statistics probe (diagnostics.probe)."
        )
    fig = new_figure(figsize=(11, 4))
    ax0, ax1 = fig.subplots(1, 2)
    cmap = matplotlib.colormaps["viridis"]
    for n, (i, (xs, ys)) in enumerate(grads.items()):
        ax0.plot(xs, ys, color=cmap(n / max(len(grads) - 1, 1)), label=f"layer {i}")
    ax0.set(yscale="log", xlabel="epoch", ylabel="||dL/dW||", title="weight-gradient norm")
    ax0.legend(fontsize=7, ncol=2)
    if deltas:
        layers = list(deltas)
        for pos, name in ((0, "first"), (-1, "last")):
            ax1.plot(
                [int(i) for i in layers],
                [deltas[i][1][pos] for i in layers],
                "o-",
                label=f"{name} logged epoch ({deltas[layers[0]][0][pos]})",
            )
        ax1.set(yscale="log", xlabel="layer", ylabel="||dL/d out||", title="delta norm by depth")
        ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_layer_series(
    histories: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    stat: str = "grad_norm",
    *,
    log: bool = True,
    title: str | None = None,
) -> Path:
    """PNG with one panel per run: ``stat/<i>`` of every layer against the epoch.

    Layers are coloured by depth (dark: first), so vanishing or exploding gradients
    show as a fan of lines; panels share the y axis so runs compare at a glance.

    Args:
      histories: run name -> its logged rows (e.g. ``{v: r.history for v, r in ...}``).
      path: where the PNG goes.
      stat: ``grad_norm``, ``delta_norm``, ``update_ratio``, ``angle`` (fbp.rules)...
      log: logarithmic y axis.
      title: figure title (default: ``stat``).

    Raises:
      ValueError: no run has ``stat/<i>`` entries.
    """
    import matplotlib

    series = {name: _series(h, stat) for name, h in histories.items()}
    series = {name: s for name, s in series.items() if s}
    if not series:
        raise ValueError(f"plot_layer_series: no run has '{stat}/<i>' entries.")
    fig = new_figure(figsize=(3.6 * len(series), 3.4))
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    for ax, (name, s) in zip(axes[0], series.items(), strict=True):
        for n, (i, (xs, ys)) in enumerate(s.items()):
            ax.plot(xs, ys, color=cmap(n / max(len(s) - 1, 1)), label=f"layer {i}")
        ax.set(title=name, xlabel="epoch", yscale="log" if log else "linear")
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel(stat)
    fig.suptitle(title or stat)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metric(
    histories: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    key: str = "val_accuracy",
) -> Path:
    """PNG of one logged metric (``val_accuracy``, ``loss``...) against the epoch, one line per run.

    Raises:
      ValueError: no run logged ``key``.
    """
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = 0
    for name, h in histories.items():
        pts = [(r.get("epoch", i), r[key]) for i, r in enumerate(h) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
            drawn += 1
    if not drawn:
        raise ValueError(f"plot_metric: no run logged {key!r}.")
    ax.set(xlabel="epoch", ylabel=key)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
