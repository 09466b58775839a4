"""The one option schema (fbp/options.py) and the runner's module layering."""

import dataclasses
import subprocess
import sys

import pytest

from fbp.run import cli, options, runner
from fbp.run.experiment import Experiment


def test_every_option_is_a_flag_an_experiment_field_or_run_option_and_saved():
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(options.names()) <= dests
    exp_fields = {f.name for f in dataclasses.fields(Experiment)}
    assert set(options.names(options.TrainingOptions)) <= exp_fields
    assert set(options.names()) - exp_fields == {
        "chunk_steps",
        "data_file",
        "devices",
        "shard_params",
        "coordinator",
        "coordinator_timeout",
        "num_processes",
        "process_id",
    }
    args = parser.parse_args(["train", "tiny", "--weight-decay", "0.5", "--data", "f.csv"])
    assert options.from_namespace(args)["weight_decay"] == 0.5
    assert options.from_namespace(args)["data_file"] == "f.csv"
    cfg = options.resolve(options.TrainingOptions(epochs=2, lr=0.1), overrides={"clip": 2.0})
    saved = runner.saved_config(_exp(), cfg, None)
    assert set(saved) == {"experiment", "experiment_path", *options.names()}
    assert options.resolve(_exp(), saved) == cfg


def _exp(**kw):
    return Experiment(name="e", description="d", data=None, model=None, loss=None,
                      optimizer=None, epochs=2, lr=0.1, **kw)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"keep": 0}, r"run: keep must be >= 1, got 0\."),
        ({"lr": -1.0}, r"run: lr must be > 0, got -1\.0\."),
        ({"lr": "fast"}, r"run: lr must be a number, got 'fast'\."),
        ({"epochs": 2.5}, r"run: epochs must be an int, got 2\.5\."),
        ({"schedule": "cosin"}, r"run: schedule must be one of \('constant'.*got 'cosin'\."),
        ({"plateau_factor": 1.0}, r"run: plateau_factor must be in \(0, 1\), got 1\.0\."),
        ({"lrr": 0.1}, r"run: unknown option\(s\) \['lrr'\]; known: \["),
    ],
)
def test_bad_option_values_name_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        options.resolve(_exp(), overrides=overrides)


def test_a_resumed_run_takes_saved_options_but_not_its_device_count():
    saved = {"experiment": "e", "epochs": 9, "lr": 0.5, "devices": 4, "chunk_steps": 7}
    cfg = options.resolve(_exp(), saved, {"epochs": 12})
    assert (cfg.epochs, cfg.lr, cfg.chunk_steps, cfg.devices) == (12, 0.5, 7, None)


def test_the_experiment_spec_is_a_leaf_that_imports_no_runner():
    code = (
        "import sys, fbp.run.experiment, fbp.run.options; "
        "print(sorted(m for m in sys.modules if m in ('fbp.run.runner', 'fbp.run.variants', 'fbp.run.loop')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
