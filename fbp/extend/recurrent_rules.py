"""Per-example rules for SimpleRNN, LSTM and GRU: weight gradients summed over time.

The reverse scan of ``backward_with_gate_deltas`` returns, per step, the cotangent
of the gate pre-activations; the step inputs are in the residuals. With both laid
out (batch, time, ...), every weight gradient is a sequence outer product:

* SimpleRNN, LSTM (one fused matmul ``[x_t, h_{t-1}] [w_ih; w_hh]``):
  ``[dw_ih; dw_hh]_b = Σ_t xh_bt dz_btᵀ``, ``db_b = Σ_t dz_bt``.
* GRU: ``dw_ih_b = Σ_t x_bt dgx_btᵀ``, ``dw_hh_b = Σ_t h_prev_bt dgh_btᵀ``,
  ``db_ih_b = Σ_t dgx_bt``, ``db_hh_b = Σ_t dgh_bt``.

Norms use the Gram form ``⟨X Xᵀ, Δ Δᵀ⟩`` when it is cheaper than forming the matrix
(``registry.seq_sq_norms``). Padded steps have zero deltas, so they add nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

from fbp.extend.registry import Rule, outer_sum, register, seq_sq_norms, weighted_outer
from fbp.nn.recurrent import GRU, LSTM, SimpleRNN


def _bm(v):
    """time-major (time, batch, f) -> batch-major (batch, time, f)."""
    return jnp.swapaxes(v, 0, 1)


def _sum_t(d):
    return jnp.sum(d, axis=1)


# --------------------------------------------------------------- SimpleRNN and LSTM


def _fused_backward(layer, params, res, dy):
    """ctx: (x (batch, T, in), h_prev (batch, T, H), dz (batch, T, gates·H))."""
    _, dx, dz = layer.backward_with_gate_deltas(params, res, dy)
    xh, n_in = _bm(res.steps.xh), params["w_ih"].shape[0]
    return dx, (xh[..., :n_in], xh[..., n_in:], _bm(dz))


def _fused_batch_grad(layer, ctx):
    x, h, dz = ctx
    return {"w_ih": outer_sum(x, dz), "w_hh": outer_sum(h, dz), "b": _sum_t(dz)}


def _fused_batch_l2(layer, ctx):
    x, h, dz = ctx
    return {
        "w_ih": seq_sq_norms(x, dz),
        "w_hh": seq_sq_norms(h, dz),
        "b": jnp.sum(_sum_t(dz) ** 2, axis=-1),
    }


def _fused_weighted(layer, ctx, w):
    x, h, dz = ctx
    return {
        "w_ih": weighted_outer(x, dz, w),
        "w_hh": weighted_outer(h, dz, w),
        "b": jnp.einsum("b,btj->j", w.astype(dz.dtype), dz),
    }


FUSED = Rule(_fused_backward, _fused_batch_grad, _fused_weighted, _fused_batch_l2)

# --------------------------------------------------------------- GRU


def _gru_backward(layer, params, res, dy):
    """ctx: (x, h_prev, dgx, dgh), batch-major."""
    _, dx, d = layer.backward_with_gate_deltas(params, res, dy)
    return dx, (_bm(res.steps.x), _bm(res.steps.h_prev), _bm(d.dgx), _bm(d.dgh))


def _gru_batch_grad(layer, ctx):
    x, h, dgx, dgh = ctx
    return {
        "w_ih": outer_sum(x, dgx),
        "w_hh": outer_sum(h, dgh),
        "b_ih": _sum_t(dgx),
        "b_hh": _sum_t(dgh),
    }


def _gru_batch_l2(layer, ctx):
    x, h, dgx, dgh = ctx
    return {
        "w_ih": seq_sq_norms(x, dgx),
        "w_hh": seq_sq_norms(h, dgh),
        "b_ih": jnp.sum(_sum_t(dgx) ** 2, axis=-1),
        "b_hh": jnp.sum(_sum_t(dgh) ** 2, axis=-1),
    }


def _gru_weighted(layer, ctx, w):
    x, h, dgx, dgh = ctx
    w = w.astype(dgx.dtype)
    return {
        "w_ih": weighted_outer(x, dgx, w),
        "w_hh": weighted_outer(h, dgh, w),
        "b_ih": jnp.einsum("b,btj->j", w, dgx),
        "b_hh": jnp.einsum("b,btj->j", w, dgh),
    }


GRU_RULE = Rule(_gru_backward, _gru_batch_grad, _gru_weighted, _gru_batch_l2)

register(SimpleRNN, FUSED)
register(LSTM, FUSED)
register(GRU, GRU_RULE)
