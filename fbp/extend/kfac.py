"""K-FAC (Martens & Grosse 2015): gradient descent preconditioned by Kronecker factors.

For every Dense and Conv layer the curvature block of ``W̄ = [w; b]`` (shape
(K+1, out), K = in or kernel·in) is approximated by ``A ⊗ G``
(``fbp.extend.curvature.kfac_factors``), so the preconditioned gradient is
``(A + π√λ I)⁻¹ ∇W̄ (G + √λ/π I)⁻¹`` with damping λ split between the factors by
π = √((tr A / dim A) / (tr G / dim G)) (factored Tikhonov damping). The factors are
running averages over steps; other parameters take the plain gradient. One step
runs the forward once, walks the loss gradient back (the gradient) and the
columns of the loss Hessian's square root (the factors: one sampled column with
``mode="mc"``), then applies momentum and the learning rate.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fbp import extend, losses, nn
  >>> model = nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])
  >>> x, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.arange(32) % 3
  >>> init, step = extend.kfac.optimizer(model, losses.softmax_cross_entropy,
  ...                                    learning_rate=0.1, damping=1e-2)
  >>> params = model.init(jax.random.key(1), x)
  >>> state = jax.jit(init)(params, x, y, jax.random.key(2))
  >>> params, state, loss = jax.jit(step)(params, state, x, y, jax.random.key(3))
  >>> sorted(state.factors)
  [('0',), ('2',)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, LossFunction, Params
from fbp.extend import curvature
from fbp.extend.curvature import get_path
from fbp.extend.registry import check


class KFACState(NamedTuple):
    factors: dict  # path -> KFACFactors, running averages
    inverses: dict  # path -> (A_inv, G_inv), damped, refreshed every ``inverse_every`` steps
    velocity: Params  # momentum buffer, params' structure
    count: Array  # type: ignore[assignment]  # (a field, as optax names it) int32 scalar: steps


def damped_inverses(factors: dict, damping: float) -> dict:
    """``{path: ((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹)}`` (factored Tikhonov damping).

    Each factor is symmetric positive semi-definite; its damped inverse is taken from
    its eigendecomposition, ``Q diag(1 / (λ_i + d)) Qᵀ`` (eigenvalues clipped at 0).
    """
    out = {}
    for path, f in factors.items():
        da, dg = f.A.shape[0], f.G.shape[0]
        ta = jnp.maximum(jnp.trace(f.A) / da, 1e-30)
        tg = jnp.maximum(jnp.trace(f.G) / dg, 1e-30)
        pi = jnp.sqrt(ta / tg)
        root = jnp.sqrt(jnp.asarray(damping, f.A.dtype))
        out[path] = (_damped_inverse(f.A, pi * root), _damped_inverse(f.G, root / pi))
    return out


def _damped_inverse(m: Array, d: Array) -> Array:
    """(m + d I)⁻¹ for symmetric PSD m, from ``eigh``."""
    w, q = jnp.linalg.eigh((m + m.T) / 2)
    return (q / (jnp.maximum(w, 0) + d)) @ q.T


def precondition(grads: Params, inverses: dict) -> Params:
    """Grads with every factored layer's ``[w; b]`` gradient g replaced by ``A⁻¹ g G⁻¹``.

    Args:
      grads: gradients (params' structure).
      inverses: ``damped_inverses(factors, damping)``; layers not in it are unchanged.
    """
    out = jax.tree.map(lambda v: v, grads)  # fresh containers, safe to update below
    for path, (a_inv, g_inv) in inverses.items():
        layer_grads = get_path(out, path)
        w, has_b = layer_grads["w"], "b" in layer_grads
        g = w.reshape(-1, w.shape[-1])
        if has_b:
            g = jnp.concatenate([g, layer_grads["b"][None, :]], axis=0)
        p = a_inv @ g @ g_inv
        new = {"w": p[: g.shape[0] - has_b].reshape(w.shape)}
        if has_b:
            new["b"] = p[-1]
        parent = get_path(out, path[:-1])
        parent[path[-1]] = {**layer_grads, **new}
    return out


def optimizer(
    model: Layer,
    loss: LossFunction,
    *,
    learning_rate: float,
    damping: float = 1e-3,
    decay: float = 0.95,
    momentum: float = 0.9,
    mode: str = "mc",
    kl_clip: float | None = 1e-3,
    inverse_every: int = 1,
) -> tuple[Callable, Callable]:
    """A K-FAC optimizer as ``(init, step)`` pure functions (jit ``step``).

    Args:
      model, loss: what to train (Dense/Conv layers are preconditioned; the other
        layers need per-example rules, see ``fbp.extend.check``).
      learning_rate: step size.
      damping: λ > 0, Tikhonov damping of the factors.
      decay: weight of the old factors in their running average, in [0, 1).
      momentum: heavy-ball momentum in [0, 1).
      mode: ``"mc"`` (one sampled target per example: K-FAC) or ``"exact"`` (KFLR).
      kl_clip: κ or None. The preconditioned gradient p is scaled by
        ``min(1, √(κ / (lr² |p·g|)))``, bounding the step's predicted change of the
        model's output distribution (Ba, Grosse & Martens 2017).
      inverse_every: recompute the damped inverses every this many steps (>= 1).

    Returns:
      ``init(params, x, y, key) -> KFACState`` (factors from a first batch) and
      ``step(params, state, x, y, key) -> (params, state, loss)``.
    """
    for name, v, lo in (("learning_rate", learning_rate, 0), ("damping", damping, 0)):
        if not v > lo:
            raise ValueError(f"kfac.optimizer: {name} must be > 0, got {v!r}.")
    for name, v in (("decay", decay), ("momentum", momentum)):
        if not 0 <= v < 1:
            raise ValueError(f"kfac.optimizer: {name} must be in [0, 1), got {v!r}.")
    if mode not in ("mc", "exact"):
        raise ValueError(f"kfac.optimizer: mode must be 'mc' or 'exact', got {mode!r}.")
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
        raise ValueError(
            f"kfac.optimizer: inverse_every must be an int >= 1, got {inverse_every!r}."
        )
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kfac.optimizer: kl_clip must be None or > 0, got {kl_clip!r}.")
    check(model, train=True)
    samples = 1 if mode == "mc" else None

    def grads_and_factors(params, x, y, key):
        k_model, key = jax.random.split(key)
        pred, res = model.forward(params, x, key=k_model, train=True)
        grads, _ = model.backward(params, res, loss.backward(pred, y))
        cols = curvature.loss_columns(loss, pred, y, key, samples, "kfac.optimizer")
        return loss(pred, y), grads, curvature.factors_from_columns(model, params, res, cols)

    def init(params: Params, x: Any, y: Any, key: Array) -> KFACState:
        _, _, factors = grads_and_factors(params, x, y, key)
        zeros = jax.tree.map(jnp.zeros_like, params)
        inverses = damped_inverses(factors, damping)
        return KFACState(factors, inverses, zeros, jnp.zeros((), jnp.int32))

    def step(params, state, x, y, key):
        value, grads, new = grads_and_factors(params, x, y, key)
        factors = jax.tree.map(lambda o, n: decay * o + (1 - decay) * n, state.factors, new)
        inverses = jax.lax.cond(
            (state.count + 1) % inverse_every == 0,
            lambda f: damped_inverses(f, damping),
            lambda f: state.inverses,
            factors,
        )
        pg = precondition(grads, inverses)
        if kl_clip is not None:
            leaves = zip(jax.tree.leaves(pg), jax.tree.leaves(grads), strict=True)
            pdotg = sum(jnp.vdot(a, b) for a, b in leaves)
            nu = jnp.minimum(1.0, jnp.sqrt(kl_clip / (learning_rate**2 * jnp.abs(pdotg))))
            pg = jax.tree.map(lambda v: v * nu.astype(v.dtype), pg)
        velocity = jax.tree.map(lambda v, g: momentum * v + g, state.velocity, pg)
        params = jax.tree.map(lambda p, v: p - learning_rate * v, params, velocity)
        return params, KFACState(factors, inverses, velocity, state.count + 1), value

    return init, step
