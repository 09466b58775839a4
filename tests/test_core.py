"""Core contract: Sequential, value_and_grad vs jax.grad, errors with their messages, harness."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fbp
from fbp import ShapeError, losses, nn, testing

ACTIVATIONS = [
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.Softplus,
    nn.Identity,
]


def test_readme_contract_shapes_and_parity():
    x = jax.random.normal(jax.random.key(0), (32, 20), jnp.float64)
    labels = jnp.arange(32) % 10
    model = nn.Sequential([nn.Dense(64), nn.Tanh(), nn.Dense(10)])
    params = model.init(jax.random.key(0), x)
    assert (
        params["0"]["w"].shape == (20, 64) and params["1"] == {} and params["2"]["b"].shape == (10,)
    )
    y, res = model.forward(params, x)
    np.testing.assert_array_equal(y, model.apply(params, x))
    dparams, dx = model.backward(params, res, jnp.ones_like(y))
    assert dx.shape == x.shape and jax.tree.structure(dparams) == jax.tree.structure(params)
    value, grads = fbp.value_and_grad(model, losses.softmax_cross_entropy)(params, x, labels)
    f = fbp.loss_fn(model, losses.softmax_cross_entropy)
    ref_value, ref = jax.value_and_grad(f)(params, x, labels)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-14)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert testing.rel_error(a, b) < 1e-10


def test_readme_quickstart_prints_what_the_readme_says_and_leaves_float32_on():
    """The quickstart runs in a fresh process (no conftest), with float64 only in its block."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quick = readme[readme.index("## Quickstart") :]
    code = quick.split("```python\n", 1)[1].split("```", 1)[0]
    printed = quick.split("prints\n\n```\n", 1)[1].split("```", 1)[0]
    check = "\nassert not jax.config.jax_enable_x64 and x.dtype == jnp.float32\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # as a newcomer runs it (the tests' compiler level rounds apart)
    out = subprocess.run(
        [sys.executable, "-c", code + check],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert out == printed


def test_value_and_grad_is_jit_safe_and_aux_carries_pred():
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
    t = jnp.zeros((8, 2))
    model = nn.Sequential([nn.Dense(2)])
    params = model.init(jax.random.key(1), x)
    vg = fbp.value_and_grad(model, losses.mse, has_aux=True)
    (value, aux), grads = jax.jit(vg)(params, x, t)
    np.testing.assert_allclose(aux.pred, model.apply(params, x), rtol=1e-12)
    assert aux.state is None
    (value_e, _), grads_e = vg(params, x, t)
    np.testing.assert_allclose(value, value_e, rtol=1e-12)


@settings(max_examples=10)
@example(widths=[1, 1], batch=1, in_features=1, act=nn.ReLU, loss_name="mse", seed=0)
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch=st.integers(1, 7),
    in_features=st.integers(1, 6),
    act=st.sampled_from(ACTIVATIONS),
    loss_name=st.sampled_from(["mse", "huber", "bce", "ce"]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps_match_jax_grad(widths, batch, in_features, act, loss_name, seed):
    """Random widths, depths, batch sizes (including 1), activations and losses."""
    kx, kt = jax.random.split(jax.random.key(seed))
    layers = []
    for w in widths:
        # random biases keep pre-activations off kinks (ReLU at exactly 0), where
        # finite differences see the mean of the two one-sided slopes
        layers += [nn.Dense(w, b_init="normal"), act()]
    model = nn.Sequential(layers)
    x = jax.random.normal(kx, (batch, in_features), jnp.float64)
    out = widths[-1]
    if loss_name == "ce":
        loss, target = losses.softmax_cross_entropy, jax.random.randint(kt, (batch,), 0, out)
    elif loss_name == "bce":
        loss, target = (
            losses.sigmoid_binary_cross_entropy,
            jax.random.uniform(kt, (batch, out), jnp.float64),
        )
    else:
        loss = losses.mse if loss_name == "mse" else losses.huber
        target = jax.random.normal(kt, (batch, out), jnp.float64)
    report = testing.check_model(model, loss, x, target, seed=seed)
    testing.assert_parity(report)


@settings(max_examples=6)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_activation_dx_shape_and_finite_differences(shape, seed):
    x = jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float64)
    for act in ACTIVATIONS:
        report = testing.check_layer(act(), x, seed=seed)
        testing.assert_parity(report)


# ----------------------------------------------------------------------------- errors


def test_dense_shape_mismatch_names_layer_and_shapes():
    model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(10)])
    params = model.init(jax.random.key(0), jnp.ones((2, 64)))
    msg = r"Sequential layer 0: Dense\(4\)\.forward: x has shape \(32, 63\) but params\['w'\] expects \(\.\.\., 64\)"
    with pytest.raises(ShapeError, match=msg):
        model.forward(params, jnp.ones((32, 63)))
    with pytest.raises(ShapeError, match=msg.replace("forward", "forward")):
        jax.jit(model.apply)(params, jnp.ones((32, 63)))


def test_mismatched_params_fail_at_trace_time_inside_sequential():
    model = nn.Sequential([nn.Dense(4), nn.Dense(3)])
    params = model.init(jax.random.key(0), jnp.ones((2, 5)))
    params["1"]["w"] = jnp.ones((7, 3))
    with pytest.raises(
        ShapeError, match=r"Sequential layer 1: Dense\(3\)\.forward: x has shape \(2, 4\)"
    ):
        jax.jit(fbp.value_and_grad(model, losses.mse))(params, jnp.ones((2, 5)), jnp.ones((2, 3)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_dense_rejects_bad_out_features(bad):
    with pytest.raises(
        ValueError, match=rf"Dense: out_features must be a positive int, got {bad!r}"
    ):
        nn.Dense(bad)


def test_unknown_initializer_is_rejected_when_built():
    with pytest.raises(
        ValueError, match=r"Dense: unknown initializer 'glorot'; expected one of \["
    ):
        nn.Dense(3, w_init="glorot")


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match=r"Sequential: layers\[1\] is 3, not an fbp layer"):
        nn.Sequential([nn.Dense(2), 3])


def test_elu_and_normal_init_validate():
    with pytest.raises(ValueError, match=r"ELU: alpha must be > 0, got 0"):
        nn.ELU(0)
    with pytest.raises(ValueError, match=r"normal: stddev must be > 0, got -1"):
        nn.initializers.normal(-1)


@pytest.mark.parametrize(
    "name",
    ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal"],
)
def test_initializer_variance_matches_its_rule(name):
    fan_in, fan_out = 400, 300
    layer = nn.Dense(fan_out, w_init=name)
    w = layer.init(jax.random.key(0), jnp.ones((1, fan_in), jnp.float32))["w"]
    fan = {"glorot": (fan_in + fan_out) / 2, "he": fan_in / 2, "lecun": fan_in}[name.split("_")[0]]
    assert float(jnp.var(w)) == pytest.approx(1 / fan, rel=0.05)
    assert w.dtype == jnp.float32


# ----------------------------------------------------------------------------- harness


def test_harness_catches_a_wrong_backward():
    class BadTanh(nn.Tanh):
        def _df(self, y):
            return 1 - y  # wrong: should be 1 - y²

    report = testing.check_layer(
        BadTanh(), jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    )
    assert not report.ok and report.errors["dx"] > 1e-3
    with pytest.raises(
        AssertionError, match=r"(?s)gradient parity failed:\n.*  dx +[0-9.e+]+   <-- FAIL"
    ):
        testing.assert_parity(report)


def test_harness_catches_wrong_reference_with_finite_differences():
    """A forward that hides a dependence from autodiff fools jax.vjp, not finite differences."""

    class Sneaky(nn.Tanh):
        def forward(self, params, x, *, key=None, state=None, train=False):
            y, res = super().forward(params, x)
            return y, res

        def apply(self, params, x, *, key=None, state=None, train=False):
            y = jnp.tanh(x)
            return y + jax.lax.stop_gradient(y)  # reference sees half the slope

    report = testing.check_layer(
        Sneaky(), jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    )
    assert report.fd_error > 1e-2 and not report.ok


def test_harness_report_lists_every_leaf():
    model = nn.Sequential([nn.Dense(3), nn.Tanh(), nn.Dense(2)])
    x = jax.random.normal(jax.random.key(0), (4, 5), jnp.float64)
    report = testing.check_model(model, losses.mse, x, jnp.zeros((4, 2)))
    assert set(report.errors) == {
        "loss",
        "grads['0']['b']",
        "grads['0']['w']",
        "grads['2']['b']",
        "grads['2']['w']",
    }
    assert "finite differences" in str(report) and report.max_error < 1e-10


def test_harness_rtol_zero_asks_for_exact_agreement():
    """rtol=0 is a tolerance, not "use the default": any rounding difference fails."""
    model = nn.Sequential([nn.Dense(7), nn.Tanh(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64)
    default = testing.check_model(model, losses.mse, x, jnp.zeros((6, 3)))
    assert default.rtol == 1e-10 and 0 < default.max_error < 1e-10  # rounding, not exact
    exact = testing.check_model(model, losses.mse, x, jnp.zeros((6, 3)), rtol=0.0)
    assert exact.rtol == 0.0 and not exact.ok
    layer = testing.check_layer(nn.Tanh(), x, rtol=0.0, fd_rtol=0.0)
    assert (layer.rtol, layer.fd_rtol) == (0.0, 0.0)
    loss = testing.check_loss(losses.mse, x, jnp.zeros_like(x), rtol=0.0)
    assert loss.rtol == 0.0


def test_harness_frozen_wants_zero_dparams_and_the_true_dx():
    x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    report = testing.check_layer(nn.Frozen(nn.Dense(5)), x, frozen=True)
    assert report.ok and set(report.errors) == {
        "y (forward vs apply)",
        "dparams['b']",
        "dparams['w']",
        "dx",
    }
    assert report.errors["dparams['w']"] == 0.0 and report.errors["dx"] < 1e-12
    # a layer that does learn fails the frozen check on its dparams
    moving = testing.check_layer(nn.Dense(5), x, frozen=True)
    assert not moving.ok and moving.errors["dparams['w']"] > 1.0
    # and a Frozen layer fails the plain check: zero dparams are not the VJP
    assert not testing.check_layer(nn.Frozen(nn.Dense(5)), x).ok


def test_relu_derivative_at_exactly_zero_matches_jax_grad():
    """Regression: a dead ReLU layer feeding Dense(1) with a zero bias puts z at exactly 0."""
    x = jnp.array([[-1.0, 0.0, 2.0]])
    layer = nn.ReLU()
    y, res = layer.forward({}, x)
    _, dx = layer.backward({}, res, jnp.ones_like(y))
    ref = jax.grad(lambda v: jnp.sum(layer.apply({}, v)))(x)
    np.testing.assert_array_equal(dx, ref)
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 1.0]])
