"""Layer zoo: conv, pooling, norm, dropout, embedding, residual. Registry cases in
tests/layer_cases.py (more of them under -m slow) cover parity, jit, dtypes and trees;
here are the semantics the generic tests cannot see (ties, running state, masks, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn, testing

KEY = jax.random.key(0)


def _jit_grads_match(model, x, target, rtol=1e-10, **kw):
    """fbp.value_and_grad vs jax.value_and_grad of fbp.loss_fn, both jitted; returns aux."""
    loss = losses.softmax_cross_entropy
    ours = fbp.value_and_grad(model, loss, has_aux=True)
    plain = fbp.loss_fn(model, loss)
    params = model.init(KEY, x)
    (v1, aux), g1 = jax.jit(lambda p: ours(p, x, target, **kw))(params)
    v2, g2 = jax.jit(jax.value_and_grad(lambda p: plain(p, x, target, **kw)))(params)
    assert testing.rel_error(v1, v2) < rtol
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert testing.rel_error(u, v) < rtol
    return aux


def _normal(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# ----------------------------------------------------------------------------- conv


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["SAME", "VALID", 0, 2, ((1, 2), (0, 3))])
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 1), (3, 2), ((1, 2), (2, 1))])
def test_conv2d_parity_over_strides_dilations_paddings(padding, strides, dilation):
    layer = nn.Conv2D(3, (3, 2), strides=strides, padding=padding, dilation=dilation)
    report = testing.assert_layer_parity(layer, _normal((2, 10, 9, 2)))
    assert report.max_error < 1e-12


def test_conv2d_output_shapes_follow_padding_rules():
    x = jnp.zeros((1, 9, 8, 2))
    shape = lambda layer: layer.apply(layer.init(KEY, x), x).shape  # noqa: E731
    assert shape(nn.Conv2D(4, 3, strides=2)) == (1, 5, 4, 4)  # SAME: ceil(n / s)
    assert shape(nn.Conv2D(4, 3, padding="VALID")) == (1, 7, 6, 4)
    assert shape(nn.Conv2D(4, 3, padding="VALID", dilation=2)) == (1, 5, 4, 4)
    assert shape(nn.Conv2D(4, 3, padding=1, strides=2)) == (1, 5, 4, 4)


def test_conv2d_matches_a_direct_correlation():
    x, w = _normal((1, 4, 5, 2)), _normal((3, 3, 2, 1), seed=1)
    layer = nn.Conv2D(1, 3, padding="VALID", use_bias=False)
    y = layer.apply({"w": w}, x)
    ref = np.zeros((1, 2, 3, 1))
    for i in range(2):
        for j in range(3):
            patch = np.asarray(x)[0, i : i + 3, j : j + 3, :]
            ref[0, i, j, 0] = np.sum(patch * np.asarray(w)[..., 0])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12)


def test_conv2d_rejects_wrong_rank_and_channels():
    layer = nn.Conv2D(4, 3)
    params = layer.init(KEY, jnp.zeros((1, 5, 5, 3)))
    msg = r"Conv2D\(4\)\.forward: x has shape \(5, 5, 3\).*4 dims"
    with pytest.raises(nn.ShapeError, match=msg):
        layer.apply(params, jnp.zeros((5, 5, 3)))
    msg = r"x has shape \(1, 5, 5, 2\) but params\['w'\].*3 input"
    with pytest.raises(nn.ShapeError, match=msg):
        layer.apply(params, jnp.zeros((1, 5, 5, 2)))


def test_conv_rejects_input_smaller_than_kernel():
    layer = nn.Conv2D(2, 5, padding="VALID")
    x = jnp.zeros((1, 4, 8, 1))
    with pytest.raises(nn.ShapeError, match=r"spatial axis 1 has 4 entries .* spans 5"):
        layer.init(KEY, x) and layer.apply(layer.init(KEY, jnp.zeros((1, 8, 8, 1))), x)


def test_conv1d_rejects_images():
    layer = nn.Conv1D(2, 3)
    with pytest.raises(nn.ShapeError, match=r"Conv1D\(2\)\.init.*\(batch, length, in\)"):
        layer.init(KEY, jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=0), "features must be a positive int"),
        (dict(features=2, kernel_size=0), "kernel_size must be an int >= 1"),
        (dict(features=2, kernel_size=(3, 3, 3)), "kernel_size must be an int >= 1 or 2"),
        (dict(features=2, strides=0), "strides must be"),
        (dict(features=2, dilation=-1), "dilation must be"),
        (dict(features=2, padding="FULL"), "padding must be 'SAME', 'VALID'"),
        (dict(features=2, padding=-1), "padding must be >= 0"),
        (dict(features=2, padding=((1, 1),)), "2 \\(low, high\\) pairs"),
        (dict(features=2, w_init="nope"), "unknown initializer"),
    ],
)
def test_conv2d_validates_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.Conv2D(**kwargs)


# ----------------------------------------------------------------------------- pooling


def test_maxpool_ties_go_to_the_first_maximum_like_jax_grad():
    # Integer-valued input has many ties, as after a ReLU.
    x = jnp.round(_normal((2, 7, 6, 3)) * 0.7)
    for layer in [
        nn.MaxPool2D(2),
        nn.MaxPool2D(3, strides=1, padding="SAME"),
        nn.MaxPool2D(3, strides=2, padding=1),
    ]:
        # Finite differences are meaningless at ties (max has a kink there): compare
        # with jax.vjp only.
        report = testing.check_layer(layer, x)
        assert report.max_error < 1e-12, str(report)
    y, res = nn.MaxPool2D(2).forward({}, jnp.ones((1, 2, 2, 1)))
    _, dx = nn.MaxPool2D(2).backward({}, res, jnp.ones_like(y))
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.slow
def test_maxpool_relu_tie_parity_in_a_model():
    model = nn.Sequential([nn.Conv2D(2, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(), nn.Dense(3)])
    x = _normal((4, 6, 6, 1))
    testing.assert_model_parity(model, losses.softmax_cross_entropy, x, jnp.arange(4) % 3)


def test_avgpool_values_with_and_without_padding_counted():
    x = jnp.ones((1, 3, 3, 1))
    incl = nn.AvgPool2D(3, strides=1, padding=1).apply({}, x)[0, :, :, 0]
    excl = nn.AvgPool2D(3, strides=1, padding=1, count_include_pad=False).apply({}, x)[0, :, :, 0]
    np.testing.assert_allclose(np.asarray(incl)[0], [4 / 9, 6 / 9, 4 / 9])
    np.testing.assert_allclose(np.asarray(excl), np.ones((3, 3)))


def test_pool_errors():
    msg = r"MaxPool2D\(\(2, 2\)\)\.forward: x has shape \(4, 4\)"
    with pytest.raises(nn.ShapeError, match=msg):
        nn.MaxPool2D(2).apply({}, jnp.zeros((4, 4)))
    with pytest.raises(nn.ShapeError, match=r"spatial axis 2 has 1 entries .* window spans 2"):
        nn.AvgPool2D(2).apply({}, jnp.zeros((1, 4, 1, 1)))
    with pytest.raises(ValueError, match=r"MaxPool2D: padding 2 must be smaller than the window"):
        nn.MaxPool2D(2, padding=2)
    with pytest.raises(ValueError, match=r"AvgPool2D: window must be an int >= 1"):
        nn.AvgPool2D(0)
    with pytest.raises(nn.ShapeError, match=r"GlobalAvgPool\(\)\.forward: x has shape \(2, 3\)"):
        nn.GlobalAvgPool().apply({}, jnp.zeros((2, 3)))


def test_reshape_and_flatten():
    x = jnp.arange(24.0).reshape(2, 12)
    assert nn.Reshape((3, -1)).apply({}, x).shape == (2, 3, 4)
    assert nn.Flatten().apply({}, x.reshape(2, 3, 4)).shape == (2, 12)
    with pytest.raises(nn.ShapeError, match=r"Reshape\(\(5, 2\)\)\.forward: x has shape \(2, 12\)"):
        nn.Reshape((5, 2)).apply({}, x)
    with pytest.raises(ValueError, match="Reshape: shape must be a tuple of positive ints"):
        nn.Reshape((-1, -1))


# ----------------------------------------------------------------------------- batch norm


def test_batchnorm_train_uses_batch_stats_and_updates_running_state():
    bn = nn.BatchNorm(momentum=0.8)
    x = _normal((16, 3)) * 2.0 + 5.0
    params, state = bn.init(KEY, x), bn.init_state(x)
    y, res = bn.forward(params, x, state=state, train=True)
    np.testing.assert_allclose(np.asarray(jnp.mean(y, 0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jnp.var(y, 0)), 1.0, rtol=1e-4)
    new = bn.next_state(state, res)
    np.testing.assert_allclose(
        np.asarray(new["mean"]), 0.2 * np.asarray(jnp.mean(x, 0)), rtol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(new["var"]), 0.8 + 0.2 * np.asarray(jnp.var(x, 0)), rtol=1e-12
    )


def test_batchnorm_eval_uses_running_state_and_leaves_it():
    bn = nn.BatchNorm()
    x = _normal((5, 2, 2, 3))
    params = bn.init(KEY, x)
    state = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1.0, 0.25])}
    y, res = bn.forward(params, x, state=state, train=False)
    ref = (x - state["mean"]) / jnp.sqrt(state["var"] + bn.eps)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-12)
    assert bn.next_state(state, res) is state
    report = testing.assert_layer_parity(bn, x, state=state, train=False)
    assert report.max_error < 1e-12


def test_batchnorm_eval_without_state_is_an_error():
    bn = nn.BatchNorm()
    params = bn.init(KEY, jnp.zeros((4, 3)))
    msg = r"BatchNorm\(0\.9\)\.forward: train=False .* state is None"
    with pytest.raises(ValueError, match=msg):
        bn.apply(params, jnp.zeros((4, 3)), train=False)


def test_batchnorm_shape_and_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"BatchNorm: momentum must be in \[0, 1\)"):
        nn.BatchNorm(momentum=1.0)
    with pytest.raises(ValueError, match="BatchNorm: eps must be a float > 0"):
        nn.BatchNorm(eps=0)
    bn = nn.BatchNorm()
    with pytest.raises(nn.ShapeError, match=r"BatchNorm\(0\.9\)\.init: x has shape \(3,\)"):
        bn.init(KEY, jnp.zeros((3,)))
    params = bn.init(KEY, jnp.zeros((4, 3)))
    with pytest.raises(nn.ShapeError, match=r"x has shape \(4, 2\) but params\['scale'\]"):
        bn.apply(params, jnp.zeros((4, 2)), train=True)
    with pytest.raises(ValueError, match="LayerNorm: eps must be a float > 0"):
        nn.LayerNorm(eps=-1.0)


def test_value_and_grad_carries_batchnorm_state_and_matches_jax_grad():
    model = nn.Sequential(
        [
            nn.Conv2D(4, 3, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.GlobalAvgPool(),
            nn.Dense(3),
        ]
    )
    x, labels = _normal((6, 5, 5, 2)), jnp.arange(6) % 3
    state = model.init_state(x)
    aux = _jit_grads_match(model, x, labels, key=jax.random.key(7), state=state, train=True)
    assert set(aux.state["1"]) == {"mean", "var"}
    assert not np.allclose(np.asarray(aux.state["1"]["mean"]), 0.0)
    assert aux.state["0"] == {} and aux.state["5"] == {}


def test_residual_init_with_batchnorm_inside_nested_sequential():
    block = nn.Residual(nn.Sequential([nn.Dense(3), nn.BatchNorm(), nn.Tanh()]))
    model = nn.Sequential([nn.Dense(3), block, nn.Dense(1)])
    x = jnp.ones((4, 2))
    params = model.init(KEY, x)
    state = model.init_state(x)
    assert set(state["1"]["1"]) == {"mean", "var"}
    assert model.output_shape(params, x).shape == (4, 1)
    y = model.apply(params, x, state=state, train=False)
    assert y.shape == (4, 1)


# ----------------------------------------------------------------------------- dropout


def test_dropout_same_key_same_mask_inverted_scaling_and_eval_identity():
    layer = nn.Dropout(0.25)
    x = jnp.ones((200, 50))
    a = layer.apply({}, x, key=jax.random.key(1), train=True)
    b = layer.apply({}, x, key=jax.random.key(1), train=True)
    c = layer.apply({}, x, key=jax.random.key(2), train=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert set(np.unique(np.asarray(a)).tolist()) == {0.0, 1 / 0.75}
    assert abs(float(jnp.mean(a)) - 1.0) < 0.03  # E[y] = x
    assert abs(float(jnp.mean(a == 0)) - 0.25) < 0.02
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, key=jax.random.key(1))), 1.0)


def test_dropout_errors():
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\)\.forward: train=True needs a PRNG key"):
        nn.Dropout(0.5).apply({}, jnp.ones((2, 2)), train=True)
    model = nn.Sequential([nn.Dense(2), nn.Dropout(0.5)])
    params = model.init(KEY, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\)\.forward: train=True needs a PRNG key"):
        model.apply(params, jnp.ones((2, 2)), train=True)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"Dropout: drop_rate must be in \[0, 1\)"):
            nn.Dropout(bad)


# ----------------------------------------------------------------------------- embedding


def test_embedding_scatter_adds_repeated_ids_and_gives_zero_dx():
    layer = nn.Embedding(5, 2)
    ids = jnp.array([[1, 3, 1], [1, 0, 3]])
    params = layer.init(KEY, ids)
    y, res = layer.forward(params, ids)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(params["w"])[np.asarray(ids)])
    dy = jnp.ones_like(y)
    dparams, dx = layer.backward(params, res, dy)
    np.testing.assert_array_equal(np.asarray(dparams["w"])[:, 0], [1.0, 3.0, 0.0, 2.0, 0.0])
    assert dx.shape == ids.shape and dx.dtype == params["w"].dtype and not np.any(np.asarray(dx))


def test_embedding_out_of_range_ids_are_nan_and_dropped_in_backward():
    layer = nn.Embedding(4, 2)
    ids = jnp.array([0, 4, -5, -1])  # -1 counts from the end (NumPy's rule); 4 and -5 are out
    params = layer.init(KEY, ids)
    y, res = layer.forward(params, ids)
    assert np.all(np.isnan(np.asarray(y)[1:3])) and not np.any(np.isnan(np.asarray(y)[[0, 3]]))
    np.testing.assert_array_equal(np.asarray(y)[3], np.asarray(params["w"])[3])
    dparams, _ = layer.backward(params, res, jnp.ones_like(y))
    np.testing.assert_array_equal(np.asarray(dparams["w"])[:, 0], [1.0, 0.0, 0.0, 1.0])


def test_embedding_table_dtype():
    ids = jnp.zeros((2, 3), jnp.int32)
    assert nn.Embedding(5, 2).init(KEY, ids)["w"].dtype == jnp.float32  # also under x64
    assert nn.Embedding(5, 2, dtype=jnp.float64).init(KEY, ids)["w"].dtype == jnp.float64


def test_embedding_errors():
    with pytest.raises(ValueError, match="Embedding: vocab must be a positive int"):
        nn.Embedding(0, 3)
    with pytest.raises(ValueError, match="Embedding: features must be a positive int"):
        nn.Embedding(3, 2.5)
    with pytest.raises(ValueError, match="Embedding: dtype must be a float dtype, got <class"):
        nn.Embedding(3, 2, dtype=jnp.int32)
    layer = nn.Embedding(5, 2)
    with pytest.raises(nn.ShapeError, match=r"Embedding\(5\)\.init: x has dtype float.*integer"):
        layer.init(KEY, jnp.zeros((2, 3)))
    params = layer.init(KEY, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(nn.ShapeError, match=r"Embedding\(5\)\.forward: x has dtype float"):
        layer.apply(params, jnp.zeros((2, 3)))


def test_embedding_conv1d_model_grads_match_jax_grad():
    model = nn.Sequential(
        [nn.Embedding(7, 3), nn.Conv1D(4, 3), nn.LayerNorm(), nn.Flatten(), nn.Dense(2)]
    )
    ids = jax.random.randint(KEY, (4, 6), 0, 7)
    _jit_grads_match(model, ids, jnp.arange(4) % 2, rtol=1e-5)  # float32 embedding table


# ----------------------------------------------------------------------------- residual


def test_residual_adds_the_skip_and_passes_params_through():
    inner = nn.Dense(3)
    block = nn.Residual(inner)
    x = _normal((4, 3))
    params = block.init(KEY, x)
    assert jax.tree.structure(params) == jax.tree.structure(inner.init(KEY, x))
    np.testing.assert_allclose(
        np.asarray(block.apply(params, x)), np.asarray(x + inner.apply(params, x)), rtol=1e-14
    )


def test_residual_errors():
    with pytest.raises(TypeError, match="Residual: layer is 3, not an fbp layer"):
        nn.Residual(3)
    block = nn.Residual(nn.Dense(4))
    msg = r"Residual\(Dense\(.*\)\)\.init: the inner layer maps x of shape \(2, 3\).*to \(2, 4\)"
    with pytest.raises(nn.ShapeError, match=msg):
        block.init(KEY, jnp.ones((2, 3)))
    params = nn.Dense(4).init(KEY, jnp.ones((2, 3)))
    for method in ("apply", "forward"):  # the message names the method called
        msg = rf"\)\.{method}: the inner layer maps x of shape \(2, 3\)"
        with pytest.raises(nn.ShapeError, match=msg):
            getattr(block, method)(params, jnp.ones((2, 3)))


def test_maxpool_grad_under_jit_after_batchnorm_relu_matches_jax_grad():
    """Regression: under jit XLA may recompute a pool's input (BN + ReLU) in two fusions
    with different rounding; a backward that tests ``x == y`` then lost windows."""
    model = nn.Sequential(
        [
            nn.Conv2D(3, 3, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(2),
        ]
    )
    x, labels = _normal((4, 6, 6, 2)), jnp.array([0, 1, 1, 0])
    _jit_grads_match(model, x, labels, state=model.init_state(x), train=True)
