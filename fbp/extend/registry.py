"""Per-layer rules for quantities beyond the gradient, keyed by layer type.

A *rule* tells, for one layer type, how to run that layer's backward once and what
to keep from it (its *context*: usually the input from the residuals and the
output delta ``dy``), and how to turn that context into per-example quantities.
The layers themselves are unchanged: a rule only calls their ``backward`` (or, for
recurrent layers, ``backward_with_gate_deltas``) and reads their residuals.

``walk(model, params, res, dy)`` is ONE backward pass over a model that returns
``dx`` and a tree of ``Node``s, one per layer; ``quantity(node, name)`` then reads
any of the quantities below from it. With examples b = 1..B and ``g_b`` example
b's gradient (the gradient the layer's backward would give for ``dy`` restricted
to example b):

| name | result (tree of params' structure) | BackPACK |
| --- | --- | --- |
| ``batch_grad`` | ``g_b`` stacked, each leaf (batch, *leaf) | ``BatchGrad`` |
| ``batch_l2`` | ``‖g_b‖²`` per leaf, each (batch,) | ``BatchL2Grad`` |
| ``weighted`` | ``Σ_b w_b g_b`` for weights w (batch,), each leaf's shape | |
| ``sum_sq`` | ``Σ_b g_b²`` elementwise, each leaf's shape | ``SumGradSquared`` |

A layer that mixes examples (BatchNorm in train mode) or has no rule is refused
by ``check`` with an error naming it, before anything is traced; nothing falls
back to vmapping the model. ``register`` adds a rule for a new layer type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, Params, Residuals, layer_name


class Rule(NamedTuple):
    """How one layer type gives per-example quantities.

    Every function takes the layer (static) first. ``ctx`` is whatever ``backward``
    kept. ``batch_l2`` and ``sum_sq`` may be None: they are then computed from
    ``batch_grad`` (materialising the per-example gradients).
    """

    backward: Callable[[Layer, Params, Residuals, Array], tuple[Array, Any]]
    batch_grad: Callable[[Layer, Any], Params]
    weighted: Callable[[Layer, Any, Array], Params]
    batch_l2: Callable[[Layer, Any], Params] | None = None
    sum_sq: Callable[[Layer, Any], Params] | None = None
    children: Callable[[Layer], tuple[Layer, ...]] = lambda layer: ()
    check: Callable[[Layer, bool], str | None] = lambda layer, train: None


class Node(NamedTuple):
    """One layer's part of a walk: its rule, the layer, and what its backward kept."""

    rule: Rule
    layer: Layer
    ctx: Any


QUANTITIES = ("batch_grad", "batch_l2", "weighted", "sum_sq")

_RULES: dict[type, Rule] = {}


def register(layer_type: type, rule: Rule) -> None:
    """Use ``rule`` for every layer of ``layer_type`` (and its subclasses without a rule).

    Args:
      layer_type: an fbp layer class.
      rule: the per-example rule for it.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, Layer)):
        raise TypeError(f"fbp.extend.register: {layer_type!r} is not an fbp layer class.")
    if not isinstance(rule, Rule):
        raise TypeError(f"fbp.extend.register: rule must be an fbp.extend.Rule, got {rule!r}.")
    _RULES[layer_type] = rule


def supported() -> list[str]:
    """Names of the layer types with a rule, sorted."""
    return sorted(t.__name__ for t in _RULES)


class UnsupportedLayerError(ValueError):
    """A layer has no per-example rule, or mixes examples in the requested mode."""


def _describe(layer: Any) -> str:
    try:
        return layer_name(layer)
    except AttributeError:  # a half-built object
        return f"{type(layer).__name__}()"


def rule_for(layer: Layer) -> Rule:
    """The rule for ``layer``'s type (looked up along its class hierarchy)."""
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    raise UnsupportedLayerError(
        f"fbp.extend: {_describe(layer)} (type {type(layer).__module__}."
        f"{type(layer).__qualname__}) has no per-example rule; supported layer types are "
        f"{', '.join(supported())}. Add one with fbp.extend.register(); per-example "
        "quantities are never computed by vmapping the model."
    )


def check(model: Layer, *, train: bool = True) -> None:
    """Raise ``UnsupportedLayerError`` unless every layer of ``model`` has a rule and
    keeps the examples of a batch apart in this mode (``train``).

    Args:
      model: any fbp layer or container.
      train: the mode the quantities will be computed in (BatchNorm mixes examples
        in train mode only).
    """
    _check(model, train, "")


def _check(layer: Layer, train: bool, where: str) -> None:
    if not isinstance(layer, Layer):
        raise TypeError(f"fbp.extend: {where}{layer!r} is not an fbp layer.")
    try:
        rule = rule_for(layer)
    except UnsupportedLayerError as e:
        body = str(e).removeprefix("fbp.extend: ")
        raise UnsupportedLayerError(f"fbp.extend: {where}{body}") from None
    problem = rule.check(layer, train)
    if problem:
        raise UnsupportedLayerError(f"fbp.extend: {where}{layer_name(layer)} {problem}")
    for i, child in enumerate(rule.children(layer)):
        _check(child, train, f"{where}{layer_name(layer)} -> child {i}: ")


def walk(layer: Layer, params: Params, res: Residuals, dy: Array) -> tuple[Array, Node]:
    """One backward pass through ``layer``: ``dx`` and the node tree to read quantities from.

    Args:
      layer: the model (checked with ``check`` beforehand).
      params: its parameters.
      res: the residuals of ``layer.forward``.
      dy: the cotangent of its output, shape of the output (batch, ...).

    Returns:
      ``(dx, node)``; ``dx`` is exactly ``layer.backward(params, res, dy)[1]``.
    """
    rule = rule_for(layer)
    dx, ctx = rule.backward(layer, params, res, dy)
    return dx, Node(rule, layer, ctx)


def quantity(node: Node, name: str, *args: Any) -> Params:
    """Read one of ``QUANTITIES`` from a walked node (``weighted`` takes the weights)."""
    rule, layer, ctx = node
    if name == "batch_grad":
        return rule.batch_grad(layer, ctx)
    if name == "weighted":
        return rule.weighted(layer, ctx, *args)
    if name == "batch_l2":
        if rule.batch_l2 is not None:
            return rule.batch_l2(layer, ctx)
        return jax.tree.map(_sq_norm_per_example, rule.batch_grad(layer, ctx))
    if name == "sum_sq":
        if rule.sum_sq is not None:
            return rule.sum_sq(layer, ctx)
        return jax.tree.map(lambda g: jnp.sum(g * g, axis=0), rule.batch_grad(layer, ctx))
    raise ValueError(f"fbp.extend: unknown quantity {name!r}; expected one of {QUANTITIES}.")


def _sq_norm_per_example(g: Array) -> Array:
    """(batch, ...) -> (batch,): Σ over every axis but the first of g²."""
    return jnp.sum(g * g, axis=tuple(range(1, g.ndim)))


# ----------------------------------------------------------------------------- helpers


def seq_sq_norms(a: Array, d: Array) -> Array:
    """``‖Σ_t a_t d_tᵀ‖²_F`` per example, without forming the matrix when that is cheaper.

    ``‖Σ_t a_t d_tᵀ‖² = Σ_{t,s} (a_t·a_s)(d_t·d_s) = ⟨A Aᵀ, D Dᵀ⟩``: the Gram form costs
    T²(m + n) per example, the materialised form T·m·n; the cheaper one is used.
    With T = 1 it is ``‖a‖² ‖d‖²``.

    Args:
      a: (batch, T, m).
      d: (batch, T, n).

    Returns:
      (batch,).
    """
    t, m, n = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        return jnp.sum(a[:, 0] ** 2, axis=-1) * jnp.sum(d[:, 0] ** 2, axis=-1)
    if gram_is_cheaper(t, m, n):
        ga = jnp.einsum("bti,bsi->bts", a, a)
        gd = jnp.einsum("btj,bsj->bts", d, d)
        return jnp.sum(ga * gd, axis=(1, 2))
    return _sq_norm_per_example(outer_sum(a, d))


def gram_is_cheaper(t: int, m: int, n: int) -> bool:
    """Whether the Gram form (T²(m + n) per example) beats the materialised one (T·m·n)."""
    return t > 1 and t * (m + n) < m * n


def outer_sum(a: Array, d: Array) -> Array:
    """``Σ_t a_t d_tᵀ`` per example: (batch, T, m), (batch, T, n) -> (batch, m, n)."""
    if a.shape[1] == 1:
        return a[:, 0, :, None] * d[:, 0, None, :]
    return jnp.einsum("bti,btj->bij", a, d)


def weighted_outer(a: Array, d: Array, w: Array) -> Array:
    """``Σ_b w_b Σ_t a_bt d_btᵀ``: one matmul over the flattened (batch·T) rows."""
    dw = d * w.astype(d.dtype)[:, None, None]
    return a.reshape(-1, a.shape[-1]).T @ dw.reshape(-1, d.shape[-1])


def seq_weighted_outer(a: Array, d: Array, w: Array, n: int | None = None) -> Array:
    """``Σ_b w_b Σ_t a_bt d_btᵀ``, sharing its product with ``seq_sq_norms`` (book-keeping).

    Where the norms materialise ``G_b = Σ_t a_bt d_btᵀ`` (T > 1 and the Gram form is
    not cheaper) the sum is ``Σ_b w_b G_b`` over that same product: in one jitted
    function XLA computes it once, so a DP clipped sum costs no second weight-gradient
    matmul (fastDP's book-keeping, Bu et al. 2023). Elsewhere it is ``weighted_outer``.
    Both cost B·T·m·n multiply-adds.

    Args:
      a: (batch, T, m).
      d: (batch, T, k·n) (the columns of k projections fused; n = d's width by default).
      w: (batch,).
      n: the width the norms' choice of form was made with (a fused block's).

    Returns:
      (m, k·n).
    """
    t, m = a.shape[1], a.shape[2]
    if t == 1 or gram_is_cheaper(t, m, n or d.shape[2]):
        return weighted_outer(a, d, w)
    return jnp.einsum("b,bij->ij", w.astype(d.dtype), outer_sum(a, d))


def to_btf(v: Array) -> Array:
    """(batch, ..., f) -> (batch, T, f): the middle axes flattened into T (1 if none)."""
    return v.reshape(v.shape[0], -1, v.shape[-1])
