"""Use an fbp model inside ordinary JAX autodiff, with its hand-written backward as the VJP.

This module (with ``fbp.testing``) is the one place in fbp that touches JAX's
autodiff machinery: ``jax.custom_vjp`` tells ``jax.grad`` to call
``model.backward`` instead of differentiating ``model.forward``. The result is a
plain JAX function that can sit inside a larger ``jax.grad``/``jax.jit`` program
(a JAX loss around an fbp encoder, an fbp block inside a Flax or hand-written
model, ...), while the gradient of the fbp part is still the hand-written one.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fbp import adapter, nn
  >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(1)])
  >>> x = jnp.ones((3, 2))
  >>> params = model.init(jax.random.key(0), x)
  >>> f = adapter.as_jax_function(model)
  >>> g = jax.grad(lambda p, v: jnp.sum(f(p, v) ** 2), argnums=(0, 1))(params, x)
  >>> g[0]['0']['w'].shape, g[1].shape
  ((2, 4), (3, 2))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Layer, Params, State


def _zero_cotangent(x: Any) -> Any:
    """Cotangent of a non-differentiable input: float0 for integers, zeros for floats."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def as_jax_function(model: Layer, *, train: bool = False, with_state: bool = False) -> Callable:
    """``model.apply`` as a JAX function whose VJP is ``model.backward``.

    Args:
      model: any fbp layer or ``Sequential``.
      train: the (static) mode the model runs in.
      with_state: also return the model's next running state (batch norm in train
        mode). The state output is not differentiated: its cotangent is ignored, as
        if it were wrapped in ``jax.lax.stop_gradient``.

    Returns:
      ``f(params, x, key=None, state=None)`` returning ``y`` (or ``(y, new_state)``
      with ``with_state``). Under ``jax.grad``/``jax.vjp`` the cotangents of
      ``params`` and ``x`` come from ``model.backward``; ``key`` and ``state`` get
      zero cotangents; integer ``x`` (token ids) gets a float0 cotangent.
      ``x``: the model's input, e.g. shape (batch, in); ``y``: its output.
    """

    def run(params, x, key, state):
        y, res = model.forward(params, x, key=key, state=state, train=train)
        return (y, model.next_state(state, res)), res

    @jax.custom_vjp
    def f(params: Params, x: Array, key: Array | None, state: State | None):
        return run(params, x, key, state)[0]

    def f_fwd(params, x, key, state):
        out, res = run(params, x, key, state)
        return out, (params, res, x, key, state)

    def f_bwd(saved, cotangents):
        params, res, x, key, state = saved
        dy, _ = cotangents  # the state output is not differentiated
        dparams, dx = model.backward(params, res, dy)
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
            dx = _zero_cotangent(x)
        return dparams, dx, None, None  # None: a zero cotangent for key and state

    f.defvjp(f_fwd, f_bwd)

    def call(params: Params, x: Array, key: Array | None = None, state: State | None = None):
        y, new_state = f(params, x, key, state)
        return (y, new_state) if with_state else y

    return call
