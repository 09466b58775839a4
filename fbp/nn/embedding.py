"""Embedding lookup: integer token ids to learned vectors, with a scatter-add backward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from fbp.core import Array, Layer, Params, PRNGKey, Residuals, Shaped, ShapeError, State, layer_name
from fbp.nn import initializers
from fbp.precision import accum_dtype


class EmbeddingRes(NamedTuple):
    ids: Array  # (...) int: the token ids, for the scatter-add


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
    """``y[..., :] = w[x[...], :]`` for integer ids x; ``dw`` is ``dy`` scatter-added by id.

    Negative ids count from the end, as in NumPy; ids outside [-vocab, vocab) give
    rows of NaN in the forward (visible, never a silent clamp) and contribute
    nothing to ``dw``.

    Token ids are not differentiable: ``backward`` returns ``dx`` as zeros of x's
    shape in the parameters' dtype (not float0), so that ``dx`` composes with
    ordinary tree arithmetic (``jax.tree.map``) like every other layer's.

    Args:
      vocab: number of rows (> 0).
      features: size of each vector (> 0).
      w_init: initialiser (default N(0, 1), as PyTorch's ``nn.Embedding``).
      dtype: the table's dtype (token ids carry none to follow): float32 by default,
        ``jnp.float64`` for float64 work under ``jax_enable_x64``.

    Parameter tree:
      ``w`` (vocab, features).

    Raises:
      ValueError: bad vocab/features (when built).
      ShapeError: x is not an integer array (trace time).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> layer = Embedding(10, 4)
      >>> ids = jnp.array([[1, 2, 3]])
      >>> layer.apply(layer.init(jax.random.key(0), ids), ids).shape
      (1, 3, 4)
    """

    vocab: int
    features: int
    w_init: str | Callable = "embedding_normal"
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab", "features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"Embedding: {name} must be a positive int, got {v!r}.")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"Embedding: dtype must be a float dtype, got {self.dtype!r}.")
        if self.w_init != "embedding_normal":
            initializers.get(self.w_init, "Embedding")

    def _init_fn(self):
        if self.w_init == "embedding_normal":
            return lambda key, shape, dtype: initializers.normal(1.0)(key, shape, dtype)
        return initializers.get(self.w_init)

    def _check(self, x, method: str) -> None:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ShapeError(
                f"{layer_name(self)}.{method}: x has dtype {x.dtype} but expected integer "
                "token ids in [0, vocab)."
            )

    def init(self, key: PRNGKey, x: Shaped) -> Params:
        """x: example token ids, shape (...) int. The params have ``self.dtype``."""
        self._check(x, "init")
        return {"w": self._init_fn()(key, (self.vocab, self.features), self.dtype)}

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: PRNGKey | None = None,
        state: State | None = None,
        train: bool = False,
    ) -> tuple[Array, Residuals]:
        """x: (...) int -> y: (..., features)."""
        self._check(x, "forward")
        w = params["w"]
        if w.shape != (self.vocab, self.features):
            raise ShapeError(
                f"{layer_name(self)}.forward: params['w'] has shape {tuple(w.shape)} but "
                f"expected ({self.vocab}, {self.features})."
            )
        y = jnp.take(w, x, axis=0, mode="fill", fill_value=jnp.nan)
        return y, EmbeddingRes(x)

    def backward(self, params: Params, res: Residuals, dy: Array) -> tuple[Params, Array]:
        """dw[v] = Σ_{p: x[p] = v} dy[p];  dx = 0 (ids).

        dy: shape (..., features); dw: (vocab, features).
        """
        w = params["w"]
        ids = res.ids.reshape(-1)
        acc = accum_dtype(w)  # float32 sums for bfloat16 tables
        rows = dy.reshape(-1, w.shape[1]).astype(acc)
        dw = jnp.zeros(w.shape, acc).at[ids].add(rows, mode="drop")
        return {"w": dw}, jnp.zeros(res.ids.shape, w.dtype)
