"""One calling convention for every function fbp returns (DESIGN.md, "One calling convention").

``f(params, x, target, *, key=None, state=None, train=True, lengths=None)``; products
take their direction ``v`` after the target, and ``curvature.jvp`` (no loss) takes
``(params, x, v)``.
"""

import inspect

import jax
import jax.numpy as jnp
import pytest

import fbp
from fbp import losses, nn, rules, train
from fbp.extend import curvature, dp

CE = losses.softmax_cross_entropy
MLP = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
X = jnp.ones((6, 2))
KEYWORDS = {"key": None, "state": None, "train": True, "lengths": None}

FACTORIES = {
    "fbp.value_and_grad": lambda: fbp.value_and_grad(MLP, CE),
    "fbp.value_and_grad(has_aux)": lambda: fbp.value_and_grad(MLP, CE, has_aux=True),
    "fbp.loss_fn": lambda: fbp.loss_fn(MLP, CE),
    "rules.value_and_grad": lambda: rules.value_and_grad(MLP, CE, "sign_symmetry"),
    "rules.value_and_grad(backprop)": lambda: rules.value_and_grad(MLP, CE, "backprop"),
    "rules.grad_fn": lambda: rules.grad_fn(MLP, CE, "feedback_alignment", jax.random.key(0), X),
    "extend.quantities": lambda: fbp.extend.quantities(MLP, CE, ["grad_norm", "batch_grad"]),
    "extend.per_example_grads": lambda: fbp.extend.per_example_grads(MLP, CE),
    "extend.per_example_norms": lambda: fbp.extend.per_example_norms(MLP, CE),
    "extend.per_example_norms(per_leaf)": lambda: fbp.extend.per_example_norms(
        MLP, CE, per_leaf=True
    ),
    "dp.clipped_sum": lambda: dp.clipped_sum(MLP, CE, clip=1.0),
    "dp.grad_fn": lambda: dp.grad_fn(MLP, CE, clip=1.0, noise=0.0),
    "curvature.hvp": lambda: curvature.hvp(MLP, CE),
    "curvature.jvp": lambda: curvature.jvp(MLP),
    "curvature.ggn_vp": lambda: curvature.ggn_vp(MLP, CE),
    "curvature.diag_ggn": lambda: curvature.diag_ggn(MLP, CE),
    "curvature.kfac_factors": lambda: curvature.kfac_factors(MLP, CE),
}
POSITIONAL = {
    "curvature.hvp": ("params", "x", "target", "v"),
    "curvature.ggn_vp": ("params", "x", "target", "v"),
    "curvature.jvp": ("params", "x", "v"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_returned_callable_takes_the_same_keywords_with_the_same_defaults(name):
    sig = inspect.signature(FACTORIES[name]())
    positional = tuple(
        p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    assert positional == POSITIONAL.get(name, ("params", "x", "target"))
    keyword = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert {k: keyword.get(k, "missing") for k in KEYWORDS} == KEYWORDS
    assert not [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]


def _dropout_model():
    model = nn.Sequential([nn.Dense(8), nn.Dropout(0.5), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.arange(16) % 3
    return model, model.init(jax.random.key(1), x), x, y


def test_curvature_defaults_to_train_mode_like_the_gradient():
    """The default changed from train=False: the curvature of the loss being trained."""
    model, params, x, y = _dropout_model()
    diag = curvature.diag_ggn(model, CE)
    with pytest.raises(ValueError, match=r"Dropout\(0.5\).forward: train=True needs a PRNG key"):
        diag(params, x, y)
    eval_mode = diag(params, x, y, train=False)
    train_mode = diag(params, x, y, key=jax.random.key(2))
    assert not jnp.allclose(train_mode["0"]["w"], eval_mode["0"]["w"])
    same_mask = fbp.value_and_grad(model, CE)(params, x, y, key=jax.random.key(2))[1]
    assert jnp.all(jnp.where(same_mask["0"]["w"] == 0, train_mode["0"]["w"] == 0, True))


def test_rules_value_and_grad_takes_lengths():
    model = nn.Sequential([nn.Dense(5), nn.Tanh(), nn.LastStep(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 6, 2))
    y, lengths = jnp.arange(4) % 3, jnp.array([6, 2, 3, 1])
    params = model.init(jax.random.key(1), x)
    f = rules.value_and_grad(model, CE, "sign_symmetry")
    (value, _), _ = f(params, x, y, lengths=lengths)
    assert value == pytest.approx(float(fbp.loss_fn(model, CE)(params, x, y, lengths=lengths)))
    (unmasked, _), _ = f(params, x, y)
    assert value != pytest.approx(float(unmasked))


def test_rules_make_is_the_deprecated_name_of_grad_fn():
    with pytest.warns(DeprecationWarning, match=r"rules.make is deprecated.*rules.grad_fn"):
        old = rules.make(MLP, CE, "feedback_alignment", jax.random.key(0), X)
    new = rules.grad_fn(MLP, CE, "feedback_alignment", jax.random.key(0), X)
    params = MLP.init(jax.random.key(1), X)
    y = jnp.arange(6) % 3
    assert jax.tree.all(jax.tree.map(jnp.array_equal, old(params, X, y)[1], new(params, X, y)[1]))


def test_evaluate_takes_state_and_its_old_name_model_state_with_a_warning():
    model = nn.Sequential([nn.Dense(4), nn.BatchNorm(), nn.Dense(3)])
    x, y = jnp.ones((8, 5)), jnp.zeros((8,), jnp.int32)
    params, state = model.init(jax.random.key(0), x), model.init_state(x)
    new = train.evaluate(model, CE, params, x, y, state=state)
    with pytest.warns(DeprecationWarning, match=r"evaluate: model_state= is deprecated.*state="):
        old = train.evaluate(model, CE, params, x, y, model_state=state)
    assert old == new
    with pytest.raises(TypeError, match=r"evaluate: got both state= and .* model_state="):
        train.evaluate(model, CE, params, x, y, state=state, model_state=state)
