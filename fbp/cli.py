"""The ``fbp`` command: ``fbp list``, ``fbp train EXPERIMENT``."""

from __future__ import annotations

import argparse
import sys

from fbp import experiment


def _cmd_list(args: argparse.Namespace) -> int:
    for name, path in sorted(experiment.available().items()):
        print(f"{name:<28} {experiment.get(str(path)).description}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    exp = experiment.get(args.experiment)
    experiment.run(exp, epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbp", description="Hand-written backprop in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list experiments with one-line descriptions")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("train", help="train an experiment and report its test metrics")
    p.add_argument("experiment", help="experiment name (see `fbp list`) or path to a .py file")
    p.add_argument("--epochs", type=int, help="total epochs (default: the experiment's)")
    p.add_argument("--seed", type=int, help="seed for init, data split and shuffling")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="minibatch size")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"fbp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
