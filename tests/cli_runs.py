"""Helpers for tests that run ``fbp train`` in this process on ``tests/experiments``."""

import json
from pathlib import Path

from fbp.run import cli

EXPERIMENTS = str(Path(__file__).parent / "experiments")


def use_test_experiments(monkeypatch) -> None:
    """Make fbp find the test experiments (``tiny``, ``wide``...) first; ``tiny`` unpoisoned."""
    monkeypatch.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
    monkeypatch.delenv("TINY_POISON", raising=False)


def train(out, *args, name: str = "tiny") -> int:
    """``fbp train NAME --out OUT ARGS...``; returns the exit status."""
    return cli.main(["train", name, "--out", str(out), *map(str, args)])


def summary(out) -> dict:
    """The run directory ``out``'s summary.json."""
    return json.loads((Path(out) / "summary.json").read_text())


def iris_csv(path: Path, rows: int = 150) -> Path:
    """iris as a CSV (4 features, label last), its first ``rows`` rows."""
    from sklearn.datasets import load_iris

    b = load_iris()
    lines = ["a,b,c,d,label"] + [
        ",".join(f"{v:.1f}" for v in x) + f",{int(y)}"
        for x, y in zip(b.data[:rows], b.target[:rows], strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
