"""Real data sets and splits: scikit-learn's bundled data, stratified splits, standardisation.

Everything here runs on the host in NumPy, before anything is compiled.

Examples:
  >>> from fbp import data
  >>> ds = data.load("digits", seed=0)
  >>> ds.train.x.shape[1], ds.classes
  (64, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    x: np.ndarray  # (n, features...) float32
    y: np.ndarray  # (n,) int32 labels, or (n, targets) float32


class Dataset(NamedTuple):
    train: Split
    val: Split
    test: Split
    classes: int | None  # number of classes; None for regression
    name: str


def _sklearn_loader(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load():
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return bunch.data, bunch.target

    return load


SKLEARN_SETS = {
    name: _sklearn_loader(name) for name in ("digits", "iris", "breast_cancer", "wine", "diabetes")
}
REGRESSION = {"diabetes"}


def split(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    stratify: bool = True,
) -> tuple[Split, Split, Split]:
    """Train/validation/test splits by seed, stratified by label for classification.

    Args:
      x: features, shape (n, ...); y: targets, shape (n,) or (n, targets).
      seed: the split's seed (the same seed gives the same split).
      val_fraction, test_fraction: shares of the whole set (the rest is train).
      stratify: keep class proportions in every split (integer labels only).
    """
    from sklearn.model_selection import train_test_split

    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"split: need 0 <= val_fraction, 0 < test_fraction and their sum < 1; got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}."
        )
    strat = y if stratify else None
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=strat
    )
    if val_fraction == 0:
        return Split(x_rest, y_rest), Split(x_rest[:0], y_rest[:0]), Split(x_test, y_test)
    val_share = val_fraction / (1 - test_fraction)
    strat = y_rest if stratify else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=strat
    )
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


def standardize(train: Split, *others: Split) -> tuple[Split, ...]:
    """Zero mean, unit variance per feature, fitted on ``train`` only.

    Features constant on train (std 0) are centred and left unscaled.
    """
    axes = 0
    mean = train.x.mean(axis=axes)
    std = train.x.std(axis=axes)
    std = np.where(std > 0, std, 1.0)
    return tuple(Split(((s.x - mean) / std).astype(np.float32), s.y) for s in (train, *others))


def load(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    standardize_x: bool = True,
) -> Dataset:
    """One of scikit-learn's bundled data sets, split by seed and standardised on train.

    Args:
      name: ``digits``, ``iris``, ``breast_cancer``, ``wine`` or ``diabetes`` (regression).
      seed: split seed.
      val_fraction, test_fraction: split shares.
      standardize_x: standardise features with train statistics.

    Returns:
      A Dataset: float32 features; int32 labels, or float32 targets of shape (n, 1)
      for regression.
    """
    if name not in SKLEARN_SETS:
        raise ValueError(f"data.load: unknown data set {name!r}; expected one of {sorted(SKLEARN_SETS)}.")
    x, y = SKLEARN_SETS[name]()
    x = np.asarray(x, np.float32)
    regression = name in REGRESSION
    y = np.asarray(y, np.float32).reshape(-1, 1) if regression else np.asarray(y, np.int32)
    tr, va, te = split(
        x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        stratify=not regression,
    )
    if standardize_x:
        tr, va, te = standardize(tr, va, te)
    classes = None if regression else int(y.max()) + 1
    return Dataset(tr, va, te, classes, name)
