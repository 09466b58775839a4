"""Position information for attention: rotary embeddings, sinusoidal and learned positions.

* Rotary (RoPE, Su et al. 2021) rotates each (first half, second half) pair of a
  query or key vector by an angle proportional to its position, so that q·k depends
  on the positions only through their difference. With h = head_dim / 2,
  θ_i = base^(−i/h) and angle a = t · θ_i:

      y1 = x1 cos a − x2 sin a,   y2 = x2 cos a + x1 sin a     (x1 = x[..., :h], x2 = x[..., h:])

  (the half-split convention of GPT-NeoX and Hugging Face's LLaMA). The map is a
  rotation, so its backward is the rotation by −a:
  dx1 = dy1 cos a + dy2 sin a,  dx2 = dy2 cos a − dy1 sin a.
* ``SinusoidalPositions`` adds Vaswani et al.'s fixed table
  PE[t, 2i] = sin(t / base^(2i/D)), PE[t, 2i+1] = cos(t / base^(2i/D)); dx = dy.
* ``LearnedPositions(max_len)`` adds a learned vector per position, looked up and
  scatter-added by ``Embedding``: y = x + w[t]; dw[t] = Σ_batch dy[:, t]; dx = dy.
"""

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
    check_ndim,
    layer_name,
    param_dtype,
)
from fbp.nn import initializers
from fbp.nn.embedding import Embedding, EmbeddingRes


def _rope_angles(time: int, half: int, base: float, dtype, positions: Array | None):
    pos = jnp.arange(time, dtype=dtype) if positions is None else positions.astype(dtype)
    inv_freq = base ** (-jnp.arange(half, dtype=dtype) / half)
    a = pos[:, None] * inv_freq[None, :]  # (time, half)
    return jnp.cos(a), jnp.sin(a)


def _check_rope(x: Array, positions: Array | None, owner: str) -> int:
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ShapeError(
            f"{owner}: x has shape {tuple(x.shape)} but expected (..., time, head_dim) with an "
            "even head_dim."
        )
    if positions is not None and tuple(positions.shape) != (x.shape[-2],):
        raise ShapeError(
            f"{owner}: positions has shape {tuple(positions.shape)} but expected (time,) = "
            f"({x.shape[-2]},)."
        )
    return x.shape[-1] // 2


def rope_forward(x: Array, positions: Array | None = None, base: float = 10000.0) -> Array:
    """Rotate (x1, x2) = (x[..., :h], x[..., h:]) by angle t · base^(−i/h) per position t.

    Args:
      x: queries or keys, shape (..., time, head_dim), head_dim even.
      positions: shape (time,) (default 0, 1, ..., time − 1).
      base: wavelength base.

    Returns:
      y, the shape of x: y1 = x1 cos a − x2 sin a, y2 = x2 cos a + x1 sin a.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 3, 2))
      >>> y = rope_forward(x)
      >>> bool(jnp.allclose(jnp.sum(y * y, -1), 2.0))  # a rotation keeps the norm
      True
    """
    half = _check_rope(x, positions, "rope_forward")
    cos, sin = _rope_angles(x.shape[-2], half, base, x.dtype, positions)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dy: Array, positions: Array | None = None, base: float = 10000.0) -> Array:
    """dx = the rotation of dy by −a: dx1 = dy1 cos a + dy2 sin a, dx2 = dy2 cos a − dy1 sin a.

    Args:
      dy: cotangent of ``rope_forward``'s output, shape (..., time, head_dim).
      positions, base: as given to ``rope_forward``.
    """
    half = _check_rope(dy, positions, "rope_backward")
    cos, sin = _rope_angles(dy.shape[-2], half, base, dy.dtype, positions)
    d1, d2 = dy[..., :half], dy[..., half:]
    return jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)


def sinusoid_table(time: int, features: int, base: float = 10000.0, dtype=jnp.float32) -> Array:
    """Vaswani et al.'s table, shape (time, features): sin on even columns, cos on odd ones.

    Examples:
      >>> sinusoid_table(2, 4).tolist()[0]
      [0.0, 1.0, 0.0, 1.0]
    """
    half = -(-features // 2)
    freq = base ** (-2.0 * jnp.arange(half, dtype=dtype) / features)
    a = jnp.arange(time, dtype=dtype)[:, None] * freq[None, :]
    return jnp.stack([jnp.sin(a), jnp.cos(a)], axis=-1).reshape(time, 2 * half)[:, :features]


class PositionsRes(NamedTuple):
    pass  # the backward of an added table needs nothing


@dataclasses.dataclass(frozen=True)
class SinusoidalPositions(Layer):
    """y = x + PE[:time]: fixed sinusoidal positions added to (batch, time, features).

    Args:
      base: wavelength base (10000 as in Vaswani et al.).

    Examples:
      >>> import jax.numpy as jnp
      >>> y = SinusoidalPositions().apply({}, jnp.zeros((1, 2, 4)))
      >>> [round(v, 4) for v in y[0, 1, :2].tolist()]  # sin 1, cos 1
      [0.8415, 0.5403]
    """

    base: float = 10000.0

    def __post_init__(self):
        if isinstance(self.base, bool) or not isinstance(self.base, (int, float)) or self.base <= 1:
            raise ValueError(f"SinusoidalPositions: base must be a number > 1, got {self.base!r}.")

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, time, features) -> y: same shape."""
        check_ndim(self, "forward", "x", x, (3,), "(batch, time, features)")
        return x + sinusoid_table(x.shape[1], x.shape[2], self.base, x.dtype), PositionsRes()

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dx = dy, shape (batch, time, dim)."""
        return {}, dy


class LearnedPositionsRes(NamedTuple):
    positions: Array  # (time,) int: 0..time-1, the rows of w that were added


@dataclasses.dataclass(frozen=True)
class LearnedPositions(Layer):
    """y = x + w[:time]: a learned vector per position (GPT-2's position embedding).

    The lookup and its scatter-add backward are ``Embedding``'s, applied to the
    positions 0..time-1; the parameters follow x's dtype.

    Args:
      max_len: the longest sequence (rows of ``w``).
      w_init: initialiser of ``w`` (default N(0, 0.02²), as GPT-2).

    Parameter tree:
      ``w`` (max_len, features).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = LearnedPositions(16)
      >>> x = jnp.zeros((2, 5, 8))
      >>> layer.init(jax.random.key(0), x)['w'].shape
      (16, 8)
    """

    max_len: int
    w_init: str | Callable = "gpt2"

    def __post_init__(self):
        m = self.max_len
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"LearnedPositions: max_len must be a positive int, got {m!r}.")
        if self.w_init != "gpt2":
            initializers.get(self.w_init, "LearnedPositions")

    def _check(self, x, method: str) -> None:
        check_ndim(self, method, "x", x, (3,), "(batch, time, features)")
        if x.shape[1] > self.max_len:
            raise ShapeError(
                f"{layer_name(self)}.{method}: x has {x.shape[1]} steps (shape "
                f"{tuple(x.shape)}) but max_len is {self.max_len}."
            )

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example input, shape (batch, time, features)."""
        self._check(x, "init")
        init = initializers.normal(0.02) if self.w_init == "gpt2" else self.w_init
        shape = (self.max_len, x.shape[-1])
        return {"w": initializers.get(init)(key, shape, param_dtype(x))}

    def _embedding(self, params) -> Embedding:
        return Embedding(self.max_len, params["w"].shape[1])

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (batch, time, features) -> y: same shape."""
        self._check(x, "forward")
        check_last_dim(self, "forward", "x", x, params["w"].shape[1], "params['w']")
        positions = jnp.arange(x.shape[1])
        table, _ = self._embedding(params).forward(params, positions)
        return x + table.astype(x.dtype), LearnedPositionsRes(positions)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dw = Embedding's scatter-add of Σ_batch dy at the positions;  dx = dy.

        dy and dx have shape (batch, time, dim).
        """
        dsum = jnp.sum(dy, axis=0).astype(params["w"].dtype)
        dparams, _ = self._embedding(params).backward(params, EmbeddingRes(res.positions), dsum)
        return dparams, dy

    def output_shape(self, params: Params, x: Shaped) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
