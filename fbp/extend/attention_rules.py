"""Per-example rules for attention models: MultiHeadAttention, TransformerBlock, positions.

``MultiHeadAttention``'s four projections are Dense layers applied at every position;
the attention core (scores, softmax, dropout, rope) has no parameters. So one
backward of the layer, written with the same public pieces as its own backward
(``sdpa_backward``, ``rope_backward``), keeps for each projection its input ``a``
and the delta ``δ`` of its output, both (batch, T, ·):

    self-attention:   a = x  for δ = [dq dk dv] (rope undone),  a = o  for δ = dy
    cross-attention:  a = x  for δ = dq,  a = c for δ = [dk dv],  a = o for δ = dy

and every quantity is a sequence outer product, as for a Dense layer over positions:
``g_b(w_n) = Σ_t a_bt δ_btᵀ`` (columns of projection n), ``g_b(b_n) = Σ_t δ_bt``. The
squared norms use the Gram form ``⟨A Aᵀ, Δ_n Δ_nᵀ⟩`` when T(m + n) < m·n, the
materialised product otherwise (one product for the fused [q k v] columns, split after).
Padded steps (``lengths``) have zero deltas: the layer masks ``dy`` on padded queries
and padded keys get zero attention, so they add nothing. Dropout and both memory
modes are handled by ``sdpa_backward`` from the residuals.

``TransformerBlock`` walks its parts (LN₁, attention, output dropout, the MLP half);
``LearnedPositions``: ``g_b(w)[t] = δ_bt`` for t < T, zero below; ``SinusoidalPositions``
has no parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from fbp.core import Array
from fbp.extend.container_rules import container_rule
from fbp.extend.layer_rules import PASS_THROUGH
from fbp.extend.registry import (
    Rule,
    gram_is_cheaper,
    outer_sum,
    register,
    seq_weighted_outer,
    walk,
)
from fbp.nn.attention import sdpa_backward, sdpa_output
from fbp.nn.mha import MultiHeadAttention
from fbp.nn.positional import LearnedPositions, SinusoidalPositions, rope_backward
from fbp.nn.transformer import TransformerBlock


class Projection(NamedTuple):
    """One fused projection of an attention layer: y = a [w_n1 w_n2 ...] (+ b)."""

    a: Array  # (batch, T, m): its input
    d: Array  # (batch, T, k·n): the delta of its output, k = len(names)
    names: str  # the projections fused in its columns, e.g. "qkv" -> w_q, w_k, w_v


def _split_heads(a: Array, heads: int) -> Array:
    """(batch, time, heads·d) -> (batch, heads, time, d)."""
    b, t, inner = a.shape
    return a.reshape(b, t, heads, inner // heads).transpose(0, 2, 1, 3)


def _merge_heads(a: Array) -> Array:
    """(batch, heads, time, d) -> (batch, time, heads·d)."""
    b, h, t, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _fused(params, names: str) -> Array:
    return jnp.concatenate([params[f"w_{n}"] for n in names], axis=1)


def _mha_backward(layer, params, res, dy):
    """dx as ``MultiHeadAttention.backward``; ctx: the projections' (a, δ), (batch, T, ·)."""
    if res.qmask is not None:
        dy = dy * res.qmask
    o = _merge_heads(sdpa_output(res.attn))
    do = _split_heads(dy @ params["w_o"].T, layer.num_heads)
    dq, dk, dv = sdpa_backward(res.attn, do)
    if layer.rope:
        dq, dk = (rope_backward(g, base=layer.rope_base) for g in (dq, dk))
    dq, dk, dv = _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)
    out = Projection(o, dy, "o")
    if res.context is None:
        dqkv = jnp.concatenate([dq, dk, dv], -1)
        return dqkv @ _fused(params, "qkv").T, (Projection(res.x, dqkv, "qkv"), out)
    dkv = jnp.concatenate([dk, dv], -1)
    dx = (dq @ params["w_q"].T, dkv @ _fused(params, "kv").T)
    return dx, (Projection(res.x, dq, "q"), Projection(res.context, dkv, "kv"), out)


def _columns(g: Array, k: int) -> list[Array]:
    """Split the last axis of g into k equal blocks."""
    return jnp.split(g, k, axis=-1) if k > 1 else [g]


def _per_projection(layer, ctx, weights, bias) -> dict:
    """{w_n: weights(p)[i], b_n: bias(p)[i]} over the projections p of ctx."""
    out = {}
    for p in ctx:
        ws, bs = weights(p), bias(p)
        for i, n in enumerate(p.names):
            out[f"w_{n}"] = ws[i]
            if layer.use_bias:
                out[f"b_{n}"] = bs[i]
    return out


def _mha_batch_grad(layer, ctx):
    k = lambda p: len(p.names)  # noqa: E731
    return _per_projection(
        layer,
        ctx,
        lambda p: _columns(outer_sum(p.a, p.d), k(p)),
        lambda p: _columns(jnp.sum(p.d, axis=1), k(p)),
    )


def block_sq_norms(a: Array, d: Array, k: int) -> list[Array]:
    """``‖Σ_t a_t δ_tᵀ‖²`` per example for each of the k column blocks of δ.

    Gram form ``⟨A Aᵀ, Δ_i Δ_iᵀ⟩`` (A Aᵀ formed once) when T(m + n) < m·n, else the
    product formed once for all blocks and split.

    Args:
      a: (batch, T, m).
      d: (batch, T, k·n).
      k: number of column blocks.

    Returns:
      k arrays of shape (batch,).
    """
    t, m, n = a.shape[1], a.shape[2], d.shape[2] // k
    if gram_is_cheaper(t, m, n):
        ga = jnp.einsum("bti,bsi->bts", a, a)
        return [
            jnp.sum(ga * jnp.einsum("btj,bsj->bts", di, di), axis=(1, 2)) for di in _columns(d, k)
        ]
    g = outer_sum(a, d).reshape(a.shape[0], m, k, n)
    return list(jnp.moveaxis(jnp.sum(g * g, axis=(1, 3)), 1, 0))


def _mha_batch_l2(layer, ctx):
    def bias(p):
        return [jnp.sum(s * s, axis=-1) for s in _columns(jnp.sum(p.d, axis=1), len(p.names))]

    return _per_projection(layer, ctx, lambda p: block_sq_norms(p.a, p.d, len(p.names)), bias)


def _mha_weighted(layer, ctx, w):
    k = lambda p: len(p.names)  # noqa: E731
    return _per_projection(
        layer,
        ctx,
        lambda p: _columns(seq_weighted_outer(p.a, p.d, w, p.d.shape[2] // k(p)), k(p)),
        lambda p: _columns(jnp.einsum("b,btj->j", w.astype(p.d.dtype), p.d), k(p)),
    )


MHA = Rule(_mha_backward, _mha_batch_grad, _mha_weighted, _mha_batch_l2)

# ----------------------------------------------------------------------------- block


def _block_backward(layer, params, res, dy):
    """dx as ``TransformerBlock.backward``; ctx: {ln1, attn, mlp: Node} (dropout: no params)."""
    if res.mask is not None:
        dy = dy * res.mask
    ln1, attn, drop, mlp = layer.parts(dy.shape[-1])
    da, node_mlp = walk(mlp, params["mlp"], res.mlp, dy)
    _, d_attn_out = drop.backward({}, res.drop, da)
    dh, node_attn = walk(attn, params["attn"], res.attn, d_attn_out)
    dx, node_ln1 = walk(ln1, params["ln1"], res.ln1, dh)
    return da + dx, {"ln1": node_ln1, "attn": node_attn, "mlp": node_mlp}


BLOCK = container_rule(_block_backward, lambda layer: layer.parts(1))

# ----------------------------------------------------------------------------- positions


def _learned_backward(layer, params, res, dy):
    """ctx: (δ (batch, T, features), max_len)."""
    return dy, (dy, params["w"].shape[0])


def _pad_rows(g: Array, rows: int, axis: int) -> Array:
    """Zero rows appended along ``axis`` up to ``rows``."""
    pad = [(0, 0)] * g.ndim
    pad[axis] = (0, rows - g.shape[axis])
    return jnp.pad(g, pad)


def _learned_batch_grad(layer, ctx):
    d, rows = ctx
    return {"w": _pad_rows(d, rows, 1)}


def _learned_batch_l2(layer, ctx):
    d, _ = ctx
    return {"w": jnp.sum(d * d, axis=(1, 2))}


def _learned_weighted(layer, ctx, w):
    d, rows = ctx
    return {"w": _pad_rows(jnp.einsum("b,btf->tf", w.astype(d.dtype), d), rows, 0)}


def _learned_sum_sq(layer, ctx):
    d, rows = ctx
    return {"w": _pad_rows(jnp.sum(d * d, axis=0), rows, 0)}


LEARNED = Rule(
    _learned_backward, _learned_batch_grad, _learned_weighted, _learned_batch_l2, _learned_sum_sq
)


register(MultiHeadAttention, MHA)
register(TransformerBlock, BLOCK)
register(LearnedPositions, LEARNED)
register(SinusoidalPositions, PASS_THROUGH)
