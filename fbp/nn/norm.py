"""Normalisation: ``BatchNorm`` (batch statistics, running state) and ``LayerNorm``.

Both normalise x̂ = (x - μ) / √(σ² + eps) and return y = scale · x̂ + bias over the
last (feature) axis. With g = dy · scale, the backward through statistics μ, σ²
taken over a set of m entries is

    dx = (g - mean(g) - x̂ · mean(g · x̂)) / √(σ² + eps),

the means taken over the same m entries; with fixed statistics (batch norm in
eval mode) it is just dx = g / √(σ² + eps). In both, dscale = Σ dy · x̂ and
dbias = Σ dy over every axis but the last.
"""

from __future__ import annotations

import dataclasses
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
from fbp.precision import like, upcast


class NormRes(NamedTuple):
    xhat: Array  # shape of x: the normalised input
    inv_std: Array  # (features,) for BatchNorm, (..., 1) for LayerNorm: 1 / √(σ² + eps)
    mean: Array | None  # (features,) batch mean in train mode (for next_state), else None
    var: Array | None  # (features,) biased batch variance in train mode, else None


def _validate_eps(owner: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps must be a float > 0, got {eps!r}.")


def _affine_init(x) -> dict[str, Array]:
    dtype = param_dtype(x)
    return {"scale": jnp.ones((x.shape[-1],), dtype), "bias": jnp.zeros((x.shape[-1],), dtype)}


def _affine_grads(dy: Array, xhat: Array) -> dict[str, Array]:
    """dscale = Σ dy·x̂, dbias = Σ dy over all but the last axis (float32 sums for bf16)."""
    axes = tuple(range(dy.ndim - 1))
    dy, xhat = upcast(dy), upcast(xhat)
    return {"scale": jnp.sum(dy * xhat, axis=axes), "bias": jnp.sum(dy, axis=axes)}


def _dx_through_stats(g: Array, xhat: Array, inv_std: Array, axes) -> Array:
    """dx = (g - mean(g) - x̂ mean(g x̂)) / √(σ² + eps), means over ``axes``."""
    mg = jnp.mean(g, axis=axes, keepdims=True)
    mgx = jnp.mean(g * xhat, axis=axes, keepdims=True)
    return (g - mg - xhat * mgx) * inv_std


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalisation over every axis but the last (features), with running statistics.

    Train mode (``train=True``) normalises with the batch's mean and biased variance
    and gradients flow through them; ``next_state`` then moves the running
    statistics: ``r ← momentum · r + (1 - momentum) · batch``. Eval mode normalises
    with the running statistics from ``state`` (a constant for the backward).

    Args:
      momentum: weight of the old running value, in [0, 1) (0.9 by default).
      eps: added to the variance (> 0).

    Parameter tree:
      ``scale`` (features,) ones, ``bias`` (features,) zeros.

    State:
      ``{'mean': (features,), 'var': (features,)}``, zeros and ones from ``init_state``.

    Raises:
      ValueError: bad momentum/eps (when built); eval mode without a state (trace time).
      ShapeError: x has fewer than 2 dims or the wrong number of features.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> bn = BatchNorm()
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> params, state = bn.init(jax.random.key(0), x), bn.init_state(x)
      >>> y, res = bn.forward(params, x, state=state, train=True)
      >>> [round(v, 4) for v in bn.next_state(state, res)['mean'].tolist()]
      [0.45, 0.55, 0.65]
    """

    momentum: float = 0.9
    eps: float = 1e-5

    def __post_init__(self):
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1), got {self.momentum!r}.")
        _validate_eps("BatchNorm", self.eps)

    def _check(self, x, method: str, params=None) -> None:
        if x.ndim < 2:
            raise ShapeError(
                f"{layer_name(self)}.{method}: x has shape {tuple(x.shape)} but expected "
                "(batch, ..., features) (>= 2 dims)."
            )
        if params is not None:
            check_last_dim(self, method, "x", x, params["scale"].shape[0], "params['scale']")

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, ..., features)."""
        self._check(x, "init")
        return _affine_init(x)

    def init_state(self, x: Shaped) -> State:
        """Running mean (zeros) and variance (ones), shape (features,)."""
        self._check(x, "init_state")
        dtype = param_dtype(x)
        return {"mean": jnp.zeros((x.shape[-1],), dtype), "var": jnp.ones((x.shape[-1],), dtype)}

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, ..., features) -> y: same shape."""
        self._check(x, "forward", params)
        axes, x_in, x = tuple(range(x.ndim - 1)), x, upcast(x)  # float32 statistics for bf16
        if train:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
        elif state is None:
            raise ValueError(
                f"{layer_name(self)}.forward: train=False normalises with the running statistics, "
                "but state is None; pass state=model.init_state(x) (or the trained model_state)."
            )
        else:
            mean, var = state["mean"], state["var"]
        inv_std = jax.lax.rsqrt(var + self.eps)
        xhat = (x - mean) * inv_std
        y = like(xhat * params["scale"] + params["bias"], x_in)
        return y, NormRes(xhat, inv_std, mean if train else None, var if train else None)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """g = dy·scale. Train: dx = (g - mean(g) - x̂·mean(g x̂)) / √(σ²+eps).

        Eval: dx = g / √(σ²+eps). Both: dscale = Σ dy·x̂, dbias = Σ dy.
        dy and dx have shape (batch, ..., features).
        """
        g = upcast(dy) * params["scale"]
        if res.mean is None:
            dx = g * res.inv_std
        else:
            dx = _dx_through_stats(g, res.xhat, res.inv_std, tuple(range(dy.ndim - 1)))
        return _affine_grads(dy, res.xhat), like(dx, dy)

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        """r ← momentum · r + (1 - momentum) · batch statistic; unchanged in eval mode."""
        if state is None or res.mean is None:
            return state
        m = self.momentum
        return {
            "mean": m * state["mean"] + (1 - m) * res.mean.astype(state["mean"].dtype),
            "var": m * state["var"] + (1 - m) * res.var.astype(state["var"].dtype),
        }


@dataclasses.dataclass(frozen=True)
class LayerNorm(Layer):
    """Layer normalisation over the last axis of each example (train and eval alike).

    Args:
      eps: added to the variance (> 0).

    Parameter tree:
      ``scale`` (features,) ones, ``bias`` (features,) zeros.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> ln = LayerNorm()
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> [round(v, 3) for v in ln.apply(ln.init(jax.random.key(0), x), x)[0].tolist()]
      [-1.225, 0.0, 1.225]
    """

    eps: float = 1e-5

    def __post_init__(self):
        _validate_eps("LayerNorm", self.eps)

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (..., features)."""
        if len(x.shape) < 1:
            raise ShapeError(f"{layer_name(self)}.init: x is a scalar; expected (..., features).")
        return _affine_init(x)

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (..., features) -> y: same shape."""
        check_last_dim(self, "forward", "x", x, params["scale"].shape[0], "params['scale']")
        x_in, x = x, upcast(x)  # float32 statistics for bfloat16 inputs
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        inv_std = jax.lax.rsqrt(var + self.eps)
        xhat = (x - mean) * inv_std
        y = like(xhat * params["scale"] + params["bias"], x_in)
        return y, NormRes(xhat, inv_std, None, None)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = (g - mean(g) - x̂ mean(g x̂)) / √(σ²+eps) over the last axis, g = dy·scale.

        dy and dx have shape (..., features).
        """
        dx = _dx_through_stats(upcast(dy) * params["scale"], res.xhat, res.inv_std, -1)
        return _affine_grads(dy, res.xhat), like(dx, dy)
