"""The experiment runner: jitted training with metrics, checkpoints, exact resume and faults.

``run(exp, out=DIR)`` trains an ``Experiment`` and writes, in ``DIR``:

* ``metrics.jsonl``: one JSON object per epoch (``epoch``, ``step``, ``loss``,
  ``val_loss``, ``val_accuracy``, ``lr``, ``grad_norm``, ``skipped``, ``seconds``;
  ``epsilon`` under DP-SGD, see ``fbp.run.privacy``), appended and flushed each epoch,
  fsynced before every checkpoint;
* ``checkpoints/ckpt-NNNNNN``: train state, best parameters, shuffling key and
  position in the epoch (``fbp.checkpoint``: safetensors + manifest, atomic);
* ``summary.json``: test metrics, config, seed, versions, ``params_sha256``;
* ``loss.png`` and ``metric.png``.

A run has four parts, each in its own place: its options (``fbp.run.options``:
experiment values, a resumed checkpoint's, overrides); what it trains, built and
checked before ``DIR`` is touched (``build``, with the optimizer and schedule of
``fbp.run.schedules``); the training loop with resume (``fbp.run.loop``); and the report
(``fbp.run.report``: test metrics, ``summary.json``, plots, printed lines). An experiment
with ``variants`` is run once per variant by ``fbp.run.variants``. Host-side
bookkeeping is in ``fbp.run.metrics`` (metrics file), ``fbp.run.rundir`` (the directory
and its lock), ``fbp.run.progress`` (progress, signals) and ``fbp.figures`` (plots).

Training runs as jitted chunks of ``lax.scan`` steps (a whole epoch unless it is
long); SIGTERM/SIGINT are served at the next chunk boundary with a checkpoint and
exit status 143/130. Resuming from any checkpoint continues the same sequence of
steps, so on CPU the final parameters are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fbp import checkpoint as ckpt
from fbp import data as fbp_data
from fbp import memory as fbp_memory
from fbp import train as fbp_train
from fbp.core import Layer, takes_lengths
from fbp.distributed import cluster, parallel
from fbp.losses import SoftmaxCrossEntropy, accuracy
from fbp.precision import get_policy
from fbp.run import fingerprint, options, privacy, schedules, variants
from fbp.run.experiment import Experiment, RunResult
from fbp.run.loop import (
    Checkpointer,
    Interrupted,
    OutOfMemory,
    ResumePosition,
    Setup,
    WriteError,
    load_position,
    start_position,
    train,
)
from fbp.run.metrics import MetricsLog, read_metrics
from fbp.run.options import RunOptions
from fbp.run.progress import Printer
from fbp.run.report import (
    data_line,
    report,
)
from fbp.run.rundir import RunLock, clear_owned, prepare_dir

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
    """(optimizer, schedule) of a run: see ``fbp.run.schedules.build_optimizer``."""
    return schedules.build_optimizer(exp, _as_options(exp, cfg), total_steps)


def make_eval(model, loss) -> Callable:
    """Jitted ``(params, state, x, y, lengths=None) -> {'loss', ['accuracy']}``
    over a whole split (``lengths`` (n,) for padded sequences)."""

    @jax.jit
    def ev(params, state, x, y, lengths=None):
        kw = {} if lengths is None else {"lengths": lengths}
        pred = model.apply(params, x, state=state or None, train=False, **kw)
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
    privacy.check(
        cfg, grad_fn=exp.grad_fn, penalty=exp.penalty, devices=cfg.devices, probe=exp.probe
    )
    ds = load_data(exp, cfg)
    model = exp.model(ds)
    lengths = _train_lengths(model, ds, cfg)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    n = x.shape[0]
    bs = cfg.batch_size or n
    steps = max(n // bs, 1)
    opt, schedule = schedules.build_optimizer(exp, cfg, cfg.epochs * steps)
    ts = fbp_train.init(model, opt, jax.random.key(cfg.seed), x, precision=cfg.precision)
    if exp.init is not None:
        p0 = get_policy(cfg.precision).cast_to_param(exp.init(model, ds, cfg.seed))
        ts = ts._replace(params=p0, opt_state=opt.init(p0))
    _check_labels(model, ts, ds, exp.loss, cfg.data_file or ds.name)
    if bs > n:
        raise ValueError(f"run: batch_size={bs} is larger than the {n} training examples.")
    grad_fn, accountant = _gradient(exp, cfg, model, ds, bs)
    chunk = _train_chunk(exp, cfg, model, opt, ts, bs, grad_fn)
    probe = jax.jit(exp.probe(model, exp.loss, opt)) if exp.probe is not None else None
    setup = Setup(
        ds,
        model,
        x,
        y,
        bs,
        steps,
        opt,
        schedule,
        chunk,
        make_eval(model, exp.loss),
        probe,
        _val_arrays(ds, lengths),
        privacy=accountant,
        lengths=lengths,
    )
    return setup, ts


def _gradient(
    exp: Experiment, cfg: RunOptions, model: Layer, ds: fbp_data.Dataset, bs: int
) -> tuple[Callable | None, Any]:
    """The step's ``grad_fn`` (None: ``fbp.value_and_grad``) and the DP accountant or None."""
    grad_fn = exp.grad_fn(model, ds) if exp.grad_fn is not None else None
    if cfg.precision != "f32" and (grad_fn is not None or privacy.enabled(cfg)):
        what = "DP-SGD" if privacy.enabled(cfg) else f"experiment {exp.name!r}'s own grad_fn"
        raise ValueError(
            f"run: --precision {cfg.precision} applies to fbp.value_and_grad, not to {what}; "
            "use --precision f32."
        )
    if not privacy.enabled(cfg):
        return grad_fn, None
    # DP-SGD: clipped, noised gradient; epsilon per epoch
    n = len(ds.train.x)
    return privacy.gradient(model, exp.loss, cfg), privacy.accountant(cfg, batch_size=bs, n=n)


def _train_chunk(
    exp: Experiment,
    cfg: RunOptions,
    model: Layer,
    opt: optax.GradientTransformation,
    ts: fbp_train.TrainState,
    bs: int,
    grad_fn: Callable | None,
) -> Callable:
    """The jitted chunk of steps: on one device, or data parallel over a mesh."""
    mesh = parallel.run_mesh(
        devices=cfg.devices,
        shard_params=cfg.shard_params,
        batch_size=bs,
        num_processes=cfg.num_processes,
    )
    if mesh is None:
        return make_train_chunk(
            model, exp.loss, opt, penalty=exp.penalty, grad_fn=grad_fn, precision=cfg.precision
        )
    if cfg.precision != "f32":
        raise ValueError(
            f"run: --precision {cfg.precision} is not supported with --devices (data parallel); "
            "use --precision f32."
        )
    # data parallel: the batch split over a mesh, same steps
    chunk = parallel.make_train_chunk(
        model,
        exp.loss,
        opt,
        mesh=mesh,
        batch_size=bs,
        penalty=exp.penalty,
        grad_fn=grad_fn,
        shard_params=cfg.shard_params,
    )
    chunk.layout.place(ts)  # on the mesh in its layout (chunk.layout.memory() reads it)
    return chunk


def _val_arrays(ds: fbp_data.Dataset, lengths: jax.Array | None) -> tuple[jax.Array, ...] | None:
    """The validation split on the device, ``(x, y[, lengths])``, or None when empty."""
    if not len(ds.val.x):
        return None
    val: tuple[jax.Array, ...] = (jnp.asarray(ds.val.x), jnp.asarray(ds.val.y))
    if lengths is not None:
        val += (jnp.asarray(ds.val.lengths),)
    return val


def _reads_lengths(layer: Any) -> bool:
    """Whether some layer inside ``layer`` reads ``lengths`` itself (a sequence layer),
    not only hands it on (``Sequential`` and the other layers built around layers)."""
    if not takes_lengths(layer):
        return False
    inner = []
    for f in dataclasses.fields(layer) if dataclasses.is_dataclass(layer) else ():
        v = getattr(layer, f.name)
        inner += [u for u in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(u, Layer)]
    return not inner or any(_reads_lengths(u) for u in inner)


def _train_lengths(model, ds: fbp_data.Dataset, cfg: RunOptions) -> jax.Array | None:
    """The training split's sequence lengths (n,), or None; refused where unusable."""
    if ds.train.lengths is None:
        return None
    where = cfg.data_file or ds.name
    if not _reads_lengths(model):
        raise ValueError(
            f"run: {where} has sequence lengths but the model ({type(model).__name__}) takes "
            "no lengths=; use a model with sequence layers (GRU, LSTM, LastStep...)."
        )
    if cfg.devices:
        raise ValueError(
            f"run: {where} has sequence lengths, which --devices does not split yet; "
            "leave --devices unset."
        )
    return jnp.asarray(ds.train.lengths)


def _check_labels(model, ts, ds, loss, where: str) -> None:
    """Classification labels must index the model's outputs: [0, outputs), and the model
    must have exactly as many outputs as the data has classes (``where``: the data's name)."""
    if not is_classifier(loss):
        return
    out = jax.eval_shape(
        lambda p, s, xb: model.apply(p, xb, state=s or None, train=False),
        ts.params,
        ts.model_state,
        jnp.asarray(ds.train.x[:1]),
    )
    if ds.classes is not None and out.shape[-1] != ds.classes:
        raise fbp_data.DataError(
            f"run: the model has {out.shape[-1]} outputs but {where} has {ds.classes} classes; "
            "use data with as many classes as the model's outputs, or an experiment whose "
            "model is built for this data (Experiment.model(ds) reading ds.classes)."
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


# ----------------------------------------------------------------------------- the run


def run(
    exp: Experiment,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
    experiment_path: str | None = None,
    accept_changed_data: bool = False,
    **overrides: Any,
) -> RunResult:
    """Train ``exp`` (each of its variants, if it has them), evaluate, print a report.

    Args:
      exp: an ``fbp.run.experiment.Experiment``.
      out: the run's directory (metrics, checkpoints, summary, plots); None keeps
        everything in memory (no files, no signal handling).
      resume: continue from the newest valid checkpoint in ``out``.
      overwrite: discard what a previous run wrote in ``out``.
      print_fn: where progress and the report go.
      experiment_path: the experiment's file, recorded so ``fbp eval``/``export`` find it.
      accept_changed_data: resume although the data's fingerprint changed (recorded in
        the run's ``changes``); otherwise a changed data set is refused.
      **overrides: any run option (``fbp.run.options.RunOptions``: ``epochs``, ``lr``,
        ``seed``, ``batch_size``, ``patience``...); None means "the experiment's value".

    Returns:
      A ``RunResult``.

    Raises:
      ValueError (DataError, CheckpointError): bad config, data or checkpoint, before
        anything is written. NonFiniteError: under ``nonfinite='halt'``.
      Interrupted: SIGTERM/SIGINT, after saving a checkpoint.
    """
    kwargs: dict[str, Any] = dict(
        resume=resume,
        overwrite=overwrite,
        experiment_path=experiment_path,
        accept_changed_data=accept_changed_data,
    )
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
    accept_changed_data: bool = False,
    **overrides: Any,
) -> RunResult:
    """``run`` for an experiment without variants (the arguments are ``run``'s).

    With ``out``, the directory is locked for the whole run (``fbp.run.rundir.RunLock``):
    a second process on it is refused at once. Everything that can fail on input
    fails in ``plan``, before the directory is written. In a run across processes
    (``fbp.distributed.cluster``) only process 0 locks and writes ``out``; the others read its
    checkpoints when resuming, and bad input in any process stops every process.
    """
    out_dir = Path(out) if out is not None else None
    write_dir = out_dir if cluster.is_main_process() else None  # only process 0 writes
    with cluster.checked_inputs():
        lock = RunLock(write_dir) if write_dir is not None else None
        if lock is not None and lock.unsupported:
            print_fn(
                f"warning: {write_dir} cannot be locked ({lock.unsupported}); a second process "
                "on it would not be refused."
            )
        try:
            if write_dir is not None:
                prepare_dir(write_dir, resume=resume, overwrite=overwrite)
            p = plan(
                exp,
                out_dir,
                resume=resume,
                overrides=overrides,
                print_fn=print_fn,
                experiment_path=experiment_path,
                accept_changed_data=accept_changed_data,
            )
            # Every process passed its checks and starts from the same point, or all stop.
            prog = p.position.progress
            cluster.inputs_ok(prog.epoch, prog.pos, int(p.position.state.step))
            layout = getattr(p.setup.chunk, "layout", None)
            if layout is not None:
                print_fn(parallel.describe_memory(layout.memory()))
            return execute(
                exp,
                p,
                out_dir,
                overwrite=overwrite,
                print_fn=print_fn,
                writer=write_dir is not None,
            )
        finally:
            if lock is not None:
                lock.release(remove_dir=True)  # only a directory this run made and left empty


class Plan(NamedTuple):
    """A run ready to start: its options, what it trains and where it starts from."""

    cfg: RunOptions
    config: dict[str, Any]  # the saved form (summary.json, checkpoints)
    setup: Setup
    position: ResumePosition
    history: list[dict[str, Any]]  # metrics rows up to the position
    resumed_from: Path | None  # the checkpoint it resumes from
    changes: list[dict[str, Any]] = []  # what this resume changed (also in config["changes"])


def plan(
    exp: Experiment,
    out_dir: Path | None,
    *,
    resume: bool,
    overrides: Mapping[str, Any],
    print_fn: Callable[[str], None],
    experiment_path: str | None = None,
    accept_changed_data: bool = False,
) -> Plan:
    """Options, data, model, optimizer and the resume position; reads, never writes.

    A resumed run's data is checked against its fingerprint (``fbp.run.fingerprint``)
    and its options against their resume rules (``fbp.run.options.resume_changes``);
    what changed is appended to the config's ``changes``, the original values kept.

    Raises:
      ValueError (DataError, CheckpointError): anything wrong with them.
    """
    ckpt_dir = out_dir / "checkpoints" if out_dir is not None else None
    # Resuming takes the saved config; explicit overrides still win (e.g. more epochs).
    saved = resume_config(ckpt_dir) if resume and ckpt_dir is not None else None
    if saved is not None and ckpt_dir is not None and saved.get("experiment") != exp.name:
        raise _another_experiment(exp, ckpt_dir, saved, overrides)
    given = overrides.get("data_file")
    data_file = fingerprint.data_file((saved or {}).get("data_file"), given, "run")
    cfg = resolve_config(exp, saved=saved, **{**overrides, "data_file": data_file})
    changed = options.resume_changes(saved, cfg) if saved is not None else {}
    if experiment_path is None and saved:
        experiment_path = saved.get("experiment_path")
    setup, ts = build(exp, cfg)
    if not cfg.devices:  # (over a mesh, fbp.distributed.parallel describes the memory)
        check_memory(setup, ts)
    data = fingerprint.describe(setup.dataset, cfg.data_file)
    if saved is None or out_dir is None or ckpt_dir is None:  # (saved needs a directory)
        config = {**saved_config(exp, cfg, experiment_path), "data": data}
        return Plan(cfg, config, setup, start_position(ts, setup.steps_per_epoch), [], None)
    recorded = fingerprint.recorded(saved)
    diff = fingerprint.check(recorded, data, where="run", accept=accept_changed_data)
    position = start_position(ts, setup.steps_per_epoch)
    resumed_from, position = _load_resumed(ckpt_dir, position, saved, experiment_path, print_fn)
    check_resumable(position, cfg, setup)
    changes = change_entries(changed, diff, data, position)
    config = resumed_config(saved, cfg, changes)
    history = [
        r for r in read_metrics(out_dir / "metrics.jsonl") if r["epoch"] <= position.progress.epoch
    ]
    print_fn(
        f"resuming from {resumed_from.name}: epoch {position.progress.epoch}, "
        f"step {int(position.state.step)}"
    )
    return Plan(cfg, config, setup, position, history, resumed_from, changes)


def resumed_config(
    saved: Mapping[str, Any], cfg: RunOptions, changes: list[dict[str, Any]]
) -> dict[str, Any]:
    """A resumed run's saved config: the original, this process's own options, the changes."""
    return {
        **saved,
        **{f.name: getattr(cfg, f.name) for f in options.fields() if f.meta.resume == "process"},
        "changes": [*saved.get("changes", []), *changes],
    }


def change_entries(
    changed: Mapping[str, tuple[Any, Any]],
    data_diff: str | None,
    data: dict[str, Any],
    position: ResumePosition,
) -> list[dict[str, Any]]:
    """The ``changes`` entries of a resume: each changed option, and accepted new data.

    ``epoch`` is the first epoch trained with the change (1-based), ``step`` the
    optimizer step it took effect at.
    """
    at = {"epoch": position.progress.epoch + 1, "step": int(position.state.step)}
    out = [{**at, "option": k, "from": a, "to": b} for k, (a, b) in changed.items()]
    if data_diff is not None:
        out.append({**at, "option": "data", "what": data_diff, "to": data})
    return out


def check_memory(setup: Setup, ts: fbp_train.TrainState) -> None:
    """Refuse, in one line, a run that clearly cannot fit the device's free memory.

    The estimate is the sweeps' (``fbp.memory.run_bytes``) for one run, from shapes
    alone (nothing is compiled or allocated).

    Raises:
      ValueError: the estimate exceeds the free memory.
    """
    x = setup.x
    state = jax.eval_shape(lambda t: t, ts)
    data_bytes = fbp_memory.tree_bytes((x, setup.y, setup.val or ()))
    need = fbp_memory.run_bytes(setup.model, state, x, setup.batch_size, data_bytes, own_data=True)
    fbp_memory.check_run_fits(need.per_run, fbp_memory.available_bytes())


def execute(
    exp: Experiment,
    p: Plan,
    out_dir: Path | None,
    *,
    overwrite: bool,
    print_fn: Callable[[str], None],
    writer: bool = True,
) -> RunResult:
    """Train from the plan's position and report, writing ``out_dir``.

    A fresh run that stops with an error before its first checkpoint removes what it
    wrote, so nothing stands in the way of running it again. ``writer=False`` (the
    processes other than 0 of a run across processes) checks what it would save and
    handles signals like process 0, but writes nothing.

    Raises:
      WriteError: writing failed (a full disk); NonFiniteError, Interrupted: ``run``'s.
    """
    ckpt_dir = out_dir / "checkpoints" if out_dir is not None else None
    saver = Checkpointer(ckpt_dir, p.config, p.cfg.keep, None, last=p.resumed_from, writer=writer)
    write_dir = out_dir if writer else None
    printer = Printer(
        print_fn,
        p.cfg.epochs,
        exp.log_every,
        steps_per_epoch=p.setup.steps_per_epoch,
        start=p.position.progress.epoch * p.setup.steps_per_epoch + p.position.progress.pos,
    )
    print_fn(f"training {exp.name}: {data_line(p.cfg, p.setup.dataset)}")
    history = list(p.history)
    try:
        if write_dir is not None:
            if overwrite:
                clear_owned(write_dir)
            ckpt.clean_temporaries(write_dir / "checkpoints")
            saver.log = MetricsLog(write_dir / "metrics.jsonl", history)
        position = train(
            p.setup,
            p.cfg,
            p.position,
            saver=saver,
            log=saver.log,
            printer=printer,
            history=history,
            handle_signals=out_dir is not None,
            changes=p.changes,
        )
        if saver.log is not None:
            saver.log.close()
        return report(
            exp, p.cfg, p.config, p.setup, position, history, saver.last, write_dir, print_fn
        )
    except BaseException as e:
        if saver.log is not None:
            with contextlib.suppress(OSError):
                saver.log.close()
        if write_dir is not None and saver.last is None and not isinstance(e, Interrupted):
            with contextlib.suppress(OSError):
                clear_owned(write_dir)
        if isinstance(e, OSError):
            raise WriteError.of(e, saver.last) from e
        if OutOfMemory.caused_by(e):
            raise OutOfMemory.of(e, p.cfg, saver.last) from None
        raise


def _another_experiment(
    exp: Experiment, ckpt_dir: Path, saved: Mapping[str, Any], overrides: Mapping[str, Any]
) -> ValueError:
    """The refusal to resume another experiment's run: said first, then a few mismatched paths."""
    text = (
        f"run: {ckpt_dir.parent} holds a run of experiment {saved.get('experiment')!r}, "
        f"not {exp.name!r}"
    )
    try:  # this experiment's own model against the newest checkpoint
        setup, ts = build(exp, resolve_config(exp, **overrides))
        template = start_position(ts, setup.steps_per_epoch).arrays()
        ckpt.load_latest(ckpt_dir, template, warn=lambda line: None)
    except ckpt.ArchitectureMismatch as e:
        return ckpt.CheckpointError(f"{text}; its checkpoint does not fit this model {e.summary}")
    except ValueError:
        pass  # nothing more to say about it than that
    return ValueError(
        f"{text}; resume it with `fbp train {saved.get('experiment')} --resume`, or give this "
        "experiment another --out."
    )


def _load_resumed(
    ckpt_dir: Path,
    template: ResumePosition,
    saved: Mapping[str, Any],
    experiment_path: str | None,
    print_fn: Callable[[str], None],
) -> tuple[Path, ResumePosition]:
    """``load_position``; a model that does not fit a run of another file says so first."""
    try:
        return load_position(ckpt_dir, template, warn=print_fn)
    except ckpt.ArchitectureMismatch as e:
        if saved.get("experiment_path") in (None, experiment_path):
            raise
        raise ckpt.CheckpointError(
            f"run: {ckpt_dir.parent} holds a run of experiment {saved.get('experiment')!r} "
            f"from {saved.get('experiment_path')}; its checkpoint does not fit this model "
            f"{e.summary}"
        ) from None


def check_resumable(position: ResumePosition, cfg: RunOptions, setup: Setup) -> None:
    done = position.progress.epoch
    if cfg.epochs < done:
        raise ValueError(
            f"run: --epochs {cfg.epochs} is below the {done} epochs this run has done; --epochs "
            f"is the run's total: pass --epochs {done} or more."
        )
    if position.progress.steps_per_epoch != setup.steps_per_epoch:
        raise ValueError(
            f"run: the checkpoint has {position.progress.steps_per_epoch} steps per epoch but "
            f"this config gives {setup.steps_per_epoch}; resume with the same data and batch size."
        )


def resume_config(ckpt_dir: Path) -> dict[str, Any]:
    """The config in the newest checkpoint whose manifest reads (no tensor is read).

    Raises:
      ValueError: there is no checkpoint; CorruptCheckpoint: no manifest reads (each
        checkpoint listed with why). A resume never quietly starts a new run.
    """
    ckpts = ckpt.list_checkpoints(ckpt_dir)
    if not ckpts:
        raise ValueError(
            f"run: --resume: {ckpt_dir.parent} has no checkpoint to resume from; run without "
            "--resume to start it."
        )
    refused: list[tuple[Path, ckpt.CheckpointError]] = []
    for p in reversed(ckpts):
        try:
            config = ckpt.read_manifest(p).get("meta", {}).get("config")
        except ckpt.CheckpointError as e:
            refused.append((p, e))
            continue
        if isinstance(config, dict):
            return config
        refused.append((p, ckpt.CorruptCheckpoint("its manifest holds no run config.")))
    raise ckpt.CorruptCheckpoint(ckpt.refusal(ckpt_dir, refused))
