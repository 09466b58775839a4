"""Sweeps: seeds × a grid of option values, trained as one vmapped program.

``fbp.run.sweep.run(exp, seeds=..., grid=..., out=DIR)`` (and ``fbp train EXP --seeds 0-7
--sweep lr=1e-3,3e-3``) trains every run of the product at once: their train states
are stacked on a leading axis and each jitted chunk is one ``jax.vmap`` of the
single-run step (``fbp.run.sweep.stack``); the host keeps each run's counters, metrics
and checkpoints as a single run does (``fbp.run.sweep.loop``). In ``DIR``:

* ``<run>/`` for every run (``seed-3``, ``lr-0.003``, ``lr-0.003_seed-1``): the files
  of a single run (``metrics.jsonl``, ``summary.json``, plots, ``checkpoints/``),
  written by the same code; ``fbp eval``/``export`` read it as any run;
* ``sweep.json``: what was swept, the summary table and each run's test metrics;
  ``sweep.md``: the table; ``comparison.png``: every grid point's validation curve,
  mean ± std over seeds.

Each run's result is that of the same run trained alone (``fbp train EXP --seed S
--lr V``) up to float rounding: a vmapped matrix product may sum in another order.
``--resume`` continues every run from its checkpoints; SIGINT/SIGTERM checkpoint
every run; a run that stops early keeps its best parameters and no longer changes.

Examples:
  >>> from fbp.run import experiment, sweep
  >>> exp = experiment.get("xor")
  >>> result = sweep.run(exp, seeds=[0, 1], grid={"lr": [1.0, 2.0]}, epochs=50,
  ...                    print_fn=lambda line: None)
  >>> sorted(result.runs)
  ['lr-1.0_seed-0', 'lr-1.0_seed-1', 'lr-2.0_seed-0', 'lr-2.0_seed-1']
  >>> [(row["group"], len(row["runs"])) for row in result.table]
  [('lr=1.0', 2), ('lr=2.0', 2)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fbp import checkpoint as ckpt
from fbp import train as fbp_train
from fbp.run import fingerprint, options, runner, variants
from fbp.run.experiment import Experiment, RunResult
from fbp.run.loop import Best, Checkpointer, OutOfMemory, load_position, start_position
from fbp.run.metrics import MetricsLog, read_metrics
from fbp.run.progress import Printer
from fbp.run.report import restores_best
from fbp.run.rundir import RunLock, clear_owned, prepare_dir
from fbp.run.sweep import grid as grid_mod
from fbp.run.sweep import memory, report
from fbp.run.sweep import stack as stk
from fbp.run.sweep.grid import Point, check_grid, check_seeds, parse_grid, parse_seeds, points
from fbp.run.sweep.loop import Data, Run, Stacked, position, train

__all__ = [
    "Point",
    "SweepResult",
    "check_grid",
    "check_seeds",
    "parse_grid",
    "parse_seeds",
    "points",
    "run",
    "saved_spec",
]

SPEC = "sweep.json"
OWNED = (SPEC, "sweep.md", "comparison.png")


@dataclasses.dataclass
class SweepResult:
    """What a sweep produced."""

    experiment: Experiment
    runs: dict[str, RunResult]  # by run name, in sweep order
    points: list[Point]
    table: list[dict[str, Any]]  # per grid point: runs, mean ± std of test metrics (report)
    train_seconds: float  # wall time of the training loop, all runs together
    out: Path | None
    reports: dict[str, list[str]]  # each run's report lines, as fbp train prints them


def run(
    exp: Experiment,
    *,
    seeds: Sequence[int] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
    experiment_path: str | None = None,
    accept_changed_data: bool = False,
    **overrides: Any,
) -> SweepResult:
    """Train every run of seeds × grid as one vmapped program; report each and the table.

    Args:
      exp: an ``fbp.run.experiment.Experiment``; one with variants is swept once per
        variant, in ``out/<variant>`` (runs named ``<variant>/<run>`` in the result).
      seeds: the seeds, e.g. ``range(8)``; None: the run's own seed alone.
      grid: ``{option: values}`` over sweepable options (``fbp.run.options.sweepable()``:
        ``lr``, ``weight_decay``, ``clip``, ``patience``); runs are its product with seeds.
      out: the sweep's directory (a directory per run in it); None keeps everything in
        memory (no files, no signal handling).
      resume: continue every run from its newest valid checkpoint in ``out``.
      overwrite: discard what a previous sweep wrote in ``out``.
      print_fn: where progress and the summary go.
      experiment_path: the experiment's file, recorded for ``fbp eval``/``export``.
      accept_changed_data: resume runs whose data changed since (``fbp.run.fingerprint``;
        recorded in each run's ``changes``); otherwise that is refused.
      **overrides: run options every run shares (``epochs``, ``batch_size``...);
        ``devices=N`` splits the runs over N devices (N must divide their number).

    Returns:
      A ``SweepResult``.

    Raises:
      ValueError: a bad seed list or grid, runs that do not fit in memory, bad data or
        checkpoints; all before anything is written.
      Interrupted: SIGTERM/SIGINT, after checkpointing every run.
      NonFiniteError: a non-finite step in some run under ``nonfinite='halt'``.
    """
    seeds = check_seeds(seeds) if seeds is not None else None
    grid = check_grid(grid or {})
    if seeds is None and not grid:
        raise ValueError("sweep: nothing to sweep; give seeds or a grid of option values.")
    _check_request(exp, seeds, grid, overrides)
    if exp.variants:
        kw = dict(
            resume=resume,
            overwrite=overwrite,
            print_fn=print_fn,
            accept_changed_data=accept_changed_data,
        )
        return _variants(exp, seeds, grid, out, experiment_path, kw, overrides)
    # the runs are split over the devices; no single run is data-parallel
    devices = overrides.pop("devices", None)
    spec = {
        "experiment": exp.name,
        "seeds": list(seeds) if seeds is not None else None,
        "grid": {k: list(v) for k, v in grid.items()},
    }
    pts = points(seeds, grid)
    if overrides.get("data_file"):  # recorded absolute, so eval finds it from anywhere
        overrides = {**overrides, "data_file": str(Path(overrides["data_file"]).resolve())}
    overrides = {**overrides, "accept_changed_data": accept_changed_data}
    if out is None:
        return _sweep(
            exp, pts, spec, None, resume, overwrite, print_fn, experiment_path, overrides, devices
        )
    lock = RunLock(Path(out))
    try:
        return _sweep(
            exp, pts, spec, Path(out), resume, overwrite, print_fn, experiment_path, overrides,
            devices,
        )  # fmt: skip
    finally:
        lock.release(remove_dir=True)


def saved_spec(out: str | os.PathLike) -> dict[str, Any] | None:
    """What the sweep in ``out`` sweeps (``seeds``, ``grid``), or None if ``out`` holds none."""
    path = Path(out) / SPEC
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return {"experiment": doc["experiment"], "seeds": doc["seeds"], "grid": doc["grid"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"sweep: {path} is not a sweep's {SPEC}.") from None


def _check_request(exp, seeds, grid, overrides) -> None:
    variants.check(exp)
    devices = overrides.get("devices")
    if devices:
        n_runs = len(points(seeds, grid))
        if devices > jax.device_count():
            raise ValueError(
                f"sweep: --devices {devices} but this process sees {jax.device_count()} device(s)."
            )
        if n_runs % devices:
            raise ValueError(
                f"sweep: --devices {devices} must divide the number of runs ({n_runs}): each "
                "device trains the same number of runs."
            )
        if overrides.get("shard_params"):
            raise ValueError("sweep: --shard-params does not apply to a sweep (runs are split).")
    if seeds is not None and overrides.get("seed") is not None:
        raise ValueError("sweep: --seed and --seeds both given; give the seeds with --seeds.")
    for name in grid:
        if overrides.get(name) is not None:
            raise ValueError(f"sweep: {name} is both swept (--sweep {name}=...) and set alone.")


# ----------------------------------------------------------------------------- variants


def _variants(exp, seeds, grid, out, experiment_path, kw, overrides) -> SweepResult:
    """The sweep of each variant in ``out/<variant>``, then one table of them all.

    Each variant is its own program (variants may differ in model or optimizer); the
    result's runs are named ``<variant>/<run>`` and its table rows ``<variant>: <point>``.
    """
    results = {}
    for name, over in (exp.variants or {}).items():
        kw["print_fn"](f"=== {exp.name} / {name}")
        sub = dataclasses.replace(
            exp, **{"report": None, **over, "variants": None, "name": f"{exp.name}/{name}"}
        )
        sub_out = Path(out) / name if out is not None else None
        results[name] = run(
            sub, seeds=seeds, grid=grid, out=sub_out, experiment_path=experiment_path,
            **kw, **overrides,
        )  # fmt: skip
    table = [
        {**row, "group": f"{name}: {row['group']}" if row["group"] else name}
        for name, r in results.items()
        for row in r.table
    ]
    kw["print_fn"](f"== {exp.name}: {len(results)} variants\n" + report.markdown(table))
    return SweepResult(
        exp,
        {f"{n}/{k}": v for n, r in results.items() for k, v in r.runs.items()},
        [p for r in results.values() for p in r.points],
        table,
        sum(r.train_seconds for r in results.values()),
        Path(out) if out is not None else None,
        {f"{n}/{k}": v for n, r in results.items() for k, v in r.reports.items()},
    )


def _place(stacked: Stacked, data: Data, devices: int | None, own_data: bool):
    """With ``devices``, split the run axis over that many devices (shared data replicated)."""
    if not devices:
        return stacked, data
    mesh = Mesh(np.array(jax.devices()[:devices]), ("runs",))
    runs_axis = NamedSharding(mesh, PartitionSpec("runs"))
    whole = NamedSharding(mesh, PartitionSpec())
    stacked = jax.device_put(stacked, runs_axis)
    shared = runs_axis if own_data else whole
    data = Data(
        jax.device_put(data.hp, runs_axis),
        jax.device_put(data.x, shared),
        jax.device_put(data.y, shared),
        None if data.val is None else jax.device_put(data.val, shared),
    )
    return stacked, data


# ----------------------------------------------------------------------------- the sweep


def _sweep(exp, pts, spec, out, resume, overwrite, print_fn, experiment_path, overrides, devices):
    # ---- everything that can fail on input, before DIR is touched
    overrides = dict(overrides)
    accept = overrides.pop("accept_changed_data", False)
    cfgs = [options.resolve(exp, None, {**overrides, **p.overrides}) for p in pts]
    own_data = len({c.seed for c in cfgs}) > 1
    _check_memory(exp, cfgs[0], len(pts), own_data)
    if out is not None:
        prepare_dir(out, resume=resume, overwrite=overwrite)
        _check_spec(out, spec, resume)
        _check_run_dirs(out, pts, resume and not overwrite)
        for p in pts:
            prepare_dir(out / p.name, resume=resume, overwrite=overwrite)
    runs, positions, resumed = _build_runs(
        exp, pts, out, resume, print_fn, experiment_path, overrides, accept
    )
    _check_alike(runs)
    shared = runs[0].cfg
    total = shared.epochs * runs[0].setup.steps_per_epoch
    hp_names = list(spec["grid"])
    hp0 = {n: pts[0].overrides[n] for n in hp_names}
    sweep_def = _sweep_treedef(exp, shared, total, positions[0].state, hp0)
    states = [stk.restructure(p.state, sweep_def) for p in positions]  # checks the layouts

    # ---- from here on DIR is written
    locks = _open_dirs(out, spec, pts, runs, overwrite) if out is not None else []
    try:
        for r in runs:
            r.log = MetricsLog(r.out / "metrics.jsonl", r.history) if r.out else None
            ckpt_dir = r.out / "checkpoints" if r.out else None
            last = resumed.get(r.point.name)
            r.saver = Checkpointer(ckpt_dir, r.config, r.cfg.keep, r.log, last=last)
        stacked = Stacked(
            stk.stack(states),
            stk.stack([p.best for p in positions]),
            stk.stack([p.order_key for p in positions]),
        )
        data = _data(runs, stk.hyperparams([p.overrides for p in pts], hp_names), own_data)
        stacked, data = _place(stacked, data, devices, own_data)
        program = stk.build_program(exp, shared, runs[0].setup, total, own_data=own_data)
        on = f" on {devices} devices" if devices else ""
        print_fn(f"sweep {exp.name}: {len(runs)} runs in one program{on} ({_describe(spec)})")
        spe = runs[0].setup.steps_per_epoch
        start = min(r.progress.epoch * spe + r.progress.pos for r in runs)
        printer = Printer(print_fn, shared.epochs, exp.log_every, steps_per_epoch=spe, start=start)
        try:
            stacked = train(
                runs, stacked, program, data,
                printer=printer, handle_signals=out is not None, sweep_dir=out,
            )  # fmt: skip
        except Exception as e:
            if OutOfMemory.caused_by(e):
                raise _out_of_memory(e, runs) from None
            raise
        finally:
            for r in runs:
                if r.log is not None:
                    r.log.close()
        return _report(exp, pts, spec, runs, stacked, program, out, print_fn)
    finally:
        for lock in locks:
            lock.release()


def _out_of_memory(error: BaseException, runs: Sequence[Run]) -> OutOfMemory:
    """A sweep's allocation failure in one line: what ran out, what to change, what is kept."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    bs = runs[0].setup.batch_size
    saved = any(r.saver is not None and r.saver.last is not None for r in runs)
    kept = (
        "each run's last checkpoint is kept (--resume continues)"
        if saved
        else "no checkpoint was written yet"
    )
    return OutOfMemory(
        f"out of memory during the sweep ({first}); sweep fewer --seeds or --sweep values, use "
        f'a smaller --batch-size than {bs} or window, or memory="linear" / nn.Recompute in '
        f"the model; {kept}."
    )


def _open_dirs(out: Path, spec: dict[str, Any], pts, runs: Sequence[Run], overwrite: bool):
    """Lock and make every run's directory, clear what ``overwrite`` discards, write the spec."""
    locks = []
    try:
        dirs = [cast(Path, r.out) for r in runs]  # every run has one when the sweep has
        locks += [RunLock(d) for d in dirs]
        if overwrite:
            for d in dirs:
                clear_owned(d)
            _clear_sweep_files(out)
        for d in dirs:
            ckpt.clean_temporaries(d / "checkpoints")
        full = {**spec, "experiment_path": runs[0].config.get("experiment_path")}
        full["runs"] = [p.name for p in pts]
        ckpt.atomic_write(out / SPEC, json.dumps(full, indent=1) + "\n")
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _build_runs(exp, pts, out, resume, print_fn, experiment_path, overrides, accept=False):
    """Each run's options, setup and position (resumed from its checkpoints when asked).

    A resumed run's data and options are checked as a single run's are
    (``fbp.run.runner.plan``): changed data refused unless ``accept``, options that
    cannot change refused, the others recorded in its config's ``changes``.
    """
    runs, positions, resumed = [], [], {}
    for p in pts:
        run_dir = out / p.name if out is not None else None
        ckpt_dir = run_dir / "checkpoints" if run_dir is not None else None
        # A run of the sweep with no checkpoint at all starts over; one whose
        # checkpoints are all unreadable is refused, like a single run.
        saved_any = resume and ckpt_dir is not None and bool(ckpt.list_checkpoints(ckpt_dir))
        saved = runner.resume_config(ckpt_dir) if saved_any and ckpt_dir else None
        where = f"sweep {run_dir or p.name}"
        data_file = fingerprint.data_file(
            (saved or {}).get("data_file"), overrides.get("data_file"), where
        )
        cfg = options.resolve(exp, saved, {**overrides, **p.overrides, "data_file": data_file})
        changed = options.resume_changes(saved, cfg) if saved else {}
        path = experiment_path or (saved or {}).get("experiment_path")
        setup, ts = runner.build(exp, cfg)
        data = fingerprint.describe(setup.dataset, cfg.data_file)
        diff = None
        if saved:
            recorded = fingerprint.recorded(saved)
            diff = fingerprint.check(recorded, data, where=where, accept=accept)
        position = start_position(ts, setup.steps_per_epoch)
        history: list[dict[str, Any]] = []
        run_ = Run(
            p,
            cfg,
            {**runner.saved_config(exp, cfg, path), "data": data},
            setup,
            jax.tree.structure(ts),
            position.progress,
            history,
            run_dir,
        )
        if saved and ckpt_dir is not None and run_dir is not None:  # (saved needs both)
            resumed[p.name], position = load_position(ckpt_dir, position, warn=print_fn)
            runner.check_resumable(position, cfg, setup)
            entries = runner.change_entries(changed, diff, data, position)
            run_.config = runner.resumed_config(saved, cfg, entries)
            run_.progress = position.progress
            run_.history[:] = [
                r
                for r in read_metrics(run_dir / "metrics.jsonl")
                if r["epoch"] <= position.progress.epoch
            ]
        runs.append(run_)
        positions.append(position)
    if resumed:
        at = sorted({r.at for r in runs if r.point.name in resumed})
        where = ", ".join(f"epoch {e} step {s}" for e, s in at)
        print_fn(f"resuming {len(resumed)} of {len(runs)} runs from their checkpoints ({where})")
    elif resume and out is not None:
        raise ValueError(
            f"run: --resume: no run of the sweep in {out} has a checkpoint to resume from; run "
            "without --resume to start it."
        )
    return runs, positions, resumed


def _check_memory(exp, cfg, n_runs: int, own_data: bool) -> None:
    """Refuse (saying how many fit) a sweep whose runs do not fit in the device's memory."""
    ds = runner.load_data(exp, cfg)
    model = exp.model(ds)
    x = jax.ShapeDtypeStruct(ds.train.x.shape, jnp.asarray(ds.train.x[:1]).dtype)
    bs = cfg.batch_size or x.shape[0]
    steps = max(x.shape[0] // bs, 1)
    opt, _ = runner.build_optimizer(exp, cfg, cfg.epochs * steps)
    state = jax.eval_shape(lambda k: fbp_train.init(model, opt, k, x), jax.random.key(cfg.seed))
    data_bytes = sum(a.nbytes for s in (ds.train, ds.val) for a in (s.x, s.y))
    need = memory.run_bytes(model, state, x, bs, data_bytes, own_data=own_data)
    device = jax.devices()[0]
    memory.check_fits(
        n_runs, need.per_run, need.shared, memory.available_bytes(device), device.platform
    )


def _check_spec(out: Path, spec: dict[str, Any], resume: bool) -> None:
    saved = saved_spec(out)
    if (
        resume
        and saved is not None
        and (saved["seeds"], saved["grid"])
        != (
            spec["seeds"],
            spec["grid"],
        )
    ):
        raise ValueError(
            f"sweep: {out} holds a sweep of {_describe(saved)}, not of {_describe(spec)}; "
            "resume it with the same --seeds and --sweep (or none)."
        )


def _check_run_dirs(out: Path, pts: Sequence[Point], resume: bool) -> None:
    """On resume, refuse (naming them) run directories that are gone while others remain."""
    if not resume:
        return
    missing = [str(out / p.name) for p in pts if not (out / p.name).is_dir()]
    if missing and len(missing) < len(pts):
        raise ValueError(
            f"sweep: --resume: the run director{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)} of this sweep {'is' if len(missing) == 1 else 'are'} "
            "missing; restore it from a copy, or pass --overwrite to start the whole sweep over."
        )


def _describe(spec: dict[str, Any]) -> str:
    parts = []
    if spec.get("seeds") is not None:
        parts.append("seeds " + ",".join(map(str, spec["seeds"])))
    for k, v in spec.get("grid", {}).items():
        parts.append(f"{k} " + ",".join(grid_mod.value_text(x) for x in v))
    return "; ".join(parts)


def _check_alike(runs: Sequence[Run]) -> None:
    """Every run must share the model, shapes and the options that are not swept."""
    first = runs[0]
    swept = set(first.point.overrides) | {"seed"}
    for r in runs[1:]:
        for name in options.names():
            if name not in swept and getattr(r.cfg, name) != getattr(first.cfg, name):
                raise ValueError(
                    f"sweep: runs {first.point.name} and {r.point.name} differ in {name} "
                    f"({getattr(first.cfg, name)!r} vs {getattr(r.cfg, name)!r}); give it on "
                    "the command line to set it for every run."
                )
        if r.setup.model != first.setup.model:
            raise ValueError(
                f"sweep: run {r.point.name} builds another model than {first.point.name}; "
                "the runs of a sweep share one model."
            )
        for split in ("train", "val", "test"):
            a, b = getattr(r.setup.dataset, split), getattr(first.setup.dataset, split)
            if a.x.shape != b.x.shape or a.y.shape != b.y.shape:
                raise ValueError(
                    f"sweep: run {r.point.name}'s {split} split has shape {a.x.shape} but "
                    f"{first.point.name}'s has {b.x.shape}; the runs of a sweep share shapes."
                )


def _sweep_treedef(exp, cfg, total, state, hp0) -> Any:
    opt_state = stk.optimizer_structure(exp, cfg, total, state.params, hp0)
    return jax.tree.structure(state._replace(opt_state=opt_state))


def _clear_sweep_files(out: Path) -> None:
    for name in OWNED:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _data(runs: Sequence[Run], hp: dict[str, Any], own_data: bool) -> Data:
    val = None
    if runs[0].setup.val is not None:
        val = tuple(_arrays(runs, own_data, _val_field(k)) for k in (0, 1))
    x = _arrays(runs, own_data, lambda r: r.setup.x)
    return Data(hp, x, _arrays(runs, own_data, lambda r: r.setup.y), val)


def _val_field(k: int) -> Callable[[Run], Any]:
    return lambda r: cast(tuple, r.setup.val)[k]  # called only when runs have val


def _arrays(runs: Sequence[Run], own_data: bool, get: Callable[[Run], Any]) -> Any:
    """Each run's array stacked (runs, n, ...) when runs have their own data, else run 0's."""
    return stk.stack([get(r) for r in runs]) if own_data else jnp.asarray(get(runs[0]))


# ----------------------------------------------------------------------------- report


def _report(exp, pts, spec, runs, stacked, program, out, print_fn) -> SweepResult:
    """Each run's test metrics (one call for all), summary, plots; the table and the plot."""
    host = stk.to_host(stacked)
    use_best = np.array([restores_best(r.cfg, r.setup, r.progress) for r in runs])
    last = Best(host.state.params, host.state.model_state)
    final = jax.tree.map(
        lambda b, a: np.where(use_best.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), host.best, last
    )
    test_x = _arrays(runs, program.data_axis == 0, lambda r: r.setup.dataset.test.x)
    test_y = _arrays(runs, program.data_axis == 0, lambda r: r.setup.dataset.test.y)
    tests = stk.evaluate_runs(program, final.params, final.model_state, test_x, test_y)
    results, reports, stopped = {}, {}, {}
    for i, (r, test) in enumerate(zip(runs, tests, strict=True)):
        lines: list[str] = []
        results[r.point.name] = runner.report(
            exp,
            r.cfg,
            r.config,
            r.setup,
            position(runs, host, i),
            r.history,
            r.saver.last,
            r.out,
            lines.append,
            test=test,
        )
        reports[r.point.name] = lines
        stopped[r.point.name] = r.progress.stopped_early
    rows = report.summarize(pts, results, stopped)
    seconds = max(r.progress.train_seconds for r in runs)
    for r in runs:
        res = results[r.point.name]
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in res.test.items())
        note = f"  (stopped early at epoch {r.progress.epoch})" if r.progress.stopped_early else ""
        print_fn(f"{r.point.name:<28} test {metrics}{note}")
    print_fn(f"== {exp.name}: {exp.description}")
    for line in report.markdown(rows).splitlines():
        print_fn(line)
    print_fn(f"training time {seconds:.2f} s for {len(runs)} runs (includes compilation)")
    if out is not None:
        report.write(out, {**spec, "runs": [p.name for p in pts]}, rows, results, seconds)
        print_fn(f"outputs in {out}")
    return SweepResult(exp, results, list(pts), rows, seconds, out, reports)
