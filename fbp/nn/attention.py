"""Scaled dot-product attention: a forward that keeps residuals and a hand-written backward.

Arrays are head-major: q (batch, heads, T, d), k (batch, heads, S, d) and
v (batch, heads, S, dv). With ``scale = 1/√d`` and the set of allowed keys of each
query row (causal, key lengths and an optional boolean mask, all combined):

    S = scale · q kᵀ                          (batch, heads, T, S)
    P = softmax of S over the allowed keys;   P = 0 on every masked key
    O = P v                                   (batch, heads, T, dv)

and the backward, with D = rowsum(dO ∘ O) (= rowsum(P ∘ dP)):

    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP − D);  dQ = scale · dS K;  dK = scale · dSᵀ Q.

A row whose every key is masked has P = 0, so its output, its D and its dS are zero:
zero output and zero gradient, never NaN. The arithmetic never forms ``-inf``: masked
scores are set to the dtype's most negative finite number and the row maximum of an
empty row is replaced by 0 before exponentiating, so ``exp`` of a masked score is 0.

Two residual modes (``memory=``):

* ``"standard"`` keeps P in factored form: E = exp(S − m) (batch, heads, T, S) and
  1 / rowsum(E) (batch, heads, T), P = E / rowsum(E). The normalisation is applied
  to the (T, dv) products instead (O = (E V) / l, dV = Eᵀ (dO / l), dS = E ∘ (dP − D) / l),
  which saves a pass over (T, S) and a (T, S) buffer; the backward is four matmuls.
* ``"linear"`` keeps only O and the row log-sum-exp L = m + log Σ exp(S − m)
  (batch, heads, T). The forward is FlashAttention's online softmax, a ``lax.scan``
  over blocks of ``block_size`` keys; the backward scans the key blocks again,
  recomputes P = exp(S − L) block by block, writes that block's dK and dV, and
  accumulates dQ in the carry (FlashAttention-2's order with the key loop outside;
  on XLA:CPU it ran faster than an outer loop over query blocks, which needs two
  carried accumulators, dK and dV, of the full key length). Residual and scratch
  memory are O(T · block_size) instead of O(T · S).

``block_size`` need not divide S: the keys are padded to a multiple of it with masked
(zero-probability) keys, which changes no result. A block larger than S is cut to S.

Dropout on the attention probabilities (``drop_rate`` with ``key``) uses the same
mask in both modes: block j of keys draws ``bernoulli(fold_in(key, j), ...)``, which
the backward draws again instead of storing it.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> q = k = v = jnp.ones((1, 2, 4, 8))
  >>> o, res = sdpa_forward(q, k, v, causal=True, memory="linear", block_size=3)
  >>> dq, dk, dv = sdpa_backward(res, jnp.ones_like(o))
  >>> o.shape, dk.shape
  ((1, 2, 4, 8), (1, 2, 4, 8))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, ShapeError
from fbp.precision import accum_dtype, bmatmul, like, upcast

MEMORY_MODES = ("standard", "linear")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q", "k", "v", "o", "p", "inv_sum", "lse", "lengths", "mask", "key"],
    meta_fields=["causal", "scale", "memory", "block_size", "drop_rate"],
)
@dataclasses.dataclass(frozen=True)
class SdpaRes:
    """Residuals of ``sdpa_forward``; the mode and options are static (the tree's structure)."""

    q: Array  # (batch, heads, T, d)
    k: Array  # (batch, heads, S, d)
    v: Array  # (batch, heads, S, dv)
    o: Array | None  # (batch, heads, T, dv): the output, for D = rowsum(dO ∘ O); None until set
    p: Array | None  # (batch, heads, T, S) E = exp(S − m), 0 where masked ("standard"), else None
    inv_sum: Array | None  # (batch, heads, T) 1 / rowsum(E) ("standard"), else None
    lse: Array | None  # (batch, heads, T) row log-sum-exp ("linear"), else None
    lengths: Array | None  # (batch,) int: valid keys per example, or None
    mask: Array | None  # bool, broadcastable to (batch, heads, T, S), or None
    key: Array | None  # PRNG key of the dropout mask, or None
    causal: bool
    scale: float
    memory: str
    block_size: int
    drop_rate: float


# ----------------------------------------------------------------------------- checks


def check_options(owner: str, memory: str, block_size: int, drop_rate: float) -> None:
    """ValueError naming ``owner`` unless the attention options are valid."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"{owner}: memory must be one of {MEMORY_MODES}, got {memory!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{owner}: block_size must be a positive int, got {block_size!r}.")
    r = drop_rate
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {r!r}.")


def check_key_lengths(owner: str, lengths: Any, batch: int, time: int, what: str) -> Array:
    """``lengths`` as an int array of shape (batch,) in [0, time] (checked when concrete)."""
    arr = jnp.asarray(lengths)
    if arr.shape != (batch,) or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ShapeError(
            f"{owner}: {what} has shape {tuple(arr.shape)} and dtype {arr.dtype} but expected "
            f"integers of shape (batch,) = ({batch},)."
        )
    if not isinstance(lengths, jax.core.Tracer) and arr.size:
        host = np.asarray(lengths)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi > time:
            raise ShapeError(
                f"{owner}: {what} has values in [{lo}, {hi}] but the sequence has {time} "
                f"steps; expected 0 <= {what} <= {time}."
            )
    return arr


def _check_inputs(owner, q, k, v, lengths, mask):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ShapeError(
                f"{owner}: {name} has shape {tuple(a.shape)} but expected "
                "(batch, heads, time, head_dim)."
            )
    b, h, t, d = q.shape
    s = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != (b, h, s):
        raise ShapeError(
            f"{owner}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "(batch, heads, T, d), (batch, heads, S, d), (batch, heads, S, dv)."
        )
    if lengths is not None:
        lengths = check_key_lengths(owner, lengths, b, s, "lengths")
    if mask is not None:
        mask = jnp.asarray(mask)
        full = (b, h, t, s)
        ok = mask.dtype == jnp.bool_ and mask.ndim <= 4
        ok = ok and all(m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1], strict=False))
        if not ok:
            raise ShapeError(
                f"{owner}: mask has shape {tuple(mask.shape)} and dtype {mask.dtype} but expected "
                f"booleans broadcastable to (batch, heads, T, S) = {full}."
            )
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return lengths, mask


# ----------------------------------------------------------------------------- shared maths


def _min(dtype) -> Array:
    """The most negative finite value: the score of a masked key."""
    return jnp.asarray(jnp.finfo(dtype).min, dtype)


def _allowed(t: int, key_idx: Array, causal: bool, lengths, mask, s_real: int | None):
    """Bool, broadcastable to (batch, heads, T, keys): which keys each query may attend to.

    ``key_idx`` are the keys' absolute positions; ``s_real`` (when keys were padded)
    masks positions >= it. None when nothing is masked.
    """
    parts = []
    if causal:
        parts.append(key_idx[None, :] <= jnp.arange(t)[:, None])
    if s_real is not None:
        parts.append(key_idx < s_real)
    if lengths is not None:
        parts.append((key_idx[None, :] < lengths[:, None])[:, None, None, :])
    if mask is not None:
        parts.append(mask)
    return functools.reduce(jnp.logical_and, parts) if parts else None


def _masked_scores(qs: Array, k: Array, allowed) -> Array:
    """Scores q kᵀ (batch, heads, T, keys), float32 for bfloat16 q and k; masked keys at min."""
    s = bmatmul(qs, k, "nt")
    return s if allowed is None else jnp.where(allowed, s, _min(s.dtype))


def _row_max(s: Array, masked: bool) -> tuple[Array, Array]:
    """(raw row max, the max used for exp): 0 for rows whose every key is masked."""
    m = jnp.max(s, axis=-1)
    if not masked:
        return m, m
    return m, jnp.where(m > _min(s.dtype) / 2, m, jnp.zeros((), s.dtype))


def _keep(key: Array, j, shape: tuple[int, ...], drop_rate: float) -> Array:
    """Dropout keep-mask of key block ``j``: bernoulli(fold_in(key, j), 1 − drop_rate)."""
    return jax.random.bernoulli(jax.random.fold_in(key, j), 1.0 - drop_rate, shape)


def _dropped(p: Array, keep: Array | None, drop_rate: float) -> Array:
    if keep is None:
        return p
    return jnp.where(keep, p * jnp.asarray(1.0 / (1.0 - drop_rate), p.dtype), 0)


def _block_keys(s: int, block_size: int) -> tuple[int, int]:
    """(block, number of blocks): the block is cut to S; S is padded to a multiple of it."""
    bk = min(block_size, s)
    return bk, -(-s // bk)


# ----------------------------------------------------------------------------- forward


def sdpa_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    lengths: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    memory: str = "standard",
    block_size: int = 128,
    drop_rate: float = 0.0,
    key: Array | None = None,
    owner: str = "sdpa_forward",
) -> tuple[Array, SdpaRes]:
    """Attention output and the residuals its backward reads.

    Args:
      q: queries, shape (batch, heads, T, d).
      k: keys, shape (batch, heads, S, d).
      v: values, shape (batch, heads, S, dv).
      causal: query i attends to keys j <= i (top-left aligned when T != S, as
        PyTorch's ``is_causal``).
      lengths: int, shape (batch,): keys ``j >= lengths[b]`` are masked.
      mask: bool, broadcastable to (batch, heads, T, S): True where a query may attend.
      scale: score scale (default 1/√d).
      memory: ``"standard"`` (keep P) or ``"linear"`` (keep O and the row log-sum-exp).
      block_size: keys per block of the ``"linear"`` scans and of the dropout mask.
      drop_rate: dropout on the probabilities, in [0, 1); needs ``key`` when > 0.
      key: PRNG key of the dropout mask.
      owner: who is calling, for error messages.

    Returns:
      ``(o, res)``: o has shape (batch, heads, T, dv); res is an ``SdpaRes``.

    Raises:
      ShapeError: q/k/v, lengths or mask of the wrong shape; lengths outside [0, S].
      ValueError: bad memory/block_size/drop_rate; drop_rate > 0 without a key.
    """
    check_options(owner, memory, block_size, drop_rate)
    lengths, mask = _check_inputs(owner, q, k, v, lengths, mask)
    if drop_rate > 0 and key is None:
        raise ValueError(f"{owner}: dropout {drop_rate} needs a PRNG key, got key=None.")
    key = key if drop_rate > 0 else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    res = SdpaRes(
        q,
        k,
        v,
        None,
        None,
        None,
        None,
        lengths,
        mask,
        key,
        causal,
        scale,
        memory,
        block_size,
        float(drop_rate),
    )
    if memory == "standard":
        o, e, inv_sum = _standard_forward(res)
        return o, dataclasses.replace(res, o=o, p=e, inv_sum=inv_sum)
    o, lse = _linear_forward(res)
    return o, dataclasses.replace(res, o=o, lse=lse)


def _standard_keep(res: SdpaRes, t: int, s: int) -> Array | None:
    """The whole (batch, heads, T, S) keep-mask, drawn block by block as the scans draw it."""
    key = res.key
    if key is None:
        return None
    b, h = res.q.shape[:2]
    bk, nb = _block_keys(s, res.block_size)
    keep = jax.vmap(lambda j: _keep(key, j, (b, h, t, bk), res.drop_rate))(jnp.arange(nb))
    return jnp.moveaxis(keep, 0, 3).reshape(b, h, t, nb * bk)[..., :s]


def _standard_forward(res: SdpaRes) -> tuple[Array, Array, Array]:
    """(O, E, 1/l): E = exp(S − m) (0 where masked), l = rowsum(E), O = (E V) / l."""
    q, k, v = res.q, res.k, res.v
    t, s = q.shape[2], k.shape[2]
    allowed = _allowed(t, jnp.arange(s), res.causal, res.lengths, res.mask, None)
    scores = _masked_scores(q * jnp.asarray(res.scale, q.dtype), k, allowed)
    _, m = _row_max(scores, allowed is not None)
    e = jnp.exp(scores - m[..., None])
    total = jnp.sum(e, axis=-1)
    inv_sum = 1 / (total if allowed is None else jnp.where(total > 0, total, 1))
    ed = _dropped(e, _standard_keep(res, t, s), res.drop_rate)
    return like(bmatmul(like(ed, v), v) * inv_sum[..., None], q), e, inv_sum


def _key_blocks(res: SdpaRes):
    """Scan inputs over key blocks: (j, k block, v block, mask block or None), padded keys."""
    k, v, mask = res.k, res.v, res.mask
    s = k.shape[2]
    bk, nb = _block_keys(s, res.block_size)
    pad = nb * bk - s

    def blocks(a, axis):
        a = jnp.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
        a = a.reshape(a.shape[:axis] + (nb, bk) + a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    mask_xs = mask if mask is None or mask.shape[3] == 1 else blocks(mask, 3)
    xs = (jnp.arange(nb), blocks(k, 2), blocks(v, 2), mask_xs if mask_xs is not mask else None)
    return xs, bk, (s if pad else None)


def _block_allowed(res: SdpaRes, t: int, j, bk: int, mask_j, s_real):
    mask = res.mask if mask_j is None else mask_j
    return _allowed(t, j * bk + jnp.arange(bk), res.causal, res.lengths, mask, s_real)


def _block_keep(res: SdpaRes, j, t: int, bk: int) -> Array | None:
    if res.key is None:
        return None
    return _keep(res.key, j, (*res.q.shape[:2], t, bk), res.drop_rate)


def _linear_forward(res: SdpaRes) -> tuple[Array, Array]:
    """Online softmax over key blocks: carry the row max m, the sum l and the output sum."""
    q, v = res.q, res.v
    b, h, t, _ = q.shape
    qs = q * jnp.asarray(res.scale, q.dtype)
    xs, bk, s_real = _key_blocks(res)
    acc_dtype = accum_dtype(q)  # softmax statistics and the output sum: float32 for bf16
    low = _min(acc_dtype)

    def step(carry, blk):
        m, total, acc = carry
        j, kb, vb, mb = blk
        allowed = _block_allowed(res, t, j, bk, mb, s_real)
        scores = _masked_scores(qs, kb, allowed)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        m_use = m_new if allowed is None else jnp.where(m_new > low / 2, m_new, 0)
        p = jnp.exp(scores - m_use[..., None])
        alpha = jnp.exp(m - m_new)
        total = alpha * total + jnp.sum(p, axis=-1)
        pd = _dropped(p, _block_keep(res, j, t, bk), res.drop_rate)
        acc = alpha[..., None] * acc + bmatmul(like(pd, vb), vb)
        return (m_new, total, acc), None

    zeros = jnp.zeros((b, h, t), acc_dtype)
    init = (jnp.full((b, h, t), low), zeros, jnp.zeros((b, h, t, v.shape[-1]), acc_dtype))
    (m, total, acc), _ = jax.lax.scan(step, init, xs)
    filled = total > 0
    safe = jnp.where(filled, total, 1)
    lse = jnp.where(filled, jnp.where(m > low / 2, m, 0) + jnp.log(safe), 0)
    return like(acc / safe[..., None], q), lse


# ----------------------------------------------------------------------------- backward


def sdpa_backward(res: SdpaRes, do: Array) -> tuple[Array, Array, Array]:
    """Cotangents of q, k and v from the output's cotangent ``do`` (batch, heads, T, dv).

    With D = rowsum(dO ∘ O) (batch, heads, T) and P the (dropped-out, for dV and dP)
    probabilities:

        dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP − D);  dQ = scale · dS K;  dK = scale · dSᵀ Q.

    ``"standard"`` reads P = E / l from the residuals (and applies 1/l to the (T, dv)
    side: dV = Eᵀ (dO / l), dS = E ∘ (dP − D) / l); ``"linear"`` recomputes it per key
    block as P = exp(scale · q kᵀ − L) from the row log-sum-exp L, in a ``lax.scan``
    that emits each block's dK, dV and accumulates dQ. Masked keys and fully
    masked rows have P = 0 and get exactly zero gradient.

    Returns:
      ``(dq, dk, dv)``, the shapes of q, k, v.
    """
    o = sdpa_output(res)
    if do.shape != o.shape:
        raise ShapeError(
            f"sdpa_backward: do has shape {tuple(do.shape)} but the output has shape "
            f"{tuple(o.shape)}."
        )
    d = jnp.sum(upcast(do) * upcast(o), axis=-1)
    if res.memory == "standard":
        return _standard_backward(res, do, d)
    return _linear_backward(res, do, d)


def sdpa_output(res: SdpaRes) -> Array:
    """The output O (batch, heads, T, dv) kept in the residuals of ``sdpa_forward``."""
    if res.o is None:
        raise ValueError("sdpa residuals without the output O; pass what sdpa_forward returned.")
    return res.o


def _softmax_grads(p, keep, do, vb, d, drop_rate):
    """(dS, dV) of one block: dV = P̃ᵀ dO, dP = dO Vᵀ ∘ keep, dS = P ∘ (dP − D)."""
    dv = bmatmul(like(_dropped(p, keep, drop_rate), do), do, "tn")
    dp = _dropped(bmatmul(do, vb, "nt"), keep, drop_rate)
    return p * (dp - d[..., None]), dv


def _standard_backward(res: SdpaRes, do: Array, d: Array):
    t, s = res.q.shape[2], res.k.shape[2]
    if res.p is None or res.inv_sum is None:
        raise ValueError("sdpa_backward: 'standard' residuals without E and 1/l.")
    p, inv = res.p, res.inv_sum[..., None]
    keep = _standard_keep(res, t, s)
    dv = bmatmul(like(_dropped(p, keep, res.drop_rate), do), like(do * inv, do), "tn")
    dp = _dropped(bmatmul(do, res.v, "nt"), keep, res.drop_rate)
    ds = p * (dp - d[..., None]) * inv
    scale = jnp.asarray(res.scale, ds.dtype)
    dq = bmatmul(like(ds, res.k), res.k) * scale
    dk = bmatmul(like(ds, res.q), res.q, "tn") * scale
    return like(dq, res.q), like(dk, res.k), like(dv, res.v)


def _linear_backward(res: SdpaRes, do: Array, d: Array):
    q = res.q
    b, h, t, _ = q.shape
    scale = jnp.asarray(res.scale, q.dtype)
    qs = q * scale
    xs, bk, s_real = _key_blocks(res)
    if res.lse is None:
        raise ValueError("sdpa_backward: 'linear' residuals without the row log-sum-exp.")
    lse = res.lse[..., None]

    def step(dq, blk):
        j, kb, vb, mb = blk
        allowed = _block_allowed(res, t, j, bk, mb, s_real)
        p = jnp.exp(_masked_scores(qs, kb, allowed) - lse)
        ds, dvb = _softmax_grads(p, _block_keep(res, j, t, bk), do, vb, d, res.drop_rate)
        ds = like(ds, qs)
        return dq + bmatmul(ds, kb), (bmatmul(ds, qs, "tn"), dvb)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, accum_dtype(q)), xs)
    s = res.k.shape[2]

    def unblock(a):  # (blocks, batch, heads, bk, d) -> (batch, heads, S, d)
        return jnp.moveaxis(a, 0, 2).reshape(b, h, -1, a.shape[-1])[:, :, :s]

    return like(dq * scale, q), like(unblock(dk), res.k), like(unblock(dv), res.v)


def sdpa(q: Array, k: Array, v: Array, **kwargs: Any) -> Array:
    """``sdpa_forward(q, k, v, **kwargs)[0]``: the attention output alone."""
    return sdpa_forward(q, k, v, **kwargs)[0]
