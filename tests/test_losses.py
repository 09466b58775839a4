"""Losses and penalties: hand-written gradients vs jax.grad, stability, masks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbp import ShapeError, losses, testing

KEY = jax.random.key(0)
PRED = jax.random.normal(KEY, (6, 4), jnp.float64) * 3


def _targets():
    k1, k2 = jax.random.split(jax.random.key(1))
    probs = jax.nn.softmax(jax.random.normal(k1, (6, 4), jnp.float64))
    return {
        "mse": (losses.mse, jax.random.normal(k2, (6, 4), jnp.float64)),
        "huber": (losses.huber, jax.random.normal(k2, (6, 4), jnp.float64) * 3),
        "huber-0.5": (losses.Huber(0.5), jax.random.normal(k2, (6, 4), jnp.float64) * 3),
        "bce": (losses.sigmoid_binary_cross_entropy, jax.random.uniform(k2, (6, 4), jnp.float64)),
        "ce-labels": (losses.softmax_cross_entropy, jnp.array([0, 1, 2, 3, 0, 1])),
        "ce-probs": (losses.softmax_cross_entropy, probs),
        "ce-onehot": (losses.softmax_cross_entropy, jax.nn.one_hot(jnp.arange(6) % 4, 4)),
    }


TARGETS = _targets()


@pytest.mark.parametrize("name", TARGETS)
def test_loss_backward_matches_jax_grad(name):
    loss, target = TARGETS[name]
    testing.assert_loss_parity(loss, PRED, target)


@pytest.mark.parametrize("name", TARGETS)
def test_masked_loss_backward_matches_jax_grad(name):
    loss, target = TARGETS[name]
    where = jnp.array([1, 0, 1, 1, 0, 1], jnp.float64)
    report = testing.assert_loss_parity(loss, PRED, target, where=where)
    assert report.errors["dpred"] <= 1e-10
    # masked rows get no gradient and do not move the value
    g = loss.backward(PRED, target, where)
    assert float(jnp.abs(g[1]).max()) == 0.0
    moved = PRED.at[1].add(100.0)
    np.testing.assert_allclose(loss(moved, target, where), loss(PRED, target, where), rtol=1e-12)


def test_values_match_optax():
    labels = TARGETS["ce-labels"][1]
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(PRED, labels),
        optax.softmax_cross_entropy_with_integer_labels(PRED, labels).mean(),
        rtol=1e-12,
    )
    t = TARGETS["bce"][1]
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(PRED, t),
        optax.sigmoid_binary_cross_entropy(PRED, t).mean(),
        rtol=1e-12,
    )
    t = TARGETS["huber"][1]
    np.testing.assert_allclose(losses.huber(PRED, t), optax.huber_loss(PRED, t).mean(), rtol=1e-12)
    np.testing.assert_allclose(losses.mse(PRED, t), jnp.mean((PRED - t) ** 2), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_extreme_logits_give_finite_loss_and_gradient(dtype):
    z = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype)
    labels = jnp.array([1, 0])
    for loss, target in [
        (losses.softmax_cross_entropy, labels),
        (losses.sigmoid_binary_cross_entropy, jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype)),
    ]:
        value, grad = loss(z, target), loss.backward(z, target)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
        assert value.dtype == dtype and grad.dtype == dtype
    # a confidently wrong prediction costs about |z|
    assert float(losses.softmax_cross_entropy(z[:1], jnp.array([1]))) == pytest.approx(2e4)


def test_sequence_loss_averages_over_valid_steps():
    """Per-step losses on (batch, time, classes) with a (batch, time) mask."""
    logits = jax.random.normal(KEY, (2, 5, 3), jnp.float64)
    labels = jnp.arange(10).reshape(2, 5) % 3
    where = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float64)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, labels, where), (per * where).sum() / 8, rtol=1e-12
    )
    testing.assert_loss_parity(losses.softmax_cross_entropy, logits, labels, where=where)
    testing.assert_loss_parity(losses.mse, logits, logits * 0.5, where=where)


def test_label_out_of_range_is_reported_eagerly():
    with pytest.raises(ValueError, match=r"label 4 at flat index 2 is outside \[0, 4\)"):
        losses.softmax_cross_entropy(PRED, jnp.array([0, 1, 4, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"label -1 at flat index 0 is outside \[0, 4\)"):
        losses.softmax_cross_entropy.backward(PRED, jnp.array([-1, 1, 2, 0, 0, 0]))


def test_label_out_of_range_under_jit_is_nan_not_wrapped():
    bad = jnp.array([0, 1, 4, 0, 0, 0])
    value = jax.jit(losses.softmax_cross_entropy)(PRED, bad)
    grad = jax.jit(losses.softmax_cross_entropy.backward)(PRED, bad)
    assert bool(jnp.isnan(value))
    assert bool(jnp.all(jnp.isnan(grad[2]))) and bool(jnp.all(jnp.isfinite(grad[0])))


def test_shape_errors_name_the_loss_and_shapes():
    with pytest.raises(
        ShapeError, match=r"mse: target has shape \(6, 3\) but pred has shape \(6, 4\)"
    ):
        losses.mse(PRED, jnp.zeros((6, 3)))
    with pytest.raises(
        ShapeError,
        match=r"integer labels have shape \(5,\) but logits of shape \(6, 4\) need labels of shape \(6,\)",
    ):
        losses.softmax_cross_entropy(PRED, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ShapeError, match=r"probability targets have shape \(6, 3\)"):
        losses.softmax_cross_entropy(PRED, jnp.zeros((6, 3)))
    with pytest.raises(
        ShapeError, match=r"where has shape \(5,\) but the per-entry loss has shape \(6, 4\)"
    ):
        losses.mse(PRED, PRED, jnp.ones(5))
    with pytest.raises(ValueError, match=r"huber: delta must be > 0, got 0"):
        losses.Huber(0)


PARAMS = {
    "0": {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([5.0, -5.0])},
    "1": {},
    "2": {"w_ih": jnp.array([[-1.0]]), "scale": jnp.array([7.0])},
}


@pytest.mark.parametrize("penalty", [losses.l1(0.3), losses.l2(0.3)], ids=["l1", "l2"])
def test_penalty_gradient_matches_jax_grad_and_skips_biases(penalty):
    got = penalty.backward(PARAMS)
    ref = jax.grad(penalty)(PARAMS)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert float(jnp.abs(got["0"]["b"]).max()) == 0.0
    assert float(jnp.abs(got["2"]["scale"]).max()) == 0.0
    expected = 0.3 * (6.5 + 1.0) if penalty.kind == "l1" else 0.3 * 0.5 * (1 + 4 + 0.25 + 9 + 1)
    assert float(penalty(PARAMS)) == pytest.approx(expected)


def test_l1_subgradient_at_zero_is_zero():
    grads = losses.l1(0.3).backward({"w": jnp.array([0.0, 2.0, -2.0])})
    np.testing.assert_array_equal(grads["w"], [0.0, 0.3, -0.3])


def test_penalty_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"l2: coef must be >= 0, got -1"):
        losses.l2(-1)
    with pytest.raises(ValueError, match=r"kind must be 'l1' or 'l2', got 'l3'"):
        losses.Penalty("l3", 1.0)
