"""The ``fbp`` command: ``list``, ``train``, ``eval``, ``export``.

Exit status: 0 done; 2 bad input (arguments, data, config, checkpoint, a run
directory in use by another process), nothing written, or a run across processes
that could not join within ``--coordinator-timeout``; 3 a non-finite loss/gradient
under ``--nonfinite halt``; 4 writing failed (a full disk, an I/O error): the last
checkpoint is intact and ``--resume`` continues once there is space; 5 the device ran
out of memory during training (one line says what to change; the last checkpoint is
kept); 130/143
stopped by SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues); 1 any
other error in a run across processes (the process exits at once, so that the
others fail rather than wait).

Without ``--out``, ``fbp train NAME`` writes to ``runs/NAME-YYYYmmdd-HHMMSS``
(``-2``, ``-3``... when that exists). ``--seeds``/``--sweep`` train many runs as one
program (``fbp.run.sweep``). ``fbp train`` launched once per process (``srun``, the
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` variables, or
``--coordinator``,
``--num-processes``, ``--process-id``) trains one run over every process's devices;
only process 0 prints and writes (``fbp.distributed.cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
import traceback
from pathlib import Path

import jax

from fbp import compile_cache, xla_config
from fbp.distributed import cluster
from fbp.run import experiment, export, loop, options, report, runner
from fbp.run.sweep import command as sweep_command


def _cmd_list(args: argparse.Namespace) -> int:
    for name, paths in sorted(experiment.candidates().items()):
        path = paths[0]
        try:
            experiment.check_unique(
                name, paths, lambda line: print(f"fbp: {line}", file=sys.stderr)
            )
            exp = experiment.get(str(path))
        except experiment.ExperimentFileError as e:
            print(f"fbp: warning: skipping {e}", file=sys.stderr)
            continue
        print(f"{name:<28} {exp.description}")
    return 0


def _experiment_path(name: str) -> str:
    if name.endswith(".py"):
        return str(Path(name).resolve())
    known = experiment.available()
    return str(known[name].resolve()) if name in known else name


def _new_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS``, made now; ``-2``, ``-3``... when that one exists."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        path = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _cmd_train(args: argparse.Namespace) -> int:
    given = options.from_namespace(args)
    # Before any JAX work: join the run's other processes, split a CPU-only host's CPU.
    cluster.launch(given, out=args.out)
    _compilation_cache(args)
    exp = experiment.get(args.experiment)
    out = Path(args.out) if args.out else _new_run_dir(exp.name)
    try:
        return _train(exp, out, args, given)
    finally:
        if not args.out:  # the directory made for this run, if nothing was written to it
            with contextlib.suppress(OSError):
                out.rmdir()


def _train(exp: experiment.Experiment, out: Path, args: argparse.Namespace, given) -> int:
    main_process = cluster.is_main_process()
    train = sweep_command.from_args(args, out) or runner.run  # --seeds/--sweep: fbp.run.sweep
    try:
        train(
            exp,
            out=out,
            resume=args.resume,
            overwrite=args.overwrite,
            experiment_path=_experiment_path(args.experiment),
            accept_changed_data=args.accept_changed_data,
            print_fn=print if main_process else (lambda s: None),
            **given,
        )
    except runner.Interrupted as e:
        if main_process:  # the one that saved the checkpoint
            print(f"fbp: {e}; continue with --resume.", file=sys.stderr)
        return e.exit_code
    except loop.NonFiniteError as e:
        if main_process:
            print(f"fbp: error: {e}", file=sys.stderr)
        return 3
    except runner.WriteError as e:
        print(f"fbp: error: {e}", file=sys.stderr)
        return 4
    except runner.OutOfMemory as e:
        print(f"fbp: error: {e}", file=sys.stderr)
        return 5
    except ValueError:
        raise  # exit 2 (main); bad input stops every process of a run together
    except Exception:
        if jax.process_count() > 1:  # end now, so that the other processes fail, not wait
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    return 0


def _compilation_cache(args: argparse.Namespace) -> None:
    """The persistent compilation cache (``fbp.compile_cache``), unless switched off.

    After ``cluster.launch``: its check compiles a probe, which starts JAX's backend.
    """
    if getattr(args, "compilation_cache", True):
        compile_cache.enable_compilation_cache()


def _cmd_eval(args: argparse.Namespace) -> int:
    _compilation_cache(args)
    metrics = export.evaluate_dir(
        args.dir,
        which=args.which or report.reported_parameters(args.dir),
        data_file=args.data,
        accept_changed_data=args.accept_changed_data,
    )
    print(
        f"test {'  '.join(f'{k} {v:.4f}' for k, v in metrics['test'].items())} "
        f"({metrics['params']} parameters of {metrics['checkpoint']})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _compilation_cache(args)
    which = args.which or report.reported_parameters(args.dir)
    path = export.export_dir(
        args.dir,
        out=args.out,
        which=which,
        data_file=args.data,
        accept_changed_data=args.accept_changed_data,
    )
    print(f"exported to {path} (load it with the snippet in {path / 'README.txt'})")
    return 0


def _add_accept(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accept-changed-data",
        action="store_true",
        help="use the data although it changed since the run was trained (recorded in the run)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbp", description="Hand-written backprop in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list experiments with one-line descriptions")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "train",
        help="train an experiment and report its test metrics",
        description="Train an experiment; metrics, checkpoints, summary and plots go to --out.",
    )
    p.add_argument("experiment", help="experiment name (see `fbp list`) or path to a .py file")
    p.add_argument("--out", help="run directory (default runs/NAME-YYYYmmdd-HHMMSS)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --out"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard a previous run's files in --out"
    )
    p.add_argument(
        "--compilation-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep compiled programs in $XDG_CACHE_HOME/fbp/xla (~/.cache/fbp/xla) for the "
        "next run (default on; FBP_COMPILATION_CACHE=0 also turns it off)",
    )
    options.add_arguments(p)
    _add_accept(p)
    sweep_command.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    for name, helptext in (
        ("eval", "evaluate a run's checkpoint on the test split"),
        ("export", "export a run's model as a jax.export artifact"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("dir", help="the run directory (--out of fbp train)")
        p.add_argument(
            "--which",
            choices=["best", "last"],
            help="best parameters by validation loss or the last ones (default: those the "
            "run's report evaluated, best after early stopping, else last)",
        )
        if name == "export":
            p.add_argument("--out", help="where to write (default DIR/export)")
        p.add_argument(
            "--data",
            metavar="FILE",
            help="the run's data file, where it is now (default: the path the run recorded)",
        )
        _add_accept(p)
        p.set_defaults(func=_cmd_eval if name == "eval" else _cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    xla_config.configure_cpu(experiment=getattr(args, "experiment", None))  # before JAX starts
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except (ValueError, TimeoutError) as e:  # TimeoutError: no coordinator answered
        print(f"fbp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (fbp list | head -1): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
