"""fbp.extend on attention models: per-example quantities, DP clipped sums, curvature.

References (float64): ``jax.vmap(jax.grad(...))`` of one-example losses, or, where the
batch shares a dropout mask, ``jax.jacrev`` of the vector of the examples' own loss
terms of one batch forward. A causal LM loss with ignored targets (-1) is a mean over
the batch's valid tokens, so example b's own term is B times its share of that mean
(``fbp.extend.per_example``'s convention).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fbp
from fbp import extend, losses, nn
from fbp.extend import curvature, dp
from fbp.testing import rel_error

TOL = 1e-10
LM, CE = losses.causal_lm_loss, losses.softmax_cross_entropy


def _lm_terms(pred, y):
    """Each example's own term of the token-mean LM loss: (batch, T, V), (batch, T) -> (batch,)."""
    valid = (y != -1).astype(pred.dtype)
    logp = jax.nn.log_softmax(pred, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(y == -1, 0, y)[..., None], axis=-1)[..., 0]
    return pred.shape[0] * jnp.sum(valid * ce, axis=1) / jnp.sum(valid)


def _ref_vmap(model, params, x, y, lengths=None):
    """jax.vmap of jax.grad of one example's own loss term (the batch's token count fixed)."""
    n_valid = jnp.sum(y != -1)
    batch = jax.tree.leaves(x)[0].shape[0]

    def one(xb, yb, lb):
        def term(p):
            kw = {} if lb is None else {"lengths": lb[None]}
            pred = model.apply(p, jax.tree.map(lambda v: v[None], xb), **kw)
            valid = (yb != -1).astype(pred.dtype)
            logp = jax.nn.log_softmax(pred[0], axis=-1)
            ce = -jnp.take_along_axis(logp, jnp.where(yb == -1, 0, yb)[:, None], axis=-1)[:, 0]
            return batch * jnp.sum(valid * ce) / n_valid

        return jax.grad(term)(params)

    if lengths is None:
        return jax.vmap(lambda xb, yb: one(xb, yb, None))(x, y)
    return jax.vmap(one)(x, y, lengths)


def _ref_jacrev(model, params, x, y, **kw):
    """jax.jacrev of the examples' own terms of ONE batch forward (dropout masks shared)."""
    return jax.jacrev(lambda p: _lm_terms(model.apply(p, x, **kw), y))(params)


def _errors(got, ref):
    """Relative error per leaf; ``b_k`` (zero by softmax's shift invariance) absolutely."""
    out = {}
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        name = jax.tree_util.keystr(path)
        r = flat_ref[path]
        if name.endswith("['b_k']"):
            out[name] = float(jnp.max(jnp.abs(g - r))) * 1e-2  # |.| < 1e-12 passes
        else:
            out[name] = rel_error(g, r)
    return out


def _assert_close(got, ref, tol=TOL):
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    errs = _errors(got, ref)
    assert max(errs.values()) < tol, errs


def _sq(tree):
    return jax.tree.map(lambda g: jnp.sum(g * g, axis=tuple(range(1, g.ndim))), tree)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: object
    batch: int = 3
    time: int = 6
    vocab: int = 11
    lengths: tuple | None = None
    kw: tuple = ()  # forward keywords (train, key)
    ref: str = "vmap"  # or "jacrev" (a shared dropout mask)
    slow: bool = False

    def __str__(self):
        return self.id


def _lm(*layers, vocab=11):
    return nn.Sequential([nn.Embedding(vocab, 8), *layers, nn.Dense(vocab)])


CASES = [
    Case(
        "embedding-mha-causal-rope-lengths",
        lambda: _lm(nn.MultiHeadAttention(2, causal=True, rope=True)),
        lengths=(6, 2, 4),
    ),
    Case(
        "block-standard-layernorm",
        lambda: _lm(nn.TransformerBlock(2, mlp_dim=12, causal=True), nn.LayerNorm()),
        lengths=(6, 3, 5),
    ),
    Case(
        "block-linear-rope-layernorm",
        lambda: _lm(
            nn.TransformerBlock(2, causal=True, rope=True, memory="linear", block_size=4),
            nn.LayerNorm(),
        ),
        time=7,
    ),
    Case(
        "learned-sinusoidal-positions-two-blocks",
        lambda: _lm(
            nn.LearnedPositions(9),
            nn.SinusoidalPositions(),
            nn.TransformerBlock(2, mlp_dim=12, causal=True),
            nn.TransformerBlock(4, mlp_dim=12, causal=True, memory="linear", block_size=2),
            nn.LayerNorm(),
        ),
        slow=True,
    ),
    Case(
        "block-dropout-train",
        lambda: _lm(nn.TransformerBlock(2, mlp_dim=12, causal=True, dropout=0.3), nn.LayerNorm()),
        kw=(("train", True), ("key", 5)),
        ref="jacrev",
        lengths=(6, 4, 5),
    ),
    Case(
        "mha-nobias-non-causal",
        lambda: _lm(nn.MultiHeadAttention(2, head_dim=3, use_bias=False), nn.GELU()),
        slow=True,
    ),
]


def _setup(case, seed=0):
    """Model, perturbed float64 params, ids, LM targets (-1 on padded steps), keywords."""
    model = case.make()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, case.vocab, (case.batch, case.time)))
    y = rng.integers(0, case.vocab, (case.batch, case.time))
    kw = dict(case.kw)
    if "key" in kw:
        kw["key"] = jax.random.key(kw["key"])
    if case.lengths is not None:
        kw["lengths"] = jnp.asarray(case.lengths)
        y = np.where(np.arange(case.time)[None] < np.asarray(case.lengths)[:, None], y, -1)
    params = jax.jit(model.init)(jax.random.key(seed), x)
    params = jax.tree.map(lambda v: jnp.asarray(v + 0.1 * rng.normal(size=v.shape)), params)
    return model, params, x, jnp.asarray(y), kw


def _reference(case, model, params, x, y, kw):
    if case.ref == "jacrev":
        return jax.jit(lambda p: _ref_jacrev(model, p, x, y, **kw))(params)
    return jax.jit(lambda p: _ref_vmap(model, p, x, y, kw.get("lengths")))(params)


def _params(cases):
    return [pytest.param(c, marks=pytest.mark.slow) if c.slow else c for c in cases]


NAMES = ["grad", "batch_grad", "batch_l2", "grad_norm", "sum_grad_squared", "variance"]


@pytest.mark.parametrize("case", _params(CASES), ids=str)
def test_per_example_quantities_of_attention_models_match_jax(case):
    model, params, x, y, kw = _setup(case)
    _, q = jax.jit(functools.partial(extend.quantities(model, LM, NAMES), **kw))(params, x, y)
    ref = _reference(case, model, params, x, y, kw)
    _assert_close(q["batch_grad"], ref)
    _assert_close(q["batch_l2"], _sq(ref))
    total = sum(jax.tree.leaves(_sq(ref)))
    assert rel_error(q["grad_norm"], jnp.sqrt(total)) < TOL
    _, batch_grad = jax.jit(functools.partial(fbp.value_and_grad(model, LM), **kw))(params, x, y)
    _assert_close(jax.tree.map(lambda g: g.mean(0), ref), batch_grad)
    _assert_close(q["grad"], batch_grad)
    _assert_close(q["sum_grad_squared"], jax.tree.map(lambda g: (g * g).sum(0), ref))
    var = jax.tree.map(lambda g: (g * g).mean(0) - g.mean(0) ** 2, ref)
    _assert_close(q["variance"], var, 1e-8)


def test_padded_steps_contribute_nothing():
    """Changing the ids of padded steps (and their -1 targets) changes no example's gradient."""
    case = CASES[1]
    model, params, x, y, kw = _setup(case)
    f = jax.jit(functools.partial(extend.per_example_grads(model, LM), **kw))
    x2 = jnp.where(y == -1, (x + 3) % case.vocab, x)
    _assert_close(f(params, x2, y)[1], f(params, x, y)[1])


def test_cross_attention_per_example_grads_match_vmap():
    attn, out = nn.MultiHeadAttention(2, causal=False), nn.Dense(3)
    model = nn.Sequential([attn, out])
    rng = np.random.default_rng(1)
    xq, ctx = jnp.asarray(rng.normal(size=(3, 4, 6))), jnp.asarray(rng.normal(size=(3, 5, 10)))
    y = jnp.asarray(rng.integers(0, 3, (3, 4)))
    params = {"0": attn.init(jax.random.key(0), (xq, ctx)), "1": out.init(jax.random.key(1), xq)}
    params = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape), params)
    assert params["0"]["w_k"].shape == (10, 6)
    _, q = jax.jit(extend.quantities(model, LM, ["batch_grad", "batch_l2"]))(params, (xq, ctx), y)
    ref = jax.jit(lambda p: _ref_vmap(model, p, (xq, ctx), y))(params)
    _assert_close(q["batch_grad"], ref)
    _assert_close(q["batch_l2"], _sq(ref))


@pytest.mark.parametrize("t, m, n, k", [(3, 8, 4, 3), (40, 8, 4, 3), (5, 16, 16, 2)])
def test_block_norms_gram_and_materialised_forms_agree(t, m, n, k):
    from fbp.extend.attention_rules import block_sq_norms

    ka, kd = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (2, t, m), jnp.float64)
    d = jax.random.normal(kd, (2, t, k * n), jnp.float64)
    g = jnp.einsum("bti,btj->bij", a, d)
    for i, got in enumerate(block_sq_norms(a, d, k)):
        assert rel_error(got, jnp.sum(g[..., i * n : (i + 1) * n] ** 2, axis=(1, 2))) < TOL


@pytest.mark.parametrize("method", dp.METHODS)
def test_dp_clipped_sum_of_an_lm_matches_its_definition(method):
    case = CASES[0]
    model, params, x, y, kw = _setup(case)
    clip = 0.5
    f = dp.clipped_sum(model, LM, clip=clip, method=method)
    out = jax.jit(functools.partial(f, **kw))(params, x, y)
    g = _reference(case, model, params, x, y, kw)
    norms = jnp.sqrt(sum(jax.tree.leaves(_sq(g))))
    c = jnp.minimum(1.0, clip / norms)
    assert rel_error(out.norms, norms) < TOL
    _assert_close(out.summed, jax.tree.map(lambda v: jnp.einsum("b,b...->...", c, v), g))
    assert bool(jnp.all(out.factors < 1))


def test_norms_of_attention_form_no_per_example_weight_matrix():
    """Per-example norms of a transformer LM whose width exceeds its length (T(m + n) < m·n:
    the Gram form) need no (batch, dim, 3·dim) or (batch, dim, 4·dim) array."""
    model = nn.Sequential([nn.Embedding(11, 32), nn.TransformerBlock(2), nn.Dense(11)])
    x = jnp.zeros((4, 5), jnp.int32)
    y = jnp.zeros((4, 5), jnp.int32)
    params = model.init(jax.random.key(0), x)
    hlo = jax.jit(extend.per_example_norms(model, LM)).lower(params, x, y).as_text()
    assert "4x32x96" not in hlo and "4x32x128" not in hlo and "4x128x32" not in hlo


# ----------------------------------------------------------------------------- curvature


def test_ggn_vp_and_diag_ggn_through_attention_match_jax():
    """Per-step cross-entropy (the causal LM loss has no hand-written Hessian)."""
    block = nn.TransformerBlock(2, mlp_dim=6, causal=True, rope=True)
    model = nn.Sequential([nn.Embedding(5, 4), block, nn.Dense(5)])
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.integers(0, 5, (2, 3))), jnp.asarray(rng.integers(0, 5, (2, 3)))
    params = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape), params)
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(rng.normal(size=flat.shape)))

    @jax.jit
    def reference(p):
        pred = model.apply(p, x)
        J = jax.jacfwd(lambda q: model.apply(unravel(q), x))(ravel_pytree(p)[0])
        J = J.reshape(pred.size, -1)
        HL = jax.hessian(lambda o: CE(o.reshape(pred.shape), y))(pred.ravel())
        return J.T @ HL @ J

    @jax.jit
    def ours(p, v):
        gv = curvature.ggn_vp(model, CE)(p, x, y, v)
        return gv, curvature.diag_ggn(model, CE)(p, x, y)

    G = reference(params)
    gv, dg = (ravel_pytree(t)[0] for t in ours(params, v))
    assert rel_error(gv, G @ ravel_pytree(v)[0]) < TOL
    assert rel_error(dg, jnp.diag(G)) < TOL


# ----------------------------------------------------------------------------- refusals


class _TiedOutput(nn.Layer):
    """logits = h Eᵀ with E the embedding table passed in params: a tied output layer."""

    def init(self, key, x):
        return {"w": jnp.zeros((11, x.shape[-1]), x.dtype)}

    def forward(self, params, x, *, key=None, state=None, train=False):
        return x @ params["w"].T, x

    def backward(self, params, res, dy):
        return {"w": jnp.einsum("btv,btf->vf", dy, res)}, dy @ params["w"]


def test_a_layer_without_a_rule_in_an_lm_is_refused_by_name():
    model = nn.Sequential([nn.Embedding(11, 8), nn.TransformerBlock(2), _TiedOutput()])
    with pytest.raises(extend.UnsupportedLayerError, match=r"_TiedOutput\(\).*no per-example"):
        extend.per_example_norms(model, LM)
    with pytest.raises(extend.UnsupportedLayerError, match=r"_TiedOutput"):
        dp.grad_fn(model, LM, clip=1.0, noise=1.0)


def test_lengths_that_do_not_match_the_batch_are_refused_naming_the_layer():
    model, params, x, y, _ = _setup(CASES[0])
    f = extend.per_example_grads(model, LM)
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(2.*lengths"):
        f(params, x, y, lengths=jnp.array([3, 2]))
