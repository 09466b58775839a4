"""Precision policies and the bfloat16 backward of every registered layer.

bfloat16 tolerance (documented in docs/speed.md): gradients computed with bfloat16
operands and float32 accumulation agree with float32 autodiff at the same
(bfloat16-rounded) point to a norm-relative error of ``BF16_RTOL`` per leaf.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from layer_cases import CASES

import fbp
from fbp import losses, nn, precision, train

BF16_RTOL = 5e-2  # ~12 bfloat16 ulps (2^-8 each) of norm-relative error per gradient leaf
# The whole registry in bf16 takes minutes here; the default run checks one case per
# layer family (each product layout the shared helper has), -m slow all of them.
FAMILIES = (
    "dense",
    "conv2d",
    "lstm",
    "simple-rnn",
    "gru",
    "mha",
    "layernorm",
    "batchnorm",
    "embedding",
)


def _bf16_case(c):
    first = next((f for f in FAMILIES if c.id.startswith(f)), None)
    default = first is not None and c.id == min(d.id for d in CASES if d.id.startswith(first))
    return pytest.param(c, id=c.id, marks=() if default else pytest.mark.slow)


QUICK = [_bf16_case(c) for c in CASES if not c.slow]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def _bf16_setup(case):
    layer = case.make()
    x = case.make_input(0, dtype=jnp.float32)
    params = layer.init(jax.random.key(1), x)
    kw = case.call_kwargs(layer, x)
    return (
        layer,
        precision.cast_floating(x, jnp.bfloat16),
        precision.cast_floating(params, jnp.bfloat16),
        kw,
    )


@pytest.mark.parametrize("case", QUICK)
def test_bf16_backward_matches_float32_autodiff(case):
    layer, xb, pb, kw = _bf16_setup(case)
    y, res = layer.forward(pb, xb, **kw)
    assert y.dtype == jnp.bfloat16, f"{case.id}: bf16 in, {y.dtype} out"
    dy = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
    dparams, dx = layer.backward(pb, res, dy.astype(jnp.bfloat16))
    # float32 autodiff of the same forward at the same bfloat16-rounded point
    p32, x32 = precision.cast_floating(pb, jnp.float32), precision.cast_floating(xb, jnp.float32)
    kw32 = dict(kw, state=precision.cast_floating(kw["state"], jnp.float32))
    if jnp.issubdtype(x32.dtype, jnp.floating):
        _, vjp = jax.vjp(lambda p, v: layer.apply(p, v, **kw32), p32, x32)
        ref_p, ref_x = vjp(dy)
        assert dx.dtype == jnp.bfloat16
        assert _rel(dx, ref_x) < BF16_RTOL, f"{case.id} dx: {_rel(dx, ref_x):.3g}"
    else:
        _, vjp = jax.vjp(lambda p: layer.apply(p, x32, **kw32), p32)
        (ref_p,) = vjp(dy)
    for path, g in jax.tree_util.tree_leaves_with_path(dparams):
        r = dict(jax.tree_util.tree_leaves_with_path(ref_p))[path]
        if case.frozen:
            continue
        assert _rel(g, r) < BF16_RTOL, f"{case.id} {jax.tree_util.keystr(path)}: {_rel(g, r):.3g}"


def test_get_policy_names_and_refusals():
    assert precision.get_policy(None).is_identity
    mixed = precision.get_policy("bf16-mixed")
    assert (mixed.param_dtype, mixed.compute_dtype) == (jnp.float32, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"precision='fp8' is not known; use one of f32, bf16"):
        precision.get_policy("fp8")
    with pytest.raises(ValueError, match=r"precision='f16-mixed': float16 .* CPU backend"):
        precision.get_policy("f16-mixed", backend="cpu")
    assert precision.get_policy("f16-mixed", backend="gpu").is_dynamic


# ----------------------------------------------------------------------------- loss scaling

# bfloat16 compute with a dynamic loss scale: what "f16-mixed" does, on a backend (CPU)
# that refuses float16. A power-of-two scale changes no mantissa, so scaled gradients
# divided back are the unscaled ones unless a product overflows.
BF16_DYNAMIC = precision.Policy(jnp.float32, jnp.bfloat16, jnp.float32, "bf16-dyn", "dynamic")


def test_dynamic_loss_scale_grows_after_a_period_and_halves_on_overflow():
    s = precision.DynamicLossScale.create(8.0, period=3, min_scale=2.0)
    for expect in (8.0, 8.0, 16.0, 16.0):  # three finite steps grow it, the counter restarts
        s = s.adjust(jnp.array(True))
        assert float(s.scale) == expect
    assert int(s.counter) == 1
    s = s.adjust(jnp.array(False))
    assert (float(s.scale), int(s.counter)) == (8.0, 0)
    for _ in range(5):
        s = s.adjust(jnp.array(False))
    assert float(s.scale) == 2.0  # never below min_scale
    with pytest.raises(ValueError, match=r"DynamicLossScale: needs .*factor > 1.*factor=1"):
        precision.DynamicLossScale.create(factor=1)


def test_a_dynamic_scale_needs_the_train_state():
    model, loss = nn.Sequential([nn.Dense(3)]), losses.mse
    x, y = jnp.ones((4, 2)), jnp.ones((4, 3))
    params = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"precision='bf16-dyn' scales the loss dynamically"):
        fbp.value_and_grad(model, loss, precision=BF16_DYNAMIC)(params, x, y)
    ts = train.init(model, optax.sgd(0.1), jax.random.key(0), x)  # no loss scale in it
    with pytest.raises(ValueError, match=r"precision='bf16-dyn' needs the train state's loss"):
        train.step_fn(model, loss, optax.sgd(0.1), precision=BF16_DYNAMIC)(ts, x, y)
    with pytest.raises(ValueError, match=r"a custom grad_fn cannot take"):
        train.step_fn(model, loss, optax.sgd(0.1), precision=BF16_DYNAMIC, grad_fn=lambda: 0)


def test_dynamic_scale_skips_overflowing_steps_then_trains_like_the_unscaled_step():
    model, loss, opt = nn.Sequential([nn.Dense(3)]), losses.mse, optax.sgd(0.1)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jnp.full((8, 3), 4.0)
    ts = train.init(model, opt, jax.random.key(1), x, precision=BF16_DYNAMIC)
    assert float(ts.loss_scale.scale) == 2.0**15
    # 2^127 · dL/dpred overflows the float32 sums of dW = xᵀ dy: skipped until it fits.
    ts = ts._replace(loss_scale=precision.DynamicLossScale.create(2.0**127))
    step = jax.jit(train.step_fn(model, loss, opt, precision=BF16_DYNAMIC))
    plain = jax.jit(train.step_fn(model, loss, opt, precision="bf16-mixed"))
    skipped = []
    for _ in range(8):
        before = ts
        ts, m = step(ts, x, y)
        skipped.append(int(m["skipped"]))
        if m["skipped"]:
            assert float(m["loss_scale"]) == float(before.loss_scale.scale) / 2
            assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, ts.params, before.params)))
        else:
            ref, _ = plain(before._replace(loss_scale=None), x, y)
            for a, b in zip(jax.tree.leaves(ts.params), jax.tree.leaves(ref.params), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    k = skipped.index(0)
    assert k >= 1 and skipped == [1] * k + [0] * (8 - k), skipped
    assert float(ts.loss_scale.scale) == 2.0 ** (127 - k) and int(ts.step) == 8 - k


def test_f32_policy_casts_nothing_float64_stays():
    with jax.enable_x64(True):
        model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(3)])
        x, y = jnp.ones((6, 2), jnp.float64), jnp.arange(6) % 3
        params = model.init(jax.random.key(0), x)
        v1, g1 = fbp.value_and_grad(model, losses.softmax_cross_entropy)(params, x, y)
        v2, g2 = fbp.value_and_grad(model, losses.softmax_cross_entropy, precision="f32")(
            params, x, y
        )
        assert v2.dtype == jnp.float64 and float(v1) == float(v2)
        assert all(
            bool(jnp.all(a == b))
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
        )


def _mlp():
    model = nn.Sequential([nn.Dense(32), nn.ReLU(), nn.LayerNorm(), nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
    y = jnp.arange(16) % 5
    return model, x, y, model.init(jax.random.key(1), x)


def test_bf16_mixed_value_and_grad_float32_masters_near_f32():
    model, x, y, params = _mlp()
    loss = losses.softmax_cross_entropy
    v32, g32 = fbp.value_and_grad(model, loss)(params, x, y)
    vb, gb = fbp.value_and_grad(model, loss, precision="bf16-mixed")(params, x, y)
    assert vb.dtype == jnp.float32 and abs(float(vb) - float(v32)) < 2e-2
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.float32 and _rel(a, b) < BF16_RTOL
    lb = fbp.loss_fn(model, loss, precision="bf16-mixed")(params, x, y)
    assert abs(float(lb) - float(vb)) < 1e-3


def test_bf16_mixed_against_jax_grad_of_the_bf16_cast_loss():
    model, x, y, params = _mlp()
    loss = losses.softmax_cross_entropy
    _, gb = fbp.value_and_grad(model, loss, precision="bf16-mixed")(params, x, y)
    ref = jax.grad(fbp.loss_fn(model, loss, precision="bf16-mixed"))(params, x, y)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(ref), strict=True):
        assert _rel(a, b) < BF16_RTOL


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16"])
def test_train_epoch_in_low_precision(name):
    model, x, y, _ = _mlp()
    opt = optax.adam(1e-2)
    ts = fbp.train.init(model, opt, jax.random.key(0), x, precision=name)
    want = jnp.float32 if name == "bf16-mixed" else jnp.bfloat16
    assert all(v.dtype == want for v in jax.tree.leaves(ts.params))
    epoch = fbp.train.make_epoch(
        model, losses.softmax_cross_entropy, opt, batch_size=8, precision=name
    )
    first = None
    for _ in range(20):
        ts, m = epoch(ts, x, y)
        first = float(m["loss"][0]) if first is None else first
    assert all(v.dtype == want for v in jax.tree.leaves(ts.params))
    assert float(m["loss"][-1]) < 0.5 * first


def test_low_precision_products_are_fast_layout_in_hlo():
    a = jnp.ones((64, 32), jnp.bfloat16)
    b = jnp.ones((64, 16), jnp.bfloat16)
    w = jnp.ones((32, 16), jnp.bfloat16)
    for f, args, shape in [
        (precision.matmul_tn, (a, b), (32, 16)),
        (precision.matmul_nt, (b, w), (64, 32)),
    ]:
        out = jax.jit(f)(*args)
        assert out.shape == shape and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), 64.0 if shape == (32, 16) else 16.0)
        hlo = jax.jit(f).lower(*args).compile().as_text()
        dots = [ln for ln in hlo.splitlines() if " dot(" in ln]
        assert all("lhs_contracting_dims={1}" in ln for ln in dots), dots


def test_static_loss_scale_is_undone_in_the_gradients():
    model, x, y, params = _mlp()
    loss = losses.softmax_cross_entropy
    scaled = precision.Policy(jnp.float32, jnp.bfloat16, jnp.float32, "scaled", loss_scale=1024.0)
    v1, g1 = fbp.value_and_grad(model, loss, precision="bf16-mixed")(params, x, y)
    v2, g2 = fbp.value_and_grad(model, loss, precision=scaled)(params, x, y)
    assert float(v1) == float(v2)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        assert a.dtype == jnp.float32 and _rel(a, b) < 1e-2
