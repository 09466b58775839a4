"""The experiment runner: jitted training with metrics, checkpoints, exact resume and faults.

``run(exp, out=DIR)`` trains an ``Experiment`` and writes, in ``DIR``:

* ``metrics.jsonl``: one JSON object per epoch (``epoch``, ``step``, ``loss``,
  ``val_loss``, ``val_accuracy``, ``lr``, ``grad_norm``, ``skipped``, ``seconds``),
  appended and flushed each epoch, fsynced before every checkpoint;
* ``checkpoints/ckpt-NNNNNN``: train state, best parameters, shuffling key and
  position in the epoch (``fbp.checkpoint``: safetensors + manifest, atomic);
* ``summary.json``: test metrics, config, seed, versions, ``params_sha256``;
* ``loss.png`` and ``metric.png``.

Host-side bookkeeping (metrics file, plots, signals, progress) is in ``fbp.runlog``.
Everything the data or the config can get wrong is checked before ``DIR`` is
touched. Training runs as jitted chunks of ``lax.scan`` steps (a whole epoch
unless it is long); SIGTERM/SIGINT are served at the next chunk boundary with a
checkpoint and exit status 143/130. Resuming from any checkpoint continues the
same sequence of steps, so on CPU the final parameters are bitwise those of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbp import checkpoint as ckpt
from fbp import data as fbp_data
from fbp import train as fbp_train
from fbp.losses import SoftmaxCrossEntropy, accuracy
from fbp.runlog import (  # noqa: F401  (re-exported: part of the runner's API)
    OWNED,
    MetricsLog,
    clear_owned,
    params_sha256,
    prepare_dir,
    read_metrics,
    versions,
    write_plots,
)
from fbp.runlog import Printer as _Printer
from fbp.runlog import StopFlag as _StopFlag

SCHEDULES = ("constant", "cosine", "warmup-cosine", "linear", "plateau")
NONFINITE = ("skip", "halt")
# Options beyond the Experiment's required fields, with the defaults a spec without them gets.
OPTIONS: dict[str, Any] = {
    "patience": None,  # early stopping: epochs without a better validation loss
    "clip": None,  # clip gradients to this global norm
    "weight_decay": 0.0,  # coupled: wd * params added to the gradient before the optimizer
    "schedule": "constant",
    "plateau_factor": 0.5,  # reduce-on-plateau: multiply the step size by this
    "plateau_patience": 5,  # ... after this many epochs without improvement
    "nonfinite": "skip",
    "keep": 3,  # checkpoints kept (plus the best by validation loss)
    "checkpoint_every": None,  # epochs between checkpoints (None: epochs // 10, at least 1)
    "chunk_steps": 128,  # steps per jitted call (signals are served between calls)
    "data_file": None,  # a CSV/NPZ file replacing the experiment's data
    "devices": None,  # data-parallel over this many devices (fbp.parallel); None: one device
}
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 128 + int(signum))
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; checkpoint {checkpoint}")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter under ``nonfinite='halt'``."""


# ----------------------------------------------------------------------------- config


def resolve_config(exp: Any, **overrides: Any) -> dict[str, Any]:
    """The run's config: the experiment's values, its optional fields, then overrides."""
    cfg = {
        "experiment": exp.name,
        "epochs": exp.epochs,
        "seed": exp.seed,
        "lr": exp.lr,
        "batch_size": exp.batch_size,
    }
    for k, v in OPTIONS.items():
        cfg[k] = getattr(exp, k, v)
    for k, v in overrides.items():
        if k not in cfg:
            raise ValueError(f"run: unknown option {k!r}; known: {sorted(cfg)}.")
        if v is not None:
            cfg[k] = v
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad option."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"run: {what}.")

    need(
        isinstance(cfg["epochs"], int) and cfg["epochs"] >= 0,
        f"epochs must be an int >= 0, got {cfg['epochs']!r}",
    )
    bs = cfg["batch_size"]
    need(
        bs is None or (isinstance(bs, int) and bs >= 1),
        f"batch_size must be a positive int or None, got {cfg['batch_size']!r}",
    )
    need(cfg["lr"] > 0, f"lr must be > 0, got {cfg['lr']!r}")
    need(
        cfg["patience"] is None or cfg["patience"] >= 1,
        f"patience must be >= 1, got {cfg['patience']!r}",
    )
    need(cfg["clip"] is None or cfg["clip"] > 0, f"clip must be > 0, got {cfg['clip']!r}")
    need(cfg["weight_decay"] >= 0, f"weight_decay must be >= 0, got {cfg['weight_decay']!r}")
    need(
        cfg["schedule"] in SCHEDULES,
        f"schedule must be one of {SCHEDULES}, got {cfg['schedule']!r}",
    )
    need(
        0 < cfg["plateau_factor"] < 1,
        f"plateau_factor must be in (0, 1), got {cfg['plateau_factor']!r}",
    )
    need(
        cfg["plateau_patience"] >= 1,
        f"plateau_patience must be >= 1, got {cfg['plateau_patience']!r}",
    )
    need(
        cfg["nonfinite"] in NONFINITE,
        f"nonfinite must be one of {NONFINITE}, got {cfg['nonfinite']!r}",
    )
    need(cfg["keep"] >= 1, f"keep must be >= 1, got {cfg['keep']!r}")
    need(
        cfg["checkpoint_every"] is None or cfg["checkpoint_every"] >= 1,
        f"checkpoint_every must be >= 1, got {cfg['checkpoint_every']!r}",
    )
    need(cfg["chunk_steps"] >= 1, f"chunk_steps must be >= 1, got {cfg['chunk_steps']!r}")


# ----------------------------------------------------------------------------- building


def is_classifier(loss: Any) -> bool:
    return isinstance(loss, SoftmaxCrossEntropy)


def load_data(exp: Any, cfg: dict[str, Any]) -> fbp_data.Dataset:
    """The run's data set, validated on the host (DataError on anything wrong)."""
    features = getattr(exp, "features", None)
    if cfg.get("data_file"):
        ds = fbp_data.load_file(
            cfg["data_file"],
            seed=cfg["seed"],
            features=features,
            regression=not is_classifier(exp.loss),
        )
    else:
        ds = exp.data(cfg["seed"])
    return fbp_data.validate_dataset(ds, features=features)


def build_schedule(cfg: dict[str, Any], total_steps: int) -> float | Callable:
    """The learning rate (a float) or an optax schedule of the optimizer step."""
    lr, name, total = cfg["lr"], cfg["schedule"], max(total_steps, 1)
    if name in ("constant", "plateau"):
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if name == "linear":
        return optax.linear_schedule(lr, 0.0, total)
    warmup = max(1, total // 20)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))


def _scale_by_plateau(cfg: dict[str, Any]) -> optax.GradientTransformation:
    """Multiply updates by a reduce-on-plateau scale that the runner updates once per epoch.

    The state is ``optax.contrib.reduce_on_plateau``'s own; the step only reads its
    ``scale``, and ``plateau_update`` feeds it the epoch's validation loss.
    """
    plateau = optax.contrib.reduce_on_plateau(
        factor=cfg["plateau_factor"], patience=cfg["plateau_patience"], accumulation_size=1
    )

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(plateau.init, update)


def build_optimizer(exp: Any, cfg: dict[str, Any], total_steps: int):
    """(optimizer, schedule): clip -> weight decay -> the experiment's -> plateau scale."""
    schedule = build_schedule(cfg, total_steps)
    parts = []
    if cfg["clip"] is not None:
        parts.append(optax.clip_by_global_norm(cfg["clip"]))
    if cfg["weight_decay"]:
        parts.append(optax.add_decayed_weights(cfg["weight_decay"]))
    parts.append(exp.optimizer(schedule, total_steps))
    if cfg["schedule"] == "plateau":
        parts.append(_scale_by_plateau(cfg))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


@functools.lru_cache(maxsize=16)
def _plateau_fn(factor: float, patience: int) -> Callable:
    plateau = optax.contrib.reduce_on_plateau(factor=factor, patience=patience, accumulation_size=1)

    @jax.jit
    def update(state, value):
        return plateau.update(jnp.zeros(()), state, value=value)[1]

    return update


def plateau_update(cfg: dict[str, Any], opt_state: Any, value: float) -> Any:
    """Feed one epoch's monitored loss to the reduce-on-plateau state (last in the chain)."""
    update = _plateau_fn(float(cfg["plateau_factor"]), int(cfg["plateau_patience"]))
    return (*opt_state[:-1], update(opt_state[-1], jnp.asarray(value, jnp.float32)))


def make_train_chunk(model, loss, optimizer, *, penalty=None, grad_fn=None) -> Callable:
    """The one place an epoch's compute is built: jitted ``(ts, x, y, order) -> (ts, metrics)``.

    ``order`` is (steps, batch) example indices; the chunk is a ``lax.scan`` of
    ``fbp.train.step_fn`` (which drops non-finite updates and reports ``skipped``).
    A data-parallel runner replaces this function (same signature, sharded inputs).
    """
    step = fbp_train.step_fn(
        model, loss, optimizer, penalty=penalty, skip_nonfinite=True, grad_fn=grad_fn
    )

    @jax.jit
    def chunk(ts, x, y, order):
        return jax.lax.scan(lambda t, idx: step(t, x[idx], y[idx]), ts, order)

    return chunk


@jax.jit
def _split(key):
    """(next train key, this epoch's order key): as ``fbp.train.make_epoch`` splits."""
    key, sub = jax.random.split(key)
    return key, sub


@functools.partial(jax.jit, static_argnums=(1, 2))
def _order(key, n: int, batch_size: int):
    return fbp_data.batch_order(key, n, batch_size)


def make_eval(model, loss) -> Callable:
    """Jitted ``(params, model_state, x, y) -> {'loss', ['accuracy']}`` over a whole split."""

    @jax.jit
    def ev(params, model_state, x, y):
        pred = model.apply(params, x, state=model_state or None, train=False)
        out = {"loss": loss(pred, y)}
        if is_classifier(loss) and jnp.issubdtype(y.dtype, jnp.integer):
            out["accuracy"] = accuracy(pred, y)
        return out

    return ev


# ----------------------------------------------------------------------------- the run


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def _new_epoch_acc() -> dict[str, float]:
    return {"loss_sum": 0.0, "loss_n": 0, "gn_sum": 0.0, "skipped": 0, "seconds": 0.0}


def run(
    exp: Any,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
    experiment_path: str | None = None,
    **overrides: Any,
):
    """Train ``exp``, evaluate it on its test split and print a short report.

    Args:
      exp: an ``fbp.experiment.Experiment``.
      out: the run's directory (metrics, checkpoints, summary, plots); None keeps
        everything in memory (no files, no signal handling).
      resume: continue from the newest valid checkpoint in ``out``.
      overwrite: discard what a previous run wrote in ``out``.
      print_fn: where progress and the report go.
      experiment_path: the experiment's file, recorded so ``fbp eval``/``export`` find it.
      **overrides: ``epochs, seed, lr, batch_size`` and any key of ``OPTIONS``; None
        means "the experiment's value".

    Returns:
      A ``RunResult``.

    Raises:
      ValueError (DataError, CheckpointError): bad config, data or checkpoint, before
        anything is written. NonFiniteError: under ``nonfinite='halt'``.
      Interrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    from fbp.experiment import RunResult

    if getattr(exp, "variants", None):
        from fbp import variants

        return variants.run(
            exp,
            run,
            out=out,
            resume=resume,
            overwrite=overwrite,
            print_fn=print_fn,
            experiment_path=experiment_path,
            **overrides,
        )
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        prepare_dir(out_dir, resume=resume, overwrite=overwrite)
    ckpt_dir = out_dir / "checkpoints" if out_dir is not None else None

    # Resuming takes the saved config; explicit overrides still win (e.g. more epochs).
    saved = None
    if resume and ckpt_dir is not None and ckpt.list_checkpoints(ckpt_dir):
        saved = _peek_config(ckpt_dir)
    known = ("epochs", "seed", "lr", "batch_size", *OPTIONS)
    base = {k: v for k, v in (saved or {}).items() if k in known}
    cfg = resolve_config(exp, **{**base, **{k: v for k, v in overrides.items() if v is not None}})
    if experiment_path is not None or saved:
        cfg["experiment_path"] = experiment_path or saved.get("experiment_path")

    # ---- everything that can fail on input, before DIR is touched
    ds = load_data(exp, cfg)
    model = exp.model(ds)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    n = x.shape[0]
    bs = cfg["batch_size"] or n
    steps = max(n // bs, 1)
    total_steps = cfg["epochs"] * steps
    opt, schedule = build_optimizer(exp, cfg, total_steps)
    ts = fbp_train.init(model, opt, jax.random.key(cfg["seed"]), x)
    if getattr(exp, "init", None) is not None:
        p0 = exp.init(model, ds, cfg["seed"])
        ts = ts._replace(params=p0, opt_state=opt.init(p0))
    _check_labels(model, ts, ds, exp.loss)
    if bs > n:
        raise ValueError(f"run: batch_size={bs} is larger than the {n} training examples.")
    grad_fn = exp.grad_fn(model, ds) if getattr(exp, "grad_fn", None) else None
    if cfg["devices"]:  # data parallel: the batch split over a mesh, same steps
        from fbp import parallel

        chunk_fn = parallel.make_train_chunk(
            model,
            exp.loss,
            opt,
            mesh=cfg["devices"],
            batch_size=bs,
            penalty=exp.penalty,
            grad_fn=grad_fn,
        )
    else:
        chunk_fn = make_train_chunk(model, exp.loss, opt, penalty=exp.penalty, grad_fn=grad_fn)
    probe = jax.jit(exp.probe(model, exp.loss, opt)) if getattr(exp, "probe", None) else None
    eval_fn = make_eval(model, exp.loss)
    has_val = len(ds.val.x) > 0
    xv, yv = (jnp.asarray(ds.val.x), jnp.asarray(ds.val.y)) if has_val else (None, None)
    every = cfg["checkpoint_every"] or max(1, cfg["epochs"] // 10)
    chunk = cfg["chunk_steps"]

    prog = {
        "epoch": 0,
        "pos": 0,
        "acc": _new_epoch_acc(),
        "best_val": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "skipped_total": 0,
        "train_seconds": 0.0,
        "stopped_early": False,
        "steps_per_epoch": steps,
    }
    order_key = jax.random.key(0)
    best = {"params": ts.params, "model_state": ts.model_state}
    history: list[dict[str, Any]] = []
    last_ckpt: Path | None = None
    printer = _Printer(print_fn, cfg["epochs"], getattr(exp, "log_every", 1))

    if saved:
        template = {"state": ts, "best": best, "order_key": order_key}
        found = ckpt.load_latest(ckpt_dir, template, warn=print_fn)
        if found is not None:
            last_ckpt, tree, meta = found
            ts, best, order_key = tree["state"], tree["best"], tree["order_key"]
            prog.update(meta["progress"])
            if prog["steps_per_epoch"] != steps:
                raise ValueError(
                    f"run: the checkpoint has {prog['steps_per_epoch']} steps per epoch but this "
                    f"config gives {steps}; resume with the same data and batch size."
                )
            history = [
                r for r in read_metrics(out_dir / "metrics.jsonl") if r["epoch"] <= prog["epoch"]
            ]
            print_fn(f"resuming from {last_ckpt.name}: epoch {prog['epoch']}, step {int(ts.step)}")
    elif resume and out_dir is not None:
        print_fn(f"no checkpoint in {out_dir}; starting from scratch.")

    # ---- from here on DIR is written
    log = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_owned(out_dir)
        ckpt.clean_temporaries(ckpt_dir)
        log = MetricsLog(out_dir / "metrics.jsonl", history)

    def save_checkpoint() -> Path | None:
        nonlocal last_ckpt
        if ckpt_dir is None:
            return None
        if not bool(fbp_train._all_finite(ts.params)):
            raise NonFiniteError(
                f"parameters became non-finite by epoch {prog['epoch']}; not saved. Last good "
                f"checkpoint: {last_ckpt}."
            )
        log.sync()
        meta = {
            "config": cfg,
            "progress": prog,
            "step": int(ts.step),
            "val_loss": prog["best_val"] if math.isfinite(prog["best_val"]) else None,
            "epoch_val_loss": history[-1].get("val_loss") if history else None,
        }
        tree = {"state": ts, "best": best, "order_key": order_key}
        last_ckpt = ckpt.save(
            ckpt_dir, tree, meta=meta, keep=cfg["keep"], score=lambda m: m.get("epoch_val_loss")
        )
        return last_ckpt

    try:
        with _StopFlag(out_dir is not None) as stop:
            while prog["epoch"] < cfg["epochs"] and not prog["stopped_early"]:
                if prog["pos"] == 0:
                    key, order_key = _split(ts.key)
                    ts = ts._replace(key=key)
                    prog["acc"] = _new_epoch_acc()
                order = _order(order_key, n, bs)
                if steps > chunk:
                    order = np.asarray(order)
                while prog["pos"] < steps:
                    lo = prog["pos"]
                    hi = min(lo + chunk, steps)
                    t0 = time.perf_counter()
                    new_ts, m = chunk_fn(ts, x, y, order if hi - lo == steps else order[lo:hi])
                    m = jax.device_get(m)
                    dt = time.perf_counter() - t0
                    skipped = np.asarray(m["skipped"])
                    if skipped.any() and cfg["nonfinite"] == "halt":
                        bad = prog["epoch"] * steps + lo + int(np.argmax(skipped)) + 1
                        raise NonFiniteError(
                            f"non-finite loss or gradient at step {bad} (epoch "
                            f"{prog['epoch'] + 1}, batch {lo + int(np.argmax(skipped))}); "
                            + (
                                f"the last good checkpoint {last_ckpt.name} is kept."
                                if last_ckpt
                                else "no checkpoint was saved."
                            )
                        )
                    ts = new_ts
                    _accumulate(prog["acc"], m, dt)
                    prog["train_seconds"] += dt
                    prog["pos"] = hi
                    if stop.signum is not None and hi < steps:
                        raise Interrupted(stop.signum, save_checkpoint())
                # ---- epoch end: metrics, best, plateau, early stopping, checkpoint
                prog["epoch"] += 1
                prog["pos"] = 0
                acc = prog["acc"]
                prog["skipped_total"] += acc["skipped"]
                row = {
                    "epoch": prog["epoch"],
                    "step": int(ts.step),
                    "loss": acc["loss_sum"] / acc["loss_n"] if acc["loss_n"] else None,
                }
                if has_val:
                    row.update(
                        {
                            f"val_{k}": float(v)
                            for k, v in jax.device_get(
                                eval_fn(ts.params, ts.model_state, xv, yv)
                            ).items()
                        }
                    )
                row["lr"] = _lr_now(cfg, schedule, ts)
                row["grad_norm"] = acc["gn_sum"] / acc["loss_n"] if acc["loss_n"] else None
                row["skipped"] = acc["skipped"]
                row["seconds"] = acc["seconds"]
                if probe is not None:  # Experiment.probe: e.g. per-layer gradient statistics
                    row.update(
                        {k: float(v) for k, v in jax.device_get(probe(ts, x[:bs], y[:bs])).items()}
                    )
                history.append(row)
                if log is not None:
                    log.write(row)
                monitor = row.get("val_loss", row["loss"])
                if has_val and monitor is not None and monitor < prog["best_val"]:
                    prog.update(best_val=monitor, best_epoch=prog["epoch"], bad_epochs=0)
                    best = {"params": ts.params, "model_state": ts.model_state}
                elif has_val:
                    prog["bad_epochs"] += 1
                else:  # nothing to select on: the best parameters are the latest
                    best = {"params": ts.params, "model_state": ts.model_state}
                if cfg["schedule"] == "plateau" and monitor is not None:
                    ts = ts._replace(opt_state=plateau_update(cfg, ts.opt_state, monitor))
                if cfg["patience"] and has_val and prog["bad_epochs"] >= cfg["patience"]:
                    prog["stopped_early"] = True
                printer.epoch(row)
                if acc["skipped"]:
                    printer.line(
                        f"epoch {prog['epoch']}: skipped {acc['skipped']} steps with a "
                        "non-finite loss or gradient"
                    )
                if stop.signum is not None:
                    raise Interrupted(stop.signum, save_checkpoint())
                if prog["epoch"] % every == 0 and prog["epoch"] < cfg["epochs"]:
                    save_checkpoint()
            if printer.tty:
                printer.line("")
            if out_dir is not None and (
                last_ckpt is None or _ckpt_epoch(last_ckpt) != (prog["epoch"], int(ts.step))
            ):
                save_checkpoint()
    finally:
        if log is not None:
            log.close()

    # ---- final parameters, test metrics, summary, plots, report
    use_best = bool(cfg["patience"]) and has_val and prog["best_epoch"] > 0
    final = ts._replace(**best) if use_best else ts
    test = fbp_train.evaluate(
        model,
        exp.loss,
        final.params,
        jnp.asarray(ds.test.x),
        jnp.asarray(ds.test.y),
        model_state=final.model_state,
    )
    result = RunResult(exp, cfg, model, ds, final, history, test, prog["train_seconds"], out_dir)
    if prog["stopped_early"]:
        print_fn(
            f"early stop at epoch {prog['epoch']}: best validation loss "
            f"{prog['best_val']:.4f} at epoch {prog['best_epoch']} (parameters restored)"
        )
    if out_dir is not None:
        summary = _summary(exp, cfg, prog, int(ts.step), final.params, test, history, last_ckpt)
        summary["restored_best"] = use_best
        ckpt.atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        if history:
            write_plots(out_dir, history)
    print_fn(f"== {exp.name}: {exp.description}")
    print_fn(f"test {_fmt(test)}")
    print_fn(
        f"training time {prog['train_seconds']:.2f} s for {prog['epoch']} epochs "
        "(includes compilation)"
    )
    if out_dir is not None:
        print_fn(f"outputs in {out_dir}")
    for line in exp.report(result) if exp.report else []:
        print_fn(line)
    return result


def _accumulate(acc: dict[str, float], m: dict[str, Any], seconds: float) -> None:
    """Add one chunk's per-step metrics to the epoch's sums (skipped steps left out)."""
    skipped = np.asarray(m["skipped"])
    ok = skipped == 0
    acc["loss_sum"] += float(np.sum(np.asarray(m["loss"], np.float64)[ok]))
    acc["gn_sum"] += float(np.sum(np.asarray(m["grad_norm"], np.float64)[ok]))
    acc["loss_n"] += int(ok.sum())
    acc["skipped"] += int(skipped.sum())
    acc["seconds"] += seconds


def _summary(exp, cfg, prog, step, params, test, history, last_ckpt) -> dict[str, Any]:
    """summary.json's content."""
    return {
        "experiment": exp.name,
        "description": exp.description,
        "config": cfg,
        "seed": cfg["seed"],
        "epochs_completed": prog["epoch"],
        "steps": step,
        "stopped_early": prog["stopped_early"],
        "best_epoch": prog["best_epoch"] or None,
        "best_val_loss": prog["best_val"] if math.isfinite(prog["best_val"]) else None,
        "skipped_steps": prog["skipped_total"],
        "train_seconds": prog["train_seconds"],
        "test": test,
        "last": history[-1] if history else None,
        "params_sha256": params_sha256(params),
        "checkpoint": last_ckpt.name if last_ckpt else None,
        "versions": versions(),
    }


def _ckpt_epoch(path: Path) -> tuple[int, int]:
    meta = ckpt.read_manifest(path).get("meta", {})
    return meta.get("progress", {}).get("epoch", -1), meta.get("step", -1)


def _peek_config(ckpt_dir: Path) -> dict[str, Any] | None:
    """The config stored in the newest checkpoint whose manifest reads (tensors not read)."""
    for p in reversed(ckpt.list_checkpoints(ckpt_dir)):
        with contextlib.suppress(ckpt.CorruptCheckpoint):
            return ckpt.read_manifest(p).get("meta", {}).get("config")
    return None


def _lr_now(cfg: dict[str, Any], schedule: Any, ts: Any) -> float:
    lr = float(schedule(ts.step)) if callable(schedule) else float(schedule)
    if cfg["schedule"] == "plateau":
        lr *= float(ts.opt_state[-1].scale)
    return lr


def _check_labels(model, ts, ds, loss) -> None:
    """Classification labels must index the model's outputs: [0, outputs)."""
    if not is_classifier(loss):
        return
    out = jax.eval_shape(
        lambda p, s, xb: model.apply(p, xb, state=s or None, train=False),
        ts.params,
        ts.model_state,
        jnp.asarray(ds.train.x[:1]),
    )
    for name in ("train", "val", "test"):
        s = getattr(ds, name)
        fbp_data.validate_arrays(
            s.x,
            s.y,
            name=f"{ds.name} {name}",
            classes=out.shape[-1],
            allow_empty=True,
            where=fbp_data.split_where(ds, name),  # file lines for data read from a file
        )
