"""Sharded parameters on 8 CPU devices, for tests/test_distributed.py (a fresh process).

Started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one
``RESULT {json}`` line. ``python shard_worker.py OUT_DIR [slow]`` runs:

* ``api``: sharded against replicated training through ``make_train_chunk``,
  ``make_epoch`` and ``make_step`` (10 Adam steps of batch 32); the leaves'
  partition specs; bytes per device from the arrays' addressable shards; XLA's
  collectives; a sharded checkpoint loaded replicated.
* ``cli``: ``fbp train tests/experiments/wide.py --devices 8 --shard-params``
  resumed without sharding; a batch that does not split over 8 devices; with
  ``slow``, also the unsharded run resumed sharded.
* ``api_more`` (``slow``): ``make_epoch`` and ``make_step`` with sharded parameters.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbp
from fbp import checkpoint, losses, nn, train
from fbp.distributed import parallel
from fbp.run import cli

fbp.configure_cpu()  # before the first computation, as a script does

N, FEATURES, CLASSES, BATCH = 320, 64, 10, 32
WIDE = str(Path(__file__).with_name("experiments") / "wide.py")


def rel_err(tree, ref) -> float:
    """Largest |a - b| / max|b| over the leaves (float leaves only)."""
    a, b = jax.tree.leaves(parallel.to_host(tree)), jax.tree.leaves(parallel.to_host(ref))
    return max(
        float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30))
        for u, v in zip(a, b, strict=True)
        if np.issubdtype(v.dtype, np.floating)
    )


def expected_bytes(tree, n: int) -> int:
    """Bytes per device if every leaf that ``leaf_spec`` splits holds 1/n of itself."""
    return sum(
        x.nbytes // n
        if parallel.leaf_spec(x.shape, n) != jax.sharding.PartitionSpec()
        else x.nbytes
        for x in jax.tree.leaves(parallel.to_host(tree))
    )


def mode_api() -> dict:
    x = jax.random.normal(jax.random.key(0), (N, FEATURES), jnp.float32)
    y = (jnp.arange(N) % CLASSES).astype(jnp.int32)
    model = nn.Sequential([nn.Dense(256), nn.Tanh(), nn.Dense(256), nn.Tanh(), nn.Dense(CLASSES)])
    loss, opt = losses.softmax_cross_entropy, optax.adam(1e-3)
    ts0 = train.init(model, opt, jax.random.key(1), x)
    mesh = parallel.make_mesh(8)
    order = jax.random.permutation(jax.random.key(2), N).reshape(N // BATCH, BATCH)
    out: dict = {"devices": len(jax.devices())}

    rep = parallel.make_train_chunk(model, loss, opt, mesh=mesh, batch_size=BATCH)
    sh = parallel.make_train_chunk(model, loss, opt, mesh=mesh, batch_size=BATCH, shard_params=True)
    ts_rep, m_rep = rep(ts0, x, y, order)
    ts_sh, m_sh = sh(ts0, x, y, order)
    ref, _ = train.make_chunk(model, loss, opt)(ts0, x, y, order)
    out["chunk"] = {
        "steps": int(ts_sh.step),
        "params_err": rel_err(ts_sh.params, ts_rep.params),
        "opt_err": rel_err(ts_sh.opt_state, ts_rep.opt_state),
        "loss_err": float(np.max(np.abs(np.asarray(m_sh["loss"]) - np.asarray(m_rep["loss"])))),
        "vs_one_device": rel_err(ts_sh.params, ref.params),
    }
    # Plain SGD: no normalisation by the gradient's size, so rounding stays at rounding.
    sgd = optax.sgd(0.05)
    ts_sgd = train.init(model, sgd, jax.random.key(1), x)
    a, _ = parallel.make_train_chunk(model, loss, sgd, mesh=mesh)(ts_sgd, x, y, order)
    b, _ = parallel.make_train_chunk(model, loss, sgd, mesh=mesh, shard_params=True)(
        ts_sgd, x, y, order
    )
    out["sgd_params_err"] = rel_err(b.params, a.params)
    out["adam_replicated_vs_one_device"] = rel_err(ts_rep.params, ref.params)
    out["specs"] = {
        "/".join(str(getattr(k, "key", k)) for k in path): str(leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(ts_sh.params)[0]
    }
    out["opt_specs"] = sorted(
        {str(leaf.sharding.spec) for leaf in jax.tree.leaves(ts_sh.opt_state)}
    )
    out["memory"] = {"sharded": sh.layout.memory(), "replicated": rep.layout.memory()}
    out["expected"] = {
        "params": expected_bytes(ts_sh.params, 8),
        "opt_state": expected_bytes(ts_sh.opt_state, 8),
    }
    out["header"] = parallel.describe_memory(sh.layout.memory())
    text = sh.lower(ts0, x, y, order).compile().as_text()
    out["hlo"] = {
        op: len(re.findall(op + r"(?:-start)?\(", text))
        for op in ("all-gather", "all-reduce", "reduce-scatter")
    }
    # The step is traced once: a second chunk reuses the compiled program.
    sh(ts_sh, x, y, order)
    out["compiled_once"] = len(sh._jitted) == 1

    # A sharded state saved, then loaded replicated on 8 and on 1 device: the same numbers.
    with tempfile.TemporaryDirectory() as d:
        path = parallel.save_checkpoint(d, ts_sh)
        back8, _ = parallel.load_checkpoint(path, ts0, mesh)
        back1, _ = parallel.load_checkpoint(path, ts0, parallel.make_mesh(1))
        out["checkpoint"] = {
            "bitwise_8": rel_err(back8, ts_sh) == 0.0,
            "bitwise_1": rel_err(back1, ts_sh) == 0.0,
            "replicated": sorted({str(v.sharding.spec) for v in jax.tree.leaves(back8.params)}),
        }
        # ... and a replicated one loaded, then sharded: the same numbers, split.
        path = parallel.save_checkpoint(d, ts_rep)
        host, _ = checkpoint.load(path, ts0)
        split = parallel.shard_state(host, mesh)
        out["checkpoint"]["sharded_bitwise"] = rel_err(split, ts_rep) == 0.0
        out["checkpoint"]["sharded_bytes"] = parallel.bytes_per_device(split.params)
    return out


def mode_api_more() -> dict:
    """``make_epoch`` and ``make_step`` with sharded parameters (slow tests)."""
    x = jax.random.normal(jax.random.key(0), (N, FEATURES), jnp.float32)
    y = (jnp.arange(N) % CLASSES).astype(jnp.int32)
    model = nn.Sequential([nn.Dense(256), nn.Tanh(), nn.Dense(256), nn.Tanh(), nn.Dense(CLASSES)])
    loss, opt = losses.softmax_cross_entropy, optax.adam(1e-3)
    ts0 = train.init(model, opt, jax.random.key(1), x)
    mesh = parallel.make_mesh(8)
    out: dict = {}
    # make_epoch and make_step with sharded parameters.
    ep_rep = parallel.make_epoch(model, loss, opt, batch_size=BATCH, mesh=mesh)
    ep_sh = parallel.make_epoch(model, loss, opt, batch_size=BATCH, mesh=mesh, shard_params=True)
    a, _ = ep_rep(ts0, x, y)
    b, _ = ep_sh(ts0, x, y)
    out["epoch_err"] = rel_err(b.params, a.params)
    st_sh = parallel.make_step(model, loss, opt, mesh=mesh, shard_params=True)
    st_ref = train.make_step(model, loss, opt)
    t_sh, t_ref = parallel.shard_state(ts0, mesh), ts0
    for i in range(5):
        xb, yb = x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]
        t_sh, _ = st_sh(t_sh, xb, yb)
        t_ref, _ = st_ref(t_ref, xb, yb)
    out["step_err"] = rel_err(t_sh.params, t_ref.params)
    out["shard_state_bytes"] = parallel.bytes_per_device(parallel.shard_state(ts0, mesh).params)

    return out


def latest_params(run_dir: Path) -> dict[str, np.ndarray]:
    path = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    arrays, _ = checkpoint.read_arrays(path)
    return {k: v for k, v in arrays.items() if k.startswith("state/params/")}


def mode_cli(out_dir: str, slow: bool) -> dict:
    """Sharded run, resumed unsharded; a batch that does not split (with ``slow``: the
    unsharded run too, resumed sharded)."""
    root = Path(out_dir)
    s, r = root / "sharded", root / "replicated"
    common = ["train", WIDE, "--devices", "8", "--epochs", "2"]
    resume = ["train", WIDE, "--devices", "8", "--epochs", "3", "--resume"]
    out: dict = {}

    def run(name, args):
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            out[f"rc_{name}"] = cli.main(args)
        out[f"stdout_{name}"], out[f"stderr_{name}"] = so.getvalue(), se.getvalue()

    run("sharded", [*common, "--shard-params", "--out", str(s)])
    out["summary_sharded"] = json.loads((s / "summary.json").read_text())
    out["params_sharded"] = {k: v.tolist() for k, v in latest_params(s).items()}
    run("s_to_r", [*resume, "--out", str(s)])
    out["resumed_s"] = json.loads((s / "summary.json").read_text())
    # A global batch of 12 does not split over 8 devices.
    run("batch", [*common, "--batch-size", "12", "--out", str(root / "batch")])
    out["batch_dir_exists"] = (root / "batch").exists()
    if slow:
        run("replicated", [*common, "--out", str(r)])
        out["summary_replicated"] = json.loads((r / "summary.json").read_text())
        p_s, p_r = out.pop("params_sharded"), latest_params(r)
        out["params_err_2"] = max(
            float(np.max(np.abs(np.asarray(p_s[k]) - p_r[k])) / np.max(np.abs(p_r[k]))) for k in p_r
        )
        run("r_to_s", [*resume, "--shard-params", "--out", str(r)])
        out["resumed_r"] = json.loads((r / "summary.json").read_text())
        p_s, p_r = latest_params(s), latest_params(r)
        out["params_err_3"] = max(
            float(np.max(np.abs(p_s[k] - p_r[k])) / np.max(np.abs(p_r[k]))) for k in p_r
        )
    else:
        out.pop("params_sharded")
    return out


def main(argv: list[str]) -> None:
    """``shard_worker.py OUT_DIR [slow]``."""
    slow = argv[1:] == ["slow"]
    out = {"api": mode_api(), "cli": mode_cli(argv[0], slow)}
    if slow:
        out["api_more"] = mode_api_more()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
