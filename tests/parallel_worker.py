"""Scenarios for tests/test_parallel.py, each run in a fresh process.

The device count is fixed when JAX starts, so the tests start this script with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and read the one JSON line it
prints last. Modes:

* ``devices``: one process, 8 CPU devices; agreement over 1/2/4/8 devices, the
  indivisible-batch errors, and a checkpoint saved on 8 devices resumed on 1 and 4.
* ``sweep``: 8 CPU devices; more optimizers and seeds (slow tests).
* ``multi CKPT_DIR [ADDRESS NUM_PROCESSES PROCESS_ID]``: one of several processes
  joined by ``fbp.distributed.parallel.initialize`` (or ``initialize_from_env`` without the
  three arguments); trains, evaluates, saves through
  ``fbp.distributed.parallel.save_checkpoint`` and reports its parameters' hash.
* ``cli OUT_DIR EXPERIMENT``: ``fbp train --devices`` through ``fbp.run.cli.main``.
* ``connect ADDRESS NUM_PROCESSES PROCESS_ID TIMEOUT``: only ``initialize``; reports
  the error it raised and how long it took (or is ended by the watchdog).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbp
from fbp import checkpoint, losses, nn, train
from fbp.distributed import parallel

fbp.configure_cpu()  # before the first computation, as a script does

N, FEATURES, CLASSES, BATCH = 320, 16, 5, 32  # 10 steps per epoch


def problem():
    x = jax.random.normal(jax.random.key(0), (N, FEATURES), jnp.float32)
    y = (jnp.arange(N) % CLASSES).astype(jnp.int32)
    model = nn.Sequential([nn.Dense(32), nn.Tanh(), nn.Dense(CLASSES)])
    return model, losses.softmax_cross_entropy, optax.adam(1e-2), x, y


def rel_errors(tree, ref):
    """Largest |a - b| / max|b| per leaf, and whether allclose(rtol=1e-5, atol=1e-6) holds."""
    a, b = jax.tree.leaves(parallel.to_host(tree)), jax.tree.leaves(parallel.to_host(ref))
    scaled = max(
        float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30))
        for u, v in zip(a, b, strict=True)
    )
    close = all(np.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b, strict=True))
    return scaled, close


def error_of(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def sha(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(parallel.to_host(tree)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def mode_devices() -> dict:
    model, loss, opt, x, y = problem()
    out: dict = {"devices": len(jax.devices())}
    ts0 = train.init(model, opt, jax.random.key(1), x)
    ref, ref_m = train.make_epoch(model, loss, opt, batch_size=BATCH)(ts0, x, y)
    ref_step = train.make_step(model, loss, opt)

    out["agree"], out["specs"], out["all_reduce"], epochs = {}, {}, {}, {}
    for n in (1, 2, 4, 8):
        mesh = parallel.make_mesh(n)
        epochs[n] = parallel.make_epoch(model, loss, opt, batch_size=BATCH, mesh=mesh)
        ts, m = epochs[n](parallel.replicate(ts0, mesh), x, y)
        err, close = rel_errors(ts.params, ref.params)
        opt_err, opt_close = rel_errors(ts.opt_state, ref.opt_state)
        out["agree"][str(n)] = {
            "params_err": err,
            "params_close": close,
            "opt_err": opt_err,
            "opt_close": opt_close,
            "loss_err": float(np.max(np.abs(np.asarray(m["loss"]) - np.asarray(ref_m["loss"])))),
            "steps": int(ts.step),
        }
        out["specs"][str(n)] = sorted(
            {str(leaf.sharding.spec) for leaf in jax.tree.leaves(ts)}
            | {str(m["loss"].sharding.spec)}
        )
        text = epochs[n].lower(parallel.replicate(ts0, mesh), x, y).compile().as_text()
        out["all_reduce"][str(n)] = {
            "count": len(re.findall(r"all-reduce(?:-start)?\(", text)),
            "local_batch_dot": f"f32[{BATCH // n},32]" in text,
        }

    # Batch statistics and dropout masks are global too: BatchNorm + Dropout on 8 devices.
    # (No bias before BatchNorm: its true gradient is 0, so its value is rounding noise.)
    bn_model = nn.Sequential(
        [
            nn.Dense(32, use_bias=False),
            nn.BatchNorm(),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Dense(CLASSES),
        ]
    )
    bn0 = train.init(bn_model, opt, jax.random.key(1), x)
    bn_ref, _ = train.make_epoch(bn_model, loss, opt, batch_size=BATCH)(bn0, x, y)
    bn_par, _ = parallel.make_epoch(
        bn_model, loss, opt, batch_size=BATCH, mesh=parallel.make_mesh(8)
    )(bn0, x, y)
    err, close = rel_errors(
        (bn_par.params, bn_par.model_state), (bn_ref.params, bn_ref.model_state)
    )
    out["batchnorm_dropout"] = {"err": err, "close": close}

    # The step API: 10 steps with an explicitly sharded batch vs train.make_step.
    mesh8 = parallel.make_mesh(8)
    step8 = parallel.make_step(model, loss, opt, mesh=mesh8)
    ts_ref, ts_par = ts0, parallel.replicate(ts0, mesh8)
    for i in range(10):
        xb, yb = x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]
        ts_ref, _ = ref_step(ts_ref, xb, yb)
        ts_par, _ = step8(ts_par, parallel.shard_batch(xb, mesh8), parallel.shard_batch(yb, mesh8))
    err, close = rel_errors(ts_par.params, ts_ref.params)
    out["step_api"] = {"params_err": err, "params_close": close}
    out["shard_spec"] = str(parallel.shard_batch(x[:BATCH], mesh8).sharding.spec)

    # The runner's chunk signature (ts, x, y, order), on 4 devices.
    from fbp.run import runner

    order = jax.random.permutation(jax.random.key(5), N).reshape(N // BATCH, BATCH)
    ref_c, _ = runner.make_train_chunk(model, loss, opt)(ts0, x, y, order)
    chunk4 = parallel.make_train_chunk(model, loss, opt, mesh=4, batch_size=BATCH)
    par_c, _ = chunk4(ts0, x, y, order)
    err, close = rel_errors(par_c, ref_c)
    out["chunk"] = {
        "err": err,
        "close": close,
        "step": int(par_c.step),
        "devices": len(par_c.params["0"]["w"].sharding.device_set),
    }

    out["errors"] = {
        "make_epoch": error_of(
            lambda: parallel.make_epoch(model, loss, opt, batch_size=30, mesh=mesh8)
        ),
        "shard_batch": error_of(lambda: parallel.shard_batch(x[:30], mesh8)),
        "step": error_of(lambda: step8(parallel.replicate(ts0, mesh8), x[:12], y[:12])),
        "too_many": error_of(lambda: parallel.make_mesh(9)),
        "chunk": error_of(
            lambda: parallel.make_train_chunk(model, loss, opt, mesh=8, batch_size=20)
        ),
    }

    # Save on 8 devices after one epoch, resume on 1 and 4; compare with 8 going on.
    ts8, _ = epochs[8](parallel.replicate(ts0, mesh8), x, y)
    with tempfile.TemporaryDirectory() as d:
        path = parallel.save_checkpoint(d, ts8, meta={"epoch": 1})
        ts8_next, _ = epochs[8](ts8, x, y)
        out["resume"] = {}
        for n in (1, 4):
            mesh = parallel.make_mesh(n)
            restored, meta = parallel.load_checkpoint(path, ts0, mesh)
            same = sha(restored) == sha(ts8)
            ts_n, _ = epochs[n](restored, x, y)
            err, close = rel_errors(ts_n, ts8_next)
            out["resume"][str(n)] = {
                "restored_bitwise": same,
                "meta_epoch": meta["epoch"],
                "restored_devices": len(jax.tree.leaves(restored)[0].sharding.device_set),
                "err": err,
                "close": close,
                "step": int(ts_n.step),
            }
    return out


def mode_sweep() -> dict:
    """More trials: optimizers x seeds x device counts, 10 steps each."""
    model, loss, _, _, _ = problem()
    optimizers = {
        "sgd": optax.sgd(0.1),
        "momentum": optax.sgd(0.1, momentum=0.9),
        "adam": optax.adam(1e-2),
        "adamw": optax.adamw(1e-2, weight_decay=1e-2),
        "rmsprop": optax.rmsprop(1e-3),
    }
    out = {}
    for name, opt in optimizers.items():
        ref_epoch = train.make_epoch(model, loss, opt, batch_size=BATCH)
        epochs = {
            n: parallel.make_epoch(model, loss, opt, batch_size=BATCH, mesh=parallel.make_mesh(n))
            for n in (2, 4, 8)
        }
        for seed in range(3):
            x = jax.random.normal(jax.random.key(10 + seed), (N, FEATURES), jnp.float32)
            y = jax.random.randint(jax.random.key(20 + seed), (N,), 0, CLASSES)
            ts0 = train.init(model, opt, jax.random.key(seed), x)
            ref, _ = ref_epoch(ts0, x, y)
            for n, epoch in epochs.items():
                ts, _ = epoch(ts0, x, y)
                err, close = rel_errors(ts.params, ref.params)
                out[f"{name}/seed{seed}/{n}"] = {"err": err, "close": close}
    return out


def mode_multi(ckpt_dir: str, *how: str) -> dict:
    """``how`` is ADDRESS NUM_PROCESSES PROCESS_ID, or empty to read them from the env."""
    t0 = time.perf_counter()
    if how:
        parallel.initialize(how[0], int(how[1]), int(how[2]), timeout=60)
        joined = True
    else:
        joined = parallel.initialize_from_env(timeout=60)
    out = {
        "joined_from_env": not how and joined,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "init_seconds": time.perf_counter() - t0,
    }
    model, loss, opt, x, y = problem()
    ts0 = train.init(model, opt, jax.random.key(1), x)
    mesh = parallel.make_mesh()
    epoch = parallel.make_epoch(model, loss, opt, batch_size=BATCH, mesh=mesh)
    ts = parallel.replicate(ts0, mesh)
    for e in range(2):
        ts, m = epoch(ts, x, y)
        path = parallel.save_checkpoint(
            ckpt_dir, ts, meta={"epoch": e + 1, "writer": jax.process_index()}
        )
        out.setdefault("saved", []).append(None if path is None else str(path))
    out["losses"] = [float(v) for v in np.asarray(m["loss"])]
    out["params_sha"] = sha(ts.params)
    out["step"] = int(ts.step)
    # The same two epochs on this process's first device alone.
    local = train.make_epoch(model, loss, opt, batch_size=BATCH)
    ref = ts0
    for _ in range(2):
        ref, _ = local(ref, x, y)
    err, close = rel_errors(ts.params, ref.params)
    out["vs_local"] = {"err": err, "close": close}
    # 10 steps on batches that each process loads only half of.
    step = parallel.make_step(model, loss, opt, mesh=mesh)
    ref_step = train.make_step(model, loss, opt)
    ts_p, ts_r = parallel.replicate(ts0, mesh), ts0
    half = BATCH // jax.process_count()
    lo = jax.process_index() * half
    for i in range(10):
        xb, yb = x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]
        xg, yg = parallel.shard_batch(
            (xb[lo : lo + half], yb[lo : lo + half]), mesh, process_local=True
        )
        ts_p, _ = step(ts_p, xg, yg)
        ts_r, _ = ref_step(ts_r, xb, yb)
    err, close = rel_errors(ts_p.params, ts_r.params)
    out["local_batches"] = {
        "err": err,
        "close": close,
        "global_rows": int(xg.shape[0]),
        "sha": sha(ts_p.params),
    }
    out["is_main"] = parallel.is_main_process()
    out["test_loss"] = train.evaluate(model, loss, ts.params, x, y)["loss"]
    restored, _ = parallel.load_checkpoint(checkpoint.list_checkpoints(ckpt_dir)[-1], ts0, mesh)
    out["restored_sha"] = sha(restored.params)
    return out


def mode_cli(out_dir: str, experiment: str) -> dict:
    """``fbp train --devices``: 4 devices, an indivisible count, a resume on 2 devices.

    Started without XLA_FLAGS: ``--devices`` itself splits the CPU.
    """
    import contextlib
    import io

    from fbp.run import cli

    out: dict = {}
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        out["rc_4"] = cli.main(["train", experiment, "--devices", "4", "--out", out_dir])
        out["devices_after_4"] = len(jax.devices())
        out["summary_4"] = json.loads((Path(out_dir) / "summary.json").read_text())
        out["rc_3"] = cli.main(["train", experiment, "--devices", "3", "--out", out_dir + "-3"])
        out["rc_resume"] = cli.main(
            ["train", experiment, "--devices", "2", "--resume", "--epochs", "6", "--out", out_dir]
        )
        out["summary_resume"] = json.loads((Path(out_dir) / "summary.json").read_text())
    out["stderr"] = err.getvalue()
    return out


def mode_connect(address: str, num_processes: str, process_id: str, timeout: str) -> dict:
    t0 = time.perf_counter()
    try:
        parallel.initialize(address, int(num_processes), int(process_id), timeout=float(timeout))
    except (TimeoutError, ValueError) as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> None:
    modes = {
        "devices": mode_devices,
        "sweep": mode_sweep,
        "multi": mode_multi,
        "connect": mode_connect,
        "cli": mode_cli,
    }
    out = modes[argv[0]](*argv[1:])
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
