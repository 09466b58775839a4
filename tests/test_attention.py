"""Scaled dot-product attention (fbp/nn/attention.py): both residual modes vs jax.grad.

The reference is naive attention differentiated by ``jax.vjp`` in float64: masked
scores set to -1e30 (exactly zero probability after the softmax), and rows without
any allowed key multiplied by zero, so the reference is finite everywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.nn.attention import sdpa, sdpa_backward, sdpa_forward
from fbp.testing import rel_error

TOL = 1e-10


def naive_attention(q, k, v, allowed):
    """softmax(q kᵀ/√d over allowed keys) v, zero on rows without an allowed key."""
    s = jnp.einsum("bhtd,bhsd->bhts", q, k) / jnp.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", p, v) * jnp.any(allowed, axis=-1, keepdims=True)


def allowed_mask(b, h, t, s, causal=False, lengths=None, mask=None):
    allowed = jnp.ones((b, h, t, s), bool)
    if causal:
        allowed &= jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    if lengths is not None:
        allowed &= (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    if mask is not None:
        allowed &= mask
    return allowed


def qkvd(b, h, t, s, d=4, dv=3, seed=0, dtype=jnp.float64):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, h, t, d), dtype)
    k = jax.random.normal(ks[1], (b, h, s, d), dtype)
    v = jax.random.normal(ks[2], (b, h, s, dv), dtype)
    do = jax.random.normal(ks[3], (b, h, t, dv), dtype)
    return q, k, v, do


def fbp_grads(q, k, v, do, **kw):
    """(o, (dq, dk, dv)) of the hand-written pair, in one compiled call."""

    @jax.jit
    def f(q, k, v, do):
        o, res = sdpa_forward(q, k, v, **kw)
        return o, sdpa_backward(res, do)

    return f(q, k, v, do)


def vjp_grads(f, q, k, v, do):
    """(o, (dq, dk, dv)) of ``f`` by jax.vjp, in one compiled call."""

    @jax.jit
    def g(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    return g(q, k, v, do)


def assert_matches_naive(q, k, v, do, allowed, **kw):
    ref, ref_grads = vjp_grads(lambda a, b, c: naive_attention(a, b, c, allowed), q, k, v, do)
    o, grads = fbp_grads(q, k, v, do, **kw)
    errors = {"o": rel_error(o, ref)}
    errors.update({n: rel_error(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)})
    assert max(errors.values()) <= TOL, errors
    return o, grads


MODES = {
    "standard": ("standard", 128),
    "linear-bs3-pads": ("linear", 3),
    "linear-bs4": ("linear", 4),
    "linear-bs-over-S": ("linear", 128),
}
# The default run keeps four representative cases; -m slow runs the whole grid.
DEFAULT = {
    "standard-causal-both",
    "standard-full-mask",
    "linear-bs3-pads-causal-both",
    "linear-bs3-pads-full-none",
}


def _grid():
    for mid, (memory, block_size) in MODES.items():
        for causal in (False, True):
            for masks in ("none", "lengths", "mask", "both"):
                name = f"{mid}-{'causal' if causal else 'full'}-{masks}"
                marks = [] if name in DEFAULT else [pytest.mark.slow]
                yield pytest.param(memory, block_size, causal, masks, id=name, marks=marks)


GRID = list(_grid())


@pytest.mark.parametrize("memory, block_size, causal, masks", GRID)
def test_matches_jax_grad_of_naive_attention(memory, block_size, causal, masks):
    b, h, t, s = 3, 2, 7, 8
    q, k, v, do = qkvd(b, h, t, s)
    lengths = jnp.array([8, 5, 1]) if masks in ("lengths", "both") else None
    mask = None
    if masks in ("mask", "both"):
        mask = jax.random.bernoulli(jax.random.key(9), 0.6, (b, 1, t, s))
    allowed = allowed_mask(b, h, t, s, causal, lengths, mask)
    assert_matches_naive(
        q,
        k,
        v,
        do,
        allowed,
        causal=causal,
        lengths=lengths,
        mask=mask,
        memory=memory,
        block_size=block_size,
    )


SMALL = [(1, 1, 1), (1, 5, 5), (2, 1, 6), (2, 6, 1)]


@pytest.mark.parametrize(
    "memory, b, t, s",
    [
        pytest.param(
            memory, *shape, id=f"{memory}-{name}", marks=[] if keep else [pytest.mark.slow]
        )
        for memory in ("standard", "linear")
        for shape, name in zip(SMALL, ["T1", "batch1", "T1-S6", "S1"], strict=True)
        for keep in [
            (memory, name) in {("standard", "T1"), ("linear", "batch1"), ("linear", "T1-S6")}
        ]
    ],
)
def test_small_shapes_match_jax_grad(memory, b, t, s):
    q, k, v, do = qkvd(b, 2, t, s, seed=1)
    causal = t == s
    allowed = allowed_mask(b, 2, t, s, causal)
    assert_matches_naive(q, k, v, do, allowed, causal=causal, memory=memory, block_size=2)


def test_modes_agree_with_each_other_including_dropout():
    q, k, v, do = qkvd(2, 2, 9, 9, seed=2)
    kw = dict(causal=True, lengths=jnp.array([9, 4]), drop_rate=0.3, key=jax.random.key(5))
    o1, g1 = fbp_grads(q, k, v, do, memory="standard", block_size=4, **kw)
    o2, g2 = fbp_grads(q, k, v, do, memory="linear", block_size=4, **kw)
    assert rel_error(o1, o2) <= TOL
    for a, b in zip(g1, g2, strict=True):
        assert rel_error(a, b) <= TOL


@pytest.mark.parametrize("memory", [pytest.param("standard", marks=pytest.mark.slow), "linear"])
def test_dropout_gradient_matches_jax_grad_with_the_same_mask(memory):
    q, k, v, do = qkvd(2, 2, 6, 6, seed=3)
    key, rate = jax.random.key(7), 0.4

    def f(a, b, c):
        return sdpa(a, b, c, causal=True, drop_rate=rate, key=key, block_size=4, memory=memory)

    ref, ref_grads = vjp_grads(f, q, k, v, do)
    o, grads = fbp_grads(
        q, k, v, do, causal=True, drop_rate=rate, key=key, block_size=4, memory=memory
    )
    assert rel_error(o, ref) <= TOL
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) <= TOL
    # some probabilities are really dropped: the output differs from no dropout
    assert rel_error(o, jax.jit(lambda a: sdpa(a, k, v, causal=True))(q)) > 1e-3


@pytest.mark.parametrize("memory", ["standard", "linear"])
def test_fully_masked_rows_give_zero_output_and_gradient_never_nan(memory):
    """float32, op by op under debug_nans/debug_infs: no intermediate is NaN or ±inf."""
    q, k, v, do = qkvd(2, 2, 5, 6, seed=4, dtype=jnp.float32)
    q = q * 30  # large scores: no accidental overflow either
    mask = jnp.ones((2, 2, 5, 6), bool).at[:, :, 2].set(False)  # row 2 of every head
    lengths = jnp.array([0, 6])  # example 0: no key at all
    with jax.debug_nans(True), jax.debug_infs(True), jax.disable_jit():
        o, res = sdpa_forward(q, k, v, lengths=lengths, mask=mask, memory=memory, block_size=4)
        dq, dk, dv = sdpa_backward(res, do)
    for a in (o, dq, dk, dv):
        assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(o[0], 0)
    np.testing.assert_array_equal(o[1, :, 2], 0)
    np.testing.assert_array_equal(dq[0], 0)
    np.testing.assert_array_equal(dq[1, :, 2], 0)
    np.testing.assert_array_equal(dk[0], 0)
    np.testing.assert_array_equal(dv[0], 0)
    assert float(jnp.abs(o[1, :, 3]).max()) > 0


def test_block_size_not_dividing_time_pads_with_masked_keys():
    """S = 10 in blocks of 4: the last block has 2 real keys and 2 masked ones."""
    q, k, v, do = qkvd(1, 1, 10, 10, seed=6)
    o4, g4 = fbp_grads(q, k, v, do, causal=True, memory="linear", block_size=4)
    o10, g10 = fbp_grads(q, k, v, do, causal=True, memory="linear", block_size=10)
    assert rel_error(o4, o10) <= TOL
    for a, b in zip(g4, g10, strict=True):
        assert a.shape == b.shape and rel_error(a, b) <= TOL


def test_linear_residuals_are_linear_in_time():
    q, k, v, _ = qkvd(1, 2, 16, 16)
    _, res = sdpa_forward(q, k, v, causal=True, memory="linear", block_size=4)
    assert res.p is None and res.lse.shape == (1, 2, 16)
    _, res = sdpa_forward(q, k, v, causal=True)
    assert res.lse is None and res.p.shape == (1, 2, 16, 16)


# ----------------------------------------------------------------------------- bad input


def _bad(match, *shapes, **kw):
    arrays = [jnp.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        sdpa_forward(*arrays, **kw)


def test_errors_name_the_argument_and_both_shapes():
    q, s4 = (2, 2, 5, 4), (2, 2, 6, 4)
    _bad(
        r"sdpa_forward: q has shape \(2, 5, 4\) but expected \(batch, heads, time, head_dim\)",
        (2, 5, 4),
        s4,
        s4,
    )
    _bad(r"q \(2, 2, 5, 4\), k \(2, 2, 6, 3\), v \(2, 2, 6, 4\) do not fit", q, (2, 2, 6, 3), s4)
    _bad(
        r"lengths has shape \(3,\) and dtype int\d+ but expected integers of shape \(batch,\) = \(2,\)",
        q,
        s4,
        s4,
        lengths=jnp.array([1, 2, 3]),
    )
    _bad(
        r"lengths has values in \[1, 7\] but the sequence has 6 steps; expected 0 <= lengths <= 6",
        q,
        s4,
        s4,
        lengths=jnp.array([1, 7]),
    )
    _bad(
        r"mask has shape \(5, 5\) and dtype bool but expected booleans broadcastable to \(batch, heads, T, S\) = \(2, 2, 5, 6\)",
        q,
        s4,
        s4,
        mask=jnp.ones((5, 5), bool),
    )
    _bad(
        r"mask has shape \(5, 6\) and dtype float\d+ but expected booleans",
        q,
        s4,
        s4,
        mask=jnp.ones((5, 6)),
    )
    _bad(r"memory must be one of \('standard', 'linear'\), got 'flash'", q, s4, s4, memory="flash")
    _bad(r"block_size must be a positive int, got 0", q, s4, s4, block_size=0)
    _bad(r"dropout must be in \[0, 1\), got 1.0", q, s4, s4, drop_rate=1.0)
    _bad(r"dropout 0.1 needs a PRNG key, got key=None", q, s4, s4, drop_rate=0.1)


def test_backward_refuses_a_cotangent_of_the_wrong_shape():
    q, k, v, do = qkvd(1, 2, 3, 3)
    _, res = sdpa_forward(q, k, v)
    with pytest.raises(
        nn.ShapeError, match=r"do has shape \(1, 2, 3, 4\) but the output has shape \(1, 2, 3, 3\)"
    ):
        sdpa_backward(res, jnp.zeros((1, 2, 3, 4)))


def test_lengths_are_checked_only_when_concrete():
    q, k, v, _ = qkvd(2, 1, 3, 3)
    f = jax.jit(lambda n: sdpa(q, k, v, lengths=n))
    assert f(jnp.array([3, 2])).shape == (2, 1, 3, 3)
