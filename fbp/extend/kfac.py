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
import optax

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
        parent, key = get_path(out, path[:-1]), path[-1]
        if isinstance(parent[key], dict):  # a layer's {"w", "b"}
            names, holder = ("w", "b"), parent[key]
        else:  # an attention projection: "w_q" and "b_q" side by side
            names, holder = (key, "b" + key[1:]), parent
        w, has_b = holder[names[0]], names[1] in holder
        g = w.reshape(-1, w.shape[-1])
        if has_b:
            g = jnp.concatenate([g, holder[names[1]][None, :]], axis=0)
        p = a_inv @ g @ g_inv
        new = {names[0]: p[: g.shape[0] - has_b].reshape(w.shape)}
        if has_b:
            new[names[1]] = p[-1]
        if holder is parent:
            parent.update(new)
        else:
            parent[key] = {**holder, **new}
    return out


def _check_options(who, learning_rate, damping, decay, momentum, mode, kl_clip, inverse_every):
    """ValueError naming ``who`` and the option unless every option is in its range."""
    for name, v, lo in (("learning_rate", learning_rate, 0), ("damping", damping, 0)):
        if not v > lo:
            raise ValueError(f"{who}: {name} must be > 0, got {v!r}.")
    for name, v in (("decay", decay), ("momentum", momentum)):
        if not 0 <= v < 1:
            raise ValueError(f"{who}: {name} must be in [0, 1), got {v!r}.")
    if mode not in ("mc", "exact"):
        raise ValueError(f"{who}: mode must be 'mc' or 'exact', got {mode!r}.")
    if isinstance(inverse_every, bool) or not isinstance(inverse_every, int) or inverse_every < 1:
        raise ValueError(f"{who}: inverse_every must be an int >= 1, got {inverse_every!r}.")
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"{who}: kl_clip must be None or > 0, got {kl_clip!r}.")


class _Options(NamedTuple):
    learning_rate: float
    damping: float
    decay: float
    momentum: float
    kl_clip: float | None
    inverse_every: int


def _factors_fn(model: Layer, loss: LossFunction, mode: str, who: str) -> Callable:
    """``(params, x, y, key) -> (loss, grads, factors)`` from one forward and its walks."""
    samples = 1 if mode == "mc" else None

    def run(params, x, y, key):
        k_model, key = jax.random.split(key)
        pred, res = model.forward(params, x, key=k_model, train=True)
        grads, _ = model.backward(params, res, loss.backward(pred, y))
        cols = curvature.loss_columns(loss, pred, y, key, samples, who)
        return loss(pred, y), grads, curvature.factors_from_columns(model, params, res, cols)

    return run


def _kl_scale(pg: Params, grads: Params, o: _Options) -> Params:
    """``pg`` times ``min(1, √(κ / (lr² |p·g|)))`` (no change without ``kl_clip``)."""
    if o.kl_clip is None:
        return pg
    leaves = zip(jax.tree.leaves(pg), jax.tree.leaves(grads), strict=True)
    pdotg = sum(jnp.vdot(a, b) for a, b in leaves)
    nu = jnp.minimum(1.0, jnp.sqrt(o.kl_clip / (o.learning_rate**2 * jnp.abs(pdotg))))
    return jax.tree.map(lambda v: v * nu.astype(v.dtype), pg)


def _update(grads: Params, state: KFACState, new: dict, o: _Options, decay) -> tuple:
    """``(updates, state)``: average the factors, refresh the inverses, precondition."""
    factors = jax.tree.map(lambda a, n: decay * a + (1 - decay) * n, state.factors, new)
    inverses = jax.lax.cond(
        (state.count + 1) % o.inverse_every == 0,
        lambda f: damped_inverses(f, o.damping),
        lambda f: state.inverses,
        factors,
    )
    pg = _kl_scale(precondition(grads, inverses), grads, o)
    velocity = jax.tree.map(lambda v, g: o.momentum * v + g, state.velocity, pg)
    updates = jax.tree.map(lambda v: -o.learning_rate * v, velocity)
    return updates, KFACState(factors, inverses, velocity, state.count + 1)


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

    The same algorithm as ``transformation`` (an optax ``GradientTransformation``),
    standalone: ``step`` takes the batch and computes the gradient and the factors
    from one forward pass, and ``init`` takes its factors from a first batch.

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
      ``step(params, state, x, y, key) -> (params, state, loss)``; x: inputs, shape
      (batch, ...), y: targets as the loss takes them.
    """
    opts = (learning_rate, damping, decay, momentum, mode, kl_clip, inverse_every)
    _check_options("kfac.optimizer", *opts)
    check(model, train=True)
    o = _Options(learning_rate, damping, decay, momentum, kl_clip, inverse_every)
    grads_and_factors = _factors_fn(model, loss, mode, "kfac.optimizer")

    def init(params: Params, x: Any, y: Any, key: Array) -> KFACState:
        _, _, factors = grads_and_factors(params, x, y, key)
        zeros = jax.tree.map(jnp.zeros_like, params)
        inverses = damped_inverses(factors, damping)
        return KFACState(factors, inverses, zeros, jnp.zeros((), jnp.int32))

    def step(params, state, x, y, key):
        value, grads, new = grads_and_factors(params, x, y, key)
        updates, state = _update(grads, state, new, o, decay)
        params = jax.tree.map(jnp.add, params, updates)
        return params, state, value

    return init, step


def transformation(
    model: Layer,
    loss: LossFunction,
    example_x: Any,
    *,
    learning_rate: float,
    damping: float = 1e-3,
    decay: float = 0.95,
    momentum: float = 0.9,
    mode: str = "mc",
    kl_clip: float | None = 1e-3,
    inverse_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC as an optax ``GradientTransformationExtraArgs``: chain it, apply its updates.

    ``update(grads, state, params, *, x, target, key)`` takes the gradient (from
    ``fbp.value_and_grad``) and the batch it came from; from the batch it computes the
    Kronecker factors (one forward, the loss Hessian's columns walked back), averages
    them with the old ones (the first update takes them whole) and returns
    ``-learning_rate ·`` the momentum of the preconditioned gradient, as
    ``optax.sgd`` returns its updates. ``optax.chain`` hands the batch on.

    Args:
      model, loss: as ``optimizer``.
      example_x: an input like the batches', e.g. ``x[:1]`` or a
        ``jax.ShapeDtypeStruct``, shape (batch, ...): ``init(params)`` sizes the
        factors from it (they do not depend on the batch size).
      learning_rate, damping, decay, momentum, mode, kl_clip, inverse_every: as
        ``optimizer``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fbp
      >>> from fbp import extend, losses, nn
      >>> model = nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])
      >>> x, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.arange(32) % 3
      >>> loss = losses.softmax_cross_entropy
      >>> opt = extend.kfac.transformation(model, loss, x[:1], learning_rate=0.1)
      >>> params = model.init(jax.random.key(1), x)
      >>> state = opt.init(params)
      >>> _, grads = fbp.value_and_grad(model, loss)(params, x, y)
      >>> updates, state = opt.update(grads, state, params, x=x, target=y, key=jax.random.key(2))
      >>> params = optax.apply_updates(params, updates)
      >>> int(state.count)
      1
    """
    opts = (learning_rate, damping, decay, momentum, mode, kl_clip, inverse_every)
    _check_options("kfac.transformation", *opts)
    check(model, train=True)
    o = _Options(learning_rate, damping, decay, momentum, kl_clip, inverse_every)
    factors_of = _factors_fn(model, loss, mode, "kfac.transformation")
    x_struct = jax.ShapeDtypeStruct(tuple(example_x.shape), example_x.dtype)

    def init(params: Params) -> KFACState:
        def shapes(p, xs):
            pred, res = model.forward(p, xs, train=False)
            cols = jnp.zeros((1, *pred.shape), pred.dtype)
            return curvature.factors_from_columns(model, p, res, cols)

        structs = jax.eval_shape(shapes, params, x_struct)
        factors = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)
        zeros = jax.tree.map(jnp.zeros_like, params)
        inverses = damped_inverses(factors, damping)
        return KFACState(factors, inverses, zeros, jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, *, x, target, key, **extra):
        """``(updates, state)`` for the gradient ``grads`` of the batch ``(x, target)``."""
        del extra  # other transformations' arguments in an optax.chain
        if params is None:
            raise ValueError("kfac.transformation: update needs params (the factors' forward).")
        _, _, new = factors_of(params, x, target, key)
        decay_now = jnp.where(state.count == 0, 0.0, decay)
        return _update(grads, state, new, o, decay_now)

    return optax.GradientTransformationExtraArgs(init, update)
