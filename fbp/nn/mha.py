"""Multi-head attention: projections, heads, rotary positions, attention, output projection.

With H heads of size d (inner = H·d):

    q = x wq + bq,  k = c wk + bk,  v = c wv + bv       (c = x for self-attention)
    q, k ← rope(q), rope(k)                              (rope=True)
    o = sdpa(split_heads(q), split_heads(k), split_heads(v))
    y = merge_heads(o) wo + bo                           zero on padded query steps

and backward in reverse: dwo = oᵀ dy, do = dy woᵀ, (dq, dk, dv) = sdpa_backward(do),
the rotation of dq, dk by −a, then dw = inputᵀ d(projection) and dx (dc) summed over
the projections that read x (c). In self-attention the three projections are one
matmul with [wq wk wv] forward and backward.

PyTorch's ``nn.MultiheadAttention(dim, H, batch_first=True)`` converts by transpose
and split: ``in_proj_weight`` = [wqᵀ; wkᵀ; wvᵀ], ``in_proj_bias`` = [bq; bk; bv],
``out_proj.weight`` = woᵀ, ``out_proj.bias`` = bo (``params_from_torch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import (
    Array,
    Layer,
    Params,
    PRNGKey,
    Shaped,
    ShapeError,
    State,
    check_last_dim,
    layer_name,
    param_dtype,
)
from fbp.nn import initializers
from fbp.nn.attention import (
    SdpaRes,
    check_key_lengths,
    check_options,
    sdpa_backward,
    sdpa_forward,
    sdpa_output,
)
from fbp.nn.positional import rope_backward, rope_forward
from fbp.precision import like, matmul, matmul_nt, matmul_tn, upcast


class MHARes(NamedTuple):
    x: Array  # (batch, T, dim): the query input, for dwq (and dwk, dwv in self-attention)
    context: Array | None  # (batch, S, dim_c): the cross-attention input; None for self
    attn: SdpaRes  # q, k, v after rope and o, all (batch, heads, ·, head_dim)
    qmask: Array | None  # (batch, T, 1) in x's dtype: 1 on valid query steps; None without lengths


def _split_heads(a: Array, heads: int) -> Array:
    """(batch, time, heads·d) -> (batch, heads, time, d)."""
    b, t, inner = a.shape
    return a.reshape(b, t, heads, inner // heads).transpose(0, 2, 1, 3)


def _merge_heads(a: Array) -> Array:
    """(batch, heads, time, d) -> (batch, time, heads·d)."""
    b, h, t, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _affine(x: Array, w: Array, b: Array | None) -> Array:
    """x w (+ b); x: (..., in), w: (in, out); bfloat16 x: float32 accumulation, x's dtype out."""
    y = matmul(x, w)
    return like(y if b is None else y + b, x)


def _weight_grads(x: Array, dz: Array) -> tuple[Array, Array]:
    """(xᵀ dz, Σ dz) with leading axes flattened into the batch."""
    dz2 = dz.reshape(-1, dz.shape[-1])
    return matmul_tn(x, dz2), jnp.sum(upcast(dz2), axis=0)


@dataclasses.dataclass(frozen=True)
class MultiHeadAttention(Layer):
    """Multi-head scaled dot-product attention, self or cross, with a hand-written backward.

    Self-attention: x (batch, T, dim) -> y (batch, T, dim). Cross-attention: x is the
    pair (queries (batch, T, dim), context (batch, S, dim_c)) -> y (batch, T, dim),
    and ``backward`` returns the pair's cotangents (dx, dcontext).

    Keyword arguments of ``apply``/``forward`` besides key/state/train:
    ``lengths`` (batch,) int: valid query steps; padded query steps output zeros and
    get no gradient; in self-attention the padded keys are masked too.
    ``context_lengths`` (batch,) int: valid context steps (cross-attention keys).
    ``mask``: bool broadcastable to (batch, heads, T, S), True where a query may attend
    (PyTorch SDPA's convention; ``nn.MultiheadAttention``'s ``attn_mask`` is its negation).

    Args:
      num_heads: number of heads (> 0).
      head_dim: size of each head (default dim // num_heads; dim must then divide).
      causal: query t attends to keys <= t.
      rope: rotary position embeddings on q and k (``rope_forward``); head_dim even.
      dropout: dropout on the attention probabilities in training (needs ``key``).
      memory: ``"standard"`` (keep the probabilities) or ``"linear"`` (keep the output
        and row log-sum-exp, recompute scores blockwise: residuals linear in time).
      block_size: keys per block of the ``"linear"`` scans and of the dropout mask.
      use_bias: whether there are ``b_q``, ``b_k``, ``b_v``, ``b_o``.
      w_init: initialiser of the four weight matrices.
      rope_base: wavelength base of the rotary embeddings.

    Parameter tree:
      ``w_q`` (dim, H·d), ``w_k``, ``w_v`` (dim_c, H·d), ``w_o`` (H·d, dim);
      ``b_q``, ``b_k``, ``b_v`` (H·d,), ``b_o`` (dim,).

    Raises:
      ValueError: bad hyperparameters (when built); train with dropout and no key.
      ShapeError: width not divisible by num_heads, x/context/lengths/mask of the wrong
        shape, lengths longer than the sequence (when concrete).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> attn = MultiHeadAttention(2, causal=True)
      >>> x = jnp.ones((3, 5, 8))
      >>> params = attn.init(jax.random.key(0), x)
      >>> y, res = attn.forward(params, x, lengths=jnp.array([5, 2, 4]))
      >>> dparams, dx = attn.backward(params, res, jnp.ones_like(y))
      >>> y.shape, params['w_q'].shape, float(jnp.abs(y[1, 2:]).max())
      ((3, 5, 8), (8, 8), 0.0)
    """

    num_heads: int
    head_dim: int | None = None
    causal: bool = False
    rope: bool = False
    dropout: float = 0.0
    memory: str = "standard"
    block_size: int = 128
    use_bias: bool = True
    w_init: str | Callable = "glorot_uniform"
    rope_base: float = 10000.0

    def __post_init__(self):
        name = "MultiHeadAttention"
        for field in ("num_heads", "head_dim"):
            v = getattr(self, field)
            if (v is not None or field == "num_heads") and (
                isinstance(v, bool) or not isinstance(v, int) or v <= 0
            ):
                raise ValueError(f"{name}: {field} must be a positive int, got {v!r}.")
        if self.rope and self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"{name}: rope=True needs an even head_dim, got {self.head_dim}.")
        check_options(name, self.memory, self.block_size, self.dropout)
        initializers.get(self.w_init, name)

    # ------------------------------------------------------------------ shapes

    def _inputs(self, x: Any, method: str) -> tuple[Any, Any]:
        """(queries, context or None), checked for rank and batch."""
        where = f"{layer_name(self)}.{method}"
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ShapeError(f"{where}: x is a sequence of {len(x)}; expected (x, context).")
            xq, ctx = x
        else:
            xq, ctx = x, None
        for name, a in (("x", xq), ("context", ctx)):
            if a is not None and len(a.shape) != 3:
                raise ShapeError(
                    f"{where}: {name} has shape {tuple(a.shape)} but expected (batch, time, dim)."
                )
        if ctx is not None and ctx.shape[0] != xq.shape[0]:
            raise ShapeError(
                f"{where}: context has batch {ctx.shape[0]} (shape {tuple(ctx.shape)}) but x has "
                f"batch {xq.shape[0]} (shape {tuple(xq.shape)})."
            )
        return xq, ctx

    def _head_dim(self, width: int, method: str) -> int:
        if self.head_dim is not None:
            return self.head_dim
        d, r = divmod(width, self.num_heads)
        if r or d == 0:
            raise ShapeError(
                f"{layer_name(self)}.{method}: x has width {width}, which {self.num_heads} heads "
                "do not divide; pass head_dim= or a width divisible by num_heads."
            )
        if self.rope and d % 2:
            raise ShapeError(
                f"{layer_name(self)}.{method}: rope=True needs an even head_dim, but width "
                f"{width} / {self.num_heads} heads = {d}."
            )
        return d

    def _check(self, params, xq, ctx, method: str) -> None:
        check_last_dim(self, method, "x", xq, params["w_q"].shape[0], "params['w_q']")
        kv_in = params["w_k"].shape[0]
        if ctx is not None:
            check_last_dim(self, method, "context", ctx, kv_in, "params['w_k']")
        elif kv_in != xq.shape[-1]:
            raise ShapeError(
                f"{layer_name(self)}.{method}: params['w_k'] has shape {tuple(params['w_k'].shape)}"
                f" (cross-attention with context width {kv_in}) but x is a single array of "
                f"shape {tuple(xq.shape)}; pass the pair (x, context)."
            )
        inner = params["w_q"].shape[1]
        if inner % self.num_heads or (self.rope and (inner // self.num_heads) % 2):
            raise ShapeError(
                f"{layer_name(self)}.{method}: params['w_q'] has {inner} columns, which do not "
                f"split into {self.num_heads} heads" + (" of even size." if self.rope else ".")
            )

    def init(self, key: PRNGKey, x: Shaped | tuple[Shaped, Shaped]) -> Params:
        """x: example input (batch, T, dim), or the pair (x, context (batch, S, dim_c))."""
        xq, ctx = self._inputs(x, "init")
        dim = xq.shape[-1]
        dim_c = dim if ctx is None else ctx.shape[-1]
        inner = self.num_heads * self._head_dim(dim, "init")
        dtype = param_dtype(xq)
        w = initializers.get(self.w_init)
        kq, kk, kv, ko = jax.random.split(key, 4)
        params = {
            "w_q": w(kq, (dim, inner), dtype),
            "w_k": w(kk, (dim_c, inner), dtype),
            "w_v": w(kv, (dim_c, inner), dtype),
            "w_o": w(ko, (inner, dim), dtype),
        }
        if self.use_bias:
            for name, n in (("b_q", inner), ("b_k", inner), ("b_v", inner), ("b_o", dim)):
                params[name] = jnp.zeros((n,), dtype)
        return params

    def output_shape(
        self, params: Params, x: Shaped | tuple[Shaped, Shaped]
    ) -> jax.ShapeDtypeStruct:
        xq, _ = self._inputs(x, "output_shape")
        return jax.ShapeDtypeStruct(tuple(xq.shape), xq.dtype)

    # ------------------------------------------------------------------ forward / backward

    def apply(
        self,
        params: Params,
        x: Array | tuple[Array, Array],
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
        context_lengths: Array | None = None,
        mask: Array | None = None,
    ) -> Array:
        """``forward(...)[0]``."""
        kw = dict(lengths=lengths, context_lengths=context_lengths, mask=mask)
        return self.forward(params, x, key=key, state=state, train=train, **kw)[0]

    def _bias(self, params, name):
        return params[name] if self.use_bias else None

    def _project(self, params, a: Array, names: str) -> Array:
        """a [w_n1 w_n2 ...] + [b_n1 b_n2 ...]: one matmul for several projections of a."""
        w = jnp.concatenate([params[f"w_{n}"] for n in names], axis=1)
        b = jnp.concatenate([params[f"b_{n}"] for n in names]) if self.use_bias else None
        return _affine(a, w, b)

    def _heads(self, params: Params, xq: Array, ctx: Array | None) -> tuple[Array, Array, Array]:
        """q (batch, heads, T, d), k and v (batch, heads, S, d): projected, split, rotated."""
        h = self.num_heads
        if ctx is None:
            q, k, v = (
                _split_heads(a, h) for a in jnp.split(self._project(params, xq, "qkv"), 3, -1)
            )
        else:
            q = _split_heads(self._project(params, xq, "q"), h)
            k, v = (_split_heads(a, h) for a in jnp.split(self._project(params, ctx, "kv"), 2, -1))
        if self.rope:
            q, k = rope_forward(q, base=self.rope_base), rope_forward(k, base=self.rope_base)
        return q, k, v

    def forward(
        self,
        params: Params,
        x: Array | tuple[Array, Array],
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
        context_lengths: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, MHARes]:
        """x: (batch, T, dim) or (x, context (batch, S, dim_c)) -> y: (batch, T, dim)."""
        where = f"{layer_name(self)}.forward"
        xq, ctx = self._inputs(x, "forward")
        self._check(params, xq, ctx, "forward")
        drop = self.dropout if train else 0.0
        if drop and key is None:
            raise ValueError(
                f"{where}: train=True with dropout {self.dropout} needs a PRNG key for the "
                "attention dropout mask, got key=None; pass key=jax.random.key(...)."
            )
        if ctx is None and context_lengths is not None:
            raise ValueError(f"{where}: context_lengths is for cross-attention (x, context).")
        if context_lengths is not None:
            context_lengths = check_key_lengths(
                where, context_lengths, ctx.shape[0], ctx.shape[1], "context_lengths"
            )
        qmask = None
        if lengths is not None:
            lengths = check_key_lengths(where, lengths, xq.shape[0], xq.shape[1], "lengths")
            qmask = (jnp.arange(xq.shape[1])[None, :] < lengths[:, None])[..., None]
            qmask = qmask.astype(xq.dtype)
        q, k, v = self._heads(params, xq, ctx)
        key_lengths = lengths if ctx is None else context_lengths
        o, attn = sdpa_forward(
            q,
            k,
            v,
            causal=self.causal,
            lengths=key_lengths,
            mask=mask,
            memory=self.memory,
            block_size=self.block_size,
            drop_rate=drop,
            key=key,
            owner=where,
        )
        y = _affine(_merge_heads(o), params["w_o"], self._bias(params, "b_o"))
        if qmask is not None:
            y = y * qmask
        return y, MHARes(xq, ctx, attn, qmask)

    def backward(  # type: ignore[override]  # cross-attention: dx is the pair's cotangents
        self, params: Params, res: MHARes, dy: Array
    ) -> tuple[Params, Array | tuple[Array, Array]]:
        """dwo = oᵀ dy; do = dy woᵀ; sdpa_backward; rope⁻¹; dw = inputᵀ dz; dx = Σ dz wᵀ.

        Returns ``(dparams, dx)`` for self-attention, ``(dparams, (dx, dcontext))`` for
        cross-attention.
        """
        if res.qmask is not None:
            dy = dy * res.qmask
        dparams = {}
        dparams["w_o"], db_o = _weight_grads(_merge_heads(sdpa_output(res.attn)), dy)
        do = like(matmul_nt(dy, params["w_o"]), dy)
        dq, dk, dv = sdpa_backward(res.attn, _split_heads(do, self.num_heads))
        if self.rope:
            dq, dk = rope_backward(dq, base=self.rope_base), rope_backward(dk, base=self.rope_base)
        dq, dk, dv = _merge_heads(dq), _merge_heads(dk), _merge_heads(dv)
        if res.context is None:
            dx, grads = self._project_backward(
                params, res.x, jnp.concatenate([dq, dk, dv], -1), "qkv"
            )
        else:
            dx, grads = self._project_backward(params, res.x, dq, "q")
            dc, kv_grads = self._project_backward(
                params, res.context, jnp.concatenate([dk, dv], -1), "kv"
            )
            grads.update(kv_grads)
            dx = (dx, dc)
        dparams.update(grads)
        if self.use_bias:
            dparams["b_o"] = db_o
        return {name: dparams[name] for name in params}, dx

    def _project_backward(self, params, a: Array, dz: Array, names: str):
        """(da, {dw_n, db_n}) of ``_project``: da = dz [w_n ...]ᵀ, dw = aᵀ dz, db = Σ dz."""
        w = jnp.concatenate([params[f"w_{n}"] for n in names], axis=1)
        dw, db = _weight_grads(a, dz)
        width = w.shape[1] // len(names)
        grads = {}
        for i, n in enumerate(names):
            grads[f"w_{n}"] = dw[:, i * width : (i + 1) * width]
            if self.use_bias:
                grads[f"b_{n}"] = db[i * width : (i + 1) * width]
        return like(matmul_nt(dz, w), dz), grads


def params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Array]:
    """``nn.MultiheadAttention`` state dict (arrays) -> fbp params, by transpose and split.

    Accepts the packed ``in_proj_weight`` (3·E, E) or, when kdim/vdim differ from E,
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``; biases when present.

    Examples:
      >>> import numpy as np
      >>> sd = {"in_proj_weight": np.zeros((12, 4)), "out_proj.weight": np.zeros((4, 4))}
      >>> sorted((k, v.shape) for k, v in params_from_torch(sd).items())[0]
      ('w_k', (4, 4))
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3, axis=0)
    else:
        wq, wk, wv = (sd[f"{n}_proj_weight"] for n in "qkv")
    params = {"w_q": wq.T, "w_k": wk.T, "w_v": wv.T, "w_o": sd["out_proj.weight"].T}
    if "in_proj_bias" in sd:
        params.update(zip(("b_q", "b_k", "b_v"), np.split(sd["in_proj_bias"], 3), strict=True))
        params["b_o"] = sd["out_proj.bias"]
    return {k: jnp.asarray(v) for k, v in params.items()}
