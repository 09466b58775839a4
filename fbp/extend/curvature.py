"""Curvature from the layers' own rules: Hessian- and Gauss-Newton-vector products,
the exact diagonal of the Gauss-Newton matrix, and K-FAC's Kronecker factors.

For a model f(θ, x) with output ``pred`` and a loss ℓ(pred, y) (a batch mean), the
generalized Gauss-Newton matrix is ``G = Jᵀ H_ℓ J``, J = ∂pred/∂θ, H_ℓ = ∂²ℓ/∂pred².

* ``hvp``: the Hessian-vector product ``H v``, forward mode (``jax.jvp``) over the
  hand-written gradient ``fbp.value_and_grad``; any model.
* ``ggn_vp``: ``G v`` in three steps: ``J v``, then ``H_ℓ (J v)`` by the hand-written
  loss Hessians below, then ``Jᵀ(·)`` by the model's hand-written backward. The
  backward ``dpred ↦ dparams`` is the linear map ``Jᵀ``, so ``J v`` is its transpose,
  taken exactly by ``jax.linear_transpose`` of the hand-written backward (no
  differentiation: each layer's rule is read backwards). Any model.
* ``diag_ggn``: ``diag(G)`` exactly. With ``H_ℓ = S Sᵀ`` (``loss_hessian_sqrt``, C
  columns for C outputs), ``diag(G) = Σ_c Σ_b (Jᵀ_b s_cb)²``: each column is walked
  back once (a vmap over the C columns, not over examples) and every layer's
  per-example rule gives ``Σ_b g_b²`` (Dense: ``(x²)ᵀ(δ²)``). Any model whose layers
  have per-example rules; ``mc_samples`` gives BackPACK's DiagGGNMC instead.
* ``kfac_factors``: for every Dense and Conv layer, ``A = (1/B) Σ_b Σ_t ā_bt ā_btᵀ``
  (ā: the layer input, or im2col patch, with a trailing 1 when the layer has a bias)
  and ``G = (1/T) Σ_c Σ_b Σ_t s_cbt s_cbtᵀ`` (s: the columns of S walked back to the
  layer's output; T output positions: 1 for a plain Dense layer, the pixels of a
  convolution, as in KFC, Grosse & Martens 2016). The GGN block of ``[w; b]``, shape
  ((in+1)·out)², is approximated by ``A ⊗ G``. ``mode="exact"`` is KFLR, ``"mc"``
  (sampled targets) is K-FAC. For a Dense layer A and G are BackPACK's KFLR/KFAC
  factors (A's leading block, without the bias row).

Supported losses: ``mse``, ``softmax_cross_entropy`` (integer labels or probabilities)
and ``sigmoid_binary_cross_entropy``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from fbp import extend, losses, nn
  >>> model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
  >>> x, y = jnp.ones((5, 2)), jnp.arange(5) % 3
  >>> params = model.init(jax.random.key(0), x)
  >>> v = jax.tree.map(jnp.ones_like, params)
  >>> gv = jax.jit(extend.curvature.ggn_vp(model, losses.softmax_cross_entropy))(params, x, y, v)
  >>> gv['2']['w'].shape
  (4, 3)
  >>> f = extend.curvature.kfac_factors(model, losses.softmax_cross_entropy)
  >>> factors = jax.jit(f)(params, x, y)
  >>> factors[('0',)].A.shape, factors[('0',)].G.shape
  ((3, 3), (4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, LossFunction, Params, value_and_grad
from fbp.extend.layer_rules import conv_patches
from fbp.extend.registry import Node, check, quantity, walk
from fbp.losses import MSE, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from fbp.nn.conv import ConvND
from fbp.nn.dense import Dense
from fbp.nn.mha import MultiHeadAttention

SUPPORTED_LOSSES = "mse, softmax_cross_entropy, sigmoid_binary_cross_entropy"

# ----------------------------------------------------------------------------- losses


def _check_loss(loss: Any, who: str) -> None:
    if not isinstance(loss, (MSE, SoftmaxCrossEntropy, SigmoidBinaryCrossEntropy)):
        raise ValueError(
            f"{who}: no hand-written Hessian for loss {loss!r}; supported: {SUPPORTED_LOSSES}."
        )


def _ce_probs(pred: Array, target: Array) -> tuple[Array, Array]:
    """softmax(pred), and the target's total mass per row (1 for labels): (..., C), (..., 1)."""
    p = jax.nn.softmax(pred, axis=-1)
    if jnp.issubdtype(target.dtype, jnp.integer):
        return p, jnp.ones(pred.shape[:-1] + (1,), pred.dtype)
    return p, jnp.sum(target.astype(pred.dtype), axis=-1, keepdims=True)


def _rows(pred: Array) -> int:
    """Number of terms the softmax cross-entropy averages over (every axis but the last)."""
    return pred.size // pred.shape[-1]


def loss_hvp(loss: LossFunction, pred: Array, target: Array, u: Array) -> Array:
    """``H_ℓ u``: the loss Hessian with respect to ``pred`` applied to ``u`` (shape of pred).

    mse: ``2u/N`` (N = pred.size); softmax CE: ``m (p ⊙ u - p (p·u)) / rows`` per row
    (m = the target's mass, 1 for labels); sigmoid BCE: ``σ(1 - σ) u / N``.
    """
    _check_loss(loss, "loss_hvp")
    if isinstance(loss, MSE):
        return 2 * u / pred.size
    if isinstance(loss, SigmoidBinaryCrossEntropy):
        s = jax.nn.sigmoid(pred)
        return s * (1 - s) * u / pred.size
    p, m = _ce_probs(pred, target)
    return m * (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / _rows(pred)


def loss_hessian_sqrt(loss: LossFunction, pred: Array, target: Array) -> Array:
    """Per-example square root of the loss Hessian: shape (K, *pred.shape), K = pred[0].size.

    For every example b, ``Σ_k S_k[b] S_k[b]ᵀ = H_b``, the Hessian of the batch loss in
    that example's outputs (examples do not interact). Column k is one output entry
    of an example: mse, ``S_k = √(2/N) e_k``; sigmoid BCE, ``S_k = √(σ(1-σ)/N) e_k``;
    softmax CE, at position t and class c, ``S_(t,c) = √(m p_c / rows) (e_c - p)`` at
    t and 0 elsewhere (m: the target's mass, 1 for labels). With pred (batch, C),
    K = C.
    """
    _check_loss(loss, "loss_hessian_sqrt")
    k = pred.size // pred.shape[0]
    if isinstance(loss, (MSE, SigmoidBinaryCrossEntropy)):
        eye = jnp.eye(k, dtype=pred.dtype).reshape((k, 1, *pred.shape[1:]))
        if isinstance(loss, MSE):
            return jnp.broadcast_to(eye * jnp.sqrt(2.0 / pred.size), (k, *pred.shape))
        s = jax.nn.sigmoid(pred)
        return eye * jnp.sqrt(s * (1 - s) / pred.size)
    c, mid = pred.shape[-1], pred.shape[1:-1]
    p, m = _ce_probs(pred, target)
    eye = jnp.eye(c, dtype=pred.dtype).reshape((c,) + (1,) * (pred.ndim - 1) + (c,))
    scale = jnp.sqrt(m * p / _rows(pred))  # (..., C): column c's factor in [..., c]
    per_class = jnp.moveaxis(scale, -1, 0)[..., None] * (eye - p)  # (C, *pred.shape)
    n_pos = k // c
    where = jnp.eye(n_pos, dtype=pred.dtype).reshape((n_pos, 1, 1, *mid, 1))
    return (where * per_class[None]).reshape((k, *pred.shape))


def loss_sampled_sqrt(loss: LossFunction, pred: Array, key: Array, samples: int) -> Array:
    """Monte-Carlo S with ``E[S Sᵀ] = H_ℓ``: shape (samples, *pred.shape).

    Targets are drawn from the model's predictive distribution (categorical for
    softmax CE, Bernoulli for sigmoid BCE, N(pred, ½) for mse, whose Fisher is
    the mse Hessian); each column is that target's per-term ``dℓ/dpred`` over ``√(samples·N)``.
    """
    _check_loss(loss, "loss_sampled_sqrt")
    shape = (samples, *pred.shape)
    if isinstance(loss, MSE):
        y = pred + jnp.sqrt(0.5) * jax.random.normal(key, shape, pred.dtype)
        g, terms = 2 * (pred - y), pred.size
    elif isinstance(loss, SigmoidBinaryCrossEntropy):
        s = jax.nn.sigmoid(pred)
        g, terms = s - jax.random.bernoulli(key, s, shape).astype(pred.dtype), pred.size
    else:
        y = jax.random.categorical(key, pred, axis=-1, shape=shape[:-1])
        g = jax.nn.softmax(pred, axis=-1) - jax.nn.one_hot(y, pred.shape[-1], dtype=pred.dtype)
        terms = _rows(pred)
    return g / jnp.sqrt(jnp.asarray(samples * terms, pred.dtype))


# ----------------------------------------------------------------------------- products


def _forward(model, params, x, key, state, train, lengths):
    kw = {} if lengths is None else {"lengths": lengths}
    return model.forward(params, x, key=key, state=state, train=train, **kw)


def hvp(model: Layer, loss: LossFunction) -> Callable:
    """``f(params, x, target, v, *, key, state, train, lengths) -> H v`` (params' structure).

    H is the Hessian of the batch loss in the parameters; forward mode over the
    hand-written gradient. ``train`` defaults to True, as for every function fbp
    returns: pass ``train=False`` for the model in eval mode (dropout off).
    """
    vg = value_and_grad(model, loss)

    def f(params, x, target, v, *, key=None, state=None, train=True, lengths=None):
        def grad(p):
            return vg(p, x, target, key=key, state=state, train=train, lengths=lengths)[1]

        return jax.jvp(grad, (params,), (v,))[1]

    return f


def jvp(model: Layer) -> Callable:
    """``f(params, x, v, *, key, state, train, lengths) -> (pred, J v)``.

    ``J v``, the change of the output along a parameter direction v, is the transpose
    of the hand-written backward ``dpred ↦ dparams`` (``jax.linear_transpose``).
    """

    def f(params, x, v, *, key=None, state=None, train=True, lengths=None):
        pred, res = _forward(model, params, x, key, state, train, lengths)
        back = jax.linear_transpose(lambda d: model.backward(params, res, d)[0], pred)
        return pred, back(v)[0]

    return f


def ggn_vp(model: Layer, loss: LossFunction) -> Callable:
    """``f(params, x, target, v, *, key, state, train, lengths) -> G v``, G = Jᵀ H_ℓ J.

    ``J v`` by transposing the hand-written backward, ``H_ℓ`` by ``loss_hvp``, ``Jᵀ`` by
    the hand-written backward. ``train`` defaults to True (``train=False``: eval mode).
    """
    _check_loss(loss, "ggn_vp")

    def f(params, x, target, v, *, key=None, state=None, train=True, lengths=None):
        pred, res = _forward(model, params, x, key, state, train, lengths)

        def back(d):
            return model.backward(params, res, d)[0]

        jv = jax.linear_transpose(back, pred)(v)[0]
        return back(loss_hvp(loss, pred, target, jv))

    return f


def loss_columns(loss, pred, target, key, mc_samples, who):
    """Columns of a square root of the loss Hessian at ``pred``, exact or sampled.

    Args:
      loss, pred, target: the loss and its inputs; pred has shape (batch, C).
      key: PRNG key, needed when ``mc_samples`` is an int.
      mc_samples: None for the exact square root (C columns), else the number of
        Monte-Carlo samples (columns).
      who: the caller's name for error messages.

    Returns:
      Array of shape (K, *pred.shape): K = C exact, or mc_samples.
    """
    if mc_samples is None:
        return loss_hessian_sqrt(loss, pred, target)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"{who}: mc_samples must be None or an int >= 1, got {mc_samples!r}.")
    if key is None:
        raise ValueError(f"{who}: mc_samples={mc_samples} needs key= (a PRNG key) to sample.")
    return loss_sampled_sqrt(loss, pred, key, mc_samples)


def diag_ggn(model: Layer, loss: LossFunction, *, mc_samples: int | None = None) -> Callable:
    """``f(params, x, target, *, key, state, train, lengths) -> diag(G)`` (params' structure).

    Exact (BackPACK's ``DiagGGNExact``), or with ``mc_samples`` sampled columns
    (``DiagGGNMC``; then ``key`` samples the targets). ``train`` defaults to True.

    Raises:
      UnsupportedLayerError: a layer without a per-example rule (now) or one that
        mixes examples (when called).
      ValueError: an unsupported loss or a bad ``mc_samples`` (now).
    """
    _check_loss(loss, "diag_ggn")
    if mc_samples is not None:
        loss_columns(loss, jnp.zeros((1, 1)), None, jax.random.key(0), mc_samples, "diag_ggn")
    check(model, train=False)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        check(model, train=train)
        pred, res = _forward(model, params, x, key, state, train, lengths)
        cols = loss_columns(loss, pred, target, key, mc_samples, "diag_ggn")

        def one(s):
            return quantity(walk(model, params, res, s)[1], "sum_sq")

        return jax.tree.map(lambda d: jnp.sum(d, axis=0), jax.vmap(one)(cols))

    return f


# ----------------------------------------------------------------------------- K-FAC


class KFACFactors(NamedTuple):
    """Kronecker factors of one layer: its GGN block ≈ A ⊗ G (for ``[w; b]``)."""

    A: Array  # (in[+1], in[+1]): E_b Σ_t ā ā ᵀ (Dense: in; Conv: kernel·in), +1 with a bias
    G: Array  # (out, out): (1/T) Σ_c E_b Σ_t s sᵀ, from the walked columns of S


def _layer_inputs(layer, ctx) -> tuple[Array, Array]:
    """(ā (batch, T, K[+1]), δ (batch, T, out)) of a Dense or Conv node."""
    if isinstance(layer, Dense):
        a, d = ctx
    else:
        x, dy = ctx
        a, d = conv_patches(layer, x), dy.reshape(dy.shape[0], -1, dy.shape[-1])
    if layer.use_bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    return a, d


def _factors(a: Array, d: Array) -> KFACFactors:
    """A = Σ ā āᵀ / B, G = Σ δ δᵀ / T from ā (batch, T, K), δ (batch, T, out)."""
    b, t = a.shape[0], a.shape[1]
    a2, d2 = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
    return KFACFactors(a2.T @ a2 / b, d2.T @ d2 / t)


def _projection_factors(layer, ctx, path: tuple[str, ...], out: dict) -> None:
    """Factors of an attention layer's projections, at paths ``(..., "w_q")`` etc."""
    for p in ctx:
        a = p.a
        if layer.use_bias:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        for n, d in zip(p.names, jnp.split(p.d, len(p.names), axis=-1), strict=True):
            out[path + (f"w_{n}",)] = _factors(a, d)


def _kfac_collect(node: Node, path: tuple[str, ...], out: dict) -> None:
    layer, ctx = node.layer, node.ctx
    if isinstance(layer, (Dense, ConvND)):
        out[path] = _factors(*_layer_inputs(layer, ctx))
    elif isinstance(layer, MultiHeadAttention):
        _projection_factors(layer, ctx, path, out)
    elif isinstance(ctx, dict):
        for k, child in ctx.items():
            _kfac_collect(child, (*path, k), out)
    elif isinstance(ctx, Node):
        _kfac_collect(ctx, path, out)


def kfac_factors(
    model: Layer, loss: LossFunction, *, mode: str = "exact", mc_samples: int = 1
) -> Callable:
    """``f(params, x, target, *, key, state, train, lengths) -> {path: KFACFactors}``.

    ``path`` is the tuple of keys of the layer's params in the params tree (``('0',)``
    for ``params['0']``); only Dense and Conv layers and the four projections of
    attention layers get factors (a projection's path ends in its weight's key,
    ``('1', 'attn', 'w_q')``; its bias is ``b_q`` beside it). ``mode="exact"``
    walks the C columns of the loss Hessian's square root back (KFLR); ``"mc"`` walks
    ``mc_samples`` columns from targets sampled with ``key`` (K-FAC). ``train``
    defaults to True.
    """
    _check_loss(loss, "kfac_factors")
    if mode not in ("exact", "mc"):
        raise ValueError(f"kfac_factors: mode must be 'exact' or 'mc', got {mode!r}.")
    samples = None if mode == "exact" else mc_samples
    if samples is not None:
        loss_columns(loss, jnp.zeros((1, 1)), None, jax.random.key(0), samples, "kfac_factors")
    check(model, train=False)

    def f(params, x, target, *, key=None, state=None, train=True, lengths=None):
        check(model, train=train)
        pred, res = _forward(model, params, x, key, state, train, lengths)
        cols = loss_columns(loss, pred, target, key, samples, "kfac_factors")
        return factors_from_columns(model, params, res, cols)

    return f


def factors_from_columns(model: Layer, params: Params, res: Any, cols: Array) -> dict:
    """K-FAC factors from a forward's residuals and columns (K, *pred.shape) to walk back."""

    def one(s):
        out: dict = {}
        _kfac_collect(walk(model, params, res, s)[1], (), out)
        return out

    shapes = jax.eval_shape(one, cols[0])
    axes = {k: KFACFactors._make((None, 0)) for k in shapes}  # vmap out_axes spec
    per_column = jax.vmap(one, out_axes=axes)(cols)
    return {k: KFACFactors(v.A, jnp.sum(v.G, axis=0)) for k, v in per_column.items()}


def get_path(tree: Params, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``: the params (or grads) of the layer at ``path``."""
    for k in path:
        tree = tree[k]
    return tree
