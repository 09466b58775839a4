"""MultiHeadAttention, positional encodings, TransformerBlock and causal_lm_loss.

The generic tests (parity, jit, trees, float32, linearity) run over the registry
cases in tests/layer_cases.py; this file checks what they cannot: lengths, masks,
cross-attention with its own context width, the function pairs, the LM loss, and
every documented error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn, testing
from fbp.testing import rel_error

TOL = 1e-10


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def _vjp_check(layer, params, x, **kw):
    """Hand-written (y, dparams, dx) vs jax.vjp of apply, for any pytree x; returns (y, dx)."""
    dy = _normal(99, layer.output_shape(params, x).shape)

    @jax.jit
    def ref(params, x):
        y, vjp = jax.vjp(lambda p, v: layer.apply(p, v, **kw), params, x)
        return y, *vjp(dy)

    @jax.jit
    def hand(params, x):
        y, res = layer.forward(params, x, **kw)
        return y, *layer.backward(params, res, dy)

    y_ref, ref_dp, ref_dx = ref(params, x)
    y, dparams, dx = hand(params, x)
    errors = {"y": rel_error(y, y_ref)}
    errors.update({k: rel_error(dparams[k], ref_dp[k]) for k in params if k != "b_k"})
    for i, (a, b) in enumerate(zip(jax.tree.leaves(dx), jax.tree.leaves(ref_dx), strict=True)):
        errors[f"dx{i}"] = rel_error(a, b)
    assert max(errors.values()) <= TOL, errors
    np.testing.assert_allclose(dparams["b_k"], ref_dp["b_k"], atol=1e-12)  # both ~0
    return y, dx


@pytest.mark.parametrize("memory", [pytest.param("standard", marks=pytest.mark.slow), "linear"])
def test_self_attention_with_lengths_zeroes_padded_steps(memory):
    attn = nn.MultiHeadAttention(2, causal=True, memory=memory, block_size=2)
    x = _normal(0, (3, 6, 8))
    params = attn.init(jax.random.key(1), x)
    lengths = jnp.array([6, 3, 0])
    y, dx = _vjp_check(attn, params, x, lengths=lengths)
    np.testing.assert_array_equal(y[1, 3:], 0)
    np.testing.assert_array_equal(y[2], 0)
    np.testing.assert_array_equal(dx[1, 3:], 0)  # padded steps get no gradient
    np.testing.assert_array_equal(dx[2], 0)
    assert bool(jnp.all(jnp.isfinite(dx)))


@pytest.mark.parametrize("memory", ["standard", pytest.param("linear", marks=pytest.mark.slow)])
def test_cross_attention_with_its_own_width_and_lengths(memory):
    attn = nn.MultiHeadAttention(2, head_dim=3, memory=memory, block_size=3)
    x, ctx = _normal(0, (2, 4, 6)), _normal(1, (2, 7, 5))
    params = attn.init(jax.random.key(2), (x, ctx))
    assert params["w_q"].shape == (6, 6) and params["w_k"].shape == (5, 6)
    assert params["w_o"].shape == (6, 6) and params["b_o"].shape == (6,)
    kw = dict(lengths=jnp.array([4, 2]), context_lengths=jnp.array([7, 1]))
    y, (dx, dctx) = _vjp_check(attn, params, (x, ctx), **kw)
    assert dx.shape == x.shape and dctx.shape == ctx.shape
    np.testing.assert_array_equal(dctx[1, 1:], 0)  # masked context steps get no gradient


@pytest.mark.slow  # sdpa's mask parity runs by default in tests/test_attention.py
def test_boolean_mask_matches_jax_grad_and_other_mode():
    x = _normal(3, (2, 5, 8))
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (2, 2, 5, 5))
    outs = []
    for memory in ("linear", "standard"):
        attn = nn.MultiHeadAttention(2, rope=True, memory=memory, block_size=2)
        params = attn.init(jax.random.key(5), x)
        outs.append(_vjp_check(attn, params, x, mask=mask))
    for a, b in zip(*outs, strict=True):
        assert rel_error(a, b) <= TOL


def test_sequential_passes_lengths_to_attention_and_lm_loss_masks_padding():
    model = nn.Sequential(
        [
            nn.Embedding(11, 8),
            nn.LearnedPositions(6),
            nn.TransformerBlock(2, causal=True, mlp_dim=8),
            nn.LayerNorm(),
            nn.Dense(11),
        ]
    )
    ids = jax.random.randint(jax.random.key(6), (3, 7), 0, 11)
    lengths = jnp.array([7, 4, 2])
    x, y = (jnp.asarray(a) for a in losses.lm_targets(np.asarray(ids), np.asarray(lengths)))
    x2 = x.at[2, 1:].set(3)  # row 2 has one valid step: what follows must be invisible
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(7), x))
    hand = fbp.value_and_grad(model, losses.causal_lm_loss)
    ref = jax.value_and_grad(fbp.loss_fn(model, losses.causal_lm_loss))

    @jax.jit
    def both(params):
        kw = dict(lengths=lengths - 1)
        return hand(params, x, y, **kw), ref(params, x, y, **kw), model.apply(params, x2, **kw)

    (value, grads), (ref_value, ref_grads), y2 = both(params)
    assert abs(float(value) - float(ref_value)) <= TOL * abs(float(ref_value))
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        if "b_k" not in jax.tree_util.keystr(path):
            assert rel_error(g, r) <= TOL, jax.tree_util.keystr(path)
    y1 = model.apply(params, x, lengths=lengths - 1)
    np.testing.assert_allclose(y1[2, :1], y2[2, :1], rtol=1e-12)


@pytest.mark.slow
def test_transformer_block_linear_memory_with_dropout_matches_jax_grad():
    block = nn.TransformerBlock(
        2, mlp_dim=12, causal=True, rope=True, dropout=0.2, memory="linear", block_size=3
    )
    testing.assert_layer_parity(block, _normal(8, (2, 5, 8)), key=jax.random.key(9), train=True)


# ----------------------------------------------------------------------------- function pairs


def test_rope_backward_is_the_vjp_of_rope_forward():
    x, dy = _normal(10, (2, 3, 5, 6)), _normal(11, (2, 3, 5, 6))
    positions = jnp.array([0, 3, 4, 9, 20])
    _, vjp = jax.vjp(lambda v: nn.rope_forward(v, positions, base=100.0), x)
    assert rel_error(nn.rope_backward(dy, positions, base=100.0), vjp(dy)[0]) <= TOL


def test_rope_scores_depend_only_on_relative_position():
    q, k = _normal(12, (1, 1, 1, 8)), _normal(13, (1, 1, 1, 8))

    def score(i, j):
        qi = nn.rope_forward(q, jnp.array([i]))
        kj = nn.rope_forward(k, jnp.array([j]))
        return float(jnp.sum(qi * kj))

    assert abs(score(5, 2) - score(13, 10)) < 1e-12
    assert abs(score(5, 2) - score(5, 3)) > 1e-3


def test_sinusoid_table_is_vaswanis():
    table = nn.sinusoid_table(50, 6, dtype=jnp.float64)
    t, i = 37, 2
    assert abs(float(table[t, 2 * i]) - np.sin(t / 10000 ** (2 * i / 6))) < 1e-12
    assert abs(float(table[t, 2 * i + 1]) - np.cos(t / 10000 ** (2 * i / 6))) < 1e-12
    assert nn.sinusoid_table(3, 5).shape == (3, 5)


def test_pytorch_parameter_layout_round_trips():
    from fbp.nn.mha import params_from_torch

    rng = np.random.default_rng(0)
    wq, wk, wv, wo = (rng.normal(size=(4, 4)) for _ in range(4))
    sd = {
        "in_proj_weight": np.concatenate([wq.T, wk.T, wv.T]),
        "in_proj_bias": np.arange(12.0),
        "out_proj.weight": wo.T,
        "out_proj.bias": np.ones(4),
    }
    p = params_from_torch(sd)
    np.testing.assert_array_equal(p["w_q"], wq)
    np.testing.assert_array_equal(p["w_v"], wv)
    np.testing.assert_array_equal(p["b_k"], np.arange(4.0, 8.0))
    np.testing.assert_array_equal(p["w_o"], wo)


# ----------------------------------------------------------------------------- causal LM loss


def test_causal_lm_loss_matches_jax_grad_and_ignores_padding():
    logits = _normal(14, (3, 5, 7))
    target = jax.random.randint(jax.random.key(15), (3, 5), 0, 7).at[1, 2:].set(-1)
    testing.assert_loss_parity(losses.causal_lm_loss, logits, target)
    logits_np, target_np = np.asarray(logits), np.asarray(target)
    kept = target_np != -1

    def mean_ce(rows):  # plain NumPy cross-entropy over the kept tokens of these rows
        z, t = logits_np[rows][kept[rows]], target_np[rows][kept[rows]]
        lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
        return float(np.mean(lse - z[np.arange(len(t)), t]))

    assert abs(float(losses.causal_lm_loss(logits, target)) - mean_ce(slice(None))) < 1e-12
    g = losses.causal_lm_loss.backward(logits, target)
    np.testing.assert_array_equal(g[1, 2:], 0)
    half = losses.causal_lm_loss(logits, target, where=jnp.array([1.0, 1.0, 0.0]))
    assert abs(float(half) - mean_ce(slice(0, 2))) < 1e-12


def test_lm_targets_shift_and_pad():
    x, y = losses.lm_targets(np.array([[1, 2, 3, 4], [5, 6, 0, 0]]), np.array([4, 2]))
    assert x.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert y.tolist() == [[2, 3, 4], [6, -1, -1]]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: nn.MultiHeadAttention(0),
            r"MultiHeadAttention: num_heads must be a positive int, got 0",
        ),
        (
            lambda: nn.MultiHeadAttention(2, head_dim=2.5),
            r"head_dim must be a positive int, got 2.5",
        ),
        (
            lambda: nn.MultiHeadAttention(2, head_dim=3, rope=True),
            r"rope=True needs an even head_dim, got 3",
        ),
        (
            lambda: nn.MultiHeadAttention(2, memory="flash"),
            r"memory must be one of \('standard', 'linear'\), got 'flash'",
        ),
        (
            lambda: nn.MultiHeadAttention(2, block_size=-1),
            r"block_size must be a positive int, got -1",
        ),
        (lambda: nn.MultiHeadAttention(2, dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
        (
            lambda: nn.MultiHeadAttention(2, w_init="nope"),
            r"MultiHeadAttention: unknown initializer 'nope'",
        ),
        (
            lambda: nn.TransformerBlock(2, mlp_dim=0),
            r"TransformerBlock: mlp_dim must be a positive int, got 0",
        ),
        (
            lambda: nn.TransformerBlock(2, memory="x"),
            r"TransformerBlock: MultiHeadAttention: memory must be one of",
        ),
        (
            lambda: nn.TransformerBlock(2, eps=0),
            r"TransformerBlock: LayerNorm: eps must be a float > 0",
        ),
        (
            lambda: nn.LearnedPositions(0),
            r"LearnedPositions: max_len must be a positive int, got 0",
        ),
        (
            lambda: nn.SinusoidalPositions(base=1),
            r"SinusoidalPositions: base must be a number > 1, got 1",
        ),
    ],
)
def test_bad_hyperparameters_fail_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _attn_params(attn, x):
    return attn.init(jax.random.key(0), x)


def test_shape_errors_name_the_layer_what_was_expected_and_got():
    x = jnp.zeros((2, 5, 10))
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(4\).init: x has width 10, which 4 heads do not divide; pass head_dim=",
    ):
        nn.MultiHeadAttention(4).init(jax.random.key(0), x)
    with pytest.raises(
        nn.ShapeError, match=r"rope=True needs an even head_dim, but width 10 / 2 heads = 5"
    ):
        nn.MultiHeadAttention(2, rope=True).init(jax.random.key(0), x)
    attn = nn.MultiHeadAttention(2)
    params = _attn_params(attn, x)
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(2\).forward: x has shape \(2, 5, 9\) but params\['w_q'\] expects \(..., 10\)",
    ):
        attn.apply(params, jnp.zeros((2, 5, 9)))
    with pytest.raises(
        nn.ShapeError, match=r"x has shape \(5, 10\) but expected \(batch, time, dim\)"
    ):
        attn.apply(params, jnp.zeros((5, 10)))
    with pytest.raises(
        nn.ShapeError,
        match=r"lengths has shape \(3,\) and dtype int\d+ but expected integers of shape \(batch,\) = \(2,\)",
    ):
        attn.apply(params, x, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(2\).forward: lengths has values in \[2, 6\] but the sequence has 5 steps",
    ):
        attn.apply(params, x, lengths=jnp.array([2, 6]))
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(2\).forward: mask has shape \(5, 4\) and dtype bool but expected booleans broadcastable to \(batch, heads, T, S\) = \(2, 2, 5, 5\)",
    ):
        attn.apply(params, x, mask=jnp.ones((5, 4), bool))
    with pytest.raises(
        ValueError, match=r"MultiHeadAttention\(2\).forward: context_lengths is for cross-attention"
    ):
        attn.apply(params, x, context_lengths=jnp.array([1, 2]))
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(3\).forward: params\['w_q'\] has 10 columns, which do not split into 3 heads",
    ):
        nn.MultiHeadAttention(3).apply(params, x)


def test_cross_attention_errors():
    x, ctx = jnp.zeros((2, 5, 8)), jnp.zeros((2, 3, 6))
    attn = nn.MultiHeadAttention(2)
    params = attn.init(jax.random.key(0), (x, ctx))
    with pytest.raises(
        nn.ShapeError,
        match=r"MultiHeadAttention\(2\).forward: context has shape \(2, 3, 7\) but params\['w_k'\] expects \(..., 6\)",
    ):
        attn.apply(params, (x, jnp.zeros((2, 3, 7))))
    with pytest.raises(
        nn.ShapeError,
        match=r"params\['w_k'\] has shape \(6, 8\) \(cross-attention with context width 6\) but x is a single array of shape \(2, 5, 8\); pass the pair",
    ):
        attn.apply(params, x)
    with pytest.raises(
        nn.ShapeError, match=r"context has batch 3 \(shape \(3, 3, 6\)\) but x has batch 2"
    ):
        attn.apply(params, (x, jnp.zeros((3, 3, 6))))
    with pytest.raises(nn.ShapeError, match=r"x is a sequence of 3; expected \(x, context\)"):
        attn.apply(params, (x, ctx, ctx))
    with pytest.raises(
        nn.ShapeError, match=r"context_lengths has values in \[1, 4\] but the sequence has 3 steps"
    ):
        attn.apply(params, (x, ctx), context_lengths=jnp.array([1, 4]))


def test_dropout_in_training_needs_a_key():
    attn = nn.MultiHeadAttention(2, dropout=0.1)
    x = jnp.zeros((1, 3, 4))
    params = _attn_params(attn, x)
    with pytest.raises(
        ValueError,
        match=r"MultiHeadAttention\(2\).forward: train=True with dropout 0.1 needs a PRNG key",
    ):
        attn.apply(params, x, train=True)
    attn.apply(params, x)  # eval mode needs none


def test_block_and_positions_shape_errors():
    block = nn.TransformerBlock(2)
    x = jnp.zeros((2, 5, 8))
    params = block.init(jax.random.key(0), x)
    with pytest.raises(
        nn.ShapeError,
        match=r"TransformerBlock\(2\).forward: x has shape \(5, 8\) but expected \(batch, time, dim\)",
    ):
        block.apply(params, x[0])
    with pytest.raises(
        nn.ShapeError,
        match=r"TransformerBlock\(2\).forward: MultiHeadAttention\(2\).forward: lengths has values in \[1, 9\]",
    ):
        block.apply(params, x, lengths=jnp.array([1, 9]))
    pos = nn.LearnedPositions(4)
    with pytest.raises(
        nn.ShapeError,
        match=r"LearnedPositions\(4\).init: x has 5 steps \(shape \(2, 5, 8\)\) but max_len is 4",
    ):
        pos.init(jax.random.key(0), x)
    with pytest.raises(
        nn.ShapeError,
        match=r"rope_forward: x has shape \(2, 3\) but expected \(..., time, head_dim\) with an even head_dim",
    ):
        nn.rope_forward(jnp.zeros((2, 3)))
    with pytest.raises(
        nn.ShapeError,
        match=r"rope_forward: positions has shape \(2,\) but expected \(time,\) = \(3,\)",
    ):
        nn.rope_forward(jnp.zeros((3, 4)), jnp.arange(2))
    with pytest.raises(
        nn.ShapeError,
        match=r"causal_lm_loss: target has dtype float\d+ but expected integer token ids",
    ):
        losses.causal_lm_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)))
