"""Recurrent layers: BPTT parity, truncation, lengths, carried state, sequence layers, errors.

The references here are written independently of fbp/nn/recurrent.py: plain jnp cells
from the design's equations, a ``lax.scan`` over time, and ``jax.grad`` through it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fbp
from fbp import losses, nn
from fbp.testing import rel_error

CELLS = {"rnn": nn.SimpleRNN, "lstm": nn.LSTM, "gru": nn.GRU}
TOL = 1e-10


# ----------------------------------------------------------------------------- references


def _ref_cell(kind, p, carry, x_t):
    h = carry["h"]
    if kind == "rnn":
        return {"h": jnp.tanh(x_t @ p["w_ih"] + h @ p["w_hh"] + p["b"])}
    if kind == "lstm":
        z = x_t @ p["w_ih"] + h @ p["w_hh"] + p["b"]
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(zf) * carry["c"] + jax.nn.sigmoid(zi) * jnp.tanh(zg)
        return {"h": jax.nn.sigmoid(zo) * jnp.tanh(c), "c": c}
    gx = x_t @ p["w_ih"] + p["b_ih"]
    gh = h @ p["w_hh"] + p["b_hh"]
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return {"h": (1 - z) * n + z * h}


def ref_scan(kind, p, x, carry0=None, truncate=None, lengths=None):
    """Every hidden state (batch, time, H) and the final carry, by jnp + lax.scan."""
    batch, time = x.shape[:2]
    hid = p["w_hh"].shape[0]
    names = ("h", "c") if kind == "lstm" else ("h",)
    carry0 = carry0 or {k: jnp.zeros((batch, hid), x.dtype) for k in names}
    ts = jnp.arange(time)
    valid = (ts[:, None] < (lengths if lengths is not None else time)) * jnp.ones((time, batch))

    def step(carry, xs):
        x_t, t, v = xs
        if truncate is not None:
            edge = (t % truncate) == 0
            carry = jax.tree.map(lambda c: jnp.where(edge, jax.lax.stop_gradient(c), c), carry)
        new = _ref_cell(kind, p, carry, x_t)
        v = v[:, None] > 0
        new = {k: jnp.where(v, new[k], carry[k]) for k in carry}
        return new, jnp.where(v, new["h"], 0)

    carry, ys = jax.lax.scan(step, carry0, (jnp.swapaxes(x, 0, 1), ts, valid))
    return jnp.swapaxes(ys, 0, 1), carry


def _setup(kind, batch=3, time=6, n_in=2, hidden=4, seed=0, dtype=jnp.float64, **kw):
    layer = CELLS[kind](hidden, **kw)
    kx, kp, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, time, n_in), dtype)
    params = layer.init(kp, x)
    # Non-zero biases so every bias gradient path is exercised.
    params = {
        k: v + 0.1 * jax.random.normal(jax.random.fold_in(kp, i), v.shape, dtype)
        for i, (k, v) in enumerate(sorted(params.items()))
    }
    dy = jax.random.normal(kd, (batch, time, hidden), dtype)
    return layer, params, x, dy


def _grads(layer, params, x, dy, lengths=None, state=None):
    y, res = layer.forward(params, x, lengths=lengths, state=state)
    return y, res, *layer.backward(params, res, dy)


_jit_grads = jax.jit(_grads, static_argnums=0)


def _fbp_grads(layer, params, x, dy, **kw):
    """forward + backward, one compiled call (eager scans compile op by op)."""
    return _jit_grads(layer, params, x, dy, **kw)


def _assert_close(got, ref, tol=TOL, what=""):
    assert jax.tree.structure(got) == jax.tree.structure(ref), f"{what}: trees differ"
    leaves = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), r in zip(leaves, jax.tree.leaves(ref), strict=True):
        err = rel_error(g, r)
        assert err <= tol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.3e}"


# ----------------------------------------------------------------------------- BPTT parity


@pytest.mark.parametrize("time", [1, 2, 17, 50])
@pytest.mark.parametrize("kind", CELLS)
def test_bptt_matches_jax_grad_of_own_forward_and_reference(kind, time):
    layer, params, x, dy = _setup(kind, batch=2, time=time, hidden=3)

    @jax.jit
    def both(params, x, dy):
        ours = _fbp_grads(layer, params, x, dy)
        own = jax.grad(lambda p, v: jnp.vdot(layer.apply(p, v), dy), argnums=(0, 1))(params, x)
        ref = jax.grad(lambda p, v: jnp.vdot(ref_scan(kind, p, v)[0], dy), argnums=(0, 1))(
            params, x
        )
        return ours, own, ref, ref_scan(kind, params, x)[0]

    (y, _, dp, dx), own, ref, y_ref = both(params, x, dy)
    _assert_close(y, y_ref, what="y vs reference forward")
    _assert_close((dp, dx), own, what="vs jax.grad of own forward ")
    _assert_close((dp, dx), ref, what="vs jax.grad of reference scan ")


@pytest.mark.parametrize("truncate", [1, 4, 40])
@pytest.mark.parametrize("kind", CELLS)
def test_truncated_bptt_equals_stop_gradient_reference(kind, truncate):
    layer, params, x, dy = _setup(kind, batch=2, time=13, hidden=3, truncate=truncate)

    @jax.jit
    def both(params, x, dy):
        ours = _fbp_grads(layer, params, x, dy)[2:]
        ref = jax.grad(
            lambda p, v: jnp.vdot(ref_scan(kind, p, v, truncate=truncate)[0], dy), argnums=(0, 1)
        )(params, x)
        full = _fbp_grads(CELLS[kind](3), params, x, dy)[2:]
        return ours, ref, full

    ours, ref, full = both(params, x, dy)
    _assert_close(ours, ref, what="truncated ")
    if truncate < 13:  # the truncation really changes the gradient
        assert rel_error(ours[0]["w_hh"], full[0]["w_hh"]) > 1e-3


# ----------------------------------------------------------------------------- lengths


def _padded_and_unpadded(layer, params, x, dy, lengths):
    """One compiled call: the padded batch with ``lengths`` and each example unpadded."""

    @jax.jit
    def run(params, x, dy):
        full = _grads(layer, params, x, dy, lengths=jnp.array(lengths))
        each = [
            _grads(layer, params, x[b : b + 1, :n], dy[b : b + 1, :n])
            for b, n in enumerate(lengths)
        ]
        return full, each

    return run(params, x, dy)


@pytest.mark.parametrize("kind", CELLS)
def test_lengths_equal_unpadded_runs(kind):
    lengths = (5, 1, 8)
    layer, params, x, dy = _setup(kind, batch=3, time=8, hidden=3)
    (y, res, dp, dx), each = _padded_and_unpadded(layer, params, x, dy, lengths)
    valid = np.asarray(nn.length_mask(jnp.array(lengths), 8))
    assert not np.any(np.asarray(y)[~valid]), "padded outputs are not zero"
    assert not np.any(np.asarray(dx)[~valid]), "padded steps got gradient"
    dp_sum = jax.tree.map(jnp.zeros_like, params)
    for b, (n, (yb, res_b, dpb, dxb)) in enumerate(zip(lengths, each, strict=True)):
        _assert_close(y[b : b + 1, :n], yb, what=f"y[{b}] ")
        _assert_close(dx[b : b + 1, :n], dxb, what=f"dx[{b}] ")
        _assert_close({k: res.carry[k][b : b + 1] for k in res.carry}, res_b.carry, what="carry")
        dp_sum = jax.tree.map(jnp.add, dp_sum, dpb)
    _assert_close(dp, dp_sum, what="dparams ")


@settings(max_examples=10)
@given(st.lists(st.integers(0, 6), min_size=3, max_size=3), st.sampled_from([1, 3]))
def test_reverse_padded_is_an_involution_on_valid_steps(lengths, features):
    x = jnp.arange(3 * 6 * features, dtype=jnp.float64).reshape(3, 6, features)
    n = jnp.array(lengths)
    rev = jax.jit(nn.reverse_padded)
    r = rev(x, n)
    np.testing.assert_array_equal(rev(r, n), x)
    for b, k in enumerate(lengths):
        np.testing.assert_array_equal(r[b, :k], x[b, :k][::-1])
        np.testing.assert_array_equal(r[b, k:], x[b, k:])


def test_bidirectional_with_lengths_equals_unpadded_runs():
    layer = nn.Bidirectional(nn.LSTM(3))
    lengths = (4, 6)
    x = jax.random.normal(jax.random.key(0), (2, 6, 2))
    params = layer.init(jax.random.key(1), x)
    dy = jax.random.normal(jax.random.key(2), (2, 6, 6))
    (y, res, dp, dx), each = _padded_and_unpadded(layer, params, x, dy, lengths)
    dp_sum = jax.tree.map(jnp.zeros_like, params)
    for b, (n, (yb, _, dpb, dxb)) in enumerate(zip(lengths, each, strict=True)):
        _assert_close(y[b : b + 1, :n], yb, what=f"y[{b}] ")
        _assert_close(dx[b : b + 1, :n], dxb, what=f"dx[{b}] ")
        assert not np.any(np.asarray(y[b, n:])) and not np.any(np.asarray(dx[b, n:]))
        dp_sum = jax.tree.map(jnp.add, dp_sum, dpb)
    _assert_close(dp, dp_sum, what="dparams ")
    # The backward direction of step 0 has seen the whole sequence.
    y_first = layer.apply(params, x[:1, :4])[0, 0, 3:]
    y_short = layer.apply(params, x[:1, :1])[0, 0, 3:]
    assert rel_error(y_first, y_short) > 1e-3


def test_last_step_selects_last_valid_step_and_routes_gradient():
    x = jax.random.normal(jax.random.key(0), (3, 5, 2))
    lengths = jnp.array([5, 2, 0])
    layer = nn.LastStep()
    y, res = layer.forward({}, x, lengths=lengths)
    np.testing.assert_array_equal(y, jnp.stack([x[0, 4], x[1, 1], x[2, 0]]))
    np.testing.assert_array_equal(layer.apply({}, x), x[:, -1])
    dy = jnp.ones((3, 2))
    _, dx = layer.backward({}, res, dy)
    ref = jax.grad(lambda v: jnp.sum(layer.apply({}, v, lengths=lengths)))(x)
    np.testing.assert_array_equal(dx, ref)


def test_per_step_head_and_masked_sequence_loss_match_jax_grad():
    rnn, head = nn.GRU(4), nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (3, 7, 2))
    labels = jax.random.randint(jax.random.key(1), (3, 7), 0, 3)
    lengths = jnp.array([7, 3, 5])
    where = nn.length_mask(lengths, 7)
    p_rnn = rnn.init(jax.random.key(2), x)
    p_head = head.init(jax.random.key(3), jnp.ones((3, 7, 4)))
    loss = losses.softmax_cross_entropy

    @jax.jit
    def both(p_rnn, p_head, x):
        h, r_rnn = rnn.forward(p_rnn, x, lengths=lengths)
        logits, r_head = head.forward(p_head, h)
        dlogits = loss.backward(logits, labels, where)
        dp_head, dh = head.backward(p_head, r_head, dlogits)
        dp_rnn, dx = rnn.backward(p_rnn, r_rnn, dh)

        def f(pr, ph, v):
            return loss(head.apply(ph, rnn.apply(pr, v, lengths=lengths)), labels, where)

        return logits, (dp_rnn, dp_head, dx), jax.grad(f, argnums=(0, 1, 2))(p_rnn, p_head, x)

    logits, ours, ref = both(p_rnn, p_head, x)
    assert logits.shape == (3, 7, 3)
    _assert_close(ours, ref)
    # A padded step's label does not matter.
    other = labels.at[1, 5].set((labels[1, 5] + 1) % 3)
    assert float(loss(logits, other, where)) == float(loss(logits, labels, where))


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("kind", CELLS)
def test_windows_with_carried_state_equal_one_long_run(kind):
    """Forward window by window == one run; summed window grads == truncate=window grads."""
    stateful = CELLS[kind](3, stateful=True)
    _, params, x, dy = _setup(kind, batch=2, time=12, hidden=3)
    state = stateful.init_state(x)
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in state.values())
    ys, dp_sum, dxs = [], jax.tree.map(jnp.zeros_like, params), []
    for t0 in range(0, 12, 4):
        y, res, dp, dx = _fbp_grads(
            stateful, params, x[:, t0 : t0 + 4], dy[:, t0 : t0 + 4], state=state
        )
        state = stateful.next_state(state, res)
        ys.append(y)
        dxs.append(dx)
        dp_sum = jax.tree.map(jnp.add, dp_sum, dp)
    y_long, carry_long = ref_scan(kind, params, x)
    _assert_close(jnp.concatenate(ys, 1), y_long, what="windowed forward ")
    _assert_close(state, carry_long, what="final carry ")
    truncated = CELLS[kind](3, truncate=4)
    _, _, dp_t, dx_t = _fbp_grads(truncated, params, x, dy)
    _assert_close((dp_sum, jnp.concatenate(dxs, 1)), (dp_t, dx_t), what="windowed grads ")


def test_default_layers_are_stateless():
    for cls in CELLS.values():
        x = jnp.ones((2, 3, 2))
        assert cls(4).init_state(x) == {}
        layer = cls(4)
        y, res = layer.forward(layer.init(jax.random.key(0), x), x)
        assert layer.next_state({}, res) == {}
        assert layer.next_state(None, res) is None


def test_stateful_training_step_carries_state():
    import optax

    from fbp import train

    model = nn.Sequential([nn.LSTM(4, stateful=True), nn.LastStep(), nn.Dense(1)])
    x = jax.random.normal(jax.random.key(0), (2, 5, 3), jnp.float32)
    ts = train.init(model, optax.sgd(0.01), jax.random.key(1), x)
    assert ts.model_state["0"]["h"].shape == (2, 4)
    step = train.make_step(model, losses.mse, optax.sgd(0.01))
    ts1, _ = step(ts, x, jnp.zeros((2, 1), jnp.float32))
    h_ref = model.layers[0].apply(ts.params["0"], x)[:, -1]
    np.testing.assert_allclose(ts1.model_state["0"]["h"], h_ref, rtol=1e-6)


def test_initial_state_changes_output_but_gets_no_gradient():
    layer, params, x, dy = _setup("lstm", batch=2, time=4, hidden=3)
    state = {"h": jnp.ones((2, 3)), "c": -jnp.ones((2, 3))}
    y, _, dp, dx = _fbp_grads(layer, params, x, dy, state=state)
    y_ref, _ = ref_scan("lstm", params, x, carry0=state)
    _assert_close(y, y_ref)
    ref = jax.grad(
        lambda p, v: jnp.vdot(ref_scan("lstm", p, v, carry0=state)[0], dy), argnums=(0, 1)
    )(params, x)
    _assert_close((dp, dx), ref)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", CELLS.values())
def test_hyperparameter_errors(cls):
    with pytest.raises(ValueError, match="hidden must be a positive int, got 0"):
        cls(0)
    with pytest.raises(ValueError, match="hidden must be a positive int, got -3"):
        cls(-3)
    with pytest.raises(ValueError, match="truncate must be None or a positive int, got 0"):
        cls(4, truncate=0)
    with pytest.raises(ValueError, match="truncate must be None or a positive int, got -1"):
        cls(4, truncate=-1)


def test_input_errors_name_layer_expected_and_got():
    layer = nn.LSTM(4)
    params = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
    with pytest.raises(
        nn.ShapeError,
        match=r"LSTM\(4\).forward: x has shape \(2, 3\) but expected "
        r"\(batch, time, in\)",
    ):
        layer.apply(params, jnp.ones((2, 3)))
    with pytest.raises(
        nn.ShapeError,
        match=r"LSTM\(4\).forward: x has shape \(2, 5, 7\) but "
        r"params\['w_ih'\] expects \(\.\.\., 3\)",
    ):
        layer.apply(params, jnp.ones((2, 5, 7)))
    with pytest.raises(nn.ShapeError, match=r"LSTM\(4\).init: x has shape \(5, 3\) but expected"):
        layer.init(jax.random.key(0), jnp.ones((5, 3)))
    with pytest.raises(
        nn.ShapeError,
        match=r"lengths has shape \(3,\) .* expected integers of "
        r"shape \(batch,\) = \(2,\)",
    ):
        layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([1, 2, 3]))
    with pytest.raises(
        nn.ShapeError,
        match=r"state\['h'\] has shape \(3, 4\) but expected "
        r"\(batch, hidden\) = \(2, 4\)",
    ):
        bad = {"h": jnp.ones((3, 4)), "c": jnp.ones((3, 4))}
        layer.apply(params, jnp.ones((2, 5, 3)), state=bad)
    with pytest.raises(nn.ShapeError, match=r"state has keys \['h'\] but expected \['c', 'h'\]"):
        layer.apply(params, jnp.ones((2, 5, 3)), state={"h": jnp.ones((2, 4))})
    with pytest.raises(
        nn.ShapeError,
        match=r"Sequential layer 1: LastStep\(\).forward: x has "
        r"shape \(2, 4\)",
    ):
        model = nn.Sequential([nn.Dense(4), nn.LastStep()])
        model.init(jax.random.key(0), jnp.ones((2, 3)))


def test_bidirectional_refuses_stateful_layer():
    with pytest.raises(ValueError, match=r"Bidirectional: LSTM\(3\) is stateful"):
        nn.Bidirectional(nn.LSTM(3, stateful=True))
    with pytest.raises(TypeError, match="Bidirectional: layer is 3, not an fbp layer"):
        nn.Bidirectional(3)


# ----------------------------------------------------------------------------- experiments


@pytest.mark.slow
def test_experiment_adding_problem_lstm_solves_it():
    import dataclasses

    from fbp.run import experiment, runner

    exp = experiment.get("adding-problem")
    result = runner.run(dataclasses.replace(exp, variants=None), print_fn=lambda s: None)
    assert result.test["loss"] < 0.01, result.test


@pytest.mark.slow
def test_experiment_digits_sequence_reaches_95_percent():
    from fbp.run import experiment, runner

    result = runner.run(experiment.get("digits-sequence"), print_fn=lambda s: None)
    assert result.test["accuracy"] >= 0.95, result.test


@pytest.mark.slow
def test_experiment_rnn_gradient_flow_writes_its_plot(tmp_path):
    from fbp.run import experiment, runner

    lines = []
    runner.run(experiment.get("rnn-gradient-flow"), out=tmp_path, print_fn=lines.append)
    assert (tmp_path / "gradient_flow.png").stat().st_size > 10_000
    assert any("simple-rnn-gain2-clipped" in line for line in lines)


def test_sequential_passes_lengths_to_recurrent_layers_and_matches_jax_grad():
    """GRU -> LastStep -> Dense in a Sequential on a padded batch, through value_and_grad."""
    model = nn.Sequential([nn.GRU(5), nn.LastStep(), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 6, 2), jnp.float64)
    lengths = jnp.array([6, 3, 1, 4])
    labels = jnp.array([0, 1, 2, 1])
    params = model.init(jax.random.key(1), x)
    value, grads = fbp.value_and_grad(model, losses.softmax_cross_entropy)(
        params, x, labels, lengths=lengths
    )
    f = fbp.loss_fn(model, losses.softmax_cross_entropy)
    ref_value, ref = jax.value_and_grad(f)(params, x, labels, lengths=lengths)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert rel_error(a, b) < 1e-10
    # padding is ignored: changing padded steps changes nothing
    x_pad = x.at[1, 3:].set(99.0).at[2, 1:].set(-7.0)
    np.testing.assert_allclose(
        model.apply(params, x_pad, lengths=lengths),
        model.apply(params, x, lengths=lengths),
        rtol=1e-12,
    )
    # and a Sequential without lengths still runs the full sequences
    assert not np.allclose(model.apply(params, x), model.apply(params, x, lengths=lengths))
