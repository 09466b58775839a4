"""fbp.extend: per-example quantities, DP-SGD, accounting and curvature (float64).

References are JAX autodiff: ``jax.vmap(jax.grad(loss of one example))`` for
per-example gradients, ``jax.hessian``/``jax.jacfwd`` for curvature.
"""

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import fbp
from fbp import extend, losses, nn, train
from fbp.extend import accounting, curvature, dp, registry
from fbp.testing import rel_error

TOL = 1e-10
CE, MSE = losses.softmax_cross_entropy, losses.mse


# ----------------------------------------------------------------------------- helpers


def _as_f64(tree):
    return jax.tree.map(lambda v: v.astype(jnp.float64), tree)


def _ref_per_example(model, loss, params, x, y, **kw):
    """jax.vmap(jax.grad(...)) of one-example batches: the reference."""
    f = fbp.loss_fn(model, loss)
    lengths = kw.pop("lengths", None)
    if lengths is None:
        return jax.vmap(lambda xb, yb: jax.grad(f)(params, xb[None], yb[None], **kw))(x, y)
    one = lambda xb, yb, lb: jax.grad(f)(params, xb[None], yb[None], lengths=lb[None], **kw)  # noqa: E731
    return jax.vmap(one)(x, y, lengths)


def _max_err(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(rel_error(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _sq_norms(tree):
    return jax.tree.map(lambda g: jnp.sum(g * g, axis=tuple(range(1, g.ndim))), tree)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: object
    shape: tuple
    loss: object = CE
    ids: int = 0  # > 0: integer inputs in [-ids, ids) (Embedding)
    kw: tuple = ()  # extra keywords for forward (train, state, lengths)
    frozen: tuple = ()  # params keys under nn.Frozen: zero gradient by design
    slow: bool = False  # run under -m slow only (keeps the default run short)

    def __str__(self):
        return self.id


CASES = [
    Case("mlp", lambda: nn.Sequential([nn.Dense(5), nn.Tanh(), nn.Dense(3)]), (6, 4)),
    Case(
        "mlp-nobias-mse",
        lambda: nn.Sequential([nn.Dense(5, use_bias=False), nn.GELU(), nn.Dense(2)]),
        (5, 3),
        MSE,
        slow=True,
    ),
    Case(
        "dense-per-step-layernorm",
        lambda: nn.Sequential([nn.Dense(6), nn.LayerNorm(), nn.ReLU(), nn.Dense(3)]),
        (4, 5, 3),
        slow=True,
    ),
    Case(
        "cnn-2d",
        lambda: nn.Sequential(
            [
                nn.Conv2D(3, 3, strides=2),
                nn.ReLU(),
                nn.MaxPool2D(2, padding="SAME"),
                nn.Conv2D(2, (2, 3), padding=((1, 0), (2, 1)), dilation=(1, 2)),
                nn.Flatten(),
                nn.Dense(3),
            ]
        ),
        (3, 9, 8, 2),
    ),
    Case(
        "cnn-1d-avgpool",
        lambda: nn.Sequential([nn.Conv1D(3, 3, strides=2, padding=1), nn.Tanh(), nn.Dense(2)]),
        (3, 11, 2),
        MSE,
        slow=True,
    ),
    Case(
        "embedding-gru-last",
        lambda: nn.Sequential([nn.Embedding(7, 4), nn.GRU(3), nn.LastStep(), nn.Dense(3)]),
        (4, 6),
        ids=7,
    ),
    Case(
        "rnn-per-step-mse",
        lambda: nn.Sequential([nn.SimpleRNN(4), nn.Dense(2)]),
        (3, 5, 2),
        MSE,
        slow=True,
    ),
    Case(
        "lstm-truncated",
        lambda: nn.Sequential([nn.LSTM(4, truncate=2), nn.LastStep(), nn.Dense(3)]),
        (3, 5, 2),
        slow=True,
    ),
    Case(
        "bidirectional-lstm-lengths",
        lambda: nn.Sequential([nn.Bidirectional(nn.LSTM(3)), nn.LastStep(), nn.Dense(3)]),
        (3, 5, 2),
        kw=(("lengths", (5, 2, 4)),),
        slow=True,
    ),
    Case(
        "residual-recompute-frozen",
        lambda: nn.Sequential(
            [
                nn.Residual(nn.Sequential([nn.Dense(4), nn.Tanh()])),
                nn.Recompute(nn.Sequential([nn.Dense(4), nn.Sigmoid()])),
                nn.Frozen(nn.Dense(4)),
                nn.Softmax(),
                nn.Dense(3),
            ]
        ),
        (5, 4),
        frozen=("2",),
    ),
    Case(
        "batchnorm-eval-dropout-eval",
        lambda: nn.Sequential([nn.Dense(4), nn.BatchNorm(), nn.Dropout(0.5), nn.Dense(3)]),
        (5, 3),
        kw=(("train", False), ("state", True)),
    ),
]


def _setup(case, seed=0):
    """Model, float64 params (perturbed), inputs and targets; host RNG keeps it cheap."""
    model = case.make()
    rng = np.random.default_rng(seed)
    if case.ids:
        x = jnp.asarray(rng.integers(-case.ids, case.ids, case.shape))
    else:
        x = jnp.asarray(rng.normal(size=case.shape))
    params = jax.jit(model.init)(jax.random.key(seed), x)
    params = jax.tree.map(lambda v: jnp.asarray(v + 0.1 * rng.normal(size=v.shape)), params)
    kw = dict(case.kw)
    if kw.get("state"):
        state = model.init_state(x)
        kw["state"] = jax.tree.map(lambda v: v + 0.3 * jnp.abs(v) + 0.2, state)
    if "lengths" in kw:
        kw["lengths"] = jnp.asarray(kw["lengths"])
    pred = jax.eval_shape(lambda p, v: model.apply(p, v, **kw), params, x)
    if case.loss is CE:
        y = jnp.asarray(rng.integers(0, pred.shape[-1], pred.shape[:-1]))
    else:
        y = jnp.asarray(rng.normal(size=pred.shape))
    return model, params, x, y, kw


def _params(cases):
    return [pytest.param(c, marks=pytest.mark.slow) if c.slow else c for c in cases]


def _jit(f, **kw):
    """``jax.jit`` of f with keyword arguments bound (one compile, no eager op-by-op)."""
    return jax.jit(functools.partial(f, **kw))


# ----------------------------------------------------------------------------- per-example


@pytest.mark.parametrize("case", _params(CASES), ids=str)
def test_per_example_quantities_match_vmap_of_jax_grad(case):
    model, params, x, y, kw = _setup(case)
    names = ["grad", "batch_grad", "batch_l2", "grad_norm", "sum_grad_squared", "variance"]
    _, q = _jit(extend.quantities(model, case.loss, names), **kw)(params, x, y)
    ref = jax.jit(lambda p: _ref_per_example(model, case.loss, p, x, y, **kw))(params)
    for k in case.frozen:
        ref[k] = jax.tree.map(jnp.zeros_like, ref[k])
    assert _max_err(q["batch_grad"], ref) < TOL
    assert _max_err(q["batch_l2"], _sq_norms(ref)) < TOL
    total = sum(jax.tree.leaves(_sq_norms(ref)))
    assert rel_error(q["grad_norm"], jnp.sqrt(total)) < TOL
    # the convention: per-example gradients are of each example's own loss term, so
    # their mean is the batch gradient
    _, batch_grad = _jit(fbp.value_and_grad(model, case.loss), **kw)(params, x, y)
    assert _max_err(jax.tree.map(lambda g: g.mean(0), ref), batch_grad) < TOL
    assert _max_err(q["grad"], batch_grad) < TOL
    assert _max_err(q["sum_grad_squared"], jax.tree.map(lambda g: (g * g).sum(0), ref)) < TOL
    var = jax.tree.map(lambda g: (g * g).mean(0) - g.mean(0) ** 2, ref)
    assert _max_err(q["variance"], var) < 1e-8  # a difference of two close terms


def test_per_example_grads_under_jit_and_the_shortcuts():
    model, params, x, y, _ = _setup(CASES[0])
    value, g = jax.jit(extend.per_example_grads(model, CE))(params, x, y)
    assert float(value) == pytest.approx(float(jax.jit(fbp.loss_fn(model, CE))(params, x, y)))
    assert _max_err(g, jax.jit(lambda p: _ref_per_example(model, CE, p, x, y))(params)) < TOL
    _, norms = jax.jit(extend.per_example_norms(model, CE))(params, x, y)
    _, per_leaf = jax.jit(extend.per_example_norms(model, CE, per_leaf=True))(params, x, y)
    assert norms.shape == (x.shape[0],)
    assert rel_error(norms**2, sum(jax.tree.leaves(per_leaf))) < TOL


@pytest.mark.parametrize("t, m, n", [(1, 3, 4), (2, 30, 40), (9, 2, 3)])
def test_sequence_norms_gram_and_materialised_forms_agree(t, m, n):
    """(2, 30, 40) takes the Gram form ⟨AAᵀ, DDᵀ⟩, (9, 2, 3) the materialised one."""
    ka, kd = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (3, t, m), jnp.float64)
    d = jax.random.normal(kd, (3, t, n), jnp.float64)
    direct = jnp.sum(jnp.einsum("bti,btj->bij", a, d) ** 2, axis=(1, 2))
    assert rel_error(registry.seq_sq_norms(a, d), direct) < TOL


def test_norms_of_a_wide_mlp_form_no_per_example_matrix():
    """Per-example norms of a Dense model need no (batch, in, out) array: the largest
    intermediate of the compiled program is no bigger than the plain gradient's."""
    model = nn.Sequential([nn.Dense(64), nn.ReLU(), nn.Dense(10)])
    x, y = jnp.ones((32, 48)), jnp.arange(32) % 10
    params = model.init(jax.random.key(0), x)
    hlo = jax.jit(extend.per_example_norms(model, CE)).lower(params, x, y).as_text()
    assert "32x48x64" not in hlo and "32x64x10" not in hlo


class _Mixer(nn.Layer):
    """A layer without a per-example rule."""

    def init(self, key, x):
        return {"w": jnp.ones((x.shape[-1],))}

    def forward(self, params, x, *, key=None, state=None, train=False):
        return x * params["w"], None

    def backward(self, params, res, dy):
        return {"w": jnp.sum(dy, 0)}, dy


def test_unsupported_layer_is_refused_by_name_before_tracing():
    model = nn.Sequential([nn.Dense(3), nn.Residual(_Mixer())])
    with pytest.raises(
        extend.UnsupportedLayerError, match=r"_Mixer\(\).*no per-example rule.*vmap"
    ):
        extend.per_example_grads(model, CE)
    with pytest.raises(ValueError, match="_Mixer"):
        dp.grad_fn(model, CE, clip=1.0, noise=1.0)
    with pytest.raises(ValueError, match="_Mixer"):
        curvature.diag_ggn(model, CE)


def test_batchnorm_in_train_mode_is_refused_before_anything_runs():
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(), nn.Dense(2)])
    f = extend.per_example_grads(model, CE)  # eval mode is per-example, so building is fine
    # params=None: the refusal comes before any forward is traced
    with pytest.raises(
        extend.UnsupportedLayerError, match=r"BatchNorm\(0.9\) in train mode.*mixes"
    ):
        f(None, None, None, train=True)
    x, y = jnp.ones((4, 2)), jnp.arange(4) % 2
    ts = train.init(model, optax.sgd(0.1), jax.random.key(0), x)
    step = dp.make_step(model, CE, optax.sgd(0.1), clip=1.0, noise=1.0)
    with pytest.raises(extend.UnsupportedLayerError, match="BatchNorm"):
        step(ts, x, y)


def test_softmax_over_the_batch_axis_is_refused():
    with pytest.raises(extend.UnsupportedLayerError, match=r"Softmax\(0\).*batch axis"):
        extend.per_example_grads(nn.Sequential([nn.Dense(3), nn.Softmax(axis=0)]), MSE)


def test_every_public_layer_has_a_rule_or_a_clear_refusal():
    for name in nn.__all__:
        obj = getattr(nn, name)
        if not (isinstance(obj, type) and issubclass(obj, nn.Layer)) or obj is nn.Layer:
            continue
        if any(c.__name__ == name for c in obj.__mro__ if c in registry._RULES):
            continue
        assert name not in extend.supported()
        fake = object.__new__(obj)
        with pytest.raises(extend.UnsupportedLayerError, match=name):
            registry.rule_for(fake)


def test_bad_quantity_names_and_registrations():
    model = nn.Sequential([nn.Dense(2)])
    with pytest.raises(ValueError, match=r"unknown or no quantities \['hessian'\]"):
        extend.quantities(model, CE, ["hessian"])
    with pytest.raises(TypeError, match="not an fbp layer class"):
        extend.register(int, registry._RULES[nn.Dense])
    with pytest.raises(TypeError, match="must be an fbp.extend.Rule"):
        extend.register(_Mixer, "rule")


class _Scale(nn.Layer):
    """y = x ⊙ w: a layer the tests register a rule for."""

    def init(self, key, x):
        return {"w": jnp.ones((x.shape[-1],), x.dtype)}

    def forward(self, params, x, *, key=None, state=None, train=False):
        return x * params["w"], x

    def backward(self, params, res, dy):
        return {"w": jnp.sum(dy * res, 0)}, dy * params["w"]


def test_register_a_rule_for_a_new_layer():
    rule = extend.Rule(
        backward=lambda layer, params, res, dy: (dy * params["w"], (res, dy)),
        batch_grad=lambda layer, ctx: {"w": ctx[0] * ctx[1]},
        weighted=lambda layer, ctx, w: {"w": jnp.einsum("b,bi->i", w, ctx[0] * ctx[1])},
    )
    extend.register(_Scale, rule)
    try:
        model = nn.Sequential([_Scale(), nn.Tanh(), nn.Dense(3)])
        x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
        params = _as_f64(jax.jit(model.init)(jax.random.key(1), x))
        params["0"]["w"] = params["0"]["w"] + jnp.arange(3.0)
        y = jnp.arange(4) % 3
        _, q = jax.jit(extend.quantities(model, CE, ["batch_grad", "batch_l2"]))(params, x, y)
        ref = jax.jit(lambda p: _ref_per_example(model, CE, p, x, y))(params)
        assert _max_err(q["batch_grad"], ref) < TOL
        assert _max_err(q["batch_l2"], _sq_norms(ref)) < TOL  # derived from batch_grad
    finally:
        del registry._RULES[_Scale]


# ----------------------------------------------------------------------------- DP-SGD


def _clipped_reference(model, loss, params, x, y, clip):
    g = _ref_per_example(model, loss, params, x, y)
    norms = jnp.sqrt(sum(jax.tree.leaves(_sq_norms(g))))
    c = jnp.minimum(1.0, clip / norms)
    return jax.tree.map(lambda v: jnp.einsum("b,b...->...", c, v), g), norms


@pytest.mark.parametrize("method", dp.METHODS)
@pytest.mark.parametrize(
    "case", [CASES[0], *_params([dataclasses.replace(c, slow=True) for c in CASES[3:6:2]])], ids=str
)
def test_clipped_sum_matches_clipping_vmapped_per_example_grads(case, method):
    model, params, x, y, _ = _setup(case)
    clip = 0.5
    out = jax.jit(dp.clipped_sum(model, case.loss, clip=clip, method=method))(params, x, y)
    ref, norms = jax.jit(lambda p: _clipped_reference(model, case.loss, p, x, y, clip))(params)
    assert rel_error(out.norms, norms) < TOL
    assert _max_err(out.summed, ref) < TOL
    assert bool(jnp.any(out.factors < 1)) and bool(jnp.all(out.factors <= 1))


def test_clipped_sum_weights_mask_examples_out():
    model, params, x, y, _ = _setup(CASES[0])
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    f = dp.clipped_sum(model, CE, clip=0.5)
    masked = jax.jit(lambda p: f(p, x, y, weights=mask).summed)(params)
    keep = jnp.array([0, 2, 3, 5])
    # each example's clipped gradient is its own: dropping examples drops their terms
    full_ref, _ = jax.jit(lambda p: _clipped_reference(model, CE, p, x[keep], y[keep], 0.5))(params)
    assert _max_err(masked, full_ref) < TOL


def test_dp_grad_noise_has_the_promised_scale():
    model = nn.Sequential([nn.Dense(64), nn.Tanh(), nn.Dense(10)])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)))
    y = jnp.arange(16) % 10
    params = jax.jit(model.init)(jax.random.key(1), x)
    clip, noise, key = 0.7, 2.0, jax.random.key(5)
    noisy_fn = jax.jit(dp.grad_fn(model, CE, clip=clip, noise=noise))
    (_, aux), noisy = noisy_fn(params, x, y, key=key)
    _, clean = jax.jit(dp.grad_fn(model, CE, clip=clip, noise=0.0))(params, x, y)
    z = jnp.concatenate(
        [
            ((a - b) * 16 / (clip * noise)).ravel()
            for a, b in zip(*map(jax.tree.leaves, (noisy, clean)), strict=True)
        ]
    )
    assert z.size > 2500
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.05
    assert aux.pred.shape == (16, 10)
    # the same key gives the same noise; expected_batch_size is the divisor
    again = noisy_fn(params, x, y, key=key)[1]
    assert _max_err(again, noisy) == 0.0
    halved_fn = dp.grad_fn(model, CE, clip=clip, noise=0.0, expected_batch_size=32)
    halved = jax.jit(halved_fn)(params, x, y)[1]
    assert _max_err(jax.tree.map(lambda v: 2 * v, halved), clean) < TOL


def test_dp_step_trains_in_a_scanned_epoch_and_traces_once():
    model = nn.Sequential([nn.Dense(16), nn.ReLU(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (96, 4))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)
    opt = optax.sgd(0.5)
    ts = train.init(model, opt, jax.random.key(1), x)
    vg = dp.grad_fn(model, CE, clip=1.0, noise=0.5)
    epoch = train.make_epoch(model, CE, opt, batch_size=16, grad_fn=vg)
    first = float(fbp.loss_fn(model, CE)(ts.params, x, y))
    for _ in range(15):
        ts, m = epoch(ts, x, y)
    assert epoch._cache_size() == 1
    assert float(fbp.loss_fn(model, CE)(ts.params, x, y)) < 0.7 * first
    assert int(m["skipped"].sum()) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip": 0.0, "noise": 1.0}, r"clip \(--dp-clip\) must be a finite number > 0, got 0.0"),
        ({"clip": -1, "noise": 1.0}, r"clip \(--dp-clip\) must be .* > 0, got -1"),
        ({"clip": float("nan"), "noise": 1.0}, r"clip \(--dp-clip\) .* got nan"),
        ({"clip": "1", "noise": 1.0}, r"clip \(--dp-clip\) .* got '1'"),
        (
            {"clip": 1.0, "noise": -0.5},
            r"noise \(--dp-noise\) must be a finite number >= 0, got -0.5",
        ),
        ({"clip": 1.0, "noise": float("inf")}, r"noise \(--dp-noise\) .* got inf"),
        (
            {"clip": 1.0, "noise": 1.0, "method": "vmap"},
            r"method must be one of \['reweight', 'second_backward'\]",
        ),
        (
            {"clip": 1.0, "noise": 1.0, "expected_batch_size": 0},
            r"expected_batch_size must be None or a number > 0, got 0",
        ),
    ],
)
def test_dp_options_are_checked_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp.grad_fn(nn.Sequential([nn.Dense(2)]), CE, **kwargs)


def test_dp_noise_without_a_key_is_an_error():
    model, params, x, y, _ = _setup(CASES[0])
    with pytest.raises(ValueError, match="noise > 0 needs a PRNG key"):
        dp.grad_fn(model, CE, clip=1.0, noise=1.0)(params, x, y)


# ----------------------------------------------------------------------------- accounting


def test_epsilon_grows_with_steps_falls_with_noise_and_pld_is_tighter():
    pytest.importorskip("dp_accounting")
    acc = accounting.PrivacyAccountant.for_batches(noise=1.0, batch_size=64, n=6000)
    eps = acc.epsilons(epochs=3, steps_per_epoch=94)
    assert 0 < eps[0] < eps[1] < eps[2] < math.inf
    assert acc.epsilon(0) == 0.0
    assert accounting.PrivacyAccountant(2.0, 64 / 6000).epsilon(282) < eps[2]
    assert accounting.PrivacyAccountant(1.0, 64 / 6000, method="pld").epsilon(282) < eps[2]
    assert accounting.PrivacyAccountant(0.0, 0.1).epsilon(10) == math.inf


def test_noise_for_epsilon_meets_the_target():
    pytest.importorskip("dp_accounting")
    q, steps = 32 / 1437, 500
    sigma = accounting.noise_for_epsilon(3.0, sampling_rate=q, steps=steps)
    eps = accounting.PrivacyAccountant(sigma, q).epsilon(steps)
    assert 2.9 < eps <= 3.0 + 1e-6
    assert accounting.PrivacyAccountant(0.95 * sigma, q).epsilon(steps) > 3.0


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: accounting.PrivacyAccountant(1.0, 0.1, delta=1.0),
            r"delta must be in \(0, 1\), got 1.0",
        ),
        (
            lambda: accounting.PrivacyAccountant(1.0, 0.1, delta=0),
            r"delta must be in \(0, 1\), got 0",
        ),
        (lambda: accounting.PrivacyAccountant(1.0, 0.1, delta=1.5), r"delta must be in \(0, 1\)"),
        (
            lambda: accounting.PrivacyAccountant(-1.0, 0.1),
            r"noise must be a finite number >= 0, got -1.0",
        ),
        (
            lambda: accounting.PrivacyAccountant(1.0, 0.0),
            r"sampling_rate must be in \(0, 1\] \(batch_size / n\), got 0.0",
        ),
        (lambda: accounting.PrivacyAccountant(1.0, 1.5), r"sampling_rate must be in \(0, 1\]"),
        (
            lambda: accounting.PrivacyAccountant(1.0, 0.1, method="moments"),
            r"method must be one of \['rdp', 'pld'\]",
        ),
        (
            lambda: accounting.PrivacyAccountant.for_batches(noise=1.0, batch_size=64, n=32),
            r"batch_size 64 is larger than the data set \(n=32\)",
        ),
        (
            lambda: accounting.PrivacyAccountant.for_batches(noise=1.0, batch_size=0, n=32),
            r"batch_size must be a positive int, got 0",
        ),
        (
            lambda: accounting.PrivacyAccountant.for_batches(noise=1.0, batch_size=8, n=2.5),
            r"n must be a positive int, got 2.5",
        ),
        (
            lambda: accounting.PrivacyAccountant(1.0, 0.1).epsilon(-1),
            r"steps must be an int >= 0, got -1",
        ),
        (
            lambda: accounting.noise_for_epsilon(0.0, sampling_rate=0.1, steps=10),
            r"epsilon must be a finite number > 0, got 0.0",
        ),
    ],
)
def test_accountant_options_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_accountant_without_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    acc = accounting.PrivacyAccountant(1.0, 0.1)  # building needs no package
    with pytest.raises(
        ImportError, match=r"^fbp.extend.accounting needs .*pip install 'fbp\[dp\]'\.$"
    ):
        acc.epsilon(10)
    with pytest.raises(ImportError, match=r"pip install 'fbp\[dp\]'"):
        accounting.require()


# ----------------------------------------------------------------------------- curvature

CURVATURE_CASES = [
    CASES[0],
    dataclasses.replace(CASES[3], slow=True),
    CASES[6],
    Case(
        "bce",
        lambda: nn.Sequential([nn.Dense(4), nn.Softplus(), nn.Dense(3)]),
        (5, 3),
        losses.sigmoid_binary_cross_entropy,
        slow=True,
    ),
]


def _dense_reference(model, loss, params, x, y):
    """Full Hessian and GGN by jax.hessian / jax.jacfwd over flat parameters."""
    flat, unravel = ravel_pytree(params)
    pred = model.apply(params, x)
    H = jax.hessian(lambda p: fbp.loss_fn(model, loss)(unravel(p), x, y, train=False))(flat)
    J = jax.jacfwd(lambda p: model.apply(unravel(p), x))(flat).reshape(pred.size, -1)
    HL = jax.hessian(lambda o: loss(o.reshape(pred.shape), y))(pred.ravel())
    return flat, unravel, H, J.T @ HL @ J


@pytest.mark.parametrize("case", _params(CURVATURE_CASES), ids=str)
def test_hvp_ggn_vp_and_diag_ggn_match_jax_hessian(case):
    model, params, x, y, _ = _setup(case)
    if case.loss is losses.sigmoid_binary_cross_entropy:
        y = jax.random.uniform(jax.random.key(9), y.shape, jnp.float64)
    flat, unravel = ravel_pytree(params)
    H, G = jax.jit(lambda p: _dense_reference(model, case.loss, p, x, y)[2:])(params)
    v = unravel(jnp.asarray(np.random.default_rng(3).normal(size=flat.shape)))

    @jax.jit
    def ours(p, v):
        hv = curvature.hvp(model, case.loss)(p, x, y, v)
        gv = curvature.ggn_vp(model, case.loss)(p, x, y, v)
        return hv, gv, curvature.diag_ggn(model, case.loss)(p, x, y)

    hv, gv, dg = map(lambda t: ravel_pytree(t)[0], ours(params, v))
    v = ravel_pytree(v)[0]
    assert rel_error(hv, H @ v) < TOL
    assert rel_error(gv, G @ v) < TOL
    assert rel_error(dg, jnp.diag(G)) < TOL


@pytest.mark.parametrize(
    "loss", [CE, MSE, losses.sigmoid_binary_cross_entropy], ids=lambda f: f.name
)
@pytest.mark.parametrize("shape", [(4, 3), pytest.param((2, 3, 4), marks=pytest.mark.slow)])
def test_loss_hessian_pieces_match_jax_hessian(loss, shape):
    rng = np.random.default_rng(0)
    pred, u = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))
    if loss is CE:
        y = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]))
    else:
        y = jnp.asarray(rng.uniform(size=shape))
    b, k = shape[0], pred.size // shape[0]

    @jax.jit
    def run(pred, y, u):
        HL = jax.hessian(lambda o: loss(o.reshape(shape), y))(pred.ravel())
        hu = curvature.loss_hvp(loss, pred, y, u).ravel()
        S = curvature.loss_hessian_sqrt(loss, pred, y)
        Sb = jnp.moveaxis(S, 1, 0).reshape(b, S.shape[0], k)
        M = curvature.loss_sampled_sqrt(loss, pred, jax.random.key(3), 40000).reshape(40000, -1)
        return HL, HL @ u.ravel(), hu, jnp.einsum("bkj,bki->bji", Sb, Sb), M.T @ M

    HL, ref_hu, hu, SS, MM = run(pred, y, u)
    assert rel_error(hu, ref_hu) < TOL
    HLb = HL.reshape(b, k, b, k)
    for i in range(b):  # per example: Σ_k s sᵀ is that example's Hessian block
        assert rel_error(SS[i], HLb[i, :, i, :]) < TOL
    assert float(jnp.abs(MM - HL).max()) < 0.04 * float(jnp.abs(HL).max())


def test_probability_targets_for_cross_entropy():
    rng = np.random.default_rng(0)
    pred, u = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(3, 4)))
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4)))) * 0.7
    HL = jax.jit(jax.hessian(lambda o: CE(o.reshape(3, 4), t)))(pred.ravel())
    assert rel_error(curvature.loss_hvp(CE, pred, t, u).ravel(), HL @ u.ravel()) < TOL


def test_kfac_factors_of_an_mlp_match_their_definitions():
    model, params, x, y, _ = _setup(CASES[0])
    f = jax.jit(curvature.kfac_factors(model, CE))(params, x, y)
    assert sorted(f) == [("0",), ("2",)]
    b = x.shape[0]

    @functools.partial(jax.jit, static_argnums=0)
    def reference(i, params):
        a = nn.Sequential(model.layers[:i]).apply({str(j): params[str(j)] for j in range(i)}, x)
        z = model.layers[i].apply(params[str(i)], a)
        tail = nn.Sequential(model.layers[i + 1 :])
        p_tail = {str(j - i - 1): params[str(j)] for j in range(i + 1, len(model.layers))}
        abar = jnp.concatenate([a, jnp.ones((b, 1))], axis=1)
        # exact GGN of the batch loss in z, summed over the per-example diagonal blocks
        Jz = jax.jacfwd(tail.apply, argnums=1)(p_tail, z)  # (b, C, b, out)
        HL = jax.hessian(lambda o: CE(o, y))(tail.apply(p_tail, z))  # (b, C, b, C)
        G = sum(Jz[k, :, k, :].T @ HL[k, :, k, :] @ Jz[k, :, k, :] for k in range(b))
        return abar.T @ abar / b, G

    for i in (0, 2):
        A, G = reference(i, params)
        assert rel_error(f[(str(i),)].A, A) < TOL
        assert rel_error(f[(str(i),)].G, G) < TOL


def test_kfac_factors_of_a_conv_layer_follow_kfc():
    """Conv: A = (1/B) Σ_b Σ_l p pᵀ over im2col patches (bias appended), G = (1/L) Σ_b Σ_l
    of the GGN blocks at each output position, L the output positions."""
    layer = nn.Conv2D(2, 3, strides=2, padding=1)
    model = nn.Sequential([layer, nn.Tanh(), nn.Flatten(), nn.Dense(3)])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 5, 2)))
    params = _as_f64(jax.jit(model.init)(jax.random.key(1), x))
    y = jnp.arange(3) % 3
    f = jax.jit(curvature.kfac_factors(model, CE))(params, x, y)[("0",)]

    @jax.jit
    def reference(params):
        z = layer.apply(params["0"], x)  # (3, 3, 3, 2)
        # patches by jax.jacfwd of the convolution itself: z_bl = w̄ᵀ p̄_bl
        conv = lambda w: layer.apply({"w": w, "b": params["0"]["b"]}, x)  # noqa: E731
        P = jax.jacfwd(conv)(params["0"]["w"])[..., 0, :, :, :, 0].reshape(27, -1)
        P = jnp.concatenate([P, jnp.ones((27, 1))], axis=1)
        tail = nn.Sequential(model.layers[1:])
        p_tail = {"0": {}, "1": {}, "2": params["3"]}
        Jz = jax.jacfwd(tail.apply, argnums=1)(p_tail, z).reshape(3, 3, 3, 9, 2)
        HL = jax.hessian(lambda o: CE(o, y))(tail.apply(p_tail, z))
        blocks = [
            Jz[i, :, i, t].T @ HL[i, :, i, :] @ Jz[i, :, i, t] for i in range(3) for t in range(9)
        ]
        return P.T @ P / 3, sum(blocks) / 9

    A, G = reference(params)
    assert rel_error(f.A, A) < TOL
    assert rel_error(f.G, G) < TOL


def test_mc_factors_and_diag_ggn_are_unbiased():
    model, params, x, y, _ = _setup(CASES[0])
    exact = jax.jit(curvature.kfac_factors(model, CE))(params, x, y)
    mc = jax.jit(curvature.kfac_factors(model, CE, mode="mc", mc_samples=4000))(
        params, x, y, key=jax.random.key(0)
    )
    for k in exact:
        assert rel_error(mc[k].A, exact[k].A) < TOL
        assert float(jnp.abs(mc[k].G - exact[k].G).max()) < 0.06 * float(jnp.abs(exact[k].G).max())
    d_exact = jax.jit(curvature.diag_ggn(model, CE))(params, x, y)
    d_mc = jax.jit(curvature.diag_ggn(model, CE, mc_samples=4000))(
        params, x, y, key=jax.random.key(1)
    )
    err = max(
        float(jnp.abs(a - b).max() / jnp.abs(b).max())
        for a, b in zip(jax.tree.leaves(d_mc), jax.tree.leaves(d_exact), strict=True)
    )
    assert err < 0.08


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda m: curvature.ggn_vp(m, losses.huber),
            r"ggn_vp: no hand-written Hessian for loss .*supported: mse, softmax_cross_entropy",
        ),
        (lambda m: curvature.diag_ggn(m, losses.huber), r"diag_ggn: no hand-written Hessian"),
        (
            lambda m: curvature.kfac_factors(m, CE, mode="kfra"),
            r"mode must be 'exact' or 'mc', got 'kfra'",
        ),
        (
            lambda m: curvature.kfac_factors(m, CE, mode="mc", mc_samples=0),
            r"mc_samples must be None or an int >= 1, got 0",
        ),
        (
            lambda m: curvature.diag_ggn(m, CE, mc_samples=1.5),
            r"mc_samples must be None or an int >= 1, got 1.5",
        ),
    ],
)
def test_curvature_options_are_checked_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make(nn.Sequential([nn.Dense(2)]))


def test_mc_curvature_needs_a_key():
    model, params, x, y, _ = _setup(CASES[0])
    with pytest.raises(ValueError, match="mc_samples=1 needs key="):
        curvature.diag_ggn(model, CE, mc_samples=1)(params, x, y)


# ----------------------------------------------------------------------------- K-FAC


def test_kfac_with_exact_factors_solves_least_squares_in_one_step():
    """For one Dense layer under mse, A ⊗ G is the exact GGN (= Hessian): one undamped
    step of size 1 lands on the least-squares solution."""
    model = nn.Sequential([nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (50, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (50, 3), jnp.float64)
    init, step = extend.kfac.optimizer(
        model,
        MSE,
        learning_rate=1.0,
        damping=1e-20,
        decay=0.0,
        momentum=0.0,
        mode="exact",
        kl_clip=None,
    )
    params = _as_f64(model.init(jax.random.key(2), x))
    state = jax.jit(init)(params, x, y, jax.random.key(3))
    params, state, _ = jax.jit(step)(params, state, x, y, jax.random.key(3))
    xb = jnp.concatenate([x, jnp.ones((50, 1))], axis=1)
    w = jnp.linalg.lstsq(xb, y)[0]
    assert rel_error(params["0"]["w"], w[:4]) < 1e-8 and rel_error(params["0"]["b"], w[4]) < 1e-8


def test_kfac_preconditions_only_factored_layers():
    model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (8, 5), jnp.float64)
    params = _as_f64(model.init(jax.random.key(1), x))
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def run(params, grads):
        factors = curvature.kfac_factors(model, CE)(params, x, jnp.arange(8) % 3)
        return extend.kfac.precondition(grads, extend.kfac.damped_inverses(factors, 1e-2))

    out = run(params, grads)
    assert _max_err(out["1"], grads["1"]) == 0.0
    assert rel_error(out["0"]["w"], grads["0"]["w"]) > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"learning_rate": 0.1, "damping": 0}, "damping must be > 0"),
        ({"learning_rate": 0.1, "decay": 1.0}, r"decay must be in \[0, 1\)"),
        ({"learning_rate": 0.1, "mode": "kfra"}, "mode must be 'mc' or 'exact'"),
        ({"learning_rate": 0.1, "inverse_every": 0}, "inverse_every must be an int >= 1"),
        ({"learning_rate": 0.1, "kl_clip": -1.0}, "kl_clip must be None or > 0"),
    ],
)
def test_kfac_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        extend.kfac.optimizer(nn.Sequential([nn.Dense(2)]), CE, **kwargs)


# ----------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.SimpleRNN(3), marks=pytest.mark.slow),
        lambda: nn.LSTM(3),
        lambda: nn.GRU(3),
    ],
    ids=["rnn", "lstm", "gru"],
)
def test_gate_deltas_leave_backward_unchanged_and_rebuild_the_weight_gradient(make):
    layer = make()
    x = jax.random.normal(jax.random.key(0), (2, 4, 2), jnp.float64)
    params = layer.init(jax.random.key(1), x)
    y, res = layer.forward(params, x, lengths=jnp.array([4, 2]))
    dy = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
    dparams, dx = layer.backward(params, res, dy)
    dparams2, dx2, deltas = layer.backward_with_gate_deltas(params, res, dy)
    assert _max_err(dparams2, dparams) == 0.0 and rel_error(dx2, dx) == 0.0
    if isinstance(layer, nn.GRU):
        assert rel_error(jnp.einsum("tbi,tbj->ij", res.steps.x, deltas.dgx), dparams["w_ih"]) < TOL
        assert float(jnp.abs(deltas.dgx[2:, 1]).max()) == 0.0  # padded steps
    else:
        w = jnp.concatenate([dparams["w_ih"], dparams["w_hh"]], axis=0)
        assert rel_error(jnp.einsum("tbi,tbj->ij", res.steps.xh, deltas), w) < TOL
        assert float(jnp.abs(deltas[2:, 1]).max()) == 0.0


def test_targets_of_padded_steps_must_be_ignored():
    model = nn.Sequential([nn.Embedding(5, 4), nn.MultiHeadAttention(2, causal=True), nn.Dense(5)])
    x = jnp.array([[1, 2, 3], [3, 4, 0]])
    params = model.init(jax.random.key(0), x)
    lengths = jnp.array([3, 1])
    f = extend.per_example_norms(model, losses.causal_lm_loss)
    with pytest.raises(ValueError, match=r"causal_lm_loss: target\[1, 1\].*lengths\[1\] = 1"):
        f(params, x, jnp.array([[1, 2, 3], [4, 0, 1]]), lengths=lengths)
    _, norms = f(params, x, jnp.array([[1, 2, 3], [4, -1, -1]]), lengths=lengths)
    assert norms.shape == (2,)


def test_kfac_factors_and_preconditioning_of_attention_projections():
    model = nn.Sequential([nn.MultiHeadAttention(2, causal=True), nn.Dense(3)])
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(4, 5, 6))), jnp.asarray(rng.normal(size=(4, 5, 3)))
    params = _as_f64(model.init(jax.random.key(1), x))
    factors = curvature.kfac_factors(model, MSE)(params, x, y)
    assert set(factors) == {("0", f"w_{n}") for n in "qkvo"} | {("1",)}
    xa = jnp.concatenate([x, jnp.ones((4, 5, 1))], -1).reshape(20, 7)
    for n in "qkv":  # each projection reads x: A = Σ x̄ x̄ᵀ / B
        assert rel_error(factors[("0", f"w_{n}")].A, xa.T @ xa / 4) < TOL
    # w_o's output delta is each column of the loss Hessian's root, walked back through Dense
    pred = model.apply(params, x)
    cols = curvature.loss_columns(MSE, pred, y, None, None, "test") @ params["1"]["w"].T
    g_o = sum(c.reshape(20, -1).T @ c.reshape(20, -1) for c in cols) / 5
    assert rel_error(factors[("0", "w_o")].G, g_o) < TOL
    grads = jax.tree.map(jnp.ones_like, params)
    inv = extend.kfac.damped_inverses(factors, 1e-2)
    out = extend.kfac.precondition(grads, inv)
    a_inv, g_inv = inv[("0", "w_q")]
    wb = jnp.concatenate([grads["0"]["w_q"], grads["0"]["b_q"][None]], axis=0)
    assert rel_error(out["0"]["w_q"], (a_inv @ wb @ g_inv)[:-1]) < TOL
    assert rel_error(out["0"]["b_q"], (a_inv @ wb @ g_inv)[-1]) < TOL
    assert jax.tree.structure(out) == jax.tree.structure(grads)
