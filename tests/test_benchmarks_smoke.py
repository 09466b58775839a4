"""Smoke tests: the core benchmark scripts run on tiny sizes (``--quick``) and print tables."""

import importlib.util
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


def test_mlp_quick_prints_every_variant(capsys):
    pytest.importorskip("torch")
    _load("mlp").main(["--quick", "--single"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    variants = {r[1] for r in rows}
    for name in ("fbp make_step", "jax.grad make_step", "fbp vg + adam", "jax.grad + adam",
                 "torch", "matmuls only, one call each"):
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
