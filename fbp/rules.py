"""Alternative learning rules as a choice of backward mode: the model stays as it is.

Backprop sends a Dense layer's error to its input through the transposed forward
weights, ``dx = dy wᵀ``. Each rule here changes only that line, for every
``nn.Dense`` in a ``Sequential``; everything else (activation derivatives, the
weight gradient ``dw = xᵀ dy``, ``db = Σ dy``, the loss) is the ordinary backward:

| rule | dx of a Dense layer | reference |
| --- | --- | --- |
| ``"backprop"`` | ``dy wᵀ`` | |
| ``"feedback_alignment"`` | ``dy Bᵀ``, B fixed random, shape (in, out) | Lillicrap et al. 2016 |
| ``"direct_feedback_alignment"`` | ``e B``, e = dL/dpred, B (n_out, in) | Nøkland 2016 |
| ``"sign_symmetry"`` | ``dy sign(w)ᵀ`` | Liao, Leibo & Poggio 2016 |

So the last Dense layer's weight gradient is always backprop's (its dy is the true
output error); earlier layers learn from a signal that only aligns with the gradient.
``alignment_angles`` measures that, per layer.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fbp import nn, losses, rules
  >>> model = nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])
  >>> x, labels = jnp.ones((4, 5)), jnp.arange(4) % 3
  >>> params = model.init(jax.random.key(0), x)
  >>> fb = rules.init_feedback(model, "feedback_alignment", jax.random.key(1), x)
  >>> fa = rules.value_and_grad(model, losses.softmax_cross_entropy, "feedback_alignment", fb)
  >>> (value, aux), grads = fa(params, x, labels)
  >>> grads['0']['w'].shape
  (5, 8)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

from fbp.core import (
    Array,
    Aux,
    LossFunction,
    Params,
    PenaltyFunction,
    Sequential,
    as_struct,
    layer_name,
    model_lengths_kw,
)
from fbp.core import value_and_grad as _bp_value_and_grad
from fbp.nn.dense import Dense
from fbp.nn.initializers import get as _get_init

RULES = ("backprop", "feedback_alignment", "direct_feedback_alignment", "sign_symmetry")
Feedback = dict  # layer index (str) -> fixed feedback matrix


def _check(model: Any, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rules: unknown rule {rule!r}; expected one of {list(RULES)}.")
    if not isinstance(model, Sequential):
        raise ValueError(f"rules: {rule} needs an nn.Sequential model, got {layer_name(model)}.")


def _dense_indices(model: Sequential, params_shapes: Params, rule: str) -> list[int]:
    """Indices of the Dense layers; other layers must be parameter-free."""
    out = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Dense):
            out.append(i)
        elif jax.tree.leaves(params_shapes[str(i)]):
            raise ValueError(
                f"rules: {rule} is defined for nn.Dense layers; layer {i} ({layer_name(layer)}) "
                "has parameters but is not a Dense."
            )
    return out


def init_feedback(model: Sequential, rule: str, key: Array, x: Any) -> Feedback:
    """The fixed random feedback matrices of a rule, for inputs shaped like ``x``.

    Drawn with each Dense layer's own ``w_init`` (Glorot uniform by default), in the
    dtype of its weights; they never change during training.

    Args:
      model: an ``nn.Sequential`` of Dense and parameter-free layers.
      rule: one of ``RULES``.
      key: PRNG key.
      x: example input (only shape and dtype are read), shape (batch, in).

    Returns:
      ``{'i': B_i}`` per Dense layer i: B of w's shape (in, out) for feedback alignment,
      (n_out, in) for direct feedback alignment; ``{}`` for backprop and sign symmetry.

    Raises:
      ValueError: unknown rule, a model that is not a Sequential, or a parametrised
        layer other than Dense.
    """
    _check(model, rule)
    shapes = jax.eval_shape(model.init, jax.random.key(0), as_struct(x))
    dense = _dense_indices(model, shapes, rule)
    if rule not in ("feedback_alignment", "direct_feedback_alignment"):
        return {}
    n_out = jax.eval_shape(model.apply, shapes, as_struct(x)).shape[-1]
    keys = jax.random.split(key, len(dense))
    out = {}
    for k, i in zip(keys, dense, strict=True):
        w = shapes[str(i)]["w"]
        shape = w.shape if rule == "feedback_alignment" else (n_out, w.shape[0])
        dense_layer = cast(Dense, model.layers[i])  # _dense_indices: Dense layers only
        out[str(i)] = _get_init(dense_layer.w_init)(k, shape, w.dtype)
    return out


def _backward(model, params, res, dpred, rule, feedback, dense):
    """Sequential backward with each Dense layer's dx replaced by the rule's signal."""
    dparams, dy = {}, dpred
    for i in reversed(range(len(model.layers))):
        k = str(i)
        dparams[k], dx = model.layers[i].backward(params[k], res[i], dy)
        if i in dense and rule == "feedback_alignment":
            dx = dy @ feedback[k].T
        elif i in dense and rule == "direct_feedback_alignment":
            dx = dpred @ feedback[k]
        elif i in dense and rule == "sign_symmetry":
            dx = dy @ jnp.sign(params[k]["w"]).T
        dy = dx
    return {str(i): dparams[str(i)] for i in range(len(model.layers))}


def value_and_grad(
    model: Sequential,
    loss: LossFunction,
    rule: str,
    feedback: Feedback | None = None,
    *,
    penalty: PenaltyFunction | None = None,
) -> Callable:
    """A ``grad_fn`` for ``fbp.train.step_fn(grad_fn=...)`` that learns by ``rule``.

    Same signature and outputs as ``fbp.value_and_grad(model, loss, has_aux=True)``:
    ``f(params, x, target, *, key=None, state=None, train=True, lengths=None) ->
    ((loss, Aux), grads)``;
    the "grads" are the rule's weight updates (before the optimizer), not dL/dθ,
    except for ``"backprop"``.

    Args:
      model: an ``nn.Sequential`` of Dense and parameter-free layers.
      loss: an fbp loss.
      rule: one of ``RULES``.
      feedback: ``init_feedback(model, rule, key, x)``; needed by the two
        feedback-alignment rules, ignored otherwise.
      penalty: optional weight penalty, added as in ``fbp.value_and_grad``.

    Raises:
      ValueError: unknown rule, a model that is not a Sequential, or missing feedback
        matrices (at trace time, naming the layer).
    """
    _check(model, rule)
    if rule == "backprop":
        return _bp_value_and_grad(model, loss, penalty=penalty, has_aux=True)
    feedback = feedback or {}

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        dense = _dense_indices(model, params, rule)
        missing = [i for i in dense if rule != "sign_symmetry" and str(i) not in feedback]
        if missing:
            raise ValueError(
                f"rules: {rule} needs a feedback matrix for Dense layer(s) {missing}; "
                "pass feedback=rules.init_feedback(model, rule, key, x)."
            )
        kw = model_lengths_kw("rules.value_and_grad", model, lengths)
        pred, res = model.forward(params, x, key=key, state=state, train=train, **kw)
        value = loss(pred, target)
        grads = _backward(model, params, res, loss.backward(pred, target), rule, feedback, dense)
        if penalty is not None:
            value = value + penalty(params)
            grads = jax.tree.map(jnp.add, grads, penalty.backward(params))
        return (value, Aux(pred, model.next_state(state, res))), grads

    return f


def alignment_angles(update: Params, grads: Params) -> dict[str, Array]:
    """Angle in degrees between a rule's weight update and the true gradient, per layer.

    Args:
      update, grads: trees like a Sequential's params (``{'i': {'w': (in, out), ...}}``).

    Returns:
      ``{'angle/i': degrees}`` for every layer with a ``'w'``: 0 is the gradient's
      direction, 90 orthogonal to it.
    """
    out = {}
    for k in sorted(grads, key=int):
        if not isinstance(grads[k], dict) or "w" not in grads[k]:
            continue
        a, b = update[k]["w"].ravel(), grads[k]["w"].ravel()
        cos = jnp.vdot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)
        out[f"angle/{k}"] = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
    return out


def alignment_probe(model: Sequential, loss: LossFunction, grad_fn: Callable) -> Callable:
    """A jitted probe ``(ts, x, y) -> {'angle/i': degrees}``: ``grad_fn``'s update vs backprop.

    Args:
      model, loss: the trained model and loss.
      grad_fn: the rule's ``value_and_grad(model, loss, rule, feedback)``.
    """
    bp = _bp_value_and_grad(model, loss, has_aux=True)

    @jax.jit
    def probe(ts, x, y):
        state = ts.model_state if ts.model_state else None
        _, update = grad_fn(ts.params, x, y, state=state, train=False)
        _, grads = bp(ts.params, x, y, state=state, train=False)
        return alignment_angles(update, grads)

    return probe


def grad_fn(model: Sequential, loss: LossFunction, rule: str, key: Array, x: Any) -> Callable:
    """``value_and_grad(model, loss, rule, init_feedback(model, rule, key, x))`` in one call.

    The result goes to ``fbp.train.step_fn(grad_fn=...)``; ``x``: an example input,
    shape (batch, in), for the feedback matrices' shapes.
    """
    return value_and_grad(model, loss, rule, init_feedback(model, rule, key, x))


def make(model: Sequential, loss: LossFunction, rule: str, key: Array, x: Any) -> Callable:
    """Deprecated name of ``grad_fn`` (a factory is named after what it returns); x (batch, in)."""
    warnings.warn(
        "fbp.rules.make is deprecated and will be removed in the next release; "
        "use fbp.rules.grad_fn (same arguments).",
        DeprecationWarning,
        stacklevel=2,
    )
    return grad_fn(model, loss, rule, key, x)
