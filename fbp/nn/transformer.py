"""The pre-LayerNorm Transformer block, composed from fbp's own layers.

    a = x + drop(attn(LN₁(x)))                        attention half
    y = a + drop(W₂ gelu(W₁ LN₂(a) + b₁) + b₂)         MLP half: Residual(Sequential([...]))

The backward is the composition of the parts' hand-written backward rules, last
part first: dy → MLP half (dy + its dx) → attention half (da + LN₁'s dx). With
``lengths``, padded steps output zeros and get no gradient, as in recurrent layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, cast

import jax

from fbp.core import (
    Array,
    Layer,
    Params,
    PRNGKey,
    Residuals,
    Sequential,
    Shaped,
    State,
    check_ndim,
    layer_name,
    split_key,
)
from fbp.nn.activations import GELU
from fbp.nn.combinators import Residual
from fbp.nn.dense import Dense
from fbp.nn.dropout import Dropout
from fbp.nn.mha import MultiHeadAttention
from fbp.nn.norm import LayerNorm


class TransformerBlockRes(NamedTuple):
    ln1: Any  # LayerNorm residuals of the attention half
    attn: Any  # MultiHeadAttention residuals
    drop: Any  # Dropout residuals of the attention output
    mlp: Any  # Residual(Sequential) residuals of the MLP half
    mask: Array | None  # (batch, time, 1) in x's dtype: 1 on valid steps; None without lengths


@dataclasses.dataclass(frozen=True)
class TransformerBlock(Layer):
    """Pre-LN Transformer block (GPT-2 style): attention and a GELU MLP, each with a skip.

    Args:
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP (default 4·dim).
      head_dim, causal, rope, memory, block_size: as ``MultiHeadAttention``.
      dropout: rate for the attention probabilities and for both branches' outputs
        (training only; needs ``key``).
      eps: LayerNorm's epsilon.

    Parameter tree:
      ``{'ln1': LayerNorm, 'attn': MultiHeadAttention, 'mlp': {'0': LayerNorm,
      '1': Dense(mlp_dim), '2': {} (GELU), '3': Dense(dim)[, '4': {} (Dropout)]}}``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> block = TransformerBlock(2, causal=True)
      >>> x = jnp.ones((2, 5, 8))
      >>> params = block.init(jax.random.key(0), x)
      >>> y, res = block.forward(params, x)
      >>> dparams, dx = block.backward(params, res, jnp.ones_like(y))
      >>> y.shape, params['mlp']['1']['w'].shape
      ((2, 5, 8), (8, 32))
    """

    num_heads: int
    mlp_dim: int | None = None
    head_dim: int | None = None
    causal: bool = False
    rope: bool = False
    dropout: float = 0.0
    memory: str = "standard"
    block_size: int = 128
    eps: float = 1e-5

    def __post_init__(self):
        m = self.mlp_dim
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise ValueError(f"TransformerBlock: mlp_dim must be a positive int, got {m!r}.")
        try:
            self._attn()
            LayerNorm(self.eps)
        except ValueError as e:
            raise ValueError(f"TransformerBlock: {e}") from None

    def _attn(self) -> MultiHeadAttention:
        return MultiHeadAttention(
            self.num_heads,
            self.head_dim,
            self.causal,
            self.rope,
            self.dropout,
            self.memory,
            self.block_size,
        )

    def _mlp(self, dim: int) -> Residual:
        layers = [LayerNorm(self.eps), Dense(self.mlp_dim or 4 * dim), GELU(), Dense(dim)]
        return Residual(Sequential(layers + ([Dropout(self.dropout)] if self.dropout else [])))

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, time, dim)."""
        check_ndim(self, "init", "x", x, (3,), "(batch, time, dim)")
        k_attn, k_mlp = jax.random.split(key)
        return {
            "ln1": LayerNorm(self.eps).init(k_attn, x),
            "attn": self._attn().init(k_attn, x),
            "mlp": self._mlp(x.shape[-1]).init(k_mlp, x),
        }

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)

    def apply(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
        mask: Array | None = None,
    ) -> Array:
        """``forward(...)[0]``."""
        return self.forward(params, x, key=key, train=train, lengths=lengths, mask=mask)[0]

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, Residuals]:
        """x: (batch, time, dim) -> y: same shape; lengths (batch,) and mask as attention's."""
        check_ndim(self, "forward", "x", x, (3,), "(batch, time, dim)")
        k_attn, k_drop, k_mlp = split_key(key, 3)
        h, r_ln1 = LayerNorm(self.eps).forward(params["ln1"], x)
        try:
            a, r_attn = self._attn().forward(
                params["attn"], h, key=k_attn, train=train, lengths=lengths, mask=mask
            )
        except ValueError as e:
            raise type(e)(f"{layer_name(self)}.forward: {e}") from None
        a, r_drop = Dropout(self.dropout).forward({}, a, key=k_drop, train=train)
        y, r_mlp = self._mlp(x.shape[-1]).forward(params["mlp"], x + a, key=k_mlp, train=train)
        mask_t = None if lengths is None else r_attn.qmask
        if mask_t is not None:
            y = y * mask_t
        return y, TransformerBlockRes(r_ln1, r_attn, r_drop, r_mlp, mask_t)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """da = dy + MLP-half dx;  dx = da + LN₁ backward(attention backward(drop backward(da))).

        dy and dx have shape (batch, time, dim).
        """
        if res.mask is not None:
            dy = dy * res.mask
        d_mlp, da = self._mlp(dy.shape[-1]).backward(params["mlp"], res.mlp, dy)
        _, d_attn_out = Dropout(self.dropout).backward({}, res.drop, da)
        d_attn, dh = self._attn().backward(params["attn"], res.attn, d_attn_out)
        d_ln1, dx = LayerNorm(self.eps).backward(params["ln1"], res.ln1, cast(Array, dh))
        return {"ln1": d_ln1, "attn": d_attn, "mlp": d_mlp}, da + dx
