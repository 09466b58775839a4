"""Training: every optimizer in a table converges inside the jitted step; traces; skips; evaluate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import losses, nn, train


def _problem(n=128):
    """A small nonlinear regression in float32: y = sin(3 x0) + x1²."""
    x = jax.random.uniform(jax.random.key(0), (n, 2), jnp.float32, -1, 1)
    y = (jnp.sin(3 * x[:, :1]) + x[:, 1:] ** 2).astype(jnp.float32)
    return x, y


MODEL = nn.Sequential([nn.Dense(32), nn.Tanh(), nn.Dense(32), nn.Tanh(), nn.Dense(1)])

OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.05, momentum=0.9),
    "nesterov": optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=1e-4),
    "rmsprop": optax.rmsprop(3e-3),
    "adagrad": optax.adagrad(0.1),
    "warmup-cosine-adam": optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=20, decay_steps=800)
    ),
    "exponential-decay-sgd": optax.sgd(optax.exponential_decay(0.2, 100, 0.9)),
    "clip-by-global-norm-adam": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_converges_inside_jitted_epochs(name):
    x, y = _problem()
    opt = OPTIMIZERS[name]
    ts = train.init(MODEL, opt, jax.random.key(1), x)
    epoch = train.make_epoch(MODEL, losses.mse, opt, batch_size=32)
    first = train.evaluate(MODEL, losses.mse, ts.params, x, y)["loss"]
    for _ in range(200):
        ts, metrics = epoch(ts, x, y)
    last = train.evaluate(MODEL, losses.mse, ts.params, x, y)["loss"]
    assert last < 0.1 * first, f"{name}: loss {first:.4f} -> {last:.4f}"
    assert int(ts.step) == 200 * 4
    assert metrics["loss"].shape == (4,) and int(metrics["skipped"].sum()) == 0
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(ts.params))


def _counting_grad_fn(traces: list):
    """fbp's value_and_grad that appends to ``traces`` each time it is traced."""
    inner = fbp.value_and_grad(MODEL, losses.mse, has_aux=True)

    def counted(*args, **kwargs):
        traces.append(1)
        return inner(*args, **kwargs)

    return counted


def test_epoch_traces_the_step_once_across_epochs():
    x, y = _problem()
    traces = []
    counted = _counting_grad_fn(traces)
    opt = optax.adam(1e-2)
    ts = train.init(MODEL, opt, jax.random.key(1), x)
    epoch = train.make_epoch(MODEL, losses.mse, opt, batch_size=32, grad_fn=counted)
    for _ in range(5):
        ts, _ = epoch(ts, x, y)
    assert len(traces) == 1


def test_jitted_step_traces_once():
    x, y = _problem()
    traces = []
    counted = _counting_grad_fn(traces)
    opt = optax.sgd(0.1)
    step = train.make_step(MODEL, losses.mse, opt, grad_fn=counted)
    ts = train.init(MODEL, opt, jax.random.key(1), x)
    for i in range(5):
        ts, m = step(ts, x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16])
    assert len(traces) == 1 and int(ts.step) == 5


def test_same_seed_gives_bitwise_identical_parameters():
    x, y = _problem()

    def run():
        opt = optax.adam(1e-2)
        ts = train.init(MODEL, opt, jax.random.key(7), x)
        epoch = train.make_epoch(MODEL, losses.mse, opt, batch_size=16)
        for _ in range(3):
            ts, _ = epoch(ts, x, y)
        return ts.params

    a, b = run(), run()
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_nonfinite_step_is_skipped_and_never_reaches_params():
    x, y = _problem(32)
    opt = optax.sgd(0.1)
    step = train.make_step(MODEL, losses.mse, opt)
    ts = train.init(MODEL, opt, jax.random.key(1), x)
    bad_y = y.at[3, 0].set(jnp.nan)
    new, m = step(ts, x, bad_y)
    assert int(m["skipped"]) == 1 and int(new.step) == 0
    for u, v in zip(jax.tree.leaves(new.params), jax.tree.leaves(ts.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(jax.random.key_data(new.key), jax.random.key_data(ts.key))
    good, m = step(new, x, y)
    assert int(m["skipped"]) == 0 and int(good.step) == 1


def test_penalty_is_added_to_loss_and_gradient():
    x, y = _problem(32)
    params = MODEL.init(jax.random.key(0), x)
    pen = losses.l2(0.5)
    value, grads = fbp.value_and_grad(MODEL, losses.mse, penalty=pen)(params, x, y)
    ref_value, ref_grads = jax.value_and_grad(fbp.loss_fn(MODEL, losses.mse, penalty=pen))(
        params, x, y
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_evaluate_reports_loss_and_accuracy_over_batches():
    x = jax.random.normal(jax.random.key(0), (50, 4), jnp.float32)
    labels = jnp.arange(50) % 3
    model = nn.Sequential([nn.Dense(3)])
    params = model.init(jax.random.key(1), x)
    full = train.evaluate(model, losses.softmax_cross_entropy, params, x, labels)
    chunked = train.evaluate(model, losses.softmax_cross_entropy, params, x, labels, batch_size=16)
    logits = model.apply(params, x)
    assert full["accuracy"] == pytest.approx(float(losses.accuracy(logits, labels)))
    assert full["loss"] == pytest.approx(
        float(losses.softmax_cross_entropy(logits, labels)), rel=1e-5
    )
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["accuracy"] == pytest.approx(full["accuracy"])


def test_make_epoch_rejects_bad_batch_size():
    with pytest.raises(ValueError, match=r"make_epoch: batch_size must be a positive int, got 0"):
        train.make_epoch(MODEL, losses.mse, optax.sgd(0.1), batch_size=0)
    x, y = _problem(8)
    opt = optax.sgd(0.1)
    epoch = train.make_epoch(MODEL, losses.mse, opt, batch_size=16)
    ts = train.init(MODEL, opt, jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"8 examples is fewer than batch_size=16"):
        epoch(ts, x, y)
