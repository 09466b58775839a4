"""Wrappers that change how a layer is differentiated, not what it computes.

``Frozen(layer)`` passes the error signal through (dx) but returns zero weight
gradients, so under jit the weight-gradient products are never computed (XLA drops
the unused ``xᵀ dy``); its params are the wrapped layer's own, so pretrained
parameters load unchanged. ``Recompute(layer)`` keeps only the layer's input for
backward and re-runs the layer's forward there: less residual memory, more work.
Both take ``lengths=`` (batch,) and hand it to the wrapped layer when it takes it
(``fbp.core.lengths_kw``), so a wrapped recurrent layer masks padded steps as it does
unwrapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, Params, PRNGKey, Residuals, Shaped, State, lengths_kw


def _check_layer(owner: str, layer: Any) -> None:
    if not isinstance(layer, Layer):
        raise TypeError(f"{owner}: layer must be an fbp layer, got {layer!r}.")


@dataclasses.dataclass(frozen=True)
class Frozen(Layer):
    """``layer`` with its parameters held fixed: dx as usual, dparams all zeros.

    The weights still shape the backward signal (earlier layers keep learning),
    but ``layer``'s own weight-gradient work is skipped: the wrapped backward's
    dparams are discarded, and jit removes the products that would have made them.

    Args:
      layer: any fbp layer (a whole ``Sequential`` freezes a block).

    Parameter tree:
      exactly ``layer``'s (no extra nesting), so ``Frozen(Dense(10))`` loads a Dense's.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.Frozen(nn.Dense(3))
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> y, res = layer.forward(params, jnp.ones((2, 4)))
      >>> dparams, dx = layer.backward(params, res, jnp.ones_like(y))
      >>> float(abs(dparams['w']).sum()), dx.shape
      (0.0, (2, 4))
    """

    layer: Layer

    def __post_init__(self):
        _check_layer("Frozen", self.layer)

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        return self.layer.init(key, x)

    def init_state(self, x: Shaped) -> State:
        return self.layer.init_state(x)

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
        """x: what ``layer`` takes -> y: what ``layer`` returns; lengths: (batch,) or None."""
        kw = lengths_kw(self.layer, lengths)
        return self.layer.apply(params, x, key=key, state=state, train=train, **kw)

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
        """x: what ``layer`` takes -> y: what ``layer`` returns; lengths: (batch,) or None."""
        kw = lengths_kw(self.layer, lengths)
        return self.layer.forward(params, x, key=key, state=state, train=train, **kw)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = layer's dx (x's shape);  dparams = 0 (same tree as params)."""
        _, dx = self.layer.backward(params, res, dy)
        return jax.tree.map(jnp.zeros_like, params), dx

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        return self.layer.next_state(state, res)


class RecomputeRes(NamedTuple):
    x: Array  # the wrapped layer's input, shape (batch, ...)
    key: Array | None  # the PRNG key forward got (same dropout mask on recompute)
    state: Any  # the running state forward got, or None
    next_state: Any  # layer.next_state after this forward (small: running statistics)
    train: Any  # None for eval mode, () for train mode (a flag in the tree structure)
    lengths: Array | None  # (batch,) as forward got it, or None


@dataclasses.dataclass(frozen=True)
class Recompute(Layer):
    """``layer`` recomputed in backward instead of storing its residuals.

    Forward keeps only ``layer``'s input (plus its key/state); backward re-runs
    ``layer.forward`` on it and then ``layer.backward``. Wrapping a block
    ``Sequential([Dense, Tanh, Dense, Tanh])`` keeps one array instead of four.
    An optimisation barrier keeps XLA from merging the recomputation with the
    original forward (which would store the residuals after all).

    Args:
      layer: any fbp layer.

    Parameter tree:
      exactly ``layer``'s.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = nn.Recompute(nn.Sequential([nn.Dense(3), nn.Tanh()]))
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 4)))
      >>> y, res = layer.forward(params, jnp.ones((2, 4)))
      >>> res.x.shape
      (2, 4)
    """

    layer: Layer

    def __post_init__(self):
        _check_layer("Recompute", self.layer)

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        return self.layer.init(key, x)

    def init_state(self, x: Shaped) -> State:
        return self.layer.init_state(x)

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
        """x: what ``layer`` takes -> y: what ``layer`` returns; lengths: (batch,) or None."""
        kw = lengths_kw(self.layer, lengths)
        return self.layer.apply(params, x, key=key, state=state, train=train, **kw)

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
        """x: what ``layer`` takes -> y: what ``layer`` returns; keeps only x (and key, state,
        lengths, shape (batch,))."""
        kw = lengths_kw(self.layer, lengths)
        y, inner = self.layer.forward(params, x, key=key, state=state, train=train, **kw)
        new_state = self.layer.next_state(state, inner)
        train_flag = () if train else None
        return y, RecomputeRes(x, key, state, new_state, train_flag, kw.get("lengths"))

    def recompute(self, params: Params, res: RecomputeRes, dy: Array) -> tuple[Residuals, Array]:
        """The wrapped layer's residuals, recomputed from the kept x (batch, ...), and dy."""
        x, dy = jax.lax.optimization_barrier((res.x, dy))
        kw = {} if res.lengths is None else {"lengths": res.lengths}
        train = res.train is not None
        _, inner = self.layer.forward(params, x, key=res.key, state=res.state, train=train, **kw)
        return inner, dy

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """(dparams, dx) = layer.backward(params, layer.forward(params, x)[1], dy)."""
        inner, dy = self.recompute(params, res, dy)
        return self.layer.backward(params, inner, dy)

    def next_state(self, state: State | None, res: Residuals) -> State | None:
        return res.next_state
