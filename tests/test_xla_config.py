"""fbp.xla_config: fbp's XLA:CPU flags are safe (supported only, user first, off switch,
too-late warning) and take effect when set before JAX starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from fbp import nn, xla_config
from fbp.run import cli

ROOT = Path(__file__).resolve().parents[1]
YNN = "xla_cpu_experimental_ynn_fusion_type"
CONV = xla_config.SETTINGS["conv"]


def accept_all(flags):
    return dict.fromkeys(flags, True)


@pytest.fixture
def fresh(monkeypatch):
    """An environment without XLA_FLAGS or FBP_XLA, as if JAX had not started yet."""
    monkeypatch.setattr(xla_config, "jax_started", lambda: False)
    return {"JAX_PLATFORMS": "cpu"}


def test_conv_setting_is_set_when_jax_has_not_started(fresh):
    applied = xla_config.configure_cpu("conv", environ=fresh, probe=accept_all)
    assert applied == CONV
    assert fresh["XLA_FLAGS"] == xla_config.format_flags(CONV)


def test_auto_chooses_by_the_models_layers(fresh):
    conv = nn.Sequential([nn.Frozen(nn.Conv2D(4, 3)), nn.ReLU(), nn.Flatten(), nn.Dense(2)])
    assert xla_config.configure_cpu(model=conv, environ=dict(fresh), probe=accept_all) == CONV
    dense = nn.Sequential([nn.Dense(4), nn.ReLU(), nn.LSTM(3)])
    assert xla_config.setting_for(dense) == xla_config.DEFAULT
    env = dict(fresh)
    assert xla_config.configure_cpu(setting="xla", environ=env, probe=accept_all) == {}
    assert "XLA_FLAGS" not in env


def test_script_without_a_model_gets_the_conv_setting(fresh):
    """The conv setting compiles the same programs for models without a convolution
    (benchmarks/cpu_setting.py), so it is the default for every script."""
    env = dict(fresh)
    assert xla_config.configure_cpu(environ=env, probe=accept_all) == CONV
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_setting_for_experiment_reads_the_file_without_running_it():
    assert xla_config.setting_for_experiment("digits-cnn") == "conv"
    assert xla_config.setting_for_experiment(str(ROOT / "experiments" / "digits_cnn.py")) == "conv"
    assert xla_config.setting_for_experiment("digits-mlp") == xla_config.DEFAULT
    assert xla_config.setting_for_experiment("no-such-experiment") == xla_config.DEFAULT
    assert xla_config.setting_for_experiment(None) == xla_config.DEFAULT


def test_experiment_override_by_name(monkeypatch):
    monkeypatch.setitem(xla_config.EXPERIMENTS, "digits-cnn", "xla")
    assert xla_config.setting_for_experiment("digits-cnn") == "xla"


def test_unsupported_flag_is_not_set(fresh):
    """A jaxlib that lacks the flag: fbp leaves XLA_FLAGS alone instead of aborting XLA."""
    applied = xla_config.configure_cpu(
        "conv", environ=fresh, probe=lambda flags: dict.fromkeys(flags, False)
    )
    assert applied == {}
    assert "XLA_FLAGS" not in fresh


def test_only_the_supported_flags_of_a_setting_are_set(fresh):
    flags = {YNN: "-individual_convolution", "xla_cpu_fbp_not_in_this_jaxlib": "true"}
    applied = xla_config.configure_cpu(
        flags, environ=fresh, probe=lambda f: {k: k == YNN for k in f}
    )
    assert applied == {YNN: "-individual_convolution"}
    assert fresh["XLA_FLAGS"] == f"--{YNN}=-individual_convolution"


def test_probe_finds_unknown_flags_and_bad_values_without_aborting_this_process():
    result = xla_config.probe_flags(
        {
            YNN: "-individual_convolution",
            "xla_cpu_fbp_no_such_flag": "true",
            "xla_cpu_use_onednn": "maybe",
        }
    )
    assert result == {
        YNN: True,
        "xla_cpu_fbp_no_such_flag": False,
        "xla_cpu_use_onednn": False,
    }


def test_probe_results_are_cached_per_jaxlib_version(monkeypatch, tmp_path):
    monkeypatch.setenv("FBP_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_probe(flags, **kw):
        calls.append(dict(flags))
        return {k: k == YNN for k in flags}

    monkeypatch.setattr(xla_config, "probe_flags", fake_probe)
    flags = {YNN: "-individual_convolution", "xla_cpu_fbp_no_such_flag": "true"}
    assert xla_config.supported(flags) == {YNN: True, "xla_cpu_fbp_no_such_flag": False}
    assert xla_config.supported(flags) == {YNN: True, "xla_cpu_fbp_no_such_flag": False}
    assert len(calls) == 1
    cache = json.loads((tmp_path / "xla_flags.json").read_text())
    assert cache[xla_config._jaxlib_version()][f"{YNN}=-individual_convolution"] is True


def test_users_own_flag_wins_over_fbps(fresh):
    fresh["XLA_FLAGS"] = f"--{YNN}=dot --xla_cpu_use_xnnpack=true"
    applied = xla_config.configure_cpu("conv", environ=fresh, probe=accept_all)
    assert applied == {}
    assert fresh["XLA_FLAGS"] == f"--{YNN}=dot --xla_cpu_use_xnnpack=true"


def test_users_other_flags_are_kept_and_come_first(fresh):
    fresh["XLA_FLAGS"] = "--xla_cpu_use_xnnpack=true"
    xla_config.configure_cpu("conv", environ=fresh, probe=accept_all)
    assert fresh["XLA_FLAGS"] == f"--xla_cpu_use_xnnpack=true --{YNN}=-individual_convolution"


@pytest.mark.parametrize("switch", ["off", "0", "OFF", "none"])
def test_off_switch(fresh, switch):
    fresh[xla_config.ENV_SWITCH] = switch
    assert xla_config.configure_cpu("conv", environ=fresh, probe=accept_all) == {}
    assert "XLA_FLAGS" not in fresh


def test_off_setting(fresh):
    assert xla_config.configure_cpu("off", environ=fresh, probe=accept_all) == {}
    assert "XLA_FLAGS" not in fresh


def test_switch_names_a_setting_for_every_model(fresh):
    fresh[xla_config.ENV_SWITCH] = "conv"
    dense = nn.Sequential([nn.Dense(4)])
    assert xla_config.configure_cpu(model=dense, environ=fresh, probe=accept_all) == CONV


def test_bad_switch_and_bad_setting_are_refused(fresh):
    fresh[xla_config.ENV_SWITCH] = "fastest"
    with pytest.raises(ValueError, match=r"FBP_XLA='fastest' is not a setting; use off, auto"):
        xla_config.configure_cpu(environ=fresh, probe=accept_all)
    with pytest.raises(ValueError, match=r"unknown setting 'fastest'; expected one of conv, xla"):
        xla_config.configure_cpu("fastest", environ={}, probe=accept_all)


def test_no_cpu_flags_when_jax_uses_no_cpu(fresh):
    fresh["JAX_PLATFORMS"] = "cuda"
    assert xla_config.configure_cpu("conv", environ=fresh, probe=accept_all) == {}


def test_too_late_warns_and_changes_nothing():
    (jnp.ones(2) + 1).block_until_ready()  # JAX has started in this process
    assert xla_config.jax_started()
    env = {"JAX_PLATFORMS": "cpu"}
    with pytest.warns(xla_config.XlaConfigWarning, match=r"ran after JAX started.*Call it before"):
        assert xla_config.configure_cpu("conv", environ=env, probe=accept_all) == {}
    assert "XLA_FLAGS" not in env


def test_cli_configures_from_the_experiment_name(monkeypatch):
    seen = []
    monkeypatch.setattr(xla_config, "configure_cpu", lambda **kw: seen.append(kw))
    assert cli.main(["train", "no-such-experiment"]) == 2  # refused later, by the loader
    assert seen == [{"experiment": "no-such-experiment"}]


_CHILD = """
import sys
import fbp.run.cli  # importing fbp and its command starts no JAX backend
from fbp import xla_config
assert not xla_config.jax_started()
model = fbp.nn.Sequential([fbp.nn.Conv2D(32, 3)])
print(fbp.configure_cpu(model=model))
import jax, jax.numpy as jnp
x = jnp.ones((8, 8, 8, 32))  # big enough for XLA to hand it to YNNPACK by default
params = model.init(jax.random.key(0), x)
text = jax.jit(model.apply).lower(params, x).compile().as_text()
print("ynn convolution" if any(
    "__ynn_fusion" in l and "conv_general_dilated" in l for l in text.splitlines()
) else "xla convolution")
"""


@pytest.mark.parametrize("switch", ["auto", "off"])
def test_flags_take_effect_in_a_fresh_process(tmp_path, switch):
    """Through the real path: the conv setting compiles convolutions without YNNPACK."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), FBP_XLA=switch, FBP_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    if switch == "off":
        assert lines == ["{}", "ynn convolution"]
    else:
        assert lines == [str(CONV), "xla convolution"]
