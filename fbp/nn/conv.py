"""Convolutions on channels-last input: ``Conv1D`` (batch, time, in), ``Conv2D`` (N, H, W, in).

The forward is XLA's convolution (``lax.conv_general_dilated``); the backward is
written by hand from the same primitive:

* ``dx`` is the transposed convolution: ``dy`` dilated by the strides
  (``lhs_dilation``), convolved with the spatially flipped kernel whose in/out
  axes are swapped, with the padding that undoes the forward's.
* ``dw`` is the correlation of ``x`` with ``dy``: the batch axis is the contracted
  one (``x`` as (C, spatial, N) images, ``dy`` as a (spatial, N, out) kernel), the
  kernel dilation becomes the window stride and the forward stride the kernel
  dilation.
* ``db = Σ dy`` over batch and spatial axes.

All three convolutions use the canonical layout (N, spatial, C) ⋆ (spatial, in,
out): the axes are moved explicitly (``jnp.moveaxis``) rather than relabelled
through dimension numbers. XLA:CPU rewrites a relabelled convolution into the
canonical one itself, but not inside a loop body (``lax.scan``, ``make_epoch``),
where it fell back to a naive convolution loop: a digits-cnn epoch spent 20-30 ms
per step in each backward convolution instead of ~0.2 ms.

Padding is ``'SAME'``, ``'VALID'``, an int (the same on both sides of every
spatial axis) or one ``(low, high)`` pair per spatial axis; it is made explicit
once so that forward and backward agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
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
    param_dtype,
)
from fbp.nn import initializers
from fbp.precision import accumulate, like, upcast

Padding = Any  # 'SAME' | 'VALID' | int | sequence of (low, high) pairs


class ConvRes(NamedTuple):
    x: Array  # (batch, *spatial, in): the input, for dw = x ⋆ dy


def as_tuple(owner: str, name: str, value: Any, n: int, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints (each >= ``minimum``) as an n-tuple."""
    vals = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
    if len(vals) != n or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in vals
    ):
        raise ValueError(
            f"{owner}: {name} must be an int >= {minimum} or {n} such ints, got {value!r}."
        )
    return tuple(int(v) for v in vals)


def normalize_padding(owner: str, padding: Padding, n: int) -> str | tuple[tuple[int, int], ...]:
    """Validate a padding hyperparameter; strings upper-cased, ints as (p, p) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"{owner}: padding must be 'SAME', 'VALID', an int or {n} (low, high) pairs, "
                f"got {padding!r}."
            )
        return padding.upper()
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"{owner}: padding must be >= 0, got {padding!r}.")
        return ((int(padding), int(padding)),) * n
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        pairs = ()
    if len(pairs) != n or any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise ValueError(
            f"{owner}: padding must be 'SAME', 'VALID', an int >= 0 or {n} (low, high) pairs "
            f"of ints >= 0, got {padding!r}."
        )
    return pairs


def explicit_padding(
    padding: str | tuple[tuple[int, int], ...],
    spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """(low, high) per spatial axis; ``window`` is the dilated kernel/window size."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding))
    return padding


def dilated(size: int, dilation: int) -> int:
    """Extent of ``size`` taps spaced ``dilation`` apart."""
    return (size - 1) * dilation + 1


def out_size(n: int, pad: tuple[int, int], window: int, stride: int) -> int:
    """Length of a strided window sweep over ``n`` padded entries."""
    return (n + pad[0] + pad[1] - window) // stride + 1


def check_windows_fit(layer, method, x, pads, window, strides, what: str) -> None:
    """ShapeError unless every spatial axis of x (batch, *spatial, C), padded, holds a window."""
    for axis in range(len(window)):
        n, p, k, s = x.shape[1 + axis], pads[axis], window[axis], strides[axis]
        if out_size(n, p, k, s) < 1:
            raise ShapeError(
                f"{layer_name(layer)}.{method}: x has shape {tuple(x.shape)}; spatial axis "
                f"{axis + 1} has {n} entries (padding {p}) but {what} spans {k}."
            )


def _dim_numbers(n: int) -> tuple[str, str, str]:
    """The canonical layout: (N, spatial, C) input ⋆ (spatial, in, out) kernel."""
    s = "HW" if n == 2 else "W"
    return (f"N{s}C", f"{s}IO", f"N{s}C")


class ConvND(Layer):
    """The shared base of Conv1D and Conv2D (not built directly): ``_n`` spatial axes."""

    _n = 0
    features: int
    kernel_size: int | tuple[int, ...]
    strides: int | tuple[int, ...]
    padding: Padding
    dilation: int | tuple[int, ...]
    use_bias: bool
    w_init: str | Callable
    b_init: str | Callable

    def __post_init__(self):
        name = type(self).__name__
        f = self.features
        if isinstance(f, bool) or not isinstance(f, int) or f <= 0:
            raise ValueError(f"{name}: features must be a positive int, got {self.features!r}.")
        n = self._n
        object.__setattr__(self, "kernel_size", as_tuple(name, "kernel_size", self.kernel_size, n))
        object.__setattr__(self, "strides", as_tuple(name, "strides", self.strides, n))
        object.__setattr__(self, "dilation", as_tuple(name, "dilation", self.dilation, n))
        object.__setattr__(self, "padding", normalize_padding(name, self.padding, n))
        initializers.get(self.w_init, name)
        initializers.get(self.b_init, name)

    # __post_init__ leaves one int per spatial axis in each of these fields.
    @property
    def _kernel(self) -> tuple[int, ...]:
        return cast(tuple[int, ...], self.kernel_size)

    @property
    def _stride(self) -> tuple[int, ...]:
        return cast(tuple[int, ...], self.strides)

    @property
    def _dilate(self) -> tuple[int, ...]:
        return cast(tuple[int, ...], self.dilation)

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, *spatial, in)."""
        check_ndim(self, "init", "x", x, (self._n + 2,), self._layout())
        dtype = param_dtype(x)
        kw, kb = jax.random.split(key)
        shape = (*self._kernel, x.shape[-1], self.features)
        params = {"w": initializers.get(self.w_init)(kw, shape, dtype)}
        if self.use_bias:
            params["b"] = initializers.get(self.b_init)(kb, (self.features,), dtype)
        return params

    def _layout(self) -> str:
        return "(batch, length, in)" if self._n == 1 else "(batch, height, width, in)"

    def geometry(self, x: Array, method: str) -> tuple[tuple[int, int], ...]:
        """Explicit padding for ``x`` (batch, *spatial, in); ShapeError if an axis is too short."""
        window = [dilated(k, d) for k, d in zip(self._kernel, self._dilate, strict=True)]
        pads = explicit_padding(self.padding, x.shape[1:-1], window, self._stride)
        check_windows_fit(self, method, x, pads, window, self._stride, "the dilated kernel")
        return pads

    def _check(self, params, x, method):
        check_ndim(self, method, "x", x, (self._n + 2,), self._layout())
        w = params["w"]
        if x.shape[-1] != w.shape[-2]:
            raise ShapeError(
                f"{layer_name(self)}.{method}: x has shape {tuple(x.shape)} but params['w'] "
                f"{tuple(w.shape)} expects {w.shape[-2]} input channels on the last axis."
            )
        return self.geometry(x, method)

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, *spatial, in) -> y: (batch, *spatial_out, features)."""
        pads = self._check(params, x, "forward")
        y = lax.conv_general_dilated(
            x,
            params["w"],
            self._stride,
            pads,
            rhs_dilation=self._dilate,
            dimension_numbers=_dim_numbers(self._n),
            **accumulate(x),
        )
        if self.use_bias:
            y = y + params["b"]
        return like(y, x), ConvRes(x)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = dy (dilated by strides) ⋆ flip(w)ᵀ;  dw = x ⋆ dy over the batch;  db = Σ dy.

        dy: shape (batch, *spatial_out, features); dx: (batch, *spatial, in).
        """
        x, w = res.x, params["w"]
        pads = self.geometry(x, "backward")
        dparams = {"w": self.weight_grad(x, dy, pads)}
        if self.use_bias:
            dparams["b"] = jnp.sum(upcast(dy), axis=tuple(range(dy.ndim - 1)))
        return dparams, like(self._dx(x.shape, w, dy, pads), dy)

    def _dx(self, x_shape, w, dy, pads):
        """Transposed convolution, padded so that its output has x's spatial shape."""
        spatial = range(self._n)
        pad_dx = []
        for i in spatial:
            k = dilated(self._kernel[i], self._dilate[i])
            lo = k - 1 - pads[i][0]
            hi = x_shape[1 + i] + k - 1 - dilated(dy.shape[1 + i], self._stride[i]) - lo
            pad_dx.append((lo, hi))
        w_t = jnp.swapaxes(lax.rev(w, tuple(spatial)), -1, -2)  # flipped, (*kernel, out, in)
        return lax.conv_general_dilated(
            dy,
            w_t,
            (1,) * self._n,
            pad_dx,
            lhs_dilation=self._stride,
            rhs_dilation=self._dilate,
            dimension_numbers=_dim_numbers(self._n),
            **accumulate(dy),
        )

    def weight_grad(self, x: Array, dy: Array, pads: Sequence[tuple[int, int]]) -> Array:
        """Correlation of x with dy, contracting the batch axis: shape (*kernel, in, out)."""
        pad_dw = []
        for i in range(self._n):
            k = dilated(self._kernel[i], self._dilate[i])
            lo = pads[i][0]
            hi = dilated(dy.shape[1 + i], self._stride[i]) - x.shape[1 + i] + k - lo - 1
            pad_dw.append((lo, hi))
        images = jnp.moveaxis(x, (0, -1), (-1, 0))  # (in, *spatial, batch)
        kernel = jnp.moveaxis(dy, 0, -2)  # (*spatial_out, batch, out)
        g = lax.conv_general_dilated(
            images,
            kernel,
            self._dilate,
            pad_dw,
            rhs_dilation=self._stride,
            dimension_numbers=_dim_numbers(self._n),
            **accumulate(x, dy),
        )  # (in, *kernel, out)
        return jnp.moveaxis(g, 0, -2)


@dataclasses.dataclass(frozen=True)
class Conv2D(ConvND):
    """2-D convolution (cross-correlation, as in every framework) on NHWC input.

    Args:
      features: output channels (> 0).
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw) (>= 1).
      padding: ``'SAME'`` (output H/stride, rounded up), ``'VALID'`` (no padding), an
        int p (p on both sides of both axes) or ((top, bottom), (left, right)).
      dilation: kernel dilation, int or (dh, dw) (>= 1).
      use_bias: whether there is a ``b``.
      w_init, b_init: initialisers (names from ``fbp.nn.initializers`` or callables).

    Parameter tree:
      ``w`` (kh, kw, in, out) and ``b`` (out,).

    Raises:
      ValueError: a hyperparameter is out of range (when built).
      ShapeError: x is not 4-D, its channels do not match ``w``, or it is too small
        for the kernel (at trace time).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv2D(8, 3, strides=2)
      >>> x = jnp.ones((2, 9, 9, 3))
      >>> params = layer.init(jax.random.key(0), x)
      >>> params['w'].shape, layer.apply(params, x).shape
      ((3, 3, 3, 8), (2, 5, 5, 8))
    """

    _n = 2
    features: int
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int, int] = 1
    padding: Padding = "SAME"
    dilation: int | tuple[int, int] = 1
    use_bias: bool = True
    w_init: str | Callable = "glorot_uniform"
    b_init: str | Callable = "zeros"


@dataclasses.dataclass(frozen=True)
class Conv1D(ConvND):
    """1-D convolution over time on batch-major sequences (batch, time, in).

    Args: as ``Conv2D``, with one int (or one pair) per hyperparameter.

    Parameter tree:
      ``w`` (k, in, out) and ``b`` (out,).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv1D(4, 5, padding='VALID', dilation=2)
      >>> x = jnp.ones((2, 20, 3))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 12, 4)
    """

    _n = 1
    features: int
    kernel_size: int | tuple[int] = 3
    strides: int | tuple[int] = 1
    padding: Padding = "SAME"
    dilation: int | tuple[int] = 1
    use_bias: bool = True
    w_init: str | Callable = "glorot_uniform"
    b_init: str | Callable = "zeros"
