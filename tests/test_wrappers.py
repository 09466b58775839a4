"""Frozen and Recompute (fbp/nn/wrappers.py), memory_report (fbp/memory.py), fbp/finetune.py,
and `lengths=` through the layers built around recurrent ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import finetune, losses, nn, testing, train

LOSS = losses.softmax_cross_entropy


def _batch(n=8, d=5, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, 3)


def _dots(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(" dot(")


# ----------------------------------------------------------------------------- Frozen


def test_frozen_dense_passes_the_true_dx_and_zero_dparams():
    layer, (x, _) = nn.Frozen(nn.Dense(4)), _batch()
    params = layer.init(jax.random.key(1), x)
    y, res = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    dparams, dx = layer.backward(params, res, dy)
    _, vjp = jax.vjp(lambda v: nn.Dense(4).apply(params, v), x)
    assert testing.rel_error(dx, vjp(dy)[0]) < 1e-12
    assert jax.tree.structure(dparams) == jax.tree.structure(params)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(dparams))


def test_frozen_params_are_the_wrapped_layers():
    x = jnp.ones((2, 5))
    plain = nn.Dense(4).init(jax.random.key(0), x)
    frozen = nn.Frozen(nn.Dense(4)).init(jax.random.key(0), x)
    assert jax.tree.structure(plain) == jax.tree.structure(frozen)
    np.testing.assert_array_equal(plain["w"], frozen["w"])


def test_frozen_backward_skips_the_weight_gradient_product_under_jit():
    x = jnp.ones((16, 5), jnp.float32)
    for layer, dots in ((nn.Dense(4), 2), (nn.Frozen(nn.Dense(4)), 1)):
        params = layer.init(jax.random.key(0), x)
        y, res = layer.forward(params, x)
        assert _dots(layer.backward, params, res, y) == dots, layer


def test_frozen_block_still_carries_deltas_to_earlier_layers():
    plain = nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(5), nn.Tanh(), nn.Dense(3)])
    frozen = nn.Sequential(
        [nn.Dense(6), nn.Tanh(), nn.Frozen(nn.Sequential([nn.Dense(5), nn.Tanh()])), nn.Dense(3)]
    )
    x, y = _batch()
    p = plain.init(jax.random.key(1), x)
    pf = {"0": p["0"], "1": {}, "2": {"0": p["2"], "1": {}}, "3": p["4"]}
    _, g = jax.jit(fbp.value_and_grad(plain, LOSS))(p, x, y)
    _, gf = jax.jit(fbp.value_and_grad(frozen, LOSS))(pf, x, y)
    assert testing.rel_error(gf["0"]["w"], g["0"]["w"]) < 1e-12
    assert testing.rel_error(gf["3"]["w"], g["4"]["w"]) < 1e-12
    assert float(jnp.abs(gf["2"]["0"]["w"]).max()) == 0.0


def test_frozen_first_layers_drop_their_backward_entirely():
    x, y = _batch()
    x = x.astype(jnp.float32)
    plain = nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(3)])
    frozen = nn.Sequential([nn.Frozen(nn.Dense(6)), nn.Tanh(), nn.Dense(3)])
    params = plain.init(jax.random.key(0), x)
    # plain: 2 forward + head dw, dx + first dw (the model's own dx is unused).
    assert _dots(fbp.value_and_grad(plain, LOSS), params, x, y) == 5
    # frozen first layer: nothing below the head's dw is needed at all.
    assert _dots(fbp.value_and_grad(frozen, LOSS), params, x, y) == 3


def test_wrappers_reject_non_layers():
    with pytest.raises(TypeError, match="Frozen: layer must be an fbp layer, got 3"):
        nn.Frozen(3)
    with pytest.raises(TypeError, match="Recompute: layer must be an fbp layer, got 'dense'"):
        nn.Recompute("dense")


# ----------------------------------------------------------------------------- Recompute


def _deep(width=64, depth=8, recompute=False):
    # GELU keeps its input z, Dense its input h: two buffers per block, one with Recompute.
    blocks = [nn.Sequential([nn.Dense(width), nn.GELU()]) for _ in range(depth)]
    if recompute:
        blocks = [nn.Recompute(b) for b in blocks]
    return nn.Sequential([*blocks, nn.Dense(10)])


def test_recompute_model_grads_equal_plain_model_grads():
    plain, rec = _deep(16, 3), _deep(16, 3, recompute=True)
    x, y = _batch(8, 5)
    params = plain.init(jax.random.key(0), x)
    _, g = jax.jit(fbp.value_and_grad(plain, LOSS))(params, x, y)
    _, gr = jax.jit(fbp.value_and_grad(rec, LOSS))(params, x, y)
    for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(g), strict=True):
        assert testing.rel_error(a, b) < 1e-12


def test_recompute_keeps_only_the_input():
    x = jnp.ones((32, 20), jnp.float32)
    plain, rec = _deep(64, 4), _deep(64, 4, recompute=True)
    params = plain.init(jax.random.key(0), x)
    r_plain, r_rec = fbp.memory_report(plain, params, x), fbp.memory_report(rec, params, x)
    assert r_plain.rows[0].residual_bytes == 32 * 20 * 4 + 32 * 64 * 4  # x and z
    assert r_rec.rows[0].residual_bytes == 32 * 20 * 4  # x only
    assert r_rec.total_bytes < r_plain.total_bytes


def test_recompute_lowers_compiled_temp_memory():
    x = jnp.ones((256, 64), jnp.float32)
    y = jnp.zeros((256,), jnp.int32)
    temps = {}
    for rec in (False, True):
        model = _deep(256, 8, recompute=rec)
        params = model.init(jax.random.key(0), x)
        compiled = jax.jit(fbp.value_and_grad(model, LOSS)).lower(params, x, y).compile()
        temps[rec] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[True] < 0.8 * temps[False], temps


def test_recompute_in_eval_mode_round_trips_the_train_flag():
    layer = nn.Recompute(nn.Dense(3))
    x = jnp.ones((2, 4))
    params = layer.init(jax.random.key(0), x)
    assert layer.forward(params, x, train=False)[1].train is None
    assert layer.forward(params, x, train=True)[1].train == ()


# ----------------------------------------------------------------------------- memory_report


def test_memory_report_counts_a_shared_buffer_once():
    model = nn.Sequential([nn.Dense(10), nn.Tanh(), nn.Dense(3)])
    x = jnp.ones((4, 5), jnp.float32)
    report = fbp.memory_report(model, model.init(jax.random.key(0), x), x)
    rows = [(r.residual_bytes, r.shared_bytes, r.param_bytes, r.output_shape) for r in report.rows]
    assert rows == [(80, 0, 240, (4, 10)), (160, 0, 0, (4, 10)), (0, 160, 132, (4, 3))]
    assert report.total_bytes == 240
    assert "total residual bytes: 240" in str(report)


def test_memory_report_of_a_single_layer():
    x = jnp.ones((4, 5), jnp.float32)
    layer = nn.Dense(3)
    report = fbp.memory_report(layer, layer.init(jax.random.key(0), x), x)
    assert [(r.name, r.residual_bytes) for r in report.rows] == [("Dense(3)", 80)]


# ----------------------------------------------------------------------------- finetune


def test_layer_labels_and_unknown_layer():
    params = {"0": {"w": 1, "b": 2}, "1": {}, "2": {"w": 3}}
    assert finetune.layer_labels(params, {"2": "head"}) == {
        "0": {"w": "0", "b": "0"},
        "1": {},
        "2": {"w": "head"},
    }
    with pytest.raises(ValueError, match=r"layer_labels: \['7'\] are not layers of params"):
        finetune.layer_labels(params, {"7": "head"})


def test_per_layer_learning_rates_and_frozen_layers():
    model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3), nn.Tanh(), nn.Dense(3)])
    x, y = _batch()
    params = model.init(jax.random.key(0), x)
    tx = finetune.per_layer({"0": None, "2": optax.sgd(0.01)}, default=optax.sgd(1.0))
    _, grads = fbp.value_and_grad(model, LOSS)(params, x, y)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["0"]["w"]).max()) == 0.0
    np.testing.assert_allclose(updates["2"]["w"], -0.01 * grads["2"]["w"], rtol=1e-12)
    np.testing.assert_allclose(updates["4"]["w"], -1.0 * grads["4"]["w"], rtol=1e-12)
    ts = train.init(model, tx, jax.random.key(0), x)
    ts2, _ = train.make_step(model, LOSS, tx)(ts, x, y)
    np.testing.assert_array_equal(ts2.params["0"]["w"], ts.params["0"]["w"])


# ----------------------------------------------------------------------------- lengths

LENGTHS = jnp.array([6, 2, 4])


def _seq(shape=(3, 6, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


@pytest.mark.parametrize("wrap", ["frozen", "recompute", "residual"])
def test_wrappers_hand_lengths_to_a_wrapped_recurrent_layer(wrap):
    """Wrapped GRU == bare GRU on a padded batch: y, dx (and dparams unless frozen)."""
    gru = nn.GRU(3)
    layer = {"frozen": nn.Frozen, "recompute": nn.Recompute, "residual": nn.Residual}[wrap](gru)
    x = _seq()
    params = gru.init(jax.random.key(1), x)
    dy = _seq(seed=2)
    y_ref, res_ref = gru.forward(params, x, lengths=LENGTHS)
    dp_ref, dx_ref = gru.backward(params, res_ref, dy)
    skip = x if wrap == "residual" else 0.0
    y, res = layer.forward(params, x, lengths=LENGTHS)
    dparams, dx = layer.backward(params, res, dy)
    np.testing.assert_array_equal(y, y_ref + skip)
    np.testing.assert_array_equal(layer.apply(params, x, lengths=LENGTHS), y_ref + skip)
    np.testing.assert_allclose(dx, dx_ref + (dy if wrap == "residual" else 0.0), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(dparams), jax.tree.leaves(dp_ref), strict=True):
        np.testing.assert_allclose(a, 0.0 * b if wrap == "frozen" else b, rtol=1e-12)
    # the lengths matter: without them the padded steps run through the GRU
    assert not np.allclose(layer.apply(params, x), y)


def test_bidirectional_of_a_frozen_gru_masks_padding_and_passes_dx():
    layer, plain = nn.Bidirectional(nn.Frozen(nn.GRU(4))), nn.Bidirectional(nn.GRU(4))
    x = _seq((3, 6, 2))
    params = plain.init(jax.random.key(1), x)
    y, res = layer.forward(params, x, lengths=LENGTHS)
    y_ref, res_ref = plain.forward(params, x, lengths=LENGTHS)
    np.testing.assert_array_equal(y, y_ref)
    dy = jax.random.normal(jax.random.key(2), y.shape, y.dtype)
    dparams, dx = layer.backward(params, res, dy)
    np.testing.assert_allclose(dx, plain.backward(params, res_ref, dy)[1], rtol=1e-12)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(dparams))
    x_pad = x.at[1, 2:].set(50.0).at[2, 4:].set(-9.0)  # padding changes nothing
    np.testing.assert_array_equal(layer.apply(params, x_pad, lengths=LENGTHS), y)


@pytest.mark.slow  # ~25 s of scan compilation; the registry checks each wrapper's parity
def test_model_of_wrapped_recurrent_layers_matches_jax_grad_on_a_padded_batch():
    model = nn.Sequential(
        [
            nn.Residual(nn.GRU(2)),
            nn.Bidirectional(nn.Recompute(nn.GRU(2))),
            nn.LastStep(),
            nn.Dense(3),
        ]
    )
    x = _seq((4, 7, 2))
    lengths, labels = jnp.array([7, 3, 1, 5]), jnp.array([0, 2, 1, 1])
    report = testing.assert_model_parity(model, LOSS, x, labels, lengths=lengths)
    assert report.max_error < 1e-10 and len(report.errors) == 1 + 4 + 8 + 2  # loss, leaves
    params = model.init(jax.random.key(0), x)
    x_pad = x.at[1, 3:].set(99.0).at[2, 1:].set(-7.0)
    np.testing.assert_allclose(
        model.apply(params, x_pad, lengths=lengths), model.apply(params, x, lengths=lengths)
    )


def test_value_and_grad_refuses_lengths_for_a_model_that_takes_none():
    x, y = _batch()
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), x)
    msg = r"value_and_grad: lengths= was given but Dense\(3\)\.forward takes no lengths"
    with pytest.raises(TypeError, match=msg):
        fbp.value_and_grad(model, LOSS)(params, x, y, lengths=jnp.ones((8,), jnp.int32))
    with pytest.raises(TypeError, match=r"loss_fn: lengths= was given but Dense\(3\)"):
        fbp.loss_fn(model, LOSS)(params, x, y, lengths=jnp.ones((8,), jnp.int32))


def test_bidirectional_refuses_a_wrapped_stateful_layer():
    with pytest.raises(ValueError, match=r"Bidirectional: LSTM\(3\) is stateful"):
        nn.Bidirectional(nn.Frozen(nn.LSTM(3, stateful=True)))
