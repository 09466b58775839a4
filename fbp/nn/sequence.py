"""Sequence helpers and layers: lengths and masks, ``Bidirectional``, ``LastStep``.

Variable-length batches are padded to a common length ``time`` and described by
``lengths``, an int array of shape (batch,): steps ``t >= lengths[b]`` are padding.
Recurrent layers, ``LastStep`` and the layers built around others (``Bidirectional``,
``Residual``, ``Frozen``, ``Recompute``, ``Sequential``) take it as the keyword
``lengths=`` (the rule is in ``fbp.core``); per-step losses take the matching mask as
``where=``:

    y = layer.apply(params, x, lengths=lengths)              # (batch, time, H)
    loss = losses.mse(pred, target, where=length_mask(lengths, time))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

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
    check_ndim,
    layer_name,
    lengths_kw,
)


def check_lengths(layer: Any, method: str, lengths: Any, batch: int) -> None:
    """Raise ShapeError unless ``lengths`` is an int array of shape (batch,)."""
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ShapeError(
            f"{layer_name(layer)}.{method}: lengths has shape {tuple(lengths.shape)} and dtype "
            f"{lengths.dtype} but expected integers of shape (batch,) = ({batch},)."
        )


def length_mask(lengths: Array, time: int) -> Array:
    """True on valid steps: ``mask[b, t] = t < lengths[b]``.

    Args:
      lengths: valid steps per sequence, int, shape (batch,).
      time: padded length.

    Returns:
      bool array, shape (batch, time): the ``where=`` of a per-step loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> length_mask(jnp.array([1, 3]), 3).astype(int).tolist()
      [[1, 0, 0], [1, 1, 1]]
    """
    return jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None]


def time_mask(lengths: Array, time: int) -> Array:
    """``length_mask`` time-major, shape (time, batch, 1), as recurrent scans read it."""
    return length_mask(lengths, time).T[:, :, None]


def reverse_padded(x: Array, lengths: Array | None = None) -> Array:
    """Reverse each sequence's valid steps in time, leaving padding where it is.

    ``out[b, t] = x[b, lengths[b] - 1 - t]`` for ``t < lengths[b]``, ``x[b, t]`` after.
    The map is its own inverse, so it is also its own backward.

    Args:
      x: sequences, shape (batch, time, ...).
      lengths: int, shape (batch,); None reverses the whole time axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(6).reshape(2, 3)
      >>> reverse_padded(x, jnp.array([2, 3])).tolist()
      [[1, 0, 2], [5, 4, 3]]
    """
    if lengths is None:
        return jnp.flip(x, axis=1)
    t = jnp.arange(x.shape[1])[None, :]
    n = jnp.asarray(lengths)[:, None]
    idx = jnp.where(t < n, n - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class BidirectionalRes(NamedTuple):
    fwd: Any  # residuals of the forward-time layer
    bwd: Any  # residuals of the layer run on the time-reversed input
    lengths: Array | None  # (batch,) or None


@dataclasses.dataclass(frozen=True)
class Bidirectional(Layer):
    """Runs ``layer`` forward in time and, with its own params, on the reversed input.

    y = concat(layer(x), reverse(layer(reverse(x))))  on the last axis, where reverse
    flips each sequence's valid steps (``reverse_padded``), so y[:, t] sees the whole
    sequence from both sides. backward: dx = dx_fwd + reverse(dx_bwd).

    Args:
      layer: a stateless recurrent layer (``stateful=True`` is refused: a reversed
        pass has no meaningful carry across windows), possibly wrapped
        (``Frozen(GRU(8))``); ``lengths`` reaches it when it takes it.

    Parameter tree:
      ``{'forward': params of layer, 'backward': params of layer}``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fbp import nn
      >>> layer = Bidirectional(nn.GRU(4))
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
      >>> layer.apply(params, jnp.ones((2, 5, 3))).shape
      (2, 5, 8)
    """

    layer: Layer

    def __post_init__(self):
        if not isinstance(self.layer, Layer):
            raise TypeError(f"Bidirectional: layer is {self.layer!r}, not an fbp layer.")
        inner: Any = self.layer
        while not getattr(inner, "stateful", False) and isinstance(
            getattr(inner, "layer", None), Layer
        ):
            inner = inner.layer  # look through Frozen, Recompute, Residual
        if getattr(inner, "stateful", False):
            raise ValueError(
                f"Bidirectional: {layer_name(inner)} is stateful; pass a stateless layer."
            )

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, time, in)."""
        k_f, k_b = jax.random.split(key)
        return {"forward": self.layer.init(k_f, x), "backward": self.layer.init(k_b, x)}

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
        """x: (batch, time, in) -> (batch, time, 2·hidden)."""
        return self.forward(params, x, train=train, lengths=lengths)[0]

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
        """x: (batch, time, in) -> y: (batch, time, 2·hidden); lengths: (batch,) or None."""
        check_ndim(self, "forward", "x", x, (3,), "(batch, time, in)")
        kw = {"train": train, **lengths_kw(self.layer, lengths)}
        y_f, r_f = self.layer.forward(params["forward"], x, **kw)
        y_b, r_b = self.layer.forward(params["backward"], reverse_padded(x, lengths), **kw)
        y = jnp.concatenate([y_f, reverse_padded(y_b, lengths)], axis=-1)
        return y, BidirectionalRes(r_f, r_b, lengths)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dy = (dy_f, dy_b) on the last axis; dx = dx_f + reverse(dx_b(reverse(dy_b)))."""
        h = dy.shape[-1] // 2
        dp_f, dx_f = self.layer.backward(params["forward"], res.fwd, dy[..., :h])
        dy_b = reverse_padded(dy[..., h:], res.lengths)
        dp_b, dx_b = self.layer.backward(params["backward"], res.bwd, dy_b)
        return {"forward": dp_f, "backward": dp_b}, dx_f + reverse_padded(dx_b, res.lengths)


class LastStepRes(NamedTuple):
    onehot: Array  # (batch, time): 1 at the selected step, in x's dtype


@dataclasses.dataclass(frozen=True)
class LastStep(Layer):
    """The last (valid) step of a sequence: (batch, time, H) -> (batch, H).

    y[b] = x[b, lengths[b] - 1] (x[b, -1] without lengths; a length of 0 selects
    step 0). backward: dx[b, t] = dy[b] at the selected step, 0 elsewhere.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(12.0).reshape(2, 3, 2)
      >>> LastStep().apply({}, x, lengths=jnp.array([1, 3])).tolist()
      [[0.0, 1.0], [10.0, 11.0]]
    """

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
        """x: (batch, time, H) -> (batch, H)."""
        return self.forward(params, x, lengths=lengths)[0]

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
        """x: (batch, time, H) -> y: (batch, H); lengths: (batch,) or None."""
        check_ndim(self, "forward", "x", x, (3,), "(batch, time, H)")
        batch, time = x.shape[0], x.shape[1]
        if lengths is None:
            last = jnp.full((batch,), time - 1)
        else:
            check_lengths(self, "forward", lengths, batch)
            last = jnp.clip(jnp.asarray(lengths) - 1, 0, time - 1)
        onehot = (jnp.arange(time)[None, :] == last[:, None]).astype(x.dtype)
        y = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return y, LastStepRes(onehot)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = onehot[..., None] · dy[:, None, :].

        dy: shape (batch, features); dx: (batch, time, features).
        """
        if dy.ndim != 2:
            raise ShapeError(
                f"LastStep().backward: dy has shape {tuple(dy.shape)} but expected (batch, H)."
            )
        return {}, res.onehot[:, :, None] * dy[:, None, :]
