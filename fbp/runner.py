"""The experiment runner: jitted training with metrics, checkpoints, exact resume and faults.

``run(exp, out=DIR)`` trains an ``Experiment`` and writes, in ``DIR``:

* ``metrics.jsonl``: one JSON object per epoch (``epoch``, ``step``, ``loss``,
  ``val_loss``, ``val_accuracy``, ``lr``, ``grad_norm``, ``skipped``, ``seconds``),
  appended and flushed each epoch, fsynced before every checkpoint;
* ``checkpoints/ckpt-NNNNNN``: train state, best parameters, shuffling key and
  position in the epoch (``fbp.checkpoint``: safetensors + manifest, atomic);
* ``summary.json``: test metrics, config, seed, versions, ``params_sha256``;
* ``loss.png`` and ``metric.png``.

A run has four parts, each in its own place: its options (``fbp.options``:
experiment values, a resumed checkpoint's, overrides); what it trains, built and
checked before ``DIR`` is touched (``build``, with the optimizer and schedule of
``fbp.schedules``); the training loop with resume (``fbp.loop``); and the report
(``report``: test metrics, ``summary.json``, plots, printed lines). An experiment
with ``variants`` is run once per variant by ``fbp.variants``. Host-side
bookkeeping (metrics file, plots, signals, progress) is in ``fbp.runlog``.

Training runs as jitted chunks of ``lax.scan`` steps (a whole epoch unless it is
long); SIGTERM/SIGINT are served at the next chunk boundary with a checkpoint and
exit status 143/130. Resuming from any checkpoint continues the same sequence of
steps, so on CPU the final parameters are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fbp import checkpoint as ckpt
from fbp import data as fbp_data
from fbp import options, parallel, schedules, variants
from fbp import train as fbp_train
from fbp.experiment import Experiment, RunResult
from fbp.loop import (  # noqa: F401  (re-exported: part of the runner's API)
    Best,
    Checkpointer,
    EpochSums,
    Interrupted,
    NonFiniteError,
    Progress,
    ResumePosition,
    Setup,
    load_position,
    start_position,
    train,
)
from fbp.losses import SoftmaxCrossEntropy, accuracy
from fbp.options import RunOptions
from fbp.runlog import (  # noqa: F401  (re-exported: part of the runner's API)
    LOCK,
    OWNED,
    MetricsLog,
    RunDirInUse,
    RunLock,
    clear_owned,
    params_sha256,
    prepare_dir,
    read_metrics,
    versions,
    write_plots,
)
from fbp.runlog import Printer as _Printer

# The one-device chunk: ``fbp.train``'s shuffle-and-scan core, jitted.
make_train_chunk = fbp_train.make_chunk


# ----------------------------------------------------------------------------- options


def resolve_config(
    exp: Experiment, *, saved: Mapping[str, Any] | None = None, **overrides: Any
) -> RunOptions:
    """The run's options: the experiment's values, a resumed run's, then ``overrides``."""
    return options.resolve(exp, saved, overrides)


def _as_options(exp: Experiment, cfg: RunOptions | Mapping[str, Any]) -> RunOptions:
    """``cfg`` itself, or a saved config (``summary.json``'s ``config``) as options."""
    return cfg if isinstance(cfg, RunOptions) else options.resolve(exp, cfg)


def saved_config(exp: Experiment, cfg: RunOptions, experiment_path: str | None) -> dict[str, Any]:
    """What ``summary.json`` and checkpoints store: the experiment, its file, the options."""
    return {"experiment": exp.name, **cfg.to_config(), "experiment_path": experiment_path}


# ----------------------------------------------------------------------------- building


def is_classifier(loss: Any) -> bool:
    return isinstance(loss, SoftmaxCrossEntropy)


def load_data(exp: Experiment, cfg: RunOptions | Mapping[str, Any]) -> fbp_data.Dataset:
    """The run's data set, validated on the host (DataError on anything wrong)."""
    cfg = _as_options(exp, cfg)
    if cfg.data_file:
        ds = fbp_data.load_file(
            cfg.data_file,
            seed=cfg.seed,
            features=exp.features,
            regression=not is_classifier(exp.loss),
        )
    else:
        ds = exp.data(cfg.seed)
    return fbp_data.validate_dataset(ds, features=exp.features)


def build_optimizer(
    exp: Experiment, cfg: RunOptions | Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, float | Callable]:
    """(optimizer, schedule) of a run: see ``fbp.schedules.build_optimizer``."""
    return schedules.build_optimizer(exp, _as_options(exp, cfg), total_steps)


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


def build(exp: Experiment, cfg: RunOptions) -> tuple[Setup, fbp_train.TrainState]:
    """What the loop trains and its initial train state; every input check happens here.

    Raises:
      ValueError (DataError): bad data, labels, batch size or device count.
    """
    ds = load_data(exp, cfg)
    model = exp.model(ds)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    n = x.shape[0]
    bs = cfg.batch_size or n
    steps = max(n // bs, 1)
    opt, schedule = schedules.build_optimizer(exp, cfg, cfg.epochs * steps)
    ts = fbp_train.init(model, opt, jax.random.key(cfg.seed), x)
    if exp.init is not None:
        p0 = exp.init(model, ds, cfg.seed)
        ts = ts._replace(params=p0, opt_state=opt.init(p0))
    _check_labels(model, ts, ds, exp.loss)
    if bs > n:
        raise ValueError(f"run: batch_size={bs} is larger than the {n} training examples.")
    grad_fn = exp.grad_fn(model, ds) if exp.grad_fn is not None else None
    if cfg.devices:  # data parallel: the batch split over a mesh, same steps
        chunk = parallel.make_train_chunk(
            model,
            exp.loss,
            opt,
            mesh=cfg.devices,
            batch_size=bs,
            penalty=exp.penalty,
            grad_fn=grad_fn,
        )
    else:
        chunk = make_train_chunk(model, exp.loss, opt, penalty=exp.penalty, grad_fn=grad_fn)
    probe = jax.jit(exp.probe(model, exp.loss, opt)) if exp.probe is not None else None
    val = (jnp.asarray(ds.val.x), jnp.asarray(ds.val.y)) if len(ds.val.x) else None
    setup = Setup(
        ds, model, x, y, bs, steps, opt, schedule, chunk, make_eval(model, exp.loss), probe, val
    )
    return setup, ts


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
            s.x, s.y, name=f"{ds.name} {name}", classes=out.shape[-1], allow_empty=True
        )


# ----------------------------------------------------------------------------- the run


def run(
    exp: Experiment,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
    experiment_path: str | None = None,
    **overrides: Any,
) -> RunResult:
    """Train ``exp`` (each of its variants, if it has them), evaluate, print a report.

    Args:
      exp: an ``fbp.experiment.Experiment``.
      out: the run's directory (metrics, checkpoints, summary, plots); None keeps
        everything in memory (no files, no signal handling).
      resume: continue from the newest valid checkpoint in ``out``.
      overwrite: discard what a previous run wrote in ``out``.
      print_fn: where progress and the report go.
      experiment_path: the experiment's file, recorded so ``fbp eval``/``export`` find it.
      **overrides: any run option (``fbp.options.RunOptions``: ``epochs``, ``lr``,
        ``seed``, ``batch_size``, ``patience``...); None means "the experiment's value".

    Returns:
      A ``RunResult``.

    Raises:
      ValueError (DataError, CheckpointError): bad config, data or checkpoint, before
        anything is written. NonFiniteError: under ``nonfinite='halt'``.
      Interrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    kwargs = dict(resume=resume, overwrite=overwrite, experiment_path=experiment_path)
    if exp.variants:
        return variants.run(exp, run_single, out=out, print_fn=print_fn, **kwargs, **overrides)
    return run_single(exp, out=out, print_fn=print_fn, **kwargs, **overrides)


def run_single(
    exp: Experiment,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
    experiment_path: str | None = None,
    **overrides: Any,
) -> RunResult:
    """``run`` for an experiment without variants (the arguments are ``run``'s).

    With ``out``, the directory is locked for the whole run (``fbp.runlog.RunLock``):
    a second process on it is refused at once.
    """
    if out is None:
        return _run_in(exp, None, resume, overwrite, print_fn, experiment_path, overrides)
    lock = RunLock(Path(out))
    try:
        return _run_in(exp, Path(out), resume, overwrite, print_fn, experiment_path, overrides)
    finally:
        lock.release(remove_dir=True)  # only a directory this run made and left empty


def _run_in(exp, out_dir, resume, overwrite, print_fn, experiment_path, overrides) -> RunResult:
    if out_dir is not None:
        prepare_dir(out_dir, resume=resume, overwrite=overwrite)
    ckpt_dir = out_dir / "checkpoints" if out_dir is not None else None

    # Resuming takes the saved config; explicit overrides still win (e.g. more epochs).
    saved = _peek_config(ckpt_dir) if resume and ckpt_dir is not None else None
    cfg = resolve_config(exp, saved=saved, **overrides)
    if experiment_path is None and saved:
        experiment_path = saved.get("experiment_path")
    config = saved_config(exp, cfg, experiment_path)

    # ---- everything that can fail on input, before DIR is touched
    setup, ts = build(exp, cfg)
    position = start_position(ts, setup.steps_per_epoch)
    history: list[dict[str, Any]] = []
    resumed_from = None
    if saved:
        found = load_position(ckpt_dir, position, warn=print_fn)
        if found is not None:
            resumed_from, position = found
            _check_resumable(position, setup)
            history = [
                r
                for r in read_metrics(out_dir / "metrics.jsonl")
                if r["epoch"] <= position.progress.epoch
            ]
            print_fn(
                f"resuming from {resumed_from.name}: epoch {position.progress.epoch}, "
                f"step {int(position.state.step)}"
            )
    elif resume and out_dir is not None:
        print_fn(f"no checkpoint in {out_dir}; starting from scratch.")

    # ---- from here on DIR is written
    log = None
    if out_dir is not None:
        if overwrite:
            clear_owned(out_dir)
        ckpt.clean_temporaries(ckpt_dir)
        log = MetricsLog(out_dir / "metrics.jsonl", history)
    saver = Checkpointer(ckpt_dir, config, cfg.keep, log, last=resumed_from)
    printer = _Printer(print_fn, cfg.epochs, exp.log_every)
    try:
        position = train(
            setup,
            cfg,
            position,
            saver=saver,
            log=log,
            printer=printer,
            history=history,
            handle_signals=out_dir is not None,
        )
    finally:
        if log is not None:
            log.close()
    return report(exp, cfg, config, setup, position, history, saver.last, out_dir, print_fn)


def _check_resumable(position: ResumePosition, setup: Setup) -> None:
    if position.progress.steps_per_epoch != setup.steps_per_epoch:
        raise ValueError(
            f"run: the checkpoint has {position.progress.steps_per_epoch} steps per epoch but "
            f"this config gives {setup.steps_per_epoch}; resume with the same data and batch size."
        )


def _peek_config(ckpt_dir: Path) -> dict[str, Any] | None:
    """The config stored in the newest checkpoint whose manifest reads (tensors not read)."""
    for p in reversed(ckpt.list_checkpoints(ckpt_dir)):
        with contextlib.suppress(ckpt.CorruptCheckpoint):
            return ckpt.read_manifest(p).get("meta", {}).get("config")
    return None


# ----------------------------------------------------------------------------- report


def report(
    exp: Experiment,
    cfg: RunOptions,
    config: dict[str, Any],
    setup: Setup,
    position: ResumePosition,
    history: list[dict[str, Any]],
    last_ckpt: Path | None,
    out_dir: Path | None,
    print_fn: Callable[[str], None],
    test: dict[str, float] | None = None,
) -> RunResult:
    """Final parameters, test metrics, ``summary.json``, plots and the printed report.

    ``test``: the final parameters' test metrics when the caller has them already
    (``fbp.sweep`` evaluates all its runs in one call); computed here otherwise.
    """
    prog = position.progress
    use_best = restores_best(cfg, setup, prog)
    final = position.state._replace(**position.best._asdict()) if use_best else position.state
    ds = setup.dataset
    if test is None:
        test = fbp_train.evaluate(
            setup.model,
            exp.loss,
            final.params,
            jnp.asarray(ds.test.x),
            jnp.asarray(ds.test.y),
            model_state=final.model_state,
        )
    result = RunResult(
        exp, config, setup.model, ds, final, history, test, prog.train_seconds, out_dir
    )
    if prog.stopped_early:
        print_fn(
            f"early stop at epoch {prog.epoch}: best validation loss "
            f"{prog.best_val:.4f} at epoch {prog.best_epoch} (parameters restored)"
        )
    if out_dir is not None:
        summary = _summary(exp, config, position, final.params, test, history, last_ckpt)
        summary["restored_best"] = use_best
        ckpt.atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        if history:
            write_plots(out_dir, history)
    print_fn(f"== {exp.name}: {exp.description}")
    print_fn(f"test {_fmt(test)}")
    print_fn(
        f"training time {prog.train_seconds:.2f} s for {prog.epoch} epochs (includes compilation)"
    )
    if out_dir is not None:
        print_fn(f"outputs in {out_dir}")
    for line in exp.report(result) if exp.report else []:
        print_fn(line)
    return result


def restores_best(cfg: RunOptions, setup: Setup, prog: Progress) -> bool:
    """Whether a run's final parameters are its best ones (early stopping with validation)."""
    return bool(cfg.patience) and setup.val is not None and prog.best_epoch > 0


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def _summary(exp, config, position, params, test, history, last_ckpt) -> dict[str, Any]:
    """summary.json's content."""
    prog = position.progress
    return {
        "experiment": exp.name,
        "description": exp.description,
        "config": config,
        "seed": config["seed"],
        "epochs_completed": prog.epoch,
        "steps": int(position.state.step),
        "stopped_early": prog.stopped_early,
        "best_epoch": prog.best_epoch or None,
        "best_val_loss": prog.best_val if math.isfinite(prog.best_val) else None,
        "skipped_steps": prog.skipped_total,
        "train_seconds": prog.train_seconds,
        "test": test,
        "last": history[-1] if history else None,
        "params_sha256": params_sha256(params),
        "checkpoint": last_ckpt.name if last_ckpt else None,
        "versions": versions(),
    }
