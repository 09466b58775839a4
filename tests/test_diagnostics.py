"""Deltas and per-layer gradient statistics (fbp/diagnostics.py, value_and_grad(with_deltas))."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbp
from fbp import diagnostics, losses, nn, testing, train

LOSS = losses.softmax_cross_entropy


def _mlp():
    return nn.Sequential([nn.Dense(7), nn.Tanh(), nn.Dense(6), nn.Sigmoid(), nn.Dense(3)])


def _batch(n=9, d=5, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, 3)


def _reference_deltas(model, params, x, y):
    """dL/d(out_i) by jax.grad: add a zero perturbation to every layer's output."""

    def f(eps):
        v = x
        for i, layer in enumerate(model.layers):
            v = layer.apply(params[str(i)], v) + eps[i]
        return LOSS(v, y)

    shapes, v = [], x
    for i, layer in enumerate(model.layers):
        v = layer.apply(params[str(i)], v)
        shapes.append(jnp.zeros_like(v))
    return jax.grad(f)(shapes)


def test_deltas_equal_jax_grad_of_each_layer_output_float64():
    model, (x, y) = _mlp(), _batch()
    params = model.init(jax.random.key(1), x)
    (_, aux), _ = jax.jit(fbp.value_and_grad(model, LOSS, with_deltas=True))(params, x, y)
    ref = jax.jit(_reference_deltas, static_argnums=0)(model, params, x, y)
    assert len(aux.deltas) == len(model.layers)
    for i, (d, r) in enumerate(zip(aux.deltas, ref, strict=True)):
        assert testing.rel_error(d, r) < 1e-10, f"layer {i}"


def test_dense_delta_is_dl_dz_before_the_activation():
    model, (x, y) = _mlp(), _batch()
    params = model.init(jax.random.key(1), x)
    (_, aux), _ = fbp.value_and_grad(model, LOSS, with_deltas=True)(params, x, y)
    h = jnp.tanh(x @ params["0"]["w"] + params["0"]["b"])
    # dL/dz_0 = dL/dh_0 * tanh'(z_0): the delta at the Dense output, below the Tanh.
    np.testing.assert_allclose(aux.deltas[0], aux.deltas[1] * (1 - h * h), rtol=1e-12)


def test_with_deltas_keeps_grads_value_and_state_unchanged():
    model, (x, y) = _mlp(), _batch()
    params = model.init(jax.random.key(1), x)
    (v0, aux0), g0 = fbp.value_and_grad(model, LOSS, has_aux=True)(params, x, y)
    (v1, aux1), g1 = jax.jit(fbp.value_and_grad(model, LOSS, with_deltas=True))(params, x, y)
    assert aux0.deltas is None
    np.testing.assert_allclose(v0, v1, rtol=1e-12)
    np.testing.assert_allclose(aux0.pred, aux1.pred, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_single_layer_model_gets_the_output_error_as_its_delta():
    model, (x, y) = nn.Dense(3), _batch()
    params = model.init(jax.random.key(1), x)
    (_, aux), _ = fbp.value_and_grad(model, LOSS, with_deltas=True)(params, x, y)
    np.testing.assert_allclose(aux.deltas[0], LOSS.backward(x @ params["w"] + params["b"], y))


def test_layer_stats_match_numpy_norms():
    model, (x, y) = _mlp(), _batch()
    params = model.init(jax.random.key(1), x)
    (_, aux), grads = fbp.value_and_grad(model, LOSS, with_deltas=True)(params, x, y)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    stats = diagnostics.to_floats(diagnostics.layer_stats(params, grads, aux.deltas, updates))
    assert set(stats) == (
        {f"delta_norm/{i}" for i in range(5)}
        | {f"{s}/{i}" for s in ("grad_norm", "w_norm", "update_ratio") for i in (0, 2, 4)}
    )
    for i in (0, 2, 4):
        g, w = np.asarray(grads[str(i)]["w"]), np.asarray(params[str(i)]["w"])
        np.testing.assert_allclose(stats[f"grad_norm/{i}"], np.linalg.norm(g), rtol=1e-6)
        np.testing.assert_allclose(stats[f"w_norm/{i}"], np.linalg.norm(w), rtol=1e-6)
        ratio = 0.1 * np.linalg.norm(g) / np.linalg.norm(w)
        np.testing.assert_allclose(stats[f"update_ratio/{i}"], ratio, rtol=1e-5)
    np.testing.assert_allclose(stats["delta_norm/3"], np.linalg.norm(aux.deltas[3]), rtol=1e-6)


def test_stats_fn_reports_the_optimizer_update_without_applying_it():
    model, (x, y) = _mlp(), _batch()
    opt = optax.sgd(0.5)
    ts = train.init(model, opt, jax.random.key(0), x)
    stats = diagnostics.to_floats(diagnostics.stats_fn(model, LOSS, opt)(ts, x, y))
    _, grads = fbp.value_and_grad(model, LOSS)(ts.params, x, y)
    w, g = ts.params["2"]["w"], grads["2"]["w"]
    np.testing.assert_allclose(
        stats["update_ratio/2"], 0.5 * np.linalg.norm(g) / np.linalg.norm(w), rtol=1e-5
    )
    assert "update_ratio/0" not in diagnostics.stats_fn(model, LOSS)(ts, x, y)


def test_deltas_vanish_with_depth_for_sigmoid_and_small_init():
    """The textbook effect the experiment shows: deeper layers get smaller errors."""
    init = nn.initializers.normal(0.05)
    layers = []
    for _ in range(8):
        layers += [nn.Dense(32, w_init=init), nn.Sigmoid()]
    model = nn.Sequential([*layers, nn.Dense(3, w_init=init)])
    x, y = _batch(32, 5)
    params = model.init(jax.random.key(1), x)

    @jax.jit
    def stats_of(p):
        (_, aux), grads = fbp.value_and_grad(model, LOSS, with_deltas=True)(p, x, y)
        return diagnostics.layer_stats(p, grads, aux.deltas)

    stats = stats_of(params)
    assert stats["grad_norm/0"] < 1e-6 * stats["grad_norm/16"]


def test_plot_gradient_flow_writes_a_png(tmp_path):
    history = [
        {
            "epoch": e,
            "grad_norm/0": 1.0 / e,
            "grad_norm/2": 2.0 / e,
            "delta_norm/0": 0.1,
            "delta_norm/1": 0.2,
            "delta_norm/2": 0.3,
            "loss": 1.0,
        }
        for e in (1, 2, 3)
    ]
    path = diagnostics.plot_gradient_flow(history, tmp_path / "flow.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_leave_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    """Library plots draw on Agg figures of their own: no matplotlib.use, no pyplot."""
    script = f"""
import sys, matplotlib
from pathlib import Path
matplotlib.use("svg")
from fbp import diagnostics
from fbp import figures
h = [{{"epoch": 1, "grad_norm/0": 1.0, "delta_norm/0": 0.5, "loss": 1.0, "val_accuracy": 0.5}}]
out = {str(tmp_path)!r}
diagnostics.plot_gradient_flow(h, out + "/a.png")
diagnostics.plot_layer_series({{"run": h}}, out + "/b.png")
diagnostics.plot_metric({{"run": h}}, out + "/c.png")
figures.write_plots(Path(out), h)
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    names = ["a.png", "b.png", "c.png", "loss.png", "metric.png"]
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_plot_gradient_flow_without_stats_raises(tmp_path):
    with pytest.raises(ValueError, match="no 'grad_norm/<i>' or 'delta_norm/<i>' entries"):
        diagnostics.plot_gradient_flow([{"epoch": 1, "loss": 1.0}], tmp_path / "x.png")


def test_report_hook_plots_the_runs_gradient_flow(tmp_path):
    from fbp import data
    from fbp.run import runner
    from fbp.run.experiment import Experiment

    exp = Experiment(
        name="flow",
        description="iris with the layer-statistics probe",
        data=lambda seed: data.load("iris", seed=seed),
        model=lambda ds: nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)]),
        loss=LOSS,
        optimizer=lambda lr, steps: optax.sgd(lr),
        epochs=2,
        lr=0.1,
        batch_size=32,
        probe=diagnostics.probe,
        report=diagnostics.report,
    )
    lines = []
    runner.run(exp, out=tmp_path, print_fn=lines.append)
    assert (tmp_path / "gradient_flow.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("gradient norm, layer 0: ") for line in lines)


def test_plot_layer_series_and_metric_write_pngs_and_refuse_empty_histories(tmp_path):
    runs = {
        "a": [{"epoch": 1, "angle/0": 80.0, "angle/2": 0.0, "val_accuracy": 0.5}],
        "b": [{"epoch": 1, "angle/0": 60.0, "angle/2": 0.0, "val_accuracy": 0.7}],
    }
    path = diagnostics.plot_layer_series(runs, tmp_path / "a.png", "angle", log=False)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert diagnostics.plot_metric(runs, tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no run has 'grad_norm/<i>' entries"):
        diagnostics.plot_layer_series(runs, tmp_path / "b.png", "grad_norm")
    with pytest.raises(ValueError, match="no run logged 'val_loss'"):
        diagnostics.plot_metric(runs, tmp_path / "c.png", "val_loss")


def test_layer_stats_of_nested_blocks_and_of_a_single_layer():
    model = nn.Sequential(
        [nn.Recompute(nn.Sequential([nn.Dense(6), nn.Tanh(), nn.Dense(5)])), nn.Tanh(), nn.Dense(3)]
    )
    x, y = _batch()
    params = model.init(jax.random.key(1), x)
    (_, aux), grads = fbp.value_and_grad(model, LOSS, with_deltas=True)(params, x, y)
    stats = diagnostics.layer_stats(params, grads, aux.deltas)
    assert [k for k in stats if k.startswith("grad_norm/")] == [
        "grad_norm/0.0",
        "grad_norm/0.2",
        "grad_norm/2",
    ]
    np.testing.assert_allclose(
        stats["grad_norm/0.2"], np.linalg.norm(grads["0"]["2"]["w"]), rtol=1e-6
    )
    single = nn.Dense(3)
    p1 = single.init(jax.random.key(1), x)
    (_, aux1), g1 = fbp.value_and_grad(single, LOSS, with_deltas=True)(p1, x, y)
    assert set(diagnostics.layer_stats(p1, g1, aux1.deltas)) == {
        "delta_norm/0",
        "grad_norm/0",
        "w_norm/0",
    }
