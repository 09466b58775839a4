"""Real data sets and splits: scikit-learn's bundled data, stratified splits, standardisation.

Everything here runs on the host in NumPy, before anything is compiled. Bad data
(NaN/Inf, wrong feature count, X/y length mismatch, labels outside [0, classes),
non-numeric or object arrays, empty splits) raises ``DataError`` with a one-line
message naming the first bad row and column.

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
    """Three splits and what was done to their features.

    ``x_mean``/``x_std`` are the standardisation the splits went through; ``fbp export``
    bakes them into the exported function so it takes raw features. Derive a data set
    from another with ``ds._replace(train=..., ...)`` or ``reshape`` so they travel along.
    """

    train: Split
    val: Split
    test: Split
    classes: int | None  # number of classes; None for regression
    name: str
    x_mean: np.ndarray | None = None  # (features...) train mean used to standardise; None if raw
    x_std: np.ndarray | None = None  # (features...) train std (1 where constant); None if raw


class DataError(ValueError):
    """Data that cannot be trained on; the message names the first bad row and column."""


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


def standardize_stats(train: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, std) of ``train.x``, float32; std is 1 where a feature is constant."""
    mean = train.x.mean(axis=0)
    std = train.x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(train: Split, *others: Split) -> tuple[Split, ...]:
    """Zero mean, unit variance per feature, fitted on ``train`` only.

    Features constant on train (std 0) are centred and left unscaled.
    """
    mean, std = standardize_stats(train)
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
        raise ValueError(
            f"data.load: unknown data set {name!r}; expected one of {sorted(SKLEARN_SETS)}."
        )
    x, y = SKLEARN_SETS[name]()
    x = np.asarray(x, np.float32)
    regression = name in REGRESSION
    y = np.asarray(y, np.float32).reshape(-1, 1) if regression else np.asarray(y, np.int32)
    tr, va, te = split(
        x,
        y,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        stratify=not regression,
    )
    classes = None if regression else int(y.max()) + 1
    return _finish(tr, va, te, classes, name, standardize_x)


def preprocess(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """Raw features as the model sees them: ``(x - x_mean) / x_std``, or ``x`` unchanged.

    What ``ds`` did to its own splits, for new raw inputs (``fbp export`` bakes the same
    map into the exported function).

    Args:
      ds: the data set whose statistics apply (``x_mean``/``x_std`` None: raw features).
      x: raw features, shape (n, features...).

    Returns:
      float32 array, shape of ``x``.

    Examples:
      >>> import numpy as np
      >>> ds = load("iris", seed=0)
      >>> raw = load("iris", seed=0, standardize_x=False)
      >>> bool(np.allclose(preprocess(ds, raw.test.x), ds.test.x, atol=1e-6))
      True
    """
    x = np.asarray(x, np.float32)
    if ds.x_mean is None:
        return x
    return ((x - ds.x_mean) / ds.x_std).astype(np.float32)


def reshape(ds: Dataset, shape: tuple[int, ...], *, name: str | None = None) -> Dataset:
    """Every split's features reshaped to (n, *shape), statistics with them.

    Args:
      ds: a data set, features of shape (n, features...).
      shape: the new per-example feature shape, e.g. (8, 8) for 64 pixels as 8 rows.
      name: the new data set's name (default: unchanged).

    Examples:
      >>> rows = reshape(load("digits", seed=0), (8, 8))
      >>> rows.train.x.shape[1:], rows.x_mean.shape
      ((8, 8), (8, 8))
    """

    def r(s: Split) -> Split:
        return Split(s.x.reshape(len(s.x), *shape), s.y)

    stats = {}
    if ds.x_mean is not None:
        stats = {"x_mean": ds.x_mean.reshape(shape), "x_std": ds.x_std.reshape(shape)}
    return ds._replace(
        train=r(ds.train), val=r(ds.val), test=r(ds.test), name=name or ds.name, **stats
    )


def _finish(tr: Split, va: Split, te: Split, classes, name: str, standardize_x: bool) -> Dataset:
    mean = std = None
    if standardize_x:
        mean, std = standardize_stats(tr)
        tr, va, te = standardize(tr, va, te)
    return Dataset(tr, va, te, classes, name, mean, std)


# ----------------------------------------------------------------------------- validation


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _where(idx: tuple[int, ...]) -> str:
    cols = ", ".join(str(i) for i in idx[1:])
    return f"row {idx[0]}" + (f", column {cols}" if cols else "")


def _check_array(a: object, what: str) -> np.ndarray:
    if isinstance(a, np.ndarray) and a.dtype == object:
        raise DataError(f"{what} is an object array; only numeric arrays are accepted.")
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as e:
        raise DataError(f"{what} is not a numeric array ({e}).") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {arr.dtype}; expected a numeric (int or float) array.")
    if arr.ndim == 0:
        raise DataError(f"{what} is a scalar; expected an array with a leading example axis.")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        idx = _first_bad(~np.isfinite(arr))
        raise DataError(f"{what} has {arr[idx]} (not finite) at {_where(idx)}.")
    return arr


def validate_arrays(
    x: object,
    y: object,
    *,
    name: str = "data",
    features: int | None = None,
    classes: int | None = None,
    allow_empty: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Check one (x, y) pair on the host; return them as NumPy arrays.

    Args:
      x: features, shape (n, features...); y: targets, shape (n,) or (n, targets).
      name: how messages name the pair (``"train"``, ``"my.csv"``).
      features: required size of x's last axis, if known.
      classes: labels must be integers in [0, classes) (classification); None: any reals.
      allow_empty: accept n == 0 (e.g. an absent validation split).

    Raises:
      DataError: non-numeric/object arrays, NaN/Inf (first bad row and column), x/y
        length mismatch, wrong feature count, labels outside [0, classes), empty data.
    """
    x = _check_array(x, f"{name}: x")
    y = _check_array(y, f"{name}: y")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{name}: x has {x.shape[0]} rows but y has {y.shape[0]}; they must match.")
    if x.shape[0] == 0 and not allow_empty:
        raise DataError(f"{name}: no examples (x has shape {x.shape}).")
    if features is not None and (x.ndim < 2 or x.shape[-1] != features):
        raise DataError(
            f"{name}: x has shape {x.shape} but the model expects {features} features per row."
        )
    if classes is not None and y.size:
        bad = (y < 0) | (y >= classes) | (y != np.round(y))
        if np.any(bad):
            idx = _first_bad(bad)
            raise DataError(
                f"{name}: label {y[idx]} at {_where(idx)} is outside [0, {classes}) "
                "(labels must be integers 0..classes-1)."
            )
    return x, y


def validate_dataset(ds: Dataset, *, features: int | None = None) -> Dataset:
    """``validate_arrays`` on every split of ``ds`` (train and test must be non-empty),
    and its standardisation statistics (both or neither, shaped like one example)."""
    _check_stats(ds)
    for split_name in ("train", "val", "test"):
        s = getattr(ds, split_name)
        validate_arrays(
            s.x,
            s.y,
            name=f"{ds.name} {split_name}",
            features=features,
            classes=ds.classes,
            allow_empty=split_name == "val",
        )
    return ds


def _check_stats(ds: Dataset) -> None:
    if (ds.x_mean is None) != (ds.x_std is None):
        raise DataError(f"{ds.name}: x_mean and x_std must be given together (or neither).")
    if ds.x_mean is None:
        return
    feat = tuple(np.shape(ds.train.x)[1:])
    for what in ("x_mean", "x_std"):
        got = tuple(np.shape(getattr(ds, what)))
        if got != feat:
            raise DataError(
                f"{ds.name}: {what} has shape {got} but one example has shape {feat}; "
                "reshape the statistics with the features (fbp.data.reshape does both)."
            )


# ----------------------------------------------------------------------------- files


def _parse_cell(text: str, path: str, row: int, col: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"{path}: row {row}, column {col}: {text.strip()!r} is not a number."
        ) from None


def read_csv(path: str) -> np.ndarray:
    """A numeric CSV as a float64 (rows, columns) array; a non-numeric first row is a header.

    Raises:
      DataError: a non-numeric cell (row and column named), ragged rows, no rows.
    """
    import csv

    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows:
        try:
            [float(c) for c in rows[0]]
        except ValueError:
            rows = rows[1:]  # header
    if not rows:
        raise DataError(f"{path}: no data rows.")
    width = len(rows[0])
    out = np.empty((len(rows), width), np.float64)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataError(f"{path}: row {i} has {len(r)} columns but row 0 has {width}.")
        out[i] = [_parse_cell(c, path, i, j) for j, c in enumerate(r)]
    return out


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz`` file, loaded with ``allow_pickle=False``.

    Raises:
      DataError: object arrays (they would need pickle: refused, never executed),
        missing keys, an unreadable file.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise DataError(f"{path}: needs arrays 'x' and 'y'; found {sorted(keys)}.")
            return f["x"], f["y"]
    except DataError:
        raise
    except ValueError as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:
            raise DataError(
                f"{path}: not a readable .npz file (not a zip archive; pickles are refused)."
            ) from None
        if "pickle" in str(e):
            raise DataError(
                f"{path}: contains object arrays, which need pickle to load; refused "
                "(save numeric arrays only)."
            ) from None
        raise DataError(f"{path}: not a readable .npz file ({e}).") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}).") from None


def load_file(
    path: str,
    *,
    seed: int = 0,
    classes: int | None = None,
    regression: bool = False,
    features: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    standardize_x: bool = True,
) -> Dataset:
    """A user's CSV (last column is the target) or NPZ (arrays ``x``, ``y``), split by seed.

    Args:
      path: ``.csv`` or ``.npz`` file.
      seed: split seed.
      classes: number of classes (default: max label + 1); ignored for regression.
      regression: float targets of shape (n, 1) instead of integer labels.
      features: required feature count (checked before anything compiles).
      val_fraction, test_fraction, standardize_x: as in ``load``.

    Raises:
      DataError: any problem ``validate_arrays`` finds, with the file's row numbers.
    """
    import os

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    if path.endswith(".npz"):
        x, y = read_npz(path)
    elif path.endswith(".csv"):
        table = read_csv(path)
        if table.shape[1] < 2:
            raise DataError(f"{path}: needs at least one feature column and a target column.")
        x, y = table[:, :-1], table[:, -1]
    else:
        raise DataError(f"{path}: unknown file type; expected .csv or .npz.")
    if not regression and classes is None:
        x, y = validate_arrays(x, y, name=path, features=features)
        if np.any(y != np.round(y)) or np.any(y < 0):
            idx = _first_bad((y != np.round(y)) | (y < 0))
            raise DataError(f"{path}: label {y[idx]} at {_where(idx)} is not an integer >= 0.")
        classes = int(y.max()) + 1
    x, y = validate_arrays(
        x, y, name=path, features=features, classes=None if regression else classes
    )
    x = x.astype(np.float32)
    y = y.astype(np.float32).reshape(len(y), -1) if regression else y.astype(np.int32)
    stratify = not regression and np.bincount(y).min() >= 2
    tr, va, te = split(
        x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, stratify=stratify
    )
    name = os.path.basename(path)
    return _finish(tr, va, te, None if regression else classes, name, standardize_x)


# ----------------------------------------------------------------------------- batching


def batch_order(key: object, n: int, batch_size: int) -> object:
    """Example indices for one epoch: a permutation drawn from ``key``, shape (steps, batch).

    The last ``n % batch_size`` examples of the permutation are left out.
    """
    import jax

    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_order: need 1 <= batch_size <= n={n}, got {batch_size}.")
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


def batches(split_: Split, batch_size: int, key: object):
    """Yield shuffled host minibatches ``(x, y)`` of one epoch, in ``batch_order(key)``."""
    order = np.asarray(batch_order(key, len(split_.x), batch_size))
    for idx in order:
        yield split_.x[idx], split_.y[idx]
