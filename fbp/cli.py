"""The ``fbp`` command: ``list``, ``train``, ``eval``, ``export``.

Exit status: 0 done; 2 bad input (arguments, data, config, checkpoint), nothing
written; 3 a non-finite loss/gradient under ``--nonfinite halt``; 130/143 stopped
by SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues).

Without ``--out``, ``fbp train NAME`` writes to ``runs/NAME-YYYYmmdd-HHMMSS``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fbp import experiment, xla_config


def _cmd_list(args: argparse.Namespace) -> int:
    for name, path in sorted(experiment.available().items()):
        print(f"{name:<28} {experiment.get(str(path)).description}")
    return 0


def _experiment_path(name: str) -> str:
    if name.endswith(".py"):
        return str(Path(name).resolve())
    known = experiment.available()
    return str(known[name].resolve()) if name in known else name


def _cmd_train(args: argparse.Namespace) -> int:
    from fbp import runner

    exp = experiment.get(args.experiment)
    out = args.out or f"runs/{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "seed",
            "lr",
            "batch_size",
            "patience",
            "clip",
            "weight_decay",
            "schedule",
            "nonfinite",
            "keep",
            "checkpoint_every",
            "chunk_steps",
            "data_file",
            "plateau_factor",
            "plateau_patience",
            "devices",
        )
    }
    if args.devices:  # on a CPU-only machine, split the CPU before JAX starts
        from fbp import parallel

        parallel.request_cpu_devices(args.devices)
    try:
        runner.run(
            exp,
            out=out,
            resume=args.resume,
            overwrite=args.overwrite,
            experiment_path=_experiment_path(args.experiment),
            **options,
        )
    except runner.Interrupted as e:
        print(f"fbp: {e}; continue with --resume.", file=sys.stderr)
        return e.exit_code
    except runner.NonFiniteError as e:
        print(f"fbp: error: {e}", file=sys.stderr)
        return 3
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fbp import export

    metrics = export.evaluate_dir(args.dir, which=args.which)
    print(
        f"test {'  '.join(f'{k} {v:.4f}' for k, v in metrics['test'].items())} "
        f"({metrics['params']} parameters of {metrics['checkpoint']})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fbp import export

    path = export.export_dir(args.dir, out=args.out, which=args.which)
    print(f"exported to {path} (load it with the snippet in {path / 'README.txt'})")
    return 0


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
    p.add_argument("--epochs", type=int, help="total epochs of the run, also when resuming")
    p.add_argument("--seed", type=int, help="seed for init, data split and shuffling")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="minibatch size")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --out"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard a previous run's files in --out"
    )
    p.add_argument(
        "--patience", type=int, help="early stopping: epochs without a better validation loss"
    )
    p.add_argument("--clip", type=float, help="clip gradients to this global norm")
    p.add_argument("--weight-decay", type=float, help="weight decay added to the gradient")
    p.add_argument(
        "--schedule",
        choices=["constant", "cosine", "warmup-cosine", "linear", "plateau"],
        help="learning-rate schedule",
    )
    p.add_argument("--plateau-factor", type=float, help="reduce-on-plateau factor (0.5)")
    p.add_argument("--plateau-patience", type=int, help="reduce-on-plateau patience (5)")
    p.add_argument(
        "--nonfinite",
        choices=["skip", "halt"],
        help="non-finite loss/gradient: skip the step (default) or halt",
    )
    p.add_argument("--keep", type=int, help="checkpoints to keep (plus the best)")
    p.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints")
    p.add_argument(
        "--chunk-steps",
        type=int,
        help="steps per jitted call; signals are served between calls (128)",
    )
    p.add_argument(
        "--data",
        dest="data_file",
        metavar="FILE",
        help="train on a CSV (last column the target) or NPZ (x, y) file",
    )
    p.add_argument(
        "--devices",
        type=int,
        help="data-parallel over N devices, the batch split evenly (fbp.parallel)",
    )
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
            default="best",
            help="best parameters by validation loss (default) or the last ones",
        )
        if name == "export":
            p.add_argument("--out", help="where to write (default DIR/export)")
        p.set_defaults(func=_cmd_eval if name == "eval" else _cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    xla_config.configure_cpu(experiment=getattr(args, "experiment", None))  # before JAX starts
    try:
        return args.func(args)
    except ValueError as e:
        print(f"fbp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
