"""Data-parallel and multi-process training (fbp/parallel.py).

The device count is fixed when JAX starts, so scenarios with 2-8 devices or
several processes run tests/parallel_worker.py in fresh processes with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (several checks per process,
since start-up is the cost). Checks that need no extra devices run here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

from fbp import losses, nn, train
from fbp.distributed import cluster, parallel

WORKER = str(Path(__file__).with_name("parallel_worker.py"))


def worker_env(devices: int | None) -> dict[str, str]:
    """The test's environment without cluster variables; ``devices`` CPU devices (None: unset)."""
    cluster = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(cluster)
    }
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("JAX_ENABLE_X64", None)
    return env


def start(
    args: list[str], devices: int | None, cwd: str | None = None, env: dict | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        env={**worker_env(devices), **(env or {})},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, dict | None, str]:
    """Wait (killing the worker after ``timeout`` s); return (status, RESULT json, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker {proc.args[2:]} still running after {timeout} s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, json.loads(lines[-1][7:]) if lines else None, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_problem(dtype=jnp.float64):
    x = jax.random.normal(jax.random.key(0), (48, 5), dtype)
    y = (jnp.arange(48) % 3).astype(jnp.int32)
    model = nn.Sequential([nn.Dense(8), nn.Tanh(), nn.Dense(3)])
    return model, losses.softmax_cross_entropy, optax.adam(1e-2), x, y


# ----------------------------------------------------------------------------- in this process


# Default runs check this exactness in the 8-device worker (n=1, float32).
@pytest.mark.slow
def test_one_device_epoch_is_bitwise_train_make_epoch():
    model, loss, opt, x, y = small_problem()
    ts0 = train.init(model, opt, jax.random.key(1), x)
    ref, ref_m = train.make_epoch(model, loss, opt, batch_size=12)(ts0, x, y)
    mesh = parallel.make_mesh(1)
    ts, m = parallel.make_epoch(model, loss, opt, batch_size=12, mesh=mesh)(
        parallel.replicate(ts0, mesh), x, y
    )
    for a, b in zip(
        jax.tree.leaves(parallel.to_host(ts)), jax.tree.leaves(parallel.to_host(ref)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m["loss"], ref_m["loss"])
    assert int(ts.step) == 4
    assert all(leaf.sharding.spec == jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(ts))


def test_epoch_sees_numpy_data_changed_in_place():
    model, loss, opt, x, y = small_problem()
    ts0 = train.init(model, opt, jax.random.key(1), x)
    epoch = parallel.make_epoch(model, loss, opt, batch_size=12, mesh=parallel.make_mesh(1))
    xn = np.asarray(x).copy()
    loss1 = np.asarray(epoch(ts0, xn, y)[1]["loss"])  # wait before changing the buffer
    xn *= 2.0  # same object, new values: must not be served from a stale copy
    _, m2 = epoch(ts0, xn, y)
    _, m_ref = epoch(ts0, jnp.asarray(xn), y)
    np.testing.assert_array_equal(m2["loss"], m_ref["loss"])
    assert not np.array_equal(loss1, m2["loss"])


@pytest.mark.slow
def test_step_api_on_one_device_matches_train_make_step():
    model, loss, opt, x, y = small_problem()
    ts0 = train.init(model, opt, jax.random.key(1), x)
    mesh = parallel.make_mesh(1)
    ref, _ = train.make_step(model, loss, opt)(ts0, x[:16], y[:16])
    ts, metrics = parallel.make_step(model, loss, opt, mesh=mesh)(ts0, x[:16], y[:16])
    np.testing.assert_array_equal(ts.params["2"]["w"], ref.params["2"]["w"])
    assert set(metrics) == {"loss", "grad_norm", "skipped"}


@pytest.mark.slow
def test_train_chunk_on_one_device_is_bitwise_the_runners():
    from fbp.run import runner

    model, loss, opt, x, y = small_problem()
    ts0 = train.init(model, opt, jax.random.key(1), x)
    order = jax.random.permutation(jax.random.key(2), 48).reshape(4, 12)
    ref, ref_m = runner.make_train_chunk(model, loss, opt)(ts0, x, y, order)
    ts, m = parallel.make_train_chunk(model, loss, opt, mesh=1, batch_size=12)(ts0, x, y, order)
    for a, b in zip(
        jax.tree.leaves(parallel.to_host(ts)), jax.tree.leaves(parallel.to_host(ref)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m["loss"], ref_m["loss"])


def test_train_chunk_checks_devices_and_batch():
    model, loss, opt, _, _ = small_problem()
    have = len(jax.devices())
    with pytest.raises(ValueError, match=rf"asked for {have + 1} devices but only {have}"):
        parallel.make_train_chunk(model, loss, opt, mesh=have + 1)
    with pytest.raises(
        ValueError,
        match=r"make_train_chunk: the global batch of 20 examples does "
        r"not split evenly over 8 devices",
    ):
        parallel.make_train_chunk(
            model, loss, opt, mesh=AbstractMesh((8,), ("data",)), batch_size=20
        )


def test_process_local_batch_in_one_process_is_the_whole_batch():
    mesh = parallel.make_mesh(1)
    x = np.arange(12.0).reshape(6, 2)
    a = parallel.shard_batch(x, mesh, process_local=True)
    np.testing.assert_array_equal(a, x)
    assert a.sharding == parallel.batch_sharding(mesh)


def test_replicate_to_host_round_trip_keeps_prng_keys():
    model, _, opt, x, _ = small_problem()
    ts = train.init(model, opt, jax.random.key(3), x)
    mesh = parallel.make_mesh(1)
    host = parallel.to_host(ts)
    assert isinstance(host.key, np.ndarray) and host.key.dtype == np.uint32
    back = parallel.replicate(host, mesh, like=ts)
    assert jax.dtypes.issubdtype(back.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(ts.key))
    np.testing.assert_array_equal(back.params["0"]["w"], ts.params["0"]["w"])


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_make_mesh_rejects_bad_counts(n):
    with pytest.raises(ValueError, match=r"make_mesh: n must be a positive int, got"):
        parallel.make_mesh(n)


def test_request_cpu_devices_before_and_after_jax_starts():
    jax.devices()
    assert parallel.request_cpu_devices(len(jax.devices()) + 1) is False  # too late here
    code = (
        "from fbp import parallel; import jax; print(parallel.request_cpu_devices(3), "
        "len(jax.devices()), parallel.request_cpu_devices(5))"
    )
    env = worker_env(None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["True", "3", "False"], out.stderr[-2000:]


def test_make_mesh_names_missing_devices():
    have = len(jax.devices())
    with pytest.raises(
        ValueError,
        match=rf"asked for {have + 1} devices but only {have} are available.*"
        rf"xla_force_host_platform_device_count={have + 1}",
    ):
        parallel.make_mesh(have + 1)


def test_indivisible_batch_names_both_numbers():
    model, loss, opt, x, _ = small_problem()
    mesh = AbstractMesh((8,), ("data",))
    msg = r"the global batch of 30 examples does not split evenly over 8 devices.*multiple of 8"
    with pytest.raises(ValueError, match="fbp.distributed.parallel.make_epoch: " + msg):
        parallel.make_epoch(model, loss, opt, batch_size=30, mesh=mesh)
    with pytest.raises(ValueError, match="shard_batch: " + msg):
        parallel.shard_batch(np.zeros((30, 5)), mesh)
    with pytest.raises(ValueError, match=r"shard_batch: got a scalar"):
        parallel.shard_batch(np.float32(1.0), mesh)


def test_mesh_without_data_axis_is_refused():
    with pytest.raises(
        ValueError, match=r"mesh has axes \('model',\) but fbp.distributed.parallel needs"
    ):
        parallel.check_batch(8, AbstractMesh((2,), ("model",)))


@pytest.mark.parametrize(
    "address", ["localhost", "127.0.0.1:", ":1234", "host:0", "host:70000", "host:port"]
)
def test_initialize_rejects_malformed_address(address):
    with pytest.raises(ValueError, match=r"coordinator_address must be HOST:PORT"):
        parallel.initialize(address, 2, 1, timeout=1)


@pytest.mark.parametrize(
    "num, pid, timeout, match",
    [
        (2, 2, 1, r"process_id must be in 0\.\.1 \(num_processes=2\), got 2\."),
        (2, -1, 1, r"process_id must be in 0\.\.1 \(num_processes=2\), got -1\."),
        (0, 0, 1, r"num_processes must be >= 1, got 0\."),
        (2, 1.0, 1, r"process_id must be an int, got 1.0"),
        (2, 1, 0, r"timeout must be positive seconds, got 0"),
    ],
)
def test_initialize_rejects_bad_arguments(num, pid, timeout, match):
    with pytest.raises(ValueError, match=match):
        parallel.initialize("127.0.0.1:1234", num, pid, timeout=timeout)


def test_unreachable_coordinator_raises_after_timeout():
    """Process 1 with nothing listening at the address: a TimeoutError, here, in ~1 s."""
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(
        TimeoutError,
        match=rf"process 1 of 2 found no coordinator at {address} "
        r"within 1 s.*Start process 0 first",
    ):
        parallel.initialize(address, 2, 1, timeout=1)
    assert 0.9 < time.perf_counter() - t0 < 10
    assert jax.process_count() == 1  # never reached jax.distributed


@pytest.mark.parametrize(
    "nodes, first",
    [("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-005],cpu1", "gpu003"), ("a[7,9-12]", "a7")],
)
def test_first_slurm_host(nodes, first):
    assert parallel.first_slurm_host(nodes) == first


CLUSTER_VARS = [
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_COORDINATOR_PORT",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
]


@pytest.fixture
def calls(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(cluster, "initialize", lambda *a, **k: seen.append((a, k)))
    return seen


def test_initialize_from_env_single_process_does_nothing(calls, monkeypatch):
    assert parallel.initialize_from_env() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize_from_env() is False
    assert calls == []


def test_initialize_from_env_reads_jax_variables(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:9876")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # explicit variables win over SLURM's
    assert parallel.initialize_from_env(timeout=7) is True
    assert calls == [(("10.0.0.1:9876", 4, 3), {"timeout": 7, "exit_code": 1})]


def test_initialize_from_env_reads_slurm(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "4097")
    assert parallel.initialize_from_env() is True
    assert calls[-1][0] == (f"node017:{4097 % 4096 + 61440}", 4, 2)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "5000")
    parallel.initialize_from_env()
    assert calls[-1][0] == ("node017:5000", 4, 2)


def test_initialize_from_env_errors(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:9876")
    with pytest.raises(ValueError, match=r"set all of JAX_COORDINATOR_ADDRESS.*or none"):
        parallel.initialize_from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an int"):
        parallel.initialize_from_env()
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ValueError, match=r"SLURM_NTASKS > 1 but SLURM_STEP_NODELIST/SLURM_PROCID"):
        parallel.initialize_from_env()
    assert calls == []


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module", autouse=True)
def eight_devices_worker(request):
    """Start the 8-device scenario when this module starts, so it overlaps the tests here."""
    wanted = any(
        "eight_devices" in getattr(item, "fixturenames", ())
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    )
    proc = start(["devices"], 8) if wanted else None
    yield proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def eight_devices(eight_devices_worker) -> dict:
    rc, result, err = finish(eight_devices_worker, timeout=300)
    assert rc == 0 and result is not None, err[-3000:]
    assert result["devices"] == 8
    return result


@pytest.mark.parametrize("n", ["1", "2", "4", "8"])
def test_ten_steps_agree_over_device_counts(eight_devices, n):
    """Same global batch, 10 Adam steps: params and optimizer state within rtol 1e-5."""
    r = eight_devices["agree"][n]
    assert r["steps"] == 10
    assert r["params_close"] and r["opt_close"], r
    assert r["params_err"] < 1e-5 and r["opt_err"] < 1e-5 and r["loss_err"] < 1e-5, r
    if n == "1":
        assert r["params_err"] == 0.0  # one device: exactly fbp.train.make_epoch


@pytest.mark.parametrize("n", ["1", "2", "4", "8"])
def test_state_replicated_and_gradient_all_reduced_by_xla(eight_devices, n):
    assert eight_devices["specs"][n] == ["P()"]
    hlo = eight_devices["all_reduce"][n]
    assert hlo["local_batch_dot"], "each device should multiply only its slice of the batch"
    assert (hlo["count"] >= 1) == (n != "1"), hlo


def test_batchnorm_statistics_and_dropout_masks_are_global(eight_devices):
    r = eight_devices["batchnorm_dropout"]
    assert r["close"] and r["err"] < 1e-5, r


def test_step_api_with_sharded_batch_agrees(eight_devices):
    assert eight_devices["shard_spec"] == "P('data',)"
    assert eight_devices["step_api"]["params_close"], eight_devices["step_api"]
    assert eight_devices["step_api"]["params_err"] < 1e-5


def test_indivisible_batch_on_eight_devices(eight_devices):
    e = eight_devices["errors"]
    assert e["make_epoch"].startswith(
        "fbp.distributed.parallel.make_epoch: the global batch of 30 examples "
        "does not split evenly over 8 devices"
    )
    assert "global batch of 30 examples does not split evenly over 8 devices" in e["shard_batch"]
    assert "global batch of 12 examples does not split evenly over 8 devices" in e["step"]
    assert "asked for 9 devices but only 8 are available" in e["too_many"]
    assert "global batch of 20 examples does not split evenly over 8 devices" in e["chunk"]


def test_runner_chunk_signature_on_four_devices(eight_devices):
    c = eight_devices["chunk"]
    assert c["devices"] == 4 and c["step"] == 10
    assert c["close"] and c["err"] < 1e-5, c


@pytest.mark.parametrize("n", ["1", "4"])
def test_checkpoint_from_eight_devices_resumes_on_fewer(eight_devices, n):
    r = eight_devices["resume"][n]
    assert r["restored_bitwise"] and r["meta_epoch"] == 1
    assert r["restored_devices"] == int(n)
    assert r["step"] == 20
    assert r["close"] and r["err"] < 1e-5, r


# ----------------------------------------------------------------------------- processes


def test_two_processes_train_the_same_parameters(tmp_path):
    """2 processes x 2 CPU devices: equal parameters everywhere, only process 0 writes.

    Process 0 gets its place from arguments (``initialize``), process 1 from the
    environment (``initialize_from_env``).
    """
    address = f"127.0.0.1:{free_port()}"
    ckpt = tmp_path / "ckpt"
    dirs = [tmp_path / f"cwd{i}" for i in range(2)]
    for d in dirs:
        d.mkdir()
    env1 = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    procs = [
        start(["multi", str(ckpt), address, "2", "0"], 2, cwd=str(dirs[0])),
        start(["multi", str(ckpt)], 2, cwd=str(dirs[1]), env=env1),
    ]
    results = []
    for p in procs:
        rc, result, err = finish(p, timeout=180)
        assert rc == 0 and result is not None, err[-3000:]
        results.append(result)
    r0, r1 = results
    assert [r0["process_index"], r1["process_index"]] == [0, 1]
    assert r0["global_devices"] == r1["global_devices"] == 4
    assert r0["local_devices"] == r1["local_devices"] == 2
    assert r0["step"] == r1["step"] == 20
    assert r0["params_sha"] == r1["params_sha"] == r0["restored_sha"] == r1["restored_sha"]
    assert r0["losses"] == r1["losses"]
    assert r0["vs_local"]["close"] and r0["vs_local"]["err"] < 1e-5  # == one device
    assert r0["is_main"] and not r1["is_main"]
    assert r1["joined_from_env"] and not r0["joined_from_env"]
    # Each process loaded half of every batch: the same steps as whole batches on one device.
    for r in results:
        assert r["local_batches"]["global_rows"] == 32
        assert r["local_batches"]["close"] and r["local_batches"]["err"] < 1e-5, r
    assert r0["local_batches"]["sha"] == r1["local_batches"]["sha"]
    assert r0["test_loss"] == r1["test_loss"]
    # Only process 0 wrote: two checkpoints (one per save), both by writer 0; none by 1.
    assert r1["saved"] == [None, None]
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ckpt-000001", "ckpt-000002"], names
    assert [Path(p).name for p in r0["saved"]] == names
    for name in names:
        meta = json.loads((ckpt / name / "manifest.json").read_text())["meta"]
        assert meta["writer"] == 0
    assert [list(d.iterdir()) for d in dirs] == [[], []]


def test_missing_peer_ends_with_message_not_hang():
    """Process 0 of 2 whose peer never starts: exits 1 with a message after the timeout."""
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    rc, result, err = finish(start(["connect", address, "2", "0", "3"], 1), timeout=90)
    seconds = time.perf_counter() - t0
    assert rc == 1 and result is None
    assert f"process 0 of 2 could not join the run coordinated at {address} within 3 s" in err
    assert seconds < 60, seconds


@pytest.mark.slow
def test_more_optimizers_and_seeds_agree_over_device_counts():
    rc, result, err = finish(start(["sweep"], 8), timeout=900)
    assert rc == 0 and result is not None, err[-3000:]
    assert len(result) == 5 * 3 * 3
    bad = {k: v for k, v in result.items() if not (v["close"] and v["err"] < 1e-5)}
    assert not bad, bad


@pytest.mark.slow
def test_four_single_device_processes(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    procs = [start(["multi", str(tmp_path / "ckpt"), address, "4", str(i)], 1) for i in range(4)]
    results = []
    for p in procs:
        rc, result, err = finish(p, timeout=600)
        assert rc == 0 and result is not None, err[-3000:]
        results.append(result)
    assert [r["process_index"] for r in results] == [0, 1, 2, 3]
    assert all(r["global_devices"] == 4 and r["local_devices"] == 1 for r in results)
    assert len({r["params_sha"] for r in results}) == 1
    assert len({r["local_batches"]["sha"] for r in results}) == 1
    assert all(r["vs_local"]["close"] and r["local_batches"]["close"] for r in results)
    assert [r["saved"] == [None, None] for r in results] == [False, True, True, True]
    assert len(list((tmp_path / "ckpt").iterdir())) == 2


@pytest.mark.slow
def test_non_jax_server_at_address_ends_with_message_not_hang():
    """Something else listens at the address: process 1 is ended by the watchdog."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        rc, result, err = finish(start(["connect", address, "2", "1", "3"], 1), timeout=90)
    assert rc == 1 and result is None
    assert f"process 1 of 2 could not join the run coordinated at {address} within 3 s" in err


@pytest.mark.slow
def test_unresolvable_coordinator_host_times_out():
    rc, result, err = finish(start(["connect", "no-such-host.invalid:1234", "2", "1", "2"], 1), 90)
    assert rc == 0, err[-2000:]
    assert result["error"] == "TimeoutError"
    assert "found no coordinator at no-such-host.invalid:1234 within 2 s" in result["message"]
    assert result["seconds"] < 10


# ----------------------------------------------------------------------------- fbp train --devices

TINY = str(Path(__file__).with_name("experiments") / "tiny.py")


@pytest.mark.slow  # a long trial: -m slow
def test_fbp_train_devices_matches_one_device_and_resumes_on_fewer(tmp_path):
    from fbp.run import experiment, runner

    proc = start(["cli", str(tmp_path / "dp"), TINY], None)  # --devices splits the CPU itself
    runner.run(experiment.get(TINY), out=tmp_path / "ref", print_fn=lambda s: None)
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    rc, r, err = finish(proc, timeout=300)
    assert rc == 0 and r is not None, err[-3000:]
    assert r["rc_4"] == 0 and r["devices_after_4"] == 4
    s4 = r["summary_4"]
    assert s4["config"]["devices"] == 4 and s4["steps"] == ref_summary["steps"]
    for k, v in ref_summary["test"].items():
        assert abs(s4["test"][k] - v) <= 1e-5 * max(1.0, abs(v)), (k, s4["test"][k], v)
    assert r["rc_3"] == 2
    assert "global batch of 16 examples does not split evenly over 3 devices" in r["stderr"]
    assert r["rc_resume"] == 0
    assert r["summary_resume"]["config"]["devices"] == 2
    assert r["summary_resume"]["epochs_completed"] == 6
