"""Generic tests over the layer registry: parity, forward == apply, jit == eager, trees."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_cases import CASES, PARAMS

from fbp import nn, testing


@pytest.mark.parametrize("case", PARAMS)
def test_parity_with_jax_grad_float64(case):
    layer, x, params, kw = case.setup()
    report = testing.check_layer(layer, x, params=params, rtol=case.rtol, frozen=case.frozen, **kw)
    testing.assert_parity(report)
    # every parameter leaf and dx (float inputs) was compared, besides the forward
    leaves = [
        "dparams" + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    dx = ["dx"] if jnp.issubdtype(x.dtype, jnp.floating) else []
    assert sorted(report.errors) == sorted(["y (forward vs apply)", *leaves, *dx])


@pytest.mark.parametrize("case", PARAMS)
def test_forward_output_equals_apply(case):
    layer, x, params, kw = case.setup()
    y, _ = layer.forward(params, x, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(layer.apply(params, x, **kw)))


@pytest.mark.parametrize("case", PARAMS)
def test_jit_equals_eager(case):
    layer, x, params, kw = case.setup()
    y, res = layer.forward(params, x, **kw)
    dy = jnp.ones_like(y)
    eager = layer.backward(params, res, dy)
    lengths = {k: v for k, v in kw.items() if k == "lengths"}
    fwd = jax.jit(
        lambda p, v, k, s: layer.forward(p, v, key=k, state=s, train=case.train, **lengths)
    )
    y_jit, res_jit = fwd(params, x, kw["key"], kw["state"])
    jitted = jax.jit(layer.backward)(params, res_jit, dy)
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y), rtol=1e-12, atol=1e-12)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", PARAMS)
def test_dparams_tree_equals_params_tree_and_dx_shape(case):
    layer, x, params, kw = case.setup()
    y, res = layer.forward(params, x, **kw)
    dparams, dx = layer.backward(params, res, jnp.ones_like(y))
    assert jax.tree.structure(dparams) == jax.tree.structure(params)
    for d, p in zip(jax.tree.leaves(dparams), jax.tree.leaves(params), strict=True):
        assert d.shape == p.shape and d.dtype == p.dtype
    assert dx.shape == x.shape


@pytest.mark.parametrize("case", PARAMS)
def test_float32_stays_float32(case):
    layer = case.make()
    x = case.make_input(0, dtype=jnp.float32)
    kw = case.call_kwargs(layer, x)
    # float32 parameters (those of integer-input layers follow no input dtype)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), layer.init(jax.random.key(1), x))

    def step(params, x):
        y, res = layer.forward(params, x, **kw)
        return y, layer.backward(params, res, jnp.ones_like(y))

    # dtypes are fixed when the functions are traced: abstract evaluation sees them all
    # without compiling or running anything.
    y, (dparams, dx) = jax.eval_shape(step, params, x)
    assert y.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(dparams))
    if jnp.issubdtype(x.dtype, jnp.floating):
        assert dx.dtype == jnp.float32


@pytest.mark.parametrize("case", PARAMS)
def test_backward_is_linear_in_dy(case):
    layer, x, params, kw = case.setup()
    y, res = layer.forward(params, x, **kw)
    a = jax.random.normal(jax.random.key(3), y.shape, y.dtype)
    b = jax.random.normal(jax.random.key(4), y.shape, y.dtype)
    lhs = layer.backward(params, res, 2.0 * a - 3.0 * b)
    ga, gb = layer.backward(params, res, a), layer.backward(params, res, b)
    rhs = jax.tree.map(lambda u, v: 2.0 * u - 3.0 * v, ga, gb)
    for u, v in zip(jax.tree.leaves(lhs), jax.tree.leaves(rhs), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-9, atol=1e-9)


def _public_layer_classes():
    for name, obj in vars(nn).items():
        if inspect.isclass(obj) and issubclass(obj, nn.Layer) and obj is not nn.Layer:
            yield name, obj


def test_every_public_layer_is_registered():
    registered = {type(case.make()) for case in CASES}
    missing = sorted(name for name, cls in _public_layer_classes() if cls not in registered)
    assert not missing, f"public layers without a case in tests/layer_cases.py: {missing}"
