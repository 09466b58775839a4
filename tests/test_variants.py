"""The runner's optional Experiment fields: variants, grad_fn, probe, init (fbp/variants.py)."""

import json

import jax
import numpy as np
import optax
import pytest

from fbp import data, diagnostics, losses, nn, rules
from fbp.run import runner
from fbp.run.experiment import Experiment

LOSS = losses.softmax_cross_entropy


def _model(ds):
    return nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])


def _exp(**kw):
    base = dict(
        name="tiny-variants",
        description="iris, two variants",
        data=lambda seed: data.load("iris", seed=seed),
        model=_model,
        loss=LOSS,
        optimizer=lambda lr, steps: optax.adam(lr),
        epochs=2,
        lr=0.01,
        batch_size=16,
    )
    return Experiment(**{**base, **kw})


def _zero_grad_fn(model, ds):
    vg = rules.value_and_grad(model, LOSS, "backprop")

    def f(params, x, y, **kw):
        out, grads = vg(params, x, y, **kw)
        return out, jax.tree.map(lambda g: 0 * g, grads)

    return f


def test_variants_run_each_with_probe_grad_fn_and_init(tmp_path):
    def init(model, ds, seed):
        p = model.init(jax.random.key(seed), ds.train.x[:1])
        return jax.tree.map(lambda v: v + 1.0, p)

    seen = {}

    def report(result):
        seen.update(result.variants)
        return ["compared"]

    exp = _exp(
        probe=diagnostics.probe,
        report=report,
        variants={"plain": {}, "frozen-by-grad-fn": {"grad_fn": _zero_grad_fn, "init": init}},
    )
    lines = []
    result = runner.run(exp, out=tmp_path, print_fn=lines.append)
    assert set(result.variants) == {"plain", "frozen-by-grad-fn"} == set(seen)
    assert "compared" in lines
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert set(table["plain"]["test"]) == {"loss", "accuracy"}
    assert result.test["plain/accuracy"] == table["plain"]["test"]["accuracy"]
    rows = [json.loads(s) for s in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["grad_norm/0"] > 0 and "delta_norm/2" in rows[0]
    # zero updates from the grad_fn: the parameters stay what init made them
    frozen = result.variants["frozen-by-grad-fn"]
    expected = init(frozen.model, frozen.dataset, 0)
    for a, b in zip(jax.tree.leaves(frozen.state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "variants, match",
    [
        ({"a/b": {}}, "variant names must be non-empty strings without '/'"),
        ({"a": {"modle": None}}, r"variant 'a' sets unknown field\(s\) \['modle'\]"),
        ({"a": [1]}, "variant 'a' must be a dict of field overrides, got list"),
    ],
)
def test_bad_variants_raise(variants, match):
    with pytest.raises(ValueError, match=match):
        runner.run(_exp(variants=variants), print_fn=lambda s: None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, plots",
    [
        ("deep-mlp-gradients", ["grad_norms.png", "val_accuracy.png"]),
        ("digits-feedback-alignment", ["alignment_angles.png", "val_accuracy.png"]),
        ("digits-transfer", []),
    ],
)
def test_comparison_experiments_run_end_to_end(name, plots, tmp_path):
    from fbp.run import experiment

    exp = experiment.get(name)
    lines = []
    result = runner.run(exp, out=tmp_path, epochs=2, print_fn=lines.append)
    assert set(result.variants) == set(exp.variants)
    assert (tmp_path / "comparison.json").is_file()
    for plot in plots:
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("| ") for line in lines), "the report prints a table"
