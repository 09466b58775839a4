"""Smoke tests: the core benchmark scripts run on tiny sizes (``--quick``) and print tables."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_mlp_flop_count_matches_hand_count():
    mlp = _load("mlp")
    # forward and dw for all three layers; dx for layers 1 and 2 only.
    per_layer = [784 * 512, 512 * 512, 512 * 10]
    expected = 2 * 256 * (2 * sum(per_layer) + per_layer[1] + per_layer[2])
    assert mlp.step_flops([784, 512, 512, 10], 256) == expected


@pytest.mark.slow  # a long trial: -m slow
def test_mlp_quick_prints_every_variant(capsys):
    pytest.importorskip("torch")
    _load("mlp").main(["--quick", "--single"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    variants = {r[1] for r in rows}
    for name in (
        "fbp make_step",
        "jax.grad make_step",
        "fbp vg + adam",
        "jax.grad + adam",
        "torch",
        "matmuls only, one call each",
    ):
        assert name in variants
    timed = [r for r in rows if r[1] == "fbp make_step"]
    assert float(timed[0][2].split()[0]) > 0
    assert "cores" in out


def test_digits_quick_prints_accuracies(capsys):
    _load("digits_vs_sklearn").main(["--quick"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    seed0 = next(r for r in rows if r[0] == "0")
    fbp_acc, sk_acc = (float(re.sub("%", "", seed0[i])) for i in (3, 5))
    # Two epochs already lift both far above chance (10%) on digits.
    assert fbp_acc > 50 and sk_acc > 50
    assert float(seed0[1]) > 0 and float(seed0[4]) > 0
    assert "cores" in out


@pytest.mark.slow  # a long trial: -m slow
def test_extensions_quick_prints_every_variant_and_checks_its_grads(capsys):
    _load("extensions").main(["--quick", "--no-torch"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in _table_rows(out)}
    for name in (
        "plain gradient",
        "per-example norms",
        "per-example grads",
        "jax.vmap(jax.grad)",
        "plain step",
        "DP step (reweight)",
        "DP step (second_backward)",
    ):
        assert float(rows[name][1].split()[0]) > 0
    err = float(re.search(r"Max \|per-example grads - vmap\(grad\)\|: (\S+)\.", out).group(1))
    assert err < 1e-5
    assert "load" in out


def test_mlp_grad_compiles_to_no_more_work_than_jax_grad():
    """Guards the speed parity behind benchmarks/mlp.py, independent of machine load.

    The optimized program of the hand-written gradient has the same matmuls as
    ``jax.grad``'s (forward, dw, and dx except for the first layer, which is dead
    code), no transposes or copies, and no more fusions.
    """
    import jax
    import jax.numpy as jnp

    import fbp
    from fbp import losses, nn

    model = nn.Sequential([nn.Dense(32), nn.ReLU(), nn.Dense(32), nn.ReLU(), nn.Dense(10)])
    loss = losses.softmax_cross_entropy
    x = jnp.ones((16, 48), jnp.float32)
    y = jnp.arange(16, dtype=jnp.int32) % 10
    params = model.init(jax.random.key(0), x)

    def hlo(f):
        return jax.jit(f).lower(params, x, y).compile().as_text()

    ours = hlo(fbp.value_and_grad(model, loss))
    ref = hlo(jax.value_and_grad(fbp.loss_fn(model, loss)))
    assert "f64" not in ours
    assert ours.count(" dot(") == ref.count(" dot(") == 3 + 3 + 2
    assert ours.count(" transpose(") == 0 and ours.count(" copy(") == 0
    assert ours.count(" fusion(") <= ref.count(" fusion(")


@pytest.mark.parametrize("bad, skipped", [(1e20, 0), (float("inf"), 1), (float("nan"), 1)])
def test_skip_guard_fast_path_keeps_finite_but_overflowing_gradients(bad, skipped):
    """The step's skip guard reads the gradient norm first; a norm that overflows
    (finite entries whose squares exceed float32) must not skip the step."""
    import jax
    import jax.numpy as jnp
    import optax

    from fbp import losses, nn, train
    from fbp.core import Aux

    model = nn.Sequential([nn.Dense(3)])
    x = jnp.ones((4, 2), jnp.float32)

    def grad_fn(params, x, y, *, key=None, state=None, train=True):
        grads = jax.tree.map(jnp.zeros_like, params)
        grads["0"]["w"] = grads["0"]["w"].at[1, 2].set(bad)
        return (jnp.float32(1.0), Aux(None, None)), grads

    opt = optax.sgd(0.0)
    ts = train.init(model, opt, jax.random.key(0), x)
    step = train.make_step(model, losses.mse, opt, grad_fn=grad_fn)
    new, m = step(ts, x, jnp.zeros((4, 3), jnp.float32))
    assert int(m["skipped"]) == skipped
    assert int(new.step) == 1 - skipped
    assert not bool(jnp.isfinite(m["grad_norm"]))


def test_attention_quick_prints_every_variant_and_the_targets(capsys):
    _load("attention").main(["--quick", "--single"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    variants = {r[2] for r in rows[1:]}
    assert {"fbp standard", "fbp linear", "jax.grad naive"} <= variants
    for r in rows[1:]:
        assert float(r[3].split()[0]) > 0
        if r[2].startswith("fbp"):
            assert float(r[9]) < 1e-4  # float32 agreement with jax.grad
    assert "linear temp memory / jax.grad" in out and "cores" in out


@pytest.mark.slow
def test_sweep_quick_prints_three_approaches(capsys):
    _load("sweep").main(["--quick"])
    rows = _table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows[1:]] == ["sweep", "sequential", "scikit-learn"]
    assert all(float(r[1]) > 0 for r in rows[1:])


@pytest.mark.slow
def test_digits_dp_quick_prints_epsilons_and_accuracies(capsys):
    pytest.importorskip("dp_accounting")
    _load("digits_dp").main(["--quick", "--no-adam"])
    rows = {r[0]: r for r in _table_rows(capsys.readouterr().out)}
    for eps in ("1", "3", "8"):
        row = rows[f"DP-SGD, ε = {eps}"]
        assert abs(float(row[1]) - float(eps)) < 0.01  # the calibrated noise meets ε
        assert float(row[3].split()[0]) > 10  # above chance after 2 epochs
    assert rows["same recipe, no clip/noise"][1] == "∞"


@pytest.mark.slow
def test_kfac_demo_quick_trains_all_three(capsys):
    _load("kfac_demo").main(["--quick"])
    rows = _table_rows(capsys.readouterr().out)
    names = [r[0] for r in rows[1:]]
    assert any(n.startswith("K-FAC") for n in names) and len(names) == 3
    for r in rows[1:]:
        assert float(r[1]) < 2.3  # below the loss of chance (ln 10) after one epoch


@pytest.mark.parametrize("conv_dims", [1, 2])
def test_conv_backward_stays_canonical_inside_a_scan(conv_dims):
    """Guards the digits-cnn epoch speed: inside ``lax.scan`` (``make_epoch``), XLA:CPU
    does not rewrite a relabelled convolution into the canonical layout and falls back
    to a naive loop (20-30 ms instead of ~0.2 ms a step), so every convolution of the
    hand-written backward must already be canonical: (N, spatial, C) ⋆ (spatial, in, out)."""
    import jax
    import jax.numpy as jnp

    import fbp
    from fbp import losses, nn

    conv = nn.Conv2D if conv_dims == 2 else nn.Conv1D
    model = nn.Sequential(
        [conv(6, 3), nn.ReLU(), conv(8, 3, strides=2), nn.ReLU(), nn.Flatten(), nn.Dense(3)]
    )
    x = jnp.ones((4, *([9] * conv_dims), 5), jnp.float32)
    y = jnp.zeros((4,), jnp.int32)
    params = model.init(jax.random.key(0), x)
    vg = fbp.value_and_grad(model, losses.softmax_cross_entropy)

    def epoch(params, xs, ys):
        return jax.lax.scan(lambda p, b: (p, vg(p, *b)[1]), params, (xs, ys))

    text = jax.jit(epoch).lower(params, x[None].repeat(2, 0), y[None].repeat(2, 0))
    labels = re.findall(r"dim_labels=(\S+?),", text.compile().as_text())
    canonical = "b01f_01io->b01f" if conv_dims == 2 else "b0f_0io->b0f"
    assert len(labels) == 5  # two forwards, two dw, dx of the second (the first's is dead)
    assert set(labels) == {canonical}


@pytest.mark.slow  # a long trial: -m slow
def test_extensions_attention_quick_prints_every_variant_and_checks_the_clipped_sum(capsys):
    _load("extensions_attention").main(["--quick"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in _table_rows(out)}
    for name in (
        "plain gradient",
        "per-example norms",
        "DP clipped sum (reweight)",
        "DP clipped sum (second_backward)",
        "jax.vmap(jax.grad)",
    ):
        assert float(rows[name][1].split()[0]) > 0
        assert float(rows[name][5].split()[0]) >= 0
    err = float(re.search(r"Max relative \|clipped sum - vmap\(grad\)'s\|: (\S+)\.", out).group(1))
    assert err < 1e-4


@pytest.mark.slow  # a long trial: -m slow
def test_opacus_attention_quick_times_its_plain_and_ghost_clipped_gradients(capsys):
    _load("opacus_attention").main(["--quick"])
    rows = {r[0]: r for r in _table_rows(capsys.readouterr().out)}
    assert set(rows) == {"variant", "torch plain gradient", "Opacus ghost clipping"}
    del rows["variant"]  # the header
    assert all(float(r[1].split()[0]) > 0 for r in rows.values())
    assert rows["torch plain gradient"][3] == "1.00x"


def test_precision_quick_prints_bf16_against_f32_jax_grad_and_torch(capsys):
    pytest.importorskip("torch")
    _load("precision").main(["--quick", "--models", "mlp"])
    rows = _table_rows(capsys.readouterr().out)
    assert rows[0][:4] == ["model", "fbp f32 ms", "fbp bf16-mixed ms", "f32 / bf16-mixed"]
    mlp = next(r for r in rows if r[0] == "mlp")
    assert float(mlp[1].split()[0]) > 0 and float(mlp[2].split()[0]) > 0
    assert mlp[3].strip("*").endswith("x") and mlp[8].endswith("x")  # fbp and torch speedups


def test_parity_report_rows_and_exit_status(capsys, tmp_path):
    parity = _load("parity")
    out_json = tmp_path / "parity.json"
    assert parity.main(["--only", "dense", "layernorm", "--json", str(out_json)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows[1:]] == ["dense", "layernorm"]
    assert all(r[3] == "yes" and float(r[1]) <= 1e-10 for r in rows[1:])
    assert [r["case"] for r in json.loads(out_json.read_text())["rows"]] == ["dense", "layernorm"]
