"""fbp.adapter: an fbp model as a JAX function whose VJP is the hand-written backward."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import adapter, nn, testing

KEY = jax.random.key(0)


def _cnn():
    return nn.Sequential(
        [
            nn.Conv2D(3, 3, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Dense(2),
        ]
    )


def _assert_trees_close(a, b, rtol=1e-10):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert testing.rel_error(u, v) < rtol


@pytest.mark.parametrize("jit", [False, True])
def test_grad_through_adapter_matches_jax_grad_of_the_plain_forward(jit):
    """The fbp model sits between JAX code (an input transform, a loss) inside jax.grad."""
    model = _cnn()
    x = jax.random.normal(KEY, (4, 6, 6, 2))
    params, state = model.init(KEY, x), model.init_state(x)
    kw = dict(key=jax.random.key(3), state=state)
    f = adapter.as_jax_function(model, train=True)

    def program(apply):
        def loss(params, x, scale):
            y = apply(params, jnp.tanh(x) * scale)
            return jnp.sum(jnp.sin(y) ** 2) + 0.1 * jnp.sum(params["6"]["w"] ** 2)

        return loss

    ours = program(lambda p, v: f(p, v, **kw))
    ref = program(lambda p, v: model.apply(p, v, train=True, **kw))
    grad = jax.grad(ours, argnums=(0, 1, 2))
    grad = jax.jit(grad) if jit else grad
    got = grad(params, x, 1.5)
    want = jax.grad(ref, argnums=(0, 1, 2))(params, x, 1.5)
    _assert_trees_close(got, want, rtol=1e-9)  # the scalar d/dscale is a cancelling sum
    np.testing.assert_allclose(float(ours(params, x, 1.5)), float(ref(params, x, 1.5)), rtol=1e-12)


def test_adapter_uses_the_hand_written_backward():
    """A layer whose backward is deliberately not the VJP shows which rule jax.grad ran."""

    class Doubled(nn.Identity):
        def backward(self, params, res, dy):
            return {}, 2.0 * dy

    f = adapter.as_jax_function(Doubled())
    g = jax.grad(lambda v: jnp.sum(f({}, v)))(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(g), 2.0)


def test_adapter_returns_next_state_without_differentiating_it():
    model = nn.Sequential([nn.Dense(3, use_bias=False), nn.BatchNorm()])
    x = jax.random.normal(KEY, (5, 2))
    params, state = model.init(KEY, x), model.init_state(x)
    f = adapter.as_jax_function(model, train=True, with_state=True)
    y, new_state = jax.jit(f)(params, x, None, state)
    _, res = model.forward(params, x, state=state, train=True)
    _assert_trees_close(new_state, model.next_state(state, res), rtol=1e-14)

    def loss(p):
        y, s = f(p, x, None, state)
        return jnp.sum(y**3) + jnp.sum(s["1"]["mean"])  # the state term adds no gradient

    ref = jax.grad(lambda p: jnp.sum(model.apply(p, x, state=state, train=True) ** 3))(params)
    _assert_trees_close(jax.grad(loss)(params), ref)


def test_adapter_with_integer_input_gives_float0_cotangent():
    model = nn.Sequential([nn.Embedding(7, 3), nn.Flatten(), nn.Dense(2)])
    ids = jnp.array([[1, 2, 3], [3, 3, 6]])
    params = model.init(KEY, ids)
    f = adapter.as_jax_function(model)
    dp, dids = jax.grad(lambda p, i: jnp.sum(f(p, i) ** 2), argnums=(0, 1), allow_int=True)(
        params, ids
    )
    assert dids.dtype == jax.dtypes.float0 and dids.shape == ids.shape
    ref = jax.grad(lambda p: jnp.sum(model.apply(p, ids) ** 2))(params)
    _assert_trees_close(dp, ref, rtol=1e-6)  # float32 embedding table


def test_autodiff_only_in_testing_and_adapter():
    """No module of fbp but testing.py and adapter.py names JAX autodiff.

    The one exception is forward mode over the hand-written gradient for
    Hessian-vector products (``fbp.extend.curvature.hvp``): exactly one ``jax.jvp``.
    """
    banned = {"grad", "vjp", "jvp", "linearize", "custom_vjp", "custom_jvp", "value_and_grad"}
    root = pathlib.Path(adapter.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name in ("testing.py", "adapter.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in banned:
                base = node.value
                if isinstance(base, ast.Name) and base.id == "jax":
                    offenders.append(f"{path.name}: jax.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "jax":
                offenders += [
                    f"{path.name}: from jax import {a.name}" for a in node.names if a.name in banned
                ]
    assert offenders.count("curvature.py: jax.jvp") == 1, offenders
    offenders.remove("curvature.py: jax.jvp")
    assert not offenders, offenders
