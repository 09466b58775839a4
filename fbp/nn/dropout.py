"""Inverted dropout with an explicit PRNG key."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, Params, PRNGKey, Residuals, State, layer_name


class DropoutRes(NamedTuple):
    keep: Array | None  # bool, shape of x: the kept entries (None at eval: identity)


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Zero each entry with probability ``drop_rate`` and scale the rest by 1 / (1 - drop_rate).

    Train mode (``train=True``) needs a ``key``; the same key gives the same mask, so
    a step is reproducible. Eval mode is the identity and ignores the key.

    Args:
      drop_rate: probability of dropping an entry, in [0, 1).

    Raises:
      ValueError: drop_rate out of range (when built); train=True without a key.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dropout(0.5)
      >>> y = layer.apply({}, jnp.ones((2, 4)), key=jax.random.key(0), train=True)
      >>> sorted(set(y.ravel().tolist()))
      [0.0, 2.0]
    """

    drop_rate: float = 0.5

    def __post_init__(self):
        r = self.drop_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"Dropout: drop_rate must be in [0, 1), got {r!r}.")

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
        if not train or self.drop_rate == 0:
            return x, DropoutRes(None)
        if key is None:
            raise ValueError(
                f"{layer_name(self)}.forward: train=True needs a PRNG key for the dropout mask, "
                "got key=None; pass key=jax.random.key(...) (fbp.train passes one per step)."
            )
        keep = jax.random.bernoulli(key, 1.0 - self.drop_rate, x.shape)
        return self._mask(x, keep), DropoutRes(keep)

    def _mask(self, v: Array, keep: Array) -> Array:
        scale = jnp.asarray(1.0 / (1.0 - self.drop_rate), v.dtype)
        return jnp.where(keep, v * scale, jnp.zeros((), v.dtype))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = dy · keep / (1 - drop_rate) (the forward's mask), dx = dy at eval; x's shape."""
        return {}, dy if res.keep is None else self._mask(dy, res.keep)
