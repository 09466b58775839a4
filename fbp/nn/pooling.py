"""Pooling and shape layers: MaxPool2D, AvgPool2D, GlobalAvgPool, Flatten, Reshape.

Pooling runs on channels-last input (N, H, W, C) with XLA's ``reduce_window``.
Both pooling backwards visit the window offsets (i, j) one by one: the strided
slice of the padded input at offset (i, j) is that tap of every window, and the
tap's share of ``dy`` goes back to those positions by an interior-padded
``lax.pad`` (a strided scatter that XLA fuses into one loop with the sum).

* Max: the forward keeps, per window, the index of the tap holding its maximum
  (the first in row-major window order on ties: the tie rule of XLA's
  ``select_and_scatter`` that ``jax.grad`` uses, so gradients agree with ties
  too, e.g. after a ReLU); the backward sends ``dy`` to that tap. It keeps one
  int8 per output instead of x.
* Average: every tap gets ``dy / count``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax

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
    sum_arrays,
)
from fbp.nn.conv import (
    Padding,
    as_tuple,
    check_windows_fit,
    explicit_padding,
    normalize_padding,
)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arg"], meta_fields=["x_shape"])
@dataclasses.dataclass(frozen=True)
class MaxPoolRes:
    """Which tap of each window holds its maximum; x's shape is static tree structure."""

    arg: Array  # (N, oh, ow, C) int8: row-major tap index of each window's first maximum
    x_shape: tuple[int, ...]  # static shape of x


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["x_shape"])
@dataclasses.dataclass(frozen=True)
class ShapeRes:
    """Residual of layers whose backward needs only x's static shape: a pytree without leaves,
    so the shape survives ``jax.jit`` as part of the tree structure."""

    x_shape: tuple[int, ...]  # static shape of x; no arrays are kept


class _Pool2D(Layer):
    """Window/stride/padding handling shared by the 2-D pools."""

    window: int | tuple[int, int]
    strides: int | tuple[int, int] | None
    padding: Padding

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "window", as_tuple(name, "window", self.window, 2))
        strides = self.window if self.strides is None else self.strides
        object.__setattr__(self, "strides", as_tuple(name, "strides", strides, 2))
        pad = normalize_padding(name, self.padding, 2)
        if not isinstance(pad, str) and any(
            max(p) >= k for p, k in zip(pad, self._window, strict=True)
        ):
            raise ValueError(
                f"{name}: padding {self.padding!r} must be smaller than the window {self.window}."
            )
        object.__setattr__(self, "padding", pad)

    # __post_init__ leaves (height, width) pairs in window and strides.
    @property
    def _window(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.window)

    @property
    def _stride(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.strides)

    def _pads(self, x: Shaped, method: str) -> tuple[tuple[int, int], ...]:
        check_ndim(self, method, "x", x, (4,), "(batch, height, width, channels)")
        pads = explicit_padding(self.padding, x.shape[1:3], self._window, self._stride)
        check_windows_fit(self, method, x, pads, self._window, self._stride, "the window")
        return pads

    def _reduce(self, x: Array, init: float, op, pads) -> Array:
        """``reduce_window`` of x; ``init`` a Python scalar so that JAX sees the monoid."""
        return lax.reduce_window(
            x,
            init,
            op,
            (1, *self._window, 1),
            (1, *self._stride, 1),
            ((0, 0), *pads, (0, 0)),
        )

    def _taps(self):
        return [(i, j) for i in range(self._window[0]) for j in range(self._window[1])]

    def _tap(self, xp: Array, out_hw, i: int, j: int) -> Array:
        """Entry (i, j) of every window of the padded input: shape (N, oh, ow, C)."""
        (sh, sw), (oh, ow) = self._stride, out_hw
        limit = (xp.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, xp.shape[3])
        return lax.slice(xp, (0, i, j, 0), limit, (1, sh, sw, 1))

    def _untap(self, g: Array, padded_hw, i: int, j: int) -> Array:
        """g (N, oh, ow, C) placed at tap (i, j) of each window, in a padded-input-shaped array."""
        (sh, sw), (_, oh, ow, _) = self._stride, g.shape
        hi_h = padded_hw[0] - i - (oh - 1) * sh - 1
        hi_w = padded_hw[1] - j - (ow - 1) * sw - 1
        zero = jnp.zeros((), g.dtype)
        return lax.pad(g, zero, ((0, 0, 0), (i, hi_h, sh - 1), (j, hi_w, sw - 1), (0, 0, 0)))


def _crop(xp: Array, pads) -> Array:
    """Undo the spatial padding of a padded-input-shaped array."""
    (t, b), (lft, r) = pads
    return xp[:, t : xp.shape[1] - b, lft : xp.shape[2] - r, :]


@dataclasses.dataclass(frozen=True)
class MaxPool2D(_Pool2D):
    """Maximum over windows of NHWC input; ``dy`` goes to each window's (first) maximum.

    Args:
      window: int or (kh, kw).
      strides: int or (sh, sw); ``None`` (default) means the window (no overlap).
      padding: ``'VALID'`` (default), ``'SAME'``, an int or ((top, bottom), (left, right));
        padded entries are -inf, so they are never the maximum.

    Raises:
      ValueError: bad window/strides/padding (when built).
      ShapeError: x is not 4-D or smaller than a window (at trace time).

    Examples:
      >>> import jax.numpy as jnp
      >>> MaxPool2D(2).apply({}, jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0].tolist()
      [[5.0, 7.0], [13.0, 15.0]]
    """

    window: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None
    padding: Padding = "VALID"

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (N, H, W, C) -> y: (N, oh, ow, C)."""
        pads = self._pads(x, "forward")
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
        out_hw = tuple((xp.shape[1 + a] - self._window[a]) // self._stride[a] + 1 for a in (0, 1))
        # One pass over the taps gives the maximum and which tap holds it (the first on
        # ties). Deciding the tap here, from the same values as y, keeps the backward free
        # of float comparisons: under jit XLA may recompute x in two fusions with
        # different rounding, and a test ``x == y`` in the backward could then miss.
        taps = self._taps()
        y = self._tap(xp, out_hw, *taps[0])
        arg = jnp.zeros(y.shape, jnp.int32)
        for t, (i, j) in enumerate(taps[1:], start=1):
            v = self._tap(xp, out_hw, i, j)
            better = v > y
            y, arg = jnp.where(better, v, y), jnp.where(better, t, arg)
        itype = jnp.int8 if len(self._taps()) <= 127 else jnp.int32
        return y, MaxPoolRes(arg.astype(itype), tuple(x.shape))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx[p] = Σ_windows w: dy[w] · [p is w's first maximum].

        dy: shape (N, oh, ow, C); dx: (N, H, W, C).
        """
        x = jax.ShapeDtypeStruct(res.x_shape, dy.dtype)
        pads = self._pads(x, "backward")
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads, strict=True))
        zero = jnp.zeros((), dy.dtype)
        if self._stride == self._window:  # windows tile the input: one broadcast, no pads
            hit = self._tile(res.arg) == self._tap_ids()
            dxp = self._tile_back(jnp.where(hit, self._tile(dy), zero), padded)
        else:
            dxp = sum_arrays(
                self._untap(jnp.where(res.arg == t, dy, zero), padded, i, j)
                for t, (i, j) in enumerate(self._taps())
            )
        return {}, _crop(dxp, pads)

    def _tile(self, v: Array) -> Array:
        """(N, oh, ow, C) -> (N, oh, 1, ow, 1, C), to broadcast over the window axes."""
        return v[:, :, None, :, None, :]

    def _tap_ids(self) -> Array:
        """Row-major tap index of each window position, shape (1, 1, kh, 1, kw, 1)."""
        kh, kw = self._window
        ids = jnp.arange(kh, dtype=jnp.int32)[:, None] * kw + jnp.arange(kw, dtype=jnp.int32)
        return ids.reshape(1, 1, kh, 1, kw, 1)

    def _tile_back(self, g: Array, padded_hw) -> Array:
        """(N, oh, kh, ow, kw, C) -> padded-input shape, zeros past the last window."""
        n, oh, kh, ow, kw, c = g.shape
        g = g.reshape(n, oh * kh, ow * kw, c)
        hi_h, hi_w = padded_hw[0] - oh * kh, padded_hw[1] - ow * kw
        zero = jnp.zeros((), g.dtype)
        return lax.pad(g, zero, ((0, 0, 0), (0, hi_h, 0), (0, hi_w, 0), (0, 0, 0)))


@dataclasses.dataclass(frozen=True)
class AvgPool2D(_Pool2D):
    """Mean over windows of NHWC input; each tap of a window gets ``dy / count``.

    Args:
      window: int or (kh, kw).
      strides: int or (sh, sw); ``None`` (default) means the window.
      padding: ``'VALID'`` (default), ``'SAME'``, an int or ((top, bottom), (left, right)).
      count_include_pad: divide by the full window size (True, PyTorch's default) or by
        the number of real, unpadded entries (False).

    Examples:
      >>> import jax.numpy as jnp
      >>> AvgPool2D(2).apply({}, jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0].tolist()
      [[2.5, 4.5], [10.5, 12.5]]
    """

    window: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None
    padding: Padding = "VALID"
    count_include_pad: bool = True

    def _count(self, x: Shaped, pads) -> Array:
        if self.count_include_pad or all(p == (0, 0) for p in pads):
            return jnp.asarray(math.prod(self._window), x.dtype)
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        return self._reduce(ones, 0.0, lax.add, pads)[0]

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (N, H, W, C) -> y: (N, oh, ow, C)."""
        pads = self._pads(x, "forward")
        y = self._reduce(x, 0.0, lax.add, pads) / self._count(x, pads)
        return y, ShapeRes(tuple(x.shape))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx[p] = Σ_windows w ∋ p: dy[w] / count[w];  dy (N, oh, ow, C) -> dx (N, H, W, C)."""
        x = jax.ShapeDtypeStruct(res.x_shape, dy.dtype)
        pads = self._pads(x, "backward")
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads, strict=True))
        g = dy / self._count(x, pads)
        dxp = sum_arrays(self._untap(g, padded, i, j) for i, j in self._taps())
        return {}, _crop(dxp, pads)


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Mean over every spatial axis: (batch, *spatial, C) -> (batch, C); dx = dy / #spatial.

    Examples:
      >>> import jax.numpy as jnp
      >>> GlobalAvgPool().apply({}, jnp.ones((2, 5, 5, 3))).shape
      (2, 3)
    """

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, *spatial, C) with at least one spatial axis -> y: (batch, C)."""
        if x.ndim < 3:
            raise ShapeError(
                f"{layer_name(self)}.forward: x has shape {tuple(x.shape)} but expected "
                "(batch, *spatial, channels) with at least one spatial axis (>= 3 dims)."
            )
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))), ShapeRes(tuple(x.shape))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx[b, ..., c] = dy[b, c] / Π spatial;  dy (batch, C) -> dx (batch, *spatial, C)."""
        shape = res.x_shape
        n = math.prod(shape[1:-1])
        g = (dy / n).reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
        dx = jnp.broadcast_to(g, shape)
        return {}, dx


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """(batch, d1, d2, ...) -> (batch, d1·d2·...); dx = dy reshaped back.

    Examples:
      >>> import jax.numpy as jnp
      >>> Flatten().apply({}, jnp.ones((2, 4, 4, 3))).shape
      (2, 48)
    """

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, ...) with >= 1 dim -> y: (batch, prod(rest))."""
        if x.ndim < 1:
            raise ShapeError(f"{layer_name(self)}.forward: x is a scalar; expected (batch, ...).")
        return x.reshape(x.shape[0], -1), ShapeRes(tuple(x.shape))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = reshape(dy, x.shape)."""
        return {}, dy.reshape(res.x_shape)


@dataclasses.dataclass(frozen=True)
class Reshape(Layer):
    """Reshape every example: (batch, ...) -> (batch, *shape); dx = dy reshaped back.

    Args:
      shape: the per-example output shape; one entry may be -1.

    Raises:
      ValueError: ``shape`` is not a tuple of positive ints with at most one -1.
      ShapeError: an example's size does not fit ``shape`` (at trace time).

    Examples:
      >>> import jax.numpy as jnp
      >>> Reshape((8, 8, 1)).apply({}, jnp.ones((5, 64))).shape
      (5, 8, 8, 1)
    """

    shape: tuple[int, ...]

    def __post_init__(self):
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if (
            shape is None
            or not all(isinstance(d, int) and (d > 0 or d == -1) for d in shape)
            or shape.count(-1) > 1
        ):
            raise ValueError(
                "Reshape: shape must be a tuple of positive ints (one may be -1), "
                f"got {self.shape!r}."
            )
        object.__setattr__(self, "shape", shape)

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, ...) -> y: (batch, *shape)."""
        size = math.prod(x.shape[1:]) if x.ndim >= 1 else 0
        known = math.prod(d for d in self.shape if d != -1)
        fits = size % known == 0 if -1 in self.shape else size == known
        if x.ndim < 1 or not fits:
            raise ShapeError(
                f"{layer_name(self)}.forward: x has shape {tuple(x.shape)} but expected "
                f"(batch, ...) with {known}{' × k' if -1 in self.shape else ''} entries per "
                "example."
            )
        return x.reshape(x.shape[0], *self.shape), ShapeRes(tuple(x.shape))

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = reshape(dy, x.shape)."""
        return {}, dy.reshape(res.x_shape)
