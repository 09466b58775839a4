"""DP-SGD (Abadi et al. 2016): per-example clipping to a norm bound plus Gaussian noise.

For a batch of B examples with per-example gradients ``g_b`` (``fbp.extend.per_example``
convention: the gradient of example b's own loss term), clip bound C and noise
multiplier σ:

    c_b   = min(1, C / ‖g_b‖)                      (computed from the norms alone)
    sum   = Σ_b c_b g_b                            (the clipped sum)
    grad  = (sum + σ C ξ) / n,   ξ ~ N(0, I)       (n: expected batch size, B by default)

The norms come from one backward pass without forming any ``g_b``
(``‖x_b‖²‖δ_b‖²`` for a Dense layer). The clipped sum is then formed one of two ways
(``method``):

* ``"reweight"`` (default): ``Σ_b c_b g_b`` from the same pass's inputs and deltas,
  one weight-gradient product per layer (a Dense layer: ``Xᵀ (c ⊙ Δ)``). Because every
  rule is linear in the deltas and examples do not mix, this equals a backward pass
  seeded with ``c_b``-scaled deltas.
* ``"second_backward"``: a second ordinary backward of the model with ``dL/dpred``
  scaled by ``c_b`` per example.

Both give the same numbers; ``benchmarks/extensions.py`` times them. Noise needs an
explicit PRNG key (``fbp.train`` passes one per step). The privacy budget of a run
is ``fbp.extend.accounting``'s.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbp import extend, losses, nn, train
  >>> model = nn.Sequential([nn.Dense(8), nn.ReLU(), nn.Dense(3)])
  >>> x, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.arange(32) % 3
  >>> opt = optax.sgd(0.1)
  >>> ts = train.init(model, opt, jax.random.key(1), x)
  >>> step = extend.dp.make_step(model, losses.softmax_cross_entropy, opt, clip=1.0, noise=1.1)
  >>> ts, metrics = step(ts, x, y)
  >>> int(ts.step)
  1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbp.core import Array, Aux, Layer, LossFunction, Params
from fbp.extend.per_example import total_sq_norms
from fbp.extend.registry import check, quantity, walk
from fbp.train import make_step as _train_make_step

METHODS = ("reweight", "second_backward")


def validate(clip: Any, noise: Any, *, method: str = "reweight") -> tuple[float, float]:
    """Check DP-SGD's options; return them as floats.

    Raises:
      ValueError: clip not a finite number > 0, noise not a finite number >= 0, or an
        unknown method; the message names the option (and its command-line flag).
    """
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip):
        raise ValueError(f"dp: clip (--dp-clip) must be a finite number > 0, got {clip!r}.")
    if clip <= 0:
        raise ValueError(f"dp: clip (--dp-clip) must be a finite number > 0, got {clip!r}.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise):
        raise ValueError(f"dp: noise (--dp-noise) must be a finite number >= 0, got {noise!r}.")
    if noise < 0:
        raise ValueError(f"dp: noise (--dp-noise) must be a finite number >= 0, got {noise!r}.")
    if method not in METHODS:
        raise ValueError(f"dp: method must be one of {list(METHODS)}, got {method!r}.")
    return float(clip), float(noise)


class Clipped(NamedTuple):
    """The clipped sum of a batch and what it was made from."""

    value: Array  # scalar batch loss (mean)
    aux: Aux  # prediction and new running state
    summed: Params  # Σ_b w_b c_b g_b, params' structure
    norms: Array  # (batch,) ‖g_b‖ before clipping
    factors: Array  # (batch,) c_b = min(1, C / ‖g_b‖)


def clip_factors(norms: Array, clip: float) -> Array:
    """``min(1, C / ‖g_b‖)`` (1 for a zero gradient): (batch,) -> (batch,)."""
    c = jnp.asarray(clip, norms.dtype)
    return c / jnp.maximum(norms, c)


def clipped_sum(model: Layer, loss: LossFunction, *, clip: float, method: str = "reweight"):
    """``f(params, x, target, *, key, state, train, lengths, weights) -> Clipped``.

    ``weights`` (batch,), optional, multiplies each example's clipped gradient (for
    example a 0/1 Poisson-sampling mask over a padded batch). Checks the options and
    the model's layers now.
    """
    clip, _ = validate(clip, 0.0, method=method)
    check(model, train=False)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None, weights=None):
        check(model, train=train)
        kw = {} if lengths is None else {"lengths": lengths}
        pred, res = model.forward(params, x, key=key, state=state, train=train, **kw)
        batch = pred.shape[0]
        dpred = loss.backward(pred, target) * jnp.asarray(batch, pred.dtype)
        _, node = walk(model, params, res, dpred)
        norms = jnp.sqrt(total_sq_norms(quantity(node, "batch_l2")))
        factors = clip_factors(norms, clip)
        w = factors if weights is None else factors * weights.astype(factors.dtype)
        if method == "reweight":
            summed = quantity(node, "weighted", w)
        else:
            scaled = dpred * w.reshape((-1,) + (1,) * (dpred.ndim - 1)).astype(dpred.dtype)
            summed, _ = model.backward(params, res, scaled)
        aux = Aux(pred, model.next_state(state, res))
        return Clipped(loss(pred, target), aux, summed, norms, factors)

    return f


def add_noise(summed: Params, key: Array, *, clip: float, noise: float, n: Any) -> Params:
    """``(summed + σ C ξ) / n`` with ξ ~ N(0, I) drawn from ``key``, leaf by leaf."""
    leaves, treedef = jax.tree.flatten(summed)
    keys = list(jax.random.split(key, len(leaves))) if leaves else []
    std = clip * noise
    out = [
        (v + std * jax.random.normal(k, v.shape, v.dtype)) / n
        for v, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def grad_fn(
    model: Layer,
    loss: LossFunction,
    *,
    clip: float,
    noise: float,
    expected_batch_size: int | None = None,
    method: str = "reweight",
) -> Callable:
    """A DP-SGD gradient with ``fbp.value_and_grad(..., has_aux=True)``'s signature.

    Pass it to ``fbp.train.step_fn``/``make_step``/``make_epoch`` as ``grad_fn=``.

    Args:
      model: an fbp model whose layers have per-example rules (checked now).
      loss: an fbp loss (a mean over the batch).
      clip: per-example clip bound C (> 0).
      noise: noise multiplier σ (>= 0); the noise's standard deviation is σ C.
      expected_batch_size: the divisor n; None uses the batch's size (fixed-size
        batches). With Poisson sampling pass the expected size q·N, as Opacus does.
      method: ``"reweight"`` or ``"second_backward"`` (see the module docstring).

    Returns:
      ``f(params, x, target, *, key=None, state=None, train=True, lengths=None)``
      returning ``((loss, Aux(pred, state)), grads)``. ``key`` is split into the
      model's key (dropout) and the noise key; it is required when ``noise > 0``.

    Raises:
      ValueError: bad clip/noise/method/expected_batch_size (now); no key with noise > 0
        (when called).
      UnsupportedLayerError: a layer without a rule or that mixes examples.
    """
    clip, noise = validate(clip, noise, method=method)
    if expected_batch_size is not None and (
        isinstance(expected_batch_size, bool)
        or not isinstance(expected_batch_size, (int, float))
        or not expected_batch_size > 0
    ):
        raise ValueError(
            f"dp: expected_batch_size must be None or a number > 0, got {expected_batch_size!r}."
        )
    inner = clipped_sum(model, loss, clip=clip, method=method)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        if key is None and noise > 0:
            raise ValueError(
                "dp.grad_fn: noise > 0 needs a PRNG key; pass key=jax.random.key(...) "
                "(fbp.train passes a fresh one every step)."
            )
        k_model, k_noise = (None, None) if key is None else jax.random.split(key)
        out = inner(params, x, target, key=k_model, state=state, train=train, lengths=lengths)
        n = expected_batch_size or out.norms.shape[0]
        if noise > 0 and k_noise is not None:  # (a key is required with noise, above)
            grads = add_noise(out.summed, k_noise, clip=clip, noise=noise, n=n)
        else:
            grads = jax.tree.map(lambda v: v / n, out.summed)
        return (out.value, out.aux), grads

    return f


def make_step(
    model: Layer,
    loss: LossFunction,
    optimizer: optax.GradientTransformation,
    *,
    clip: float,
    noise: float,
    expected_batch_size: int | None = None,
    method: str = "reweight",
    **kwargs: Any,
) -> Callable:
    """``fbp.train.make_step`` with the DP-SGD gradient: a jitted ``(ts, x, y) -> (ts, metrics)``.

    ``kwargs`` go to ``fbp.train.step_fn`` (e.g. ``skip_nonfinite``); see ``grad_fn``.
    """
    vg = grad_fn(
        model,
        loss,
        clip=clip,
        noise=noise,
        expected_batch_size=expected_batch_size,
        method=method,
    )
    return _train_make_step(model, loss, optimizer, grad_fn=vg, **kwargs)
