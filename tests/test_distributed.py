"""``fbp train`` across processes, sharded parameters, and their bad input.

Scenarios with several processes or devices run in fresh processes (tests/procs.py):
two ``fbp train`` processes of 2 CPU devices each on localhost, and
tests/shard_worker.py on 8 CPU devices. Both start when this module starts, so
they overlap the in-process tests.

Tolerances: runs split over devices sum each gradient in another order than one
device does (per-device partial sums, then the all-reduce or reduce-scatter), so
float32 results differ in the last bits of every step, never bitwise; Adam divides
by the gradient's running size, which turns that rounding into larger (still
~1e-5 relative) differences of parameters whose gradient is near zero.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from procs import fbp_lines, finish, free_port, result, start

from fbp import checkpoint
from fbp.distributed import cluster, parallel
from fbp.run import cli, experiment, options, runner

HERE = Path(__file__).parent
TINY = str(HERE / "experiments" / "tiny.py")
WIDE = str(HERE / "experiments" / "wide.py")
CLI = ["-m", "fbp.run.cli", "train"]


def two_processes(tmp_path: Path, out: Path, *args: str, devices: int = 2) -> list:
    """``fbp train`` as processes 0 (flags) and 1 (JAX_* variables), each in its own cwd."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(2):
        cwd = tmp_path / f"cwd{pid}"
        cwd.mkdir(exist_ok=True)
        argv = [*CLI, *args, "--out", str(out)]
        if pid == 0:
            procs.append(
                start(
                    [*argv, "--coordinator", address, "--num-processes", "2", "--process-id", "0"],
                    devices,
                    cwd,
                )
            )
        else:
            extra = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": "1"}  # fmt: skip
            procs.append(start(argv, devices, cwd, **extra))
    return procs


def latest_params(run_dir: Path) -> dict[str, np.ndarray]:
    path = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    arrays, _ = checkpoint.read_arrays(path)
    return {k: v for k, v in arrays.items() if k.startswith("state/params/")}


def params_err(a: dict, b: dict) -> float:
    """Largest |a - b| / max|b| over the parameter arrays."""
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- started at once


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start the 2-process run and the 8-device worker when this module starts."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            wanted |= {"pair", "shard"} & set(getattr(item, "fixturenames", ()))
    root = tmp_path_factory.mktemp("background")
    jobs = {}
    if "pair" in wanted:
        jobs["pair"] = (root, two_processes(root, root / "mp", TINY))
    if "shard" in wanted:
        jobs["shard"] = (root, start([str(HERE / "shard_worker.py"), str(root / "shard")], 8))
    yield jobs
    for _, procs in jobs.values():
        for p in procs if isinstance(procs, list) else [procs]:
            if p.poll() is None:
                p.kill()
            p.communicate()  # closes its pipes


@pytest.fixture(scope="module")
def pair(background) -> dict:
    root, procs = background["pair"]
    done = [finish(p, timeout=600) for p in procs]
    for rc, _, err in done:
        assert rc == 0, err[-3000:]
    return {"root": root, "out": root / "mp", "runs": done}


@pytest.fixture(scope="module")
def shard(background) -> dict:
    _, proc = background["shard"]
    rc, out, err = finish(proc, timeout=900)
    r = result(out)
    assert rc == 0 and r is not None, err[-3000:]
    return r


# ----------------------------------------------------------------------------- two processes


def test_two_processes_match_one_process(pair, tmp_path):
    """2 processes x 2 CPU devices = one run of global batch 16 over 4 devices.

    Against one process on one device, same experiment and seed: test metrics and
    final parameters within 1e-5 relative (24 Adam steps; measured 3e-7).
    """
    ref = runner.run(experiment.get(TINY), out=tmp_path / "ref", print_fn=quiet)
    out = pair["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"]["processes"] == 2 and summary["parallel"]["devices"] == 4
    assert summary["steps"] == int(ref.state.step) == 24
    for k, v in ref.test.items():
        assert abs(summary["test"][k] - v) <= 1e-5 * max(1.0, abs(v)), (k, summary["test"][k], v)
    assert params_err(latest_params(out), latest_params(tmp_path / "ref")) < 1e-5
    # Only process 0 printed and wrote: one metrics row per epoch, nothing in either cwd.
    (_, out0, _), (_, out1, err1) = pair["runs"]
    assert "data parallel over 4 devices in 2 processes" in out0
    assert "epoch      4/4" in out0 and "test accuracy" in out0
    assert fbp_lines(out1) == [] and fbp_lines(err1) == []
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert [list((pair["root"] / f"cwd{i}").iterdir()) for i in range(2)] == [[], []]
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_two_process_run_resumes_on_one_and_one_process_run_on_two(tmp_path):
    """Saved by 2 processes, resumed by 1, and the other way round: as a 6-epoch run."""
    ref6 = runner.run(experiment.get(TINY), out=tmp_path / "ref6", epochs=6, print_fn=quiet)
    # 2 -> 1
    two = tmp_path / "two"
    for rc, _, err in [finish(p, 600) for p in two_processes(tmp_path, two, TINY)]:
        assert rc == 0, err[-3000:]
    rc, out, err = finish(start([*CLI, TINY, "--out", str(two), "--resume", "--epochs", "6"],
                                None), 600)  # fmt: skip
    assert rc == 0, err[-3000:]
    assert "resuming from ckpt-000004: epoch 4" in out
    # 1 -> 2
    one = tmp_path / "one"
    runner.run(experiment.get(TINY), out=one, print_fn=quiet)
    procs = two_processes(tmp_path, one, TINY, "--resume", "--epochs", "6")
    for rc, _, err in [finish(p, 600) for p in procs]:
        assert rc == 0, err[-3000:]
    for d in (two, one):
        s = json.loads((d / "summary.json").read_text())
        assert s["epochs_completed"] == 6 and s["steps"] == 36
        for k, v in ref6.test.items():
            assert abs(s["test"][k] - v) <= 1e-5 * max(1.0, abs(v)), (d.name, k)
        assert params_err(latest_params(d), latest_params(tmp_path / "ref6")) < 1e-5
    assert json.loads((one / "summary.json").read_text())["parallel"]["processes"] == 2
    assert "parallel" not in json.loads((two / "summary.json").read_text())  # one device


@pytest.mark.slow
def test_two_processes_with_sharded_parameters(tmp_path):
    """Parameters split over 2 processes x 2 devices: the same run as 4 local devices."""
    args = [WIDE, "--shard-params", "--epochs", "2"]
    procs = two_processes(tmp_path, tmp_path / "mp", *args)
    ref = start([*CLI, WIDE, "--devices", "4", "--epochs", "2", "--out", str(tmp_path / "ref")],
                None)  # fmt: skip
    for rc, _, err in [finish(p, 600) for p in [*procs, ref]]:
        assert rc == 0, err[-3000:]
    s = json.loads((tmp_path / "mp" / "summary.json").read_text())
    r = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s["parallel"]["shard_params"] and s["parallel"]["processes"] == 2
    assert s["parallel"]["params_bytes_per_device"] < s["parallel"]["params_bytes"] / 3
    for k, v in r["test"].items():
        assert abs(s["test"][k] - v) <= 1e-5 * max(1.0, abs(v)), k
    assert params_err(latest_params(tmp_path / "mp"), latest_params(tmp_path / "ref")) < 1e-4


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_a_checkpoint(tmp_path):
    """SIGTERM to process 1 only: both stop at the same chunk boundary with 143."""
    out = tmp_path / "mp"
    procs = two_processes(tmp_path, out, TINY, "--epochs", "100000")
    deadline = time.monotonic() + 600
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, _, err0), (rc1, _, err1) = [finish(p, 300) for p in procs]
    assert (rc0, rc1) == (143, 143), err0[-2000:] + err1[-2000:]
    assert "fbp: stopped by SIGTERM; checkpoint " in err0 and "continue with --resume" in err0
    last = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    assert last.name in err0
    epoch = checkpoint.read_manifest(last)["meta"]["progress"]["epoch"]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == epoch >= 3
    # ... and the run goes on from there, here in one process.
    argv = [*CLI, TINY, "--out", str(out), "--resume", "--epochs", str(epoch + 1)]
    rc, stdout, err = finish(start(argv, None), 300)
    assert rc == 0, err[-2000:]
    assert f"resuming from {last.name}: epoch {epoch}" in stdout


def test_coordinator_that_never_answers_fails_within_the_timeout(tmp_path):
    """Process 1 of 2 with nothing at the address: exit 2, one line, after ~2 s."""
    address = f"127.0.0.1:{free_port()}"
    argv = [*CLI, TINY, "--out", str(tmp_path / "run"), "--coordinator", address]
    argv += ["--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "2"]
    t0 = time.perf_counter()
    rc, out, err = finish(start(argv, None), 120)
    seconds = time.perf_counter() - t0
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Start process 0 first" in lines[0], err
    assert lines[0].startswith(
        f"fbp: error: initialize: process 1 of 2 found no coordinator at {address} within 2 s"
    )
    assert 2 <= seconds < 60
    assert not (tmp_path / "run").exists()


def test_process_zero_whose_peers_never_come_fails_within_the_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    argv = [*CLI, TINY, "--out", str(tmp_path / "run"), "--coordinator", address]
    argv += ["--num-processes", "2", "--process-id", "0", "--coordinator-timeout", "3"]
    rc, out, err = finish(start(argv, None), 120)
    assert rc == 2
    assert len(fbp_lines(err)) == 1
    assert f"process 0 of 2 could not join the run coordinated at {address} within 3 s" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.chdir(tmp_path)  # a default run directory would appear here


MP = ["--coordinator", "127.0.0.1:9", "--num-processes", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([*MP, "--process-id", "2"], "run: process_id must be in 0..1 (num_processes=2), got 2."),
        (["--process-id", "-1"], "run: process_id must be >= 0, got -1."),
        (["--num-processes", "0"], "run: num_processes must be >= 1, got 0."),
        (["--num-processes", "1", "--process-id", "1"], "run: process_id must be in 0..0"),
        (["--process-id", "1"], "run: set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES"),
        (["--coordinator", "host"], "run: coordinator must be HOST:PORT with a port in 1..65535"),
        (["--coordinator-timeout", "0"], "run: coordinator_timeout must be > 0, got 0.0."),
        (
            [*MP, "--process-id", "0", "--devices", "3"],
            "run: devices=3 does not split evenly over 2 processes",
        ),
        (
            ["--shard-params", "--devices", "1"],
            "run: shard_params needs 2 or more devices but this run has 1",
        ),
        (["--coordinator", "127.0.0.1:70000"], "run: coordinator must be HOST:PORT"),
    ],
)
def test_bad_process_options_exit_2_with_one_line_and_write_nothing(
    no_cluster, tmp_path, capsys, args, message
):
    rc = cli.main(["train", TINY, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("fbp: error: " + message), err
    assert list(tmp_path.iterdir()) == []


def test_several_processes_need_out(no_cluster, tmp_path, capsys):
    assert cli.main(["train", TINY, *MP, "--process-id", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "fbp: error: run: out must be given for a run of 2 processes (every process names "
        "the same directory, on a file system all of them see)."
    ]
    assert list(tmp_path.iterdir()) == []


def test_runner_refuses_a_process_count_it_has_not_joined(tmp_path):
    with pytest.raises(ValueError, match=r"run: num_processes=2 but this process is in a run of 1"):
        runner.run(experiment.get(TINY), out=tmp_path / "run", num_processes=2, print_fn=quiet)
    assert not (tmp_path / "run").exists()


def test_run_mesh_names_the_option():
    with pytest.raises(ValueError, match=r"run: shard_params needs 2 or more devices"):
        parallel.run_mesh(devices=1, shard_params=True, batch_size=8)
    assert parallel.run_mesh(devices=None, shard_params=False, batch_size=8) is None
    with pytest.raises(ValueError, match=r"run: batch_size: the global batch of 12 examples"):
        parallel.check_batch(12, AbstractMesh((8,), ("data",)), "run: batch_size")


# ----------------------------------------------------------------------------- options, agreement


def test_shard_params_is_a_schema_option():
    parser = cli.build_parser()
    given = options.from_namespace(parser.parse_args(["train", "x", "--shard-params"]))
    assert given["shard_params"] is True
    assert options.from_namespace(parser.parse_args(["train", "x"]))["shard_params"] is None
    no = parser.parse_args(["train", "x", "--no-shard-params"])
    assert options.from_namespace(no)["shard_params"] is False
    with pytest.raises(ValueError, match=r"run: shard_params must be True or False, got 1\."):
        options.check("shard_params", 1)
    cfg = options.resolve(experiment.get(TINY), {"shard_params": True, "num_processes": 4})
    assert cfg.shard_params is False and cfg.num_processes is None  # not taken on resume
    assert options.resolve(experiment.get(TINY), None, {"shard_params": True}).shard_params


def test_agreement_is_free_in_one_process():
    with cluster.checked_inputs():
        cluster.inputs_ok(1, 2, 3)
    assert cluster.first_signal(None) is None and cluster.first_signal(15) == 15
    with pytest.raises(ValueError, match="mine"), cluster.checked_inputs():
        raise ValueError("mine")


def test_flags_take_precedence_over_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert cluster.find_placement() == ("10.0.0.1:1234", 4, 3)
    assert cluster.find_placement("h:5", process_id=1) == ("h:5", 4, 1)
    assert cluster.find_placement(num_processes=1, process_id=0) == (None, 1, 0)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[3-4]")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "7000")
    assert cluster.find_placement() == ("gpu3:7000", 2, 1)
    assert cluster.find_placement("login:9") == ("login:9", 2, 1)


# ----------------------------------------------------------------------------- 8 devices, sharded


def test_sharded_training_matches_replicated(shard):
    """10 steps of batch 32 on 8 devices: Adam within 1e-4, SGD within 1e-5 (relative).

    Measured: Adam 4e-5 on parameters (entries whose gradient is near zero), 3e-6
    on the optimizer state, 2e-7 on the losses; SGD 1e-6.
    """
    a = shard["api"]
    c = a["chunk"]
    assert a["devices"] == 8 and c["steps"] == 10
    assert c["params_err"] < 1e-4 and c["opt_err"] < 1e-5 and c["loss_err"] < 1e-5, c
    assert c["vs_one_device"] < 1e-4, c
    assert a["sgd_params_err"] < 1e-5, a["sgd_params_err"]
    assert a["compiled_once"]


def test_sharded_leaves_split_on_their_largest_divisible_axis(shard):
    specs = shard["api"]["specs"]
    assert specs == {
        "0/b": "P()",  # 256 elements: below the 1024 threshold, replicated
        "0/w": "P(None, 'data')",  # (64, 256)
        "2/b": "P()",
        "2/w": "P('data',)",  # (256, 256): the first of equal axes
        "4/b": "P()",
        "4/w": "P('data',)",  # (256, 10)
    }
    assert shard["api"]["opt_specs"] == ["P('data',)", "P()", "P(None, 'data')"]


def test_sharded_bytes_per_device_are_an_eighth(shard):
    a = shard["api"]
    sh, rep = a["memory"]["sharded"], a["memory"]["replicated"]
    assert rep["params_bytes_per_device"] == rep["params_bytes"] == 340008
    assert sh["params_bytes_per_device"] == a["expected"]["params"] == 44328  # 0.130 of it
    assert sh["opt_state_bytes_per_device"] == a["expected"]["opt_state"] == 88660
    assert sh["params_bytes_per_device"] < rep["params_bytes"] / 7
    assert sh["opt_state_bytes_per_device"] < rep["opt_state_bytes"] / 7
    assert a["header"] == (
        "data parallel over 8 devices; parameters and optimizer state sharded: "
        "43.3 KiB + 86.6 KiB per device (whole: 332.0 KiB + 664.1 KiB)"
    )


def test_sharded_step_gathers_weights_in_xla(shard):
    hlo = shard["api"]["hlo"]
    assert hlo["all-gather"] >= 3, hlo  # one per sharded weight at least
    assert hlo["all-reduce"] + hlo["reduce-scatter"] >= 1, hlo


def test_sharded_checkpoints_load_replicated_and_back(shard):
    ck = shard["api"]["checkpoint"]
    assert ck["bitwise_8"] and ck["bitwise_1"] and ck["replicated"] == ["P()"]
    assert ck["sharded_bitwise"] and ck["sharded_bytes"] == 44328


def test_sharded_fbp_train_and_its_resume_without_sharding(shard):
    c = shard["cli"]
    assert c["rc_sharded"] == 0 and c["rc_s_to_r"] == 0, c["stderr_sharded"] + c["stderr_s_to_r"]
    p = c["summary_sharded"]["parallel"]
    assert p["shard_params"] and p["devices"] == 8 and p["processes"] == 1
    assert p["params_bytes_per_device"] < p["params_bytes"] / 6, p
    assert "parameters and optimizer state sharded" in c["stdout_sharded"]
    assert c["summary_sharded"]["config"]["shard_params"] is True
    resumed = c["resumed_s"]
    assert resumed["epochs_completed"] == 3 and resumed["config"]["shard_params"] is False
    assert resumed["parallel"]["shard_params"] is False
    assert "resuming from ckpt-000002: epoch 2" in c["stdout_s_to_r"]


def test_sharded_run_batch_that_does_not_split_over_the_devices(shard):
    c = shard["cli"]
    assert c["rc_batch"] == 2 and not c["batch_dir_exists"]
    assert c["stderr_batch"].splitlines() == [
        "fbp: error: run: batch_size: the global batch of 12 examples does not split evenly "
        "over 8 devices; use a batch size that is a multiple of 8."
    ]


@pytest.mark.slow
def test_sharded_and_replicated_runs_resumed_the_other_way_agree(tmp_path):
    rc, out, err = finish(start([str(HERE / "shard_worker.py"), str(tmp_path), "slow"], 8), 1800)
    r = result(out)
    assert rc == 0 and r is not None, err[-3000:]
    c = r["cli"]
    assert c["rc_replicated"] == 0 and c["rc_r_to_s"] == 0
    assert c["params_err_2"] < 1e-4 and c["params_err_3"] < 1e-4, c
    for k, v in c["summary_replicated"]["test"].items():
        assert abs(c["summary_sharded"]["test"][k] - v) <= 1e-5 * max(1.0, abs(v)), k
    assert c["resumed_r"]["parallel"]["shard_params"] is True
    more = r["api_more"]
    assert more["epoch_err"] < 1e-4 and more["step_err"] < 1e-4, more
    assert more["shard_state_bytes"] == 44328
