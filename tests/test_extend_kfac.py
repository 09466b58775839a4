"""fbp.extend.kfac.transformation: K-FAC as an optax GradientTransformation."""

import jax
import jax.numpy as jnp
import optax
import pytest

import fbp
from fbp import extend, losses, nn
from fbp.testing import rel_error

CE, MSE = losses.softmax_cross_entropy, losses.mse
EXACT = dict(damping=1e-20, decay=0.0, momentum=0.0, mode="exact", kl_clip=None)


def _as_f64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64), tree)


def _least_squares():
    model = nn.Sequential([nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (50, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (50, 3), jnp.float64)
    return model, _as_f64(model.init(jax.random.key(2), x)), x, y


def test_kfac_transformation_is_an_optax_transformation_solving_least_squares_in_one_step():
    """One Dense layer under mse: A ⊗ G is the exact Hessian, so one undamped update of
    size 1 lands on the least-squares solution (as ``kfac.optimizer``'s step does)."""
    model, params, x, y = _least_squares()
    opt = extend.kfac.transformation(model, MSE, x[:1], learning_rate=1.0, **EXACT)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    state = opt.init(params)
    _, grads = fbp.value_and_grad(model, MSE)(params, x, y)
    updates, state = jax.jit(opt.update)(grads, state, params, x=x, target=y, key=jax.random.key(3))
    params = optax.apply_updates(params, updates)
    w = jnp.linalg.lstsq(jnp.concatenate([x, jnp.ones((50, 1))], axis=1), y)[0]
    assert rel_error(params["0"]["w"], w[:4]) < 1e-8 and rel_error(params["0"]["b"], w[4]) < 1e-8
    assert int(state.count) == 1


def test_kfac_transformation_matches_the_standalone_optimizer_after_its_first_step():
    """Same factors (exact mode, no decay), same update: the two forms are one algorithm."""
    model = nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
    y = jnp.arange(16) % 3
    params = _as_f64(model.init(jax.random.key(1), x))
    kw = dict(learning_rate=0.5, damping=1e-2, decay=0.0, momentum=0.0, mode="exact")
    init, step = extend.kfac.optimizer(model, CE, **kw)
    key = jax.random.key(2)
    expected, _, _ = step(params, init(params, x, y, key), x, y, key)
    opt = extend.kfac.transformation(model, CE, x, **kw)
    _, grads = fbp.value_and_grad(model, CE)(params, x, y)
    updates, _ = opt.update(grads, opt.init(params), params, x=x, target=y, key=key)
    got = optax.apply_updates(params, updates)
    for path in (("0", "w"), ("0", "b"), ("2", "w"), ("2", "b")):
        assert rel_error(got[path[0]][path[1]], expected[path[0]][path[1]]) < 1e-10


def test_kfac_transformation_chains_with_optax_and_trains():
    model = nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    opt = optax.chain(
        optax.clip_by_global_norm(10.0),
        extend.kfac.transformation(model, CE, x[:1], learning_rate=0.2, damping=1e-2),
    )
    vg = fbp.value_and_grad(model, CE)

    @jax.jit
    def step(params, state, key):
        value, grads = vg(params, x, y)
        updates, state = opt.update(grads, state, params, x=x, target=y, key=key)
        return optax.apply_updates(params, updates), state, value

    params = model.init(jax.random.key(1), x)
    state = opt.init(params)
    first = None
    for i in range(30):
        params, state, value = step(params, state, jax.random.key(10 + i))
        first = value if first is None else first
    assert float(value) < 0.5 * float(first)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), r"kfac.transformation: learning_rate must be > 0, got 0.0"),
        (dict(learning_rate=0.1, decay=1.0), r"kfac.transformation: decay must be in \[0, 1\)"),
        (dict(learning_rate=0.1, mode="kfra"), r"kfac.transformation: mode must be 'mc' or"),
    ],
)
def test_kfac_transformation_options_are_checked_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extend.kfac.transformation(nn.Sequential([nn.Dense(2)]), CE, jnp.ones((1, 3)), **kwargs)
