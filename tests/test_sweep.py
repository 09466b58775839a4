"""Sweeps (fbp.run.sweep, ``fbp train --seeds/--sweep``): equivalence, files, resume, bad input.

The reference sweep is tiny (iris 4-8-3, 6 steps an epoch) over seeds 0, 1 and
lr 0.01, 0.03 for 3 epochs; every run of it is compared with the same run trained
alone by ``fbp train``. Runs of a sweep are not bitwise those of runs alone (a
vmapped matrix product may sum in another order: one ulp in a weight gradient per
step), so parameters are compared to a relative 1e-5 and test accuracy exactly.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_runs import EXPERIMENTS, use_test_experiments
from cli_runs import summary as _summary
from cli_runs import train as _train

from fbp import checkpoint as ckpt
from fbp.run import cli, experiment, export, metrics, runner, sweep
from fbp.run.sweep import grid, memory
from fbp.run.sweep import stack as stk

GRID = ["--seeds", "0-1", "--sweep", "lr=0.01,0.03", "--epochs", "3"]
NAMES = ["lr-0.01_seed-0", "lr-0.01_seed-1", "lr-0.03_seed-0", "lr-0.03_seed-1"]


@pytest.fixture(autouse=True)
def _experiments(monkeypatch):
    use_test_experiments(monkeypatch)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted sweep (4 runs, 3 epochs), shared by the tests below."""
    out = tmp_path_factory.mktemp("sweep") / "ref"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert _train(out, *GRID) == 0
    return out


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "name, seed, lr", [("lr-0.01_seed-0", 0, 0.01), ("lr-0.03_seed-1", 1, 0.03)]
)
def test_each_run_matches_the_same_run_trained_alone(ref, tmp_path, name, seed, lr):
    alone = tmp_path / "alone"
    assert _train(alone, "--seed", seed, "--lr", lr, "--epochs", 3) == 0
    mine, theirs = _summary(ref / name), _summary(alone)
    assert mine["config"] == theirs["config"]
    assert mine["test"]["accuracy"] == theirs["test"]["accuracy"]
    assert mine["test"]["loss"] == pytest.approx(theirs["test"]["loss"], rel=1e-5)
    a = export.load_run(ref / name, which="last")["params"]
    b = export.load_run(alone, which="last")["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= 1e-5 * np.abs(y).max()
    rows_a = metrics.read_metrics(ref / name / "metrics.jsonl")
    rows_b = metrics.read_metrics(alone / "metrics.jsonl")
    assert [list(r) for r in rows_a] == [list(r) for r in rows_b]  # same columns, same order
    for ra, rb in zip(_strip(rows_a), _strip(rows_b), strict=True):
        assert ra == pytest.approx(rb, rel=1e-5)
    assert len(ckpt.list_checkpoints(ref / name / "checkpoints")) == 3


def test_sweep_directory_table_and_plot(ref, capsys):
    assert sorted(p.name for p in ref.iterdir()) == sorted(
        [*NAMES, "comparison.png", "sweep.json", "sweep.md"]
    )
    for name in NAMES:
        files = {p.name for p in (ref / name).iterdir()}
        assert {"metrics.jsonl", "summary.json", "loss.png", "metric.png", "checkpoints"} <= files
        s = _summary(ref / name)
        params = export.load_run(ref / name, which="last")["params"]
        assert s["params_sha256"] == metrics.params_sha256(params)
    doc = json.loads((ref / "sweep.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["grid"] == {"lr": [0.01, 0.03]}
    assert [row["group"] for row in doc["table"]] == ["lr=0.01", "lr=0.03"]
    row = doc["table"][1]
    accs = [_summary(ref / n)["test"]["accuracy"] for n in NAMES[2:]]
    assert row["test"]["accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert row["test"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-4)
    md = (ref / "sweep.md").read_text()
    assert md.startswith("| grid point | runs | test accuracy | test loss | epochs |")
    assert f"| lr=0.03 | 2 | {np.mean(accs):.4f} ± " in md
    assert (ref / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in ref.rglob(".*")]  # no temporaries or locks left
    assert cli.main(["eval", str(ref / NAMES[3])]) == 0  # a run of a sweep is a run
    assert "test accuracy" in capsys.readouterr().out


def test_python_api_and_a_swept_weight_decay(tmp_path):
    """A swept weight decay adds a stateless transform to every run's optimizer; the run
    with 0 has none when alone, and its checkpoints keep that layout."""
    exp = experiment.get("tiny")
    lines = []
    result = sweep.run(exp, seeds=[2], grid={"weight_decay": [0.0, 0.1]}, epochs=1,
                       out=tmp_path / "sw", print_fn=lines.append)  # fmt: skip
    assert list(result.runs) == ["weight-decay-0.0_seed-2", "weight-decay-0.1_seed-2"]
    assert result.runs["weight-decay-0.1_seed-2"].config["weight_decay"] == 0.1
    assert "| weight_decay=0.1 | 1 | " in "\n".join(lines)
    a, b = (r.state.params["0"]["w"] for r in result.runs.values())
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the decay reached one run only
    alone = runner.run(exp, seed=2, weight_decay=0.1, epochs=1, print_fn=lambda s: None)
    np.testing.assert_allclose(b, alone.state.params["0"]["w"], rtol=1e-5, atol=1e-7)
    for name, mu in (
        ("weight-decay-0.0_seed-2", "state/opt_state/0/mu/0/w"),
        ("weight-decay-0.1_seed-2", "state/opt_state/1/0/mu/0/w"),
    ):
        path = ckpt.list_checkpoints(tmp_path / "sw" / name / "checkpoints")[-1]
        assert mu in ckpt.read_manifest(path)["tensors"]
        assert cli.main(["eval", str(tmp_path / "sw" / name)]) == 0


# ----------------------------------------------------------------------------- stopping, resume


def test_a_run_that_stops_early_keeps_its_best_params_while_others_go_on(tmp_path):
    """Also with a reduce-on-plateau schedule, whose state each run updates for itself."""
    out = tmp_path / "sw"
    common = ["--patience", 2, "--epochs", 40, "--checkpoint-every", 40]
    common += ["--schedule", "plateau", "--plateau-patience", 1]
    assert _train(out, "--sweep", "lr=0.3,0.01", *common) == 0
    fast, slow = _summary(out / "lr-0.3"), _summary(out / "lr-0.01")
    assert fast["stopped_early"] and fast["restored_best"]
    assert fast["epochs_completed"] == fast["best_epoch"] + 2 < 40
    assert not slow["stopped_early"] and slow["epochs_completed"] == 40
    alone = tmp_path / "alone"
    assert _train(alone, "--lr", 0.3, *common) == 0
    ref = _summary(alone)
    lrs = [r["lr"] for r in metrics.read_metrics(out / "lr-0.3" / "metrics.jsonl")]
    assert lrs == [r["lr"] for r in metrics.read_metrics(alone / "metrics.jsonl")]
    assert lrs[-1] < 0.3  # the plateau cut it
    for key in ("stopped_early", "best_epoch", "epochs_completed", "steps", "restored_best"):
        assert fast[key] == ref[key], key
    assert fast["test"]["accuracy"] == ref["test"]["accuracy"]
    best = export.load_run(out / "lr-0.3", which="best")["params"]
    assert metrics.params_sha256(best) == fast["params_sha256"]
    last = export.load_run(out / "lr-0.3", which="last")
    assert last["checkpoint"].name == "ckpt-000001"  # saved once, when the whole sweep ended
    table = json.loads((out / "sweep.json").read_text())["table"]
    assert [r["stopped_early"] for r in table] == [1, 0]


def test_resume_continues_every_run_bitwise_also_from_different_epochs(ref, tmp_path, capsys):
    """As if killed between checkpoints: runs 0, 2, 3 saved epoch 2, run 1 only epoch 1.
    The runs behind catch up alone (the others masked), then all go on together."""
    part = tmp_path / "part"
    shutil.copytree(ref, part)
    for name in NAMES:
        for c in ckpt.list_checkpoints(part / name / "checkpoints")[1 if name == NAMES[1] else 2 :]:
            shutil.rmtree(c)
    assert _train(part, "--resume") == 0  # the sweep is read from sweep.json
    out = capsys.readouterr().out
    assert "resuming 4 of 4 runs from their checkpoints (epoch 1 step 0, epoch 2 step 0)" in out
    for name in NAMES:
        assert _summary(part / name)["params_sha256"] == _summary(ref / name)["params_sha256"]
        assert _strip(metrics.read_metrics(part / name / "metrics.jsonl")) == _strip(
            metrics.read_metrics(ref / name / "metrics.jsonl")
        )


def test_sigterm_checkpoints_every_run_and_resume_is_bitwise(ref, tmp_path, monkeypatch, capsys):
    cut = tmp_path / "cut"
    real = stk.build_program
    calls = []

    def program_that_gets_sigterm(*a, **k):
        program = real(*a, **k)

        def chunk(*args):
            calls.append(1)
            if len(calls) == 3:  # the first chunk of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
            return program.chunk(*args)

        return program._replace(chunk=chunk)

    monkeypatch.setattr(stk, "build_program", program_that_gets_sigterm)
    assert _train(cut, *GRID, "--chunk-steps", 3) == 143  # 2 chunks an epoch
    assert "stopped by SIGTERM" in capsys.readouterr().err
    for name in NAMES:
        newest = ckpt.list_checkpoints(cut / name / "checkpoints")[-1]
        prog = ckpt.read_manifest(newest)["meta"]["progress"]
        assert (prog["epoch"], prog["pos"]) == (1, 3)
    monkeypatch.setattr(stk, "build_program", real)
    assert _train(cut, "--resume") == 0
    for name in NAMES:
        assert _summary(cut / name)["params_sha256"] == _summary(ref / name)["params_sha256"]


def test_nonfinite_halt_names_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINY_POISON", "1")
    out = tmp_path / "sw"
    assert _train(out, "--seeds", "0,1", "--nonfinite", "halt", name="tiny-poison") == 3
    err = capsys.readouterr().err
    assert re.search(r"run seed-0: non-finite loss or gradient at step \d+ \(epoch 1", err), err


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, match",
    [
        (["--sweep", "lr=1e-3,fast"], r"--sweep lr: 'fast' is not a number\."),
        (["--sweep", "lr="], r"--sweep lr= has no values\."),
        (["--sweep", "lr"], r"--sweep 'lr' is not NAME=V1,V2,\.\.\."),
        (
            ["--sweep", "momentum=0.9"],
            r"--sweep names an unknown option 'momentum'; sweepable: lr, patience, clip, weight_decay\.",
        ),
        (
            ["--sweep", "batch-size=8,16"],
            r"--sweep cannot sweep batch_size \(runs of one program share it\)",
        ),
        (["--sweep", "seed=1,2"], r"--sweep cannot sweep seed; give the seeds with --seeds\."),
        (["--sweep", "patience=2,2.5"], r"--sweep patience: '2\.5' is not an int\."),
        (["--sweep", "lr=0.1,1e-1"], r"--sweep option lr gives 0\.1 twice\."),
        (["--sweep", "lr=0.1", "--sweep", "lr=0.2"], r"--sweep gives lr twice"),
        (["--sweep", "lr=0.1,-1"], r"run: lr must be > 0, got -1\.0\."),
        (["--seeds", "0-3,2"], r"--seeds gives seed 2 twice\."),
        (["--seeds", "0-x"], r"--seeds '0-x': '0-x' is not a seed or a range"),
        (["--seeds", "3-1"], r"--seeds '3-1': the range 3-1 is empty\."),
        (["--seeds", "0-1", "--seed", "4"], r"--seed and --seeds both given"),
        (
            ["--sweep", "lr=0.1,0.2", "--lr", "0.3"],
            r"lr is both swept \(--sweep lr=\.\.\.\) and set alone",
        ),
        (
            ["--seeds", "0-2", "--devices", "2"],
            r"--devices 2 but this process sees 1 device|--devices 2 must divide the number of runs",
        ),
    ],
)
def test_bad_sweep_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "sw"
    assert _train(out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fbp: error: sweep: ") or err.startswith("fbp: error: run: "), err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert not out.exists()


def test_resume_with_another_grid_is_refused(ref, capsys):
    before = sorted(str(p) for p in ref.rglob("*"))
    assert _train(ref, "--resume", "--sweep", "lr=0.1") == 2
    err = capsys.readouterr().err
    assert "holds a sweep of seeds 0,1; lr 0.01,0.03, not of lr 0.1" in err and err.count("\n") == 1
    assert sorted(str(p) for p in ref.rglob("*")) == before


def test_more_runs_than_fit_are_refused_before_anything_is_built(tmp_path):
    """A 10000 -> 20000 Dense layer with Adam needs ~7.2 GB a run: 64 runs cannot fit, and the
    refusal comes from shapes alone (the subprocess would not survive allocating them)."""
    avail = memory.available_bytes()
    assert avail is not None
    exp_file = tmp_path / "huge.py"
    exp_file.write_text(
        textwrap.dedent("""
        import numpy as np, optax
        from fbp import losses, nn
        from fbp.data import Dataset, Split
        from fbp.run.experiment import Experiment

        def data(seed):
            x = np.zeros((8, 10000), np.float32); y = np.zeros((8,), np.int32)
            return Dataset(Split(x, y), Split(x[:0], y[:0]), Split(x, y), 2, "huge")

        EXPERIMENT = Experiment(name="huge", description="too big to sweep", data=data,
            model=lambda ds: nn.Sequential([nn.Dense(20000), nn.Dense(2)]),
            loss=losses.softmax_cross_entropy, optimizer=lambda lr, steps: optax.adam(lr),
            epochs=1, lr=1e-3, batch_size=8)
    """)
    )
    out = tmp_path / "sw"
    cmd = [
        sys.executable,
        "-m",
        "fbp.run.cli",
        "train",
        str(exp_file),
        "--seeds",
        "0-63",
        "--out",
        str(out),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    m = re.search(
        r"sweep: 64 runs need about ([\d.]+) GB \(([\d.]+) GB a run\) but ([\d.]+) GB is free on cpu; at most (\d+) of the 64 runs fit\. Sweep fewer --seeds or --sweep values\.",
        proc.stderr,
    )
    assert m, proc.stderr
    per_run = float(m[2]) * 1e9
    assert 7.1e9 <= per_run <= 7.3e9  # state (w, Adam's mu, nu: 2.4 GB) twice, 3 x 0.8 GB
    assert int(m[4]) == pytest.approx(avail / per_run, abs=1.5)
    assert not out.exists()


# ----------------------------------------------------------------------------- parts


def test_seed_and_grid_parsing():
    assert grid.parse_seeds("0-3") == (0, 1, 2, 3)
    assert grid.parse_seeds("0,3,5") == (0, 3, 5)
    assert grid.parse_seeds(" 7 ") == (7,)
    assert grid.parse_grid(["weight_decay=0,1e-4", "patience=3"]) == {
        "weight_decay": (0.0, 1e-4),
        "patience": (3,),
    }
    with pytest.raises(ValueError, match=r"sweep: grid option lr has no values\."):
        sweep.run(experiment.get("tiny"), grid={"lr": []})
    with pytest.raises(ValueError, match=r"sweep: nothing to sweep"):
        sweep.run(experiment.get("tiny"))
    with pytest.raises(ValueError, match=r"sweep: seeds gives seed 1 twice\."):
        sweep.run(experiment.get("tiny"), seeds=[1, 1])
    names = [p.name for p in grid.points(None, {"lr": (0.1,), "clip": (1.0, 2.0)})]
    assert names == ["lr-0.1_clip-1.0", "lr-0.1_clip-2.0"]
    assert [p.name for p in grid.points((4,), {})] == ["seed-4"]


def test_run_bytes_counts_state_activations_and_data():
    import optax

    from fbp import nn
    from fbp import train as fbp_train

    model = nn.Sequential([nn.Dense(100), nn.Tanh(), nn.Dense(10)])
    x = jax.ShapeDtypeStruct((64, 50), np.float32)
    state = jax.eval_shape(
        lambda k: fbp_train.init(model, optax.adam(0.1), k, x), jax.random.key(0)
    )
    p = memory.tree_bytes(state.params)
    assert p == 4 * (50 * 100 + 100 + 100 * 10 + 10)
    assert memory.tree_bytes(state) == 3 * p + 4 + 4 + 8  # params, mu, nu, count, step, key
    own = memory.run_bytes(model, state, x, 32, 1000, own_data=True)
    shared = memory.run_bytes(model, state, x, 32, 1000, own_data=False)
    residuals = 32 * 50 * 4 + 32 * 100 * 4  # Dense(100) keeps x, Tanh keeps its output
    assert own.per_run == 2 * memory.tree_bytes(state) + 3 * p + 2 * residuals + 4 * 2 * 32 + 1000
    assert (shared.per_run, shared.shared) == (own.per_run - 1000, 1000)


@pytest.mark.slow
def test_digits_mlp_sweep_of_8_seeds_matches_8_runs_alone(tmp_path):
    """The full experiment (100 epochs, 4,400 steps a run): the same test accuracy as each
    run alone, test loss and parameters within float tolerance. Measured: bitwise here (the
    tests enable float64, which changes XLA's fusions); with float32 defaults up to 8.5e-4
    relative in the parameters of one seed after 4,400 steps, 2.4e-5 in test loss."""
    exp = experiment.get("digits-mlp")
    result = sweep.run(exp, seeds=range(8), out=tmp_path / "sw", print_fn=lambda s: None)
    worst = 0.0
    for seed in range(8):
        alone = runner.run(exp, seed=seed, out=tmp_path / str(seed), print_fn=lambda s: None)
        mine = result.runs[f"seed-{seed}"]
        assert mine.test["accuracy"] == alone.test["accuracy"], seed
        assert mine.test["loss"] == pytest.approx(alone.test["loss"], rel=1e-4)
        for x, y in zip(
            jax.tree.leaves(mine.state.params), jax.tree.leaves(alone.state.params), strict=True
        ):
            x, y = np.asarray(x), np.asarray(y)
            worst = max(worst, float(np.abs(x - y).max() / np.abs(y).max()))
    assert worst < 1e-2, worst
    print(f"largest relative parameter difference over 8 runs: {worst:.2e}")


# ----------------------------------------------------------------------------- variants, devices


def test_an_experiment_with_variants_is_swept_once_per_variant(tmp_path):
    """Each variant is its own sweep in DIR/<variant>; its runs equal that variant's sweep."""
    import dataclasses

    import optax

    base = experiment.get("tiny")
    exp = dataclasses.replace(
        base, variants={"adam": {}, "sgd": {"optimizer": lambda lr, steps: optax.sgd(lr)}}
    )
    lines = []
    result = sweep.run(exp, seeds=[0, 1], epochs=1, out=tmp_path / "sw", print_fn=lines.append)
    assert list(result.runs) == ["adam/seed-0", "adam/seed-1", "sgd/seed-0", "sgd/seed-1"]
    assert [row["group"] for row in result.table] == ["adam", "sgd"]
    assert (tmp_path / "sw" / "sgd" / "seed-1" / "summary.json").is_file()
    assert (tmp_path / "sw" / "adam" / "sweep.md").is_file()
    assert "== tiny: 2 variants" in "\n".join(lines)
    sgd = dataclasses.replace(base, optimizer=lambda lr, steps: optax.sgd(lr))
    alone = sweep.run(sgd, seeds=[0, 1], epochs=1, print_fn=lambda s: None)
    np.testing.assert_array_equal(
        result.runs["sgd/seed-1"].state.params["0"]["w"],
        alone.runs["seed-1"].state.params["0"]["w"],
    )


def test_a_sweep_split_over_two_devices_matches_one_device(tmp_path):
    """``--devices 2`` splits the 4 runs over two (fake CPU) devices; same results."""
    code = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        from fbp.run import experiment, sweep
        exp = experiment.get("tiny")
        kw = dict(seeds=[0, 1], grid={"lr": [0.01, 0.03]}, epochs=2, print_fn=lambda s: None)
        one = sweep.run(exp, **kw)
        lines = []
        two = sweep.run(exp, devices=2, out=sys.argv[1], **{**kw, "print_fn": lines.append})
        assert any("4 runs in one program on 2 devices" in s for s in lines), lines
        leaf = lambda r: np.asarray(r.state.params["0"]["w"])
        err = max(float(np.max(np.abs(leaf(one.runs[k]) - leaf(two.runs[k])))) for k in one.runs)
        print(json.dumps({"runs": sorted(two.runs), "err": err}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        FBP_EXPERIMENTS=EXPERIMENTS,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "sw")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["runs"] == sorted(NAMES)
    assert out["err"] < 1e-6
    assert (tmp_path / "sw" / NAMES[0] / "summary.json").is_file()
