"""Activation layers, a = f(z), each with its derivative written by hand.

Each keeps the cheapest residual its derivative can be written in: sigmoid and
tanh keep their output (σ' = σ(1-σ), tanh' = 1 - tanh²), ReLU keeps its output
(its sign is the mask), the rest keep the input. Inputs have any shape; the
derivative is elementwise except for ``Softmax``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, Params, PRNGKey, Residuals, State


class ActRes(NamedTuple):
    r: Array  # same shape as x: the input or the output, whichever the derivative needs


class _Elementwise(Layer):
    """y = f(x) elementwise; dx = dy * f'(x), f' expressed through the kept residual."""

    def _f(self, x: Array) -> tuple[Array, Array]:
        """Returns (y, residual)."""
        raise NotImplementedError

    def _df(self, r: Array) -> Array:
        """f'(x) from the residual."""
        raise NotImplementedError

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: any shape -> y: same shape."""
        y, r = self._f(x)
        return y, ActRes(r)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        return {}, dy * self._df(res.r)


@dataclasses.dataclass(frozen=True)
class Identity(Layer):
    """y = x; dx = dy. Keeps nothing."""

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: any shape -> y: x."""
        return x, ()

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        return {}, dy


@dataclasses.dataclass(frozen=True)
class Sigmoid(_Elementwise):
    """y = 1 / (1 + e^-x); dx = dy * y (1 - y)."""

    def _f(self, x):
        y = jax.nn.sigmoid(x)
        return y, y

    def _df(self, y):
        return y * (1 - y)


@dataclasses.dataclass(frozen=True)
class Tanh(_Elementwise):
    """y = tanh x; dx = dy * (1 - y²)."""

    def _f(self, x):
        y = jnp.tanh(x)
        return y, y

    def _df(self, y):
        return 1 - y * y


@dataclasses.dataclass(frozen=True)
class ReLU(_Elementwise):
    """y = max(x, 0); dx = dy * [y > 0] (the derivative at 0 is taken as 0, as JAX does)."""

    def _f(self, x):
        y = jax.nn.relu(x)  # JAX's relu: derivative 0 at 0, the rule below
        return y, y

    def _df(self, y):
        return (y > 0).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LeakyReLU(_Elementwise):
    """y = x if x >= 0 else slope·x; dx = dy * (1 if x >= 0 else slope).

    Args:
      negative_slope: slope for x < 0 (JAX's default 0.01).
    """

    negative_slope: float = 0.01

    def _f(self, x):
        return jnp.where(x >= 0, x, self.negative_slope * x), x

    def _df(self, x):
        return jnp.where(x >= 0, 1.0, self.negative_slope).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ELU(_Elementwise):
    """y = x if x > 0 else α(eˣ - 1); dx = dy * (1 if y > 0 else y + α).

    Args:
      alpha: the negative saturation value is -alpha (> 0).
    """

    alpha: float = 1.0

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"ELU: alpha must be > 0, got {self.alpha!r}.")

    def _f(self, x):
        y = jnp.where(x > 0, x, self.alpha * jnp.expm1(jnp.minimum(x, 0)))
        return y, y

    def _df(self, y):
        return jnp.where(y > 0, 1.0, y + self.alpha).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class GELU(_Elementwise):
    """Gaussian error linear unit, y = x Φ(x) (or its tanh approximation).

    Exact: dx = dy * (Φ(x) + x φ(x)).
    Approximate: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
    dx = dy * (½(1 + tanh u) + ½x(1 - tanh²u) √(2/π)(1 + 3·0.044715x²)).

    Args:
      approximate: use the tanh approximation (JAX's default), else the erf form.
    """

    approximate: bool = True

    def _f(self, x):
        return jax.nn.gelu(x, approximate=self.approximate), x

    def _df(self, x):
        if self.approximate:
            c = math.sqrt(2 / math.pi)
            t = jnp.tanh(c * (x + 0.044715 * x**3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        cdf = 0.5 * (1 + jax.lax.erf(x / math.sqrt(2)))
        pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf


@dataclasses.dataclass(frozen=True)
class Softplus(_Elementwise):
    """y = log(1 + eˣ) (computed stably); dx = dy * σ(x)."""

    def _f(self, x):
        return jax.nn.softplus(x), x

    def _df(self, x):
        return jax.nn.sigmoid(x)


@dataclasses.dataclass(frozen=True)
class Softmax(Layer):
    """Softmax over ``axis``; dx = y ⊙ (dy - Σ_axis dy ⊙ y).

    For classification prefer raw logits with ``losses.softmax_cross_entropy``,
    which is stabler and cheaper; this layer is for when the probabilities
    themselves are the output.

    Args:
      axis: the axis normalised over.
    """

    axis: int = -1

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: any shape -> y: same shape, summing to 1 along ``axis``."""
        y = jax.nn.softmax(x, axis=self.axis)
        return y, ActRes(y)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        y = res.r
        return {}, y * (dy - jnp.sum(dy * y, axis=self.axis, keepdims=True))
