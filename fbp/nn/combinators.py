"""Combinators: layers built from layers. ``Residual(layer)``: y = x + layer(x)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from fbp.core import (
    Array,
    Layer,
    Params,
    PRNGKey,
    Residuals,
    Shaped,
    ShapeError,
    State,
    layer_name,
    lengths_kw,
)


@dataclasses.dataclass(frozen=True)
class Residual(Layer):
    """Skip connection around ``layer``: ``y = x + layer(x)``; dx = dy + layer's dx.

    The inner layer's params, state, key and residuals pass through unchanged, so
    ``Residual(layer)`` has exactly ``layer``'s params tree and running state;
    ``lengths=`` (batch,) reaches ``layer`` when it takes it (a padded step of a
    recurrent block outputs x there, since the block outputs zeros).

    Args:
      layer: any fbp layer whose output has the shape of its input.

    Raises:
      TypeError: ``layer`` is not an fbp layer (when built).
      ShapeError: the inner layer changes the shape (at init and at trace time).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> block = Residual(nn.Sequential([nn.Dense(4), nn.Tanh()]))
      >>> x = jnp.ones((2, 4))
      >>> params = block.init(jax.random.key(0), x)
      >>> y, res = block.forward(params, x)
      >>> dparams, dx = block.backward(params, res, jnp.ones_like(y))
      >>> y.shape, dx.shape
      ((2, 4), (2, 4))
    """

    layer: Layer

    def __post_init__(self):
        if not isinstance(self.layer, Layer):
            raise TypeError(f"Residual: layer is {self.layer!r}, not an fbp layer.")

    def _check(self, x: Any, y: Any, method: str) -> None:
        if tuple(y.shape) != tuple(x.shape) or y.dtype != x.dtype:
            raise ShapeError(
                f"{layer_name(self)}.{method}: the inner layer maps x of shape {tuple(x.shape)} "
                f"({x.dtype}) to {tuple(y.shape)} ({y.dtype}); a residual needs the same shape "
                "and dtype (add a projection inside the block)."
            )

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, any shape the inner layer takes and keeps."""
        params = self.layer.init(key, x)
        self._check(x, self.layer.output_shape(params, x), "init")
        return params

    def init_state(self, x: Shaped) -> State:
        return self.layer.init_state(x)

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        y = self.layer.output_shape(params, x)
        self._check(x, y, "output_shape")
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
    ) -> Array:
        """x: any shape -> y = x + layer(x): same shape; lengths: (batch,) or None."""
        kw = lengths_kw(self.layer, lengths)
        y = self.layer.apply(params, x, key=key, state=state, train=train, **kw)
        self._check(x, y, "apply")
        return x + y

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
        lengths: Array | None = None,
    ) -> tuple[Array, Residuals]:
        """x: any shape -> y = x + layer(x): same shape; lengths: (batch,) or None."""
        kw = lengths_kw(self.layer, lengths)
        y, res = self.layer.forward(params, x, key=key, state=state, train=train, **kw)
        self._check(x, y, "forward")
        return x + y, res

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = dy + backward_layer(dy).dx;  dparams = backward_layer(dy).dparams.

        dy and dx have x's shape.
        """
        dparams, dx = self.layer.backward(params, res, dy)
        return dparams, dy + dx

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        return self.layer.next_state(state, res)
