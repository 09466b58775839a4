"""Per-example rules for the feed-forward layers: Dense, Conv1D/2D, Embedding, norms,
and the parameter-free layers that keep examples apart.

Per example b the weight gradient of a layer ``y = x w`` is ``g_b = Σ_t x_bt δ_btᵀ``
(t runs over every position the same weights are applied at: 1 for a plain Dense,
the steps of a sequence, the output pixels of a convolution), so everything is read
from the input ``x`` the residuals keep and the output delta ``δ = dy``:

* Dense: ``g_b = Σ_t x_bt δ_btᵀ``; ``‖g_b‖² = ‖x_b‖² ‖δ_b‖²`` for T = 1, else
  ``⟨X_b X_bᵀ, Δ_b Δ_bᵀ⟩`` (``registry.seq_sq_norms``); ``Σ_b w_b g_b = Xᵀ (w ⊙ Δ)``.
* Conv: the same with ``x`` replaced by its patches (im2col, in the (kernel..., in)
  order of ``w``); ``Σ_b w_b g_b`` is the layer's own ``dw`` of ``w ⊙ dy``.
* Embedding: ``g_b[v] = Σ_{t: id_bt = v} δ_bt``; ``‖g_b‖² = Σ_{t,s} [id_t = id_s] δ_t·δ_s``.
* LayerNorm (and BatchNorm in eval mode): ``scale_b = Σ_t δ_bt x̂_bt``, ``bias_b = Σ_t δ_bt``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fbp.extend.registry import (
    Rule,
    outer_sum,
    register,
    seq_sq_norms,
    seq_weighted_outer,
    to_btf,
)
from fbp.nn.activations import (
    ELU,
    GELU,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)
from fbp.nn.conv import Conv1D, Conv2D
from fbp.nn.dense import Dense
from fbp.nn.dropout import Dropout
from fbp.nn.embedding import Embedding
from fbp.nn.norm import BatchNorm, LayerNorm
from fbp.nn.pooling import AvgPool2D, Flatten, GlobalAvgPool, MaxPool2D, Reshape
from fbp.nn.sequence import LastStep

# ----------------------------------------------------------------------------- Dense


def _dense_backward(layer, params, res, dy):
    """ctx: (x, δ), each (batch, T, features)."""
    _, dx = layer.backward(params, res, dy)
    return dx, (to_btf(res.x), to_btf(dy))


def _dense_batch_grad(layer, ctx):
    x, d = ctx
    out = {"w": outer_sum(x, d)}
    if layer.use_bias:
        out["b"] = jnp.sum(d, axis=1)
    return out


def _dense_batch_l2(layer, ctx):
    x, d = ctx
    out = {"w": seq_sq_norms(x, d)}
    if layer.use_bias:
        out["b"] = jnp.sum(jnp.sum(d, axis=1) ** 2, axis=-1)
    return out


def _dense_weighted(layer, ctx, w):
    x, d = ctx
    out = {"w": seq_weighted_outer(x, d, w)}  # shares the norms' product where they form it
    if layer.use_bias:
        out["b"] = jnp.einsum("b,btj->j", w.astype(d.dtype), d)
    return out


def _dense_sum_sq(layer, ctx):
    x, d = ctx
    if x.shape[1] == 1:  # Σ_b (x_b²)(δ_b²)ᵀ: one matmul, nothing per example
        out = {"w": (x[:, 0] ** 2).T @ (d[:, 0] ** 2)}
    else:
        out = {"w": jnp.sum(outer_sum(x, d) ** 2, axis=0)}
    if layer.use_bias:
        out["b"] = jnp.sum(jnp.sum(d, axis=1) ** 2, axis=0)
    return out


DENSE = Rule(_dense_backward, _dense_batch_grad, _dense_weighted, _dense_batch_l2, _dense_sum_sq)

# ----------------------------------------------------------------------------- Conv


def conv_patches(layer, x):
    """im2col: (batch, *spatial, in) -> (batch, L, K), K in ``w``'s (*kernel, in) order.

    L is the number of output positions; ``y = patches @ w.reshape(K, out)``.
    """
    n = layer._n
    pads = layer.geometry(x, "per-example")
    dims = ("NHWC", "HWIO", "NHWC") if n == 2 else ("NWC", "WIO", "NWC")
    p = lax.conv_general_dilated_patches(
        x,
        layer.kernel_size,
        layer.strides,
        pads,
        rhs_dilation=layer.dilation,
        dimension_numbers=dims,
    )
    # XLA orders the patch features (in, *kernel), channels slowest; w is (*kernel, in).
    batch, cin, taps = x.shape[0], x.shape[-1], math.prod(layer.kernel_size)
    p = p.reshape(batch, -1, cin, taps)
    return jnp.swapaxes(p, 2, 3).reshape(batch, -1, taps * cin)


def _conv_backward(layer, params, res, dy):
    """ctx: (x, dy) as the layer has them; patches are formed only where needed."""
    _, dx = layer.backward(params, res, dy)
    return dx, (res.x, dy)


def _conv_batch_grad(layer, ctx):
    x, dy = ctx
    d = to_btf(dy)
    g = jnp.einsum("blk,blo->bko", conv_patches(layer, x), d)
    out = {"w": g.reshape(x.shape[0], *layer.kernel_size, x.shape[-1], d.shape[-1])}
    if layer.use_bias:
        out["b"] = jnp.sum(d, axis=1)
    return out


def _conv_batch_l2(layer, ctx):
    x, dy = ctx
    d = to_btf(dy)
    out = {"w": seq_sq_norms(conv_patches(layer, x), d)}
    if layer.use_bias:
        out["b"] = jnp.sum(jnp.sum(d, axis=1) ** 2, axis=-1)
    return out


def _conv_weighted(layer, ctx, w):
    x, dy = ctx
    dyw = dy * w.astype(dy.dtype).reshape((-1,) + (1,) * (dy.ndim - 1))
    out = {"w": layer.weight_grad(x, dyw, layer.geometry(x, "per-example"))}
    if layer.use_bias:
        out["b"] = jnp.sum(dyw, axis=tuple(range(dy.ndim - 1)))
    return out


CONV = Rule(_conv_backward, _conv_batch_grad, _conv_weighted, _conv_batch_l2)

# ----------------------------------------------------------------------------- Embedding


def _embedding_backward(layer, params, res, dy):
    """ctx: (ids (batch, T), δ (batch, T, features))."""
    _, dx = layer.backward(params, res, dy)
    batch = res.ids.shape[0]
    return dx, (res.ids.reshape(batch, -1), dy.reshape(batch, -1, dy.shape[-1]))


def _embedding_batch_grad(layer, ctx):
    ids, d = ctx
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    g = jnp.zeros((ids.shape[0], layer.vocab, layer.features), d.dtype)
    return {"w": g.at[rows, ids].add(d, mode="drop")}


def _embedding_batch_l2(layer, ctx):
    ids, d = ctx
    t = ids.shape[1]
    if t * t > layer.vocab:  # the Gram form costs T²·F, the materialised one V·F
        return {"w": jnp.sum(_embedding_batch_grad(layer, ctx)["w"] ** 2, axis=(1, 2))}
    v = jnp.where(ids < 0, ids + layer.vocab, ids)
    valid = (v >= 0) & (v < layer.vocab)
    same = (v[:, :, None] == v[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gram = jnp.einsum("btf,bsf->bts", d, d)
    return {"w": jnp.sum(jnp.where(same, gram, 0), axis=(1, 2))}


def _embedding_weighted(layer, ctx, w):
    ids, d = ctx
    dw = d * w.astype(d.dtype)[:, None, None]
    g = jnp.zeros((layer.vocab, layer.features), d.dtype)
    return {"w": g.at[ids.reshape(-1)].add(dw.reshape(-1, d.shape[-1]), mode="drop")}


EMBEDDING = Rule(
    _embedding_backward, _embedding_batch_grad, _embedding_weighted, _embedding_batch_l2
)

# ----------------------------------------------------------------------------- norms


def _norm_backward(layer, params, res, dy):
    """ctx: (x̂, δ), each (batch, T, features)."""
    _, dx = layer.backward(params, res, dy)
    return dx, (to_btf(res.xhat), to_btf(dy))


def _norm_batch_grad(layer, ctx):
    xhat, d = ctx
    return {"scale": jnp.sum(d * xhat, axis=1), "bias": jnp.sum(d, axis=1)}


def _norm_weighted(layer, ctx, w):
    return jax.tree.map(
        lambda g: jnp.einsum("b,bf->f", w.astype(g.dtype), g), _norm_batch_grad(layer, ctx)
    )


def _batchnorm_check(layer, train):
    if train:
        return (
            "in train mode normalises with batch statistics, which mixes the examples of "
            "a batch, so per-example gradients are not defined; use train=False (running "
            "statistics) or LayerNorm."
        )
    return None


LAYERNORM = Rule(_norm_backward, _norm_batch_grad, _norm_weighted)
BATCHNORM = LAYERNORM._replace(check=_batchnorm_check)

# ----------------------------------------------------------------------------- no params


def _pass_backward(layer, params, res, dy):
    _, dx = layer.backward(params, res, dy)
    return dx, None


def _empty(layer, ctx, *args):
    return {}


def _softmax_check(layer, train):
    if layer.axis == 0:
        return "normalises over axis 0, the batch axis, which mixes examples."
    return None


def _softmax_backward(layer, params, res, dy):
    if layer.axis % dy.ndim == 0:
        raise ValueError(
            f"fbp.extend: Softmax(axis={layer.axis}) normalises over the batch axis of its "
            f"{dy.ndim}-d input, which mixes examples."
        )
    return _pass_backward(layer, params, res, dy)


PASS_THROUGH = Rule(_pass_backward, _empty, _empty, _empty, _empty)

for _t, _rule in [
    (Dense, DENSE),
    (Conv1D, CONV),
    (Conv2D, CONV),
    (Embedding, EMBEDDING),
    (LayerNorm, LAYERNORM),
    (BatchNorm, BATCHNORM),
    (Softmax, PASS_THROUGH._replace(backward=_softmax_backward, check=_softmax_check)),
]:
    register(_t, _rule)
for _t in (Identity, Sigmoid, Tanh, ReLU, LeakyReLU, ELU, GELU, Softplus, Dropout):
    register(_t, PASS_THROUGH)
for _t in (MaxPool2D, AvgPool2D, GlobalAvgPool, Flatten, Reshape, LastStep):
    register(_t, PASS_THROUGH)
