"""Per-example rules for containers and wrappers: they walk their inner layers.

``Sequential`` walks its layers last to first (the chain rule), ``Residual`` adds
the skip's ``dy`` to the inner ``dx``, ``Recompute`` re-runs the inner forward for
its residuals first, ``Bidirectional`` walks its two recurrent layers (the second on
the time-reversed deltas), and ``Frozen`` passes ``dx`` and gives zero per-example
gradients, as its backward gives zero ``dparams``. Each container's quantities have
exactly its params' tree structure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp.core import Sequential
from fbp.extend.registry import Rule, quantity, register, walk
from fbp.nn.combinators import Residual
from fbp.nn.sequence import Bidirectional, reverse_padded
from fbp.nn.wrappers import Frozen, Recompute


def _delegate(name):
    """A quantity of a container: the same quantity of its inner node(s), same keys."""

    def f(layer, ctx, *args):
        if isinstance(ctx, dict):
            return {k: quantity(node, name, *args) for k, node in ctx.items()}
        return quantity(ctx, name, *args)

    return f


def container_rule(backward, children) -> Rule:
    """A rule whose quantities are its backward's nodes' (ctx: a Node or {key: Node})."""
    return Rule(
        backward,
        _delegate("batch_grad"),
        _delegate("weighted"),
        _delegate("batch_l2"),
        _delegate("sum_sq"),
        children=children,
    )


def _sequential_backward(layer, params, res, dy):
    nodes = {}
    for i in reversed(range(len(layer.layers))):
        dy, nodes[str(i)] = walk(layer.layers[i], params[str(i)], res[i], dy)
    return dy, {str(i): nodes[str(i)] for i in range(len(layer.layers))}


def _residual_backward(layer, params, res, dy):
    dx, node = walk(layer.layer, params, res, dy)
    return dy + dx, node


def _recompute_backward(layer, params, res, dy):
    inner, dy = layer.recompute(params, res, dy)
    return walk(layer.layer, params, inner, dy)


def _bidirectional_backward(layer, params, res, dy):
    h = dy.shape[-1] // 2
    dx_f, node_f = walk(layer.layer, params["forward"], res.fwd, dy[..., :h])
    dy_b = reverse_padded(dy[..., h:], res.lengths)
    dx_b, node_b = walk(layer.layer, params["backward"], res.bwd, dy_b)
    dx = dx_f + reverse_padded(dx_b, res.lengths)
    return dx, {"forward": node_f, "backward": node_b}


def _frozen_backward(layer, params, res, dy):
    """ctx: (params' shapes, batch): the per-example gradients are zeros."""
    _, dx = layer.backward(params, res, dy)
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    return dx, (shapes, dy.shape[0])


def _frozen_batch_grad(layer, ctx):
    shapes, batch = ctx
    return jax.tree.map(lambda s: jnp.zeros((batch, *s.shape), s.dtype), shapes)


def _frozen_batch_l2(layer, ctx):
    shapes, batch = ctx
    return jax.tree.map(lambda s: jnp.zeros((batch,), s.dtype), shapes)


def _frozen_total(layer, ctx, *args):
    shapes, _ = ctx
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


_one_child = lambda layer: (layer.layer,)  # noqa: E731

register(Sequential, container_rule(_sequential_backward, lambda layer: layer.layers))
register(Residual, container_rule(_residual_backward, _one_child))
register(Recompute, container_rule(_recompute_backward, _one_child))
register(Bidirectional, container_rule(_bidirectional_backward, _one_child))
register(
    Frozen,
    Rule(
        _frozen_backward,
        _frozen_batch_grad,
        _frozen_total,
        _frozen_batch_l2,
        _frozen_total,
        children=_one_child,
    ),
)
