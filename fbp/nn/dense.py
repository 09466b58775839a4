"""Fully connected layer: z = x w + b."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import (
    Array,
    Layer,
    Params,
    PRNGKey,
    Residuals,
    Shaped,
    ShapeError,
    State,
    check_last_dim,
    layer_name,
    param_dtype,
)
from fbp.nn import initializers
from fbp.precision import like, matmul, matmul_nt, matmul_tn, upcast


class DenseRes(NamedTuple):
    x: Array  # (..., in): the input, for dw = xᵀ dy


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """Affine map of the last axis: ``y = x @ w + b``.

    Leading axes are batch axes, so a Dense applied to hidden states of shape
    (batch, time, hidden) is a per-step head.

    Args:
      out_features: size of the output's last axis (> 0).
      w_init: initialiser for ``w`` (a name from ``fbp.nn.initializers`` or a callable).
      b_init: initialiser for ``b``.
      use_bias: whether there is a ``b``.

    Parameter tree:
      ``w`` (in, out) and ``b`` (out,).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dense(3)
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> layer.apply(params, jnp.ones((2, 4))).shape
      (2, 3)
    """

    out_features: int
    w_init: str | Callable = "glorot_uniform"
    b_init: str | Callable = "zeros"
    use_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.out_features, int) or self.out_features <= 0:
            raise ValueError(
                f"Dense: out_features must be a positive int, got {self.out_features!r}."
            )
        initializers.get(self.w_init, "Dense")
        initializers.get(self.b_init, "Dense")

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (..., in)."""
        if len(x.shape) < 1:
            raise ShapeError(
                f"{layer_name(self)}.init: x has shape {tuple(x.shape)}; need (..., in)."
            )
        dtype = param_dtype(x)
        kw, kb = jax.random.split(key)
        params = {"w": initializers.get(self.w_init)(kw, (x.shape[-1], self.out_features), dtype)}
        if self.use_bias:
            params["b"] = initializers.get(self.b_init)(kb, (self.out_features,), dtype)
        return params

    def _check(self, params, x, method):
        check_last_dim(self, method, "x", x, params["w"].shape[0], "params['w']")

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (..., in) -> y: (..., out)."""
        self._check(params, x, "forward")
        y = matmul(x, params["w"])
        if self.use_bias:
            y = y + params["b"]
        return like(y, x), DenseRes(x)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = dy wᵀ;  dw = xᵀ dy;  db = Σ_batch dy;  dy (..., out) -> dx (..., in).

        bfloat16 operands: products in XLA:CPU's fast layout, sums in float32
        (``fbp.precision``); dparams are float32, dx has dy's dtype.
        """
        x2 = res.x.reshape(-1, res.x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dparams = {"w": matmul_tn(x2, dy2)}
        if self.use_bias:
            dparams["b"] = jnp.sum(upcast(dy2), axis=0)
        return dparams, like(matmul_nt(dy, params["w"]), dy)
