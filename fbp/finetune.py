"""Per-layer optimizers for fine-tuning: label a Sequential's params by layer for optax.

``optax.multi_transform`` takes a tree of labels with the params' structure; for a
``Sequential`` the natural label is the layer index. ``per_layer`` builds the whole
transformation: a learning rate (or any optax transformation) per layer, and
``optax.set_to_zero()`` for layers given ``None``.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbp import nn, finetune
  >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(2)])
  >>> params = model.init(jax.random.key(0), jnp.ones((3, 5)))
  >>> labels = finetune.layer_labels(params, {'2': 'head'})
  >>> labels['2']['w'], labels['0']['b']
  ('head', '0')
  >>> tx = finetune.per_layer({'0': optax.sgd(1e-4), '2': optax.sgd(1e-2)})
  >>> state = tx.init(params)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fbp.core import Params


def layer_labels(params: Params, names: Mapping[str, str] | None = None) -> Any:
    """A label per parameter leaf: its layer's key (``'0'``, ``'1'``...), or ``names[key]``.

    Args:
      params: a Sequential's parameters ``{'0': {...}, '1': {}, ...}``.
      names: optional layer key -> label, e.g. ``{'4': 'head'}``; other layers keep their key.

    Raises:
      ValueError: a key of ``names`` is not a layer of ``params``.
    """
    names = dict(names or {})
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ValueError(
            f"layer_labels: {unknown} are not layers of params (layers: {sorted(params)})."
        )
    return {k: jax.tree.map(lambda _, k=k: names.get(k, k), v) for k, v in params.items()}


def per_layer(
    transforms: Mapping[str, optax.GradientTransformation | float | None],
    default: optax.GradientTransformation | float | None = None,
    *,
    make: Callable[[float], optax.GradientTransformation] = optax.adam,
) -> optax.GradientTransformation:
    """One optax transformation per layer of a Sequential, through ``optax.multi_transform``.

    Args:
      transforms: layer key -> an optax transformation, a learning rate (``make(lr)``),
        or None (the layer's updates are zero: frozen by the optimizer).
      default: the same for layers not in ``transforms`` (None: frozen).
      make: builds a transformation from a learning rate (Adam by default).

    Returns:
      An ``optax.GradientTransformation`` for the Sequential's whole params tree.
    """

    def build(t):
        if t is None:
            return optax.set_to_zero()
        if isinstance(t, (int, float)):
            return make(float(t))
        return t

    txs = {k: build(t) for k, t in transforms.items()}
    txs["__default__"] = build(default)

    def labels(params):
        return {
            k: jax.tree.map(lambda _, k=k: k if k in transforms else "__default__", v)
            for k, v in params.items()
        }

    return optax.multi_transform(txs, labels)
