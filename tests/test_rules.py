"""Alternative learning rules (fbp/rules.py) against plain, independent implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import losses, nn, rules, testing, train

LOSS = losses.softmax_cross_entropy
FEEDBACK_RULES = ["feedback_alignment", "direct_feedback_alignment", "sign_symmetry"]


def _mlp():
    return nn.Sequential([nn.Dense(7), nn.Tanh(), nn.Dense(6), nn.Sigmoid(), nn.Dense(3)])


def _setup(rule, seed=0):
    kx, ky, kp, kb = jax.random.split(jax.random.key(seed), 4)
    x, y = jax.random.normal(kx, (9, 5)), jax.random.randint(ky, (9,), 0, 3)
    model = _mlp()
    params = model.init(kp, x)
    feedback = rules.init_feedback(model, rule, kb, x)
    return model, params, feedback, x, y


def _reference(rule, p, fb, x, y):
    """The three rules written out for Dense-Tanh-Dense-Sigmoid-Dense + softmax CE."""
    w0, w2, w4 = p["0"]["w"], p["2"]["w"], p["4"]["w"]
    h1 = jnp.tanh(x @ w0 + p["0"]["b"])
    h2 = jax.nn.sigmoid(h1 @ w2 + p["2"]["b"])
    logits = h2 @ w4 + p["4"]["b"]
    e = (jax.nn.softmax(logits) - jax.nn.one_hot(y, 3)) / x.shape[0]
    if rule == "feedback_alignment":  # Lillicrap et al.: B_l replaces w_lᵀ
        d2 = (e @ fb["4"].T) * h2 * (1 - h2)
        d1 = (d2 @ fb["2"].T) * (1 - h1**2)
    elif rule == "direct_feedback_alignment":  # Nøkland: output error straight to each layer
        d2 = (e @ fb["4"]) * h2 * (1 - h2)
        d1 = (e @ fb["2"]) * (1 - h1**2)
    elif rule == "sign_symmetry":  # Liao et al.: sign(w_l)ᵀ as feedback
        d2 = (e @ jnp.sign(w4).T) * h2 * (1 - h2)
        d1 = (d2 @ jnp.sign(w2).T) * (1 - h1**2)
    return {
        "0": {"w": x.T @ d1, "b": d1.sum(0)},
        "1": {},
        "2": {"w": h1.T @ d2, "b": d2.sum(0)},
        "3": {},
        "4": {"w": h2.T @ e, "b": e.sum(0)},
    }


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_rule_equals_its_plain_reference_float64(rule):
    model, params, fb, x, y = _setup(rule)
    (value, aux), grads = jax.jit(rules.value_and_grad(model, LOSS, rule, fb))(params, x, y)
    ref = _reference(rule, params, fb, x, y)
    for k in ("0", "2", "4"):
        for leaf in ("w", "b"):
            assert testing.rel_error(grads[k][leaf], ref[k][leaf]) < 1e-10, (k, leaf)
    np.testing.assert_allclose(value, LOSS(model.apply(params, x), y), rtol=1e-12)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_last_layer_gets_backprops_gradient_and_hidden_layers_do_not(rule):
    model, params, fb, x, y = _setup(rule)
    _, grads = rules.value_and_grad(model, LOSS, rule, fb)(params, x, y)
    _, bp = fbp.value_and_grad(model, LOSS)(params, x, y)
    assert testing.rel_error(grads["4"]["w"], bp["4"]["w"]) < 1e-12
    assert testing.rel_error(grads["4"]["b"], bp["4"]["b"]) < 1e-12
    assert testing.rel_error(grads["0"]["w"], bp["0"]["w"]) > 1e-3


def test_backprop_rule_is_fbp_value_and_grad():
    model, params, _, x, y = _setup("backprop")
    (v, _), grads = rules.value_and_grad(model, LOSS, "backprop")(params, x, y)
    ref_v, ref = fbp.value_and_grad(model, LOSS)(params, x, y)
    np.testing.assert_allclose(v, ref_v)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b)


def test_feedback_shapes_and_fixedness():
    model, _, fb, x, _ = _setup("feedback_alignment")
    assert {k: v.shape for k, v in fb.items()} == {"0": (5, 7), "2": (7, 6), "4": (6, 3)}
    dfa = rules.init_feedback(model, "direct_feedback_alignment", jax.random.key(3), x)
    assert {k: v.shape for k, v in dfa.items()} == {"0": (3, 5), "2": (3, 7), "4": (3, 6)}
    again = rules.init_feedback(
        model, "feedback_alignment", jax.random.split(jax.random.key(0), 4)[3], x
    )
    np.testing.assert_array_equal(fb["2"], again["2"])
    assert rules.init_feedback(model, "sign_symmetry", jax.random.key(0), x) == {}


def test_alignment_angles_geometry():
    g = {"0": {"w": jnp.array([[1.0, 0.0]]), "b": jnp.zeros(2)}, "1": {}}
    assert float(rules.alignment_angles(g, g)["angle/0"]) == pytest.approx(0.0, abs=1e-5)
    neg = jax.tree.map(jnp.negative, g)
    assert float(rules.alignment_angles(neg, g)["angle/0"]) == pytest.approx(180.0, abs=1e-5)
    orth = {"0": {"w": jnp.array([[0.0, 2.0]]), "b": jnp.zeros(2)}, "1": {}}
    assert float(rules.alignment_angles(orth, g)["angle/0"]) == pytest.approx(90.0)
    assert set(rules.alignment_angles(g, g)) == {"angle/0"}


def test_alignment_probe_last_layer_angle_is_zero_and_hidden_is_not():
    model, params, fb, x, y = _setup("feedback_alignment")
    opt = optax.sgd(0.1)
    ts = train.init(model, opt, jax.random.key(0), x)._replace(params=params)
    probe = rules.alignment_probe(
        model, LOSS, rules.value_and_grad(model, LOSS, "feedback_alignment", fb)
    )
    angles = {k: float(v) for k, v in probe(ts, x, y).items()}
    assert angles["angle/4"] == pytest.approx(0.0, abs=1e-3)
    assert angles["angle/0"] > 1.0


def test_feedback_alignment_trains_through_step_fn_grad_fn():
    model, params, fb, x, y = _setup("feedback_alignment")
    x, y = x.astype(jnp.float32), y
    fb = jax.tree.map(lambda b: b.astype(jnp.float32), fb)
    opt = optax.adam(0.05)
    ts = train.init(model, opt, jax.random.key(0), x)
    step = train.make_step(
        model, LOSS, opt, grad_fn=rules.value_and_grad(model, LOSS, "feedback_alignment", fb)
    )
    ts, m0 = step(ts, x, y)
    for _ in range(60):
        ts, m = step(ts, x, y)
    assert float(m["loss"]) < 0.5 * float(m0["loss"])


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match="unknown rule 'hebbian'; expected one of"):
        rules.value_and_grad(_mlp(), LOSS, "hebbian")


def test_non_sequential_model_raises():
    with pytest.raises(ValueError, match="needs an nn.Sequential model, got Dense"):
        rules.value_and_grad(nn.Dense(3), LOSS, "feedback_alignment", {})


def test_non_dense_parametrised_layer_raises():
    model = nn.Sequential([nn.Recompute(nn.Dense(4)), nn.Tanh(), nn.Dense(3)])
    with pytest.raises(ValueError, match=r"layer 0 \(Recompute.*has parameters but is not a Dense"):
        rules.init_feedback(model, "feedback_alignment", jax.random.key(0), jnp.ones((2, 5)))


def test_missing_feedback_raises_at_trace_time():
    model, params, _, x, y = _setup("feedback_alignment")
    f = rules.value_and_grad(model, LOSS, "feedback_alignment")
    with pytest.raises(
        ValueError, match=r"needs a feedback matrix for Dense layer\(s\) \[0, 2, 4\]"
    ):
        f(params, x, y)
