"""Real data sets and splits: scikit-learn's bundled data, stratified splits, standardisation.

Everything here runs on the host in NumPy, before anything is compiled. Bad data
(NaN/Inf, wrong feature count, X/y length mismatch, labels outside [0, classes),
non-numeric or object arrays, empty splits) raises ``DataError`` with a one-line
message naming the first bad row and column: for data read from a file, as the file
shows it (a CSV's line, counting the header, and column from 1), also after the split.

Examples:
  >>> from fbp import data
  >>> ds = data.load("digits", seed=0)
  >>> ds.train.x.shape[1], ds.classes
  (64, 10)
"""

from __future__ import annotations

import codecs
import csv
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import Array


class Split(NamedTuple):
    x: np.ndarray  # (n, features...) float32
    y: np.ndarray  # (n,) int32 labels, or (n, targets) float32
    lengths: np.ndarray | None = None  # (n,) int32 valid steps of padded sequences (n, time, ...)


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
    origin: Origin | None = None  # where each example sits in the file it was read from


class Origin(NamedTuple):
    """Where the examples of a data set read from a file are in that file, for messages."""

    lines: np.ndarray | None  # (n,) CSV: file line of each example (1-based, header counted)
    index: dict[str, np.ndarray]  # type: ignore[assignment]  # (a field, not tuple.index) split name -> (n_split,) positions in file order


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
      stratify: keep class proportions in every split (integer labels only; where a
        class is too small for that, the split is at random).
    """
    from sklearn.model_selection import train_test_split

    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"split: need 0 <= val_fraction, 0 < test_fraction and their sum < 1; got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}."
        )

    def cut(x, y, size):
        if stratify:
            try:
                return train_test_split(x, y, test_size=size, random_state=seed, stratify=y)
            except ValueError:  # a class too small to spread over both parts: split at random
                pass
        return train_test_split(x, y, test_size=size, random_state=seed)

    x_rest, x_test, y_rest, y_test = cut(x, y, test_fraction)
    if val_fraction == 0:
        return Split(x_rest, y_rest), Split(x_rest[:0], y_rest[:0]), Split(x_test, y_test)
    x_train, x_val, y_train, y_val = cut(x_rest, y_rest, val_fraction / (1 - test_fraction))
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


def standardize_stats(train: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, std) of ``train.x``, float32; std is 1 where a feature is constant.

    Padded sequences (``train.lengths`` set, x of shape (n, time, features...)) get
    statistics over their valid steps only, pooled over time and repeated along it
    (shape (time, features...)), so what is in the padding changes nothing.
    """
    if train.lengths is not None:
        valid = np.arange(train.x.shape[1])[None, :] < train.lengths[:, None]  # (n, time)
        steps = train.x[valid]  # (valid steps, features...)
        mean = np.broadcast_to(steps.mean(axis=0), train.x.shape[1:])
        std = np.broadcast_to(steps.std(axis=0), train.x.shape[1:])
        std = np.where(std > 0, std, 1.0)
        return mean.astype(np.float32), std.astype(np.float32)
    mean = train.x.mean(axis=0)
    std = train.x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(train: Split, *others: Split) -> tuple[Split, ...]:
    """Zero mean, unit variance per feature, fitted on ``train`` only.

    Features constant on train (std 0) are centred and left unscaled.
    """
    mean, std = standardize_stats(train)
    return tuple(s._replace(x=((s.x - mean) / std).astype(np.float32)) for s in (train, *others))


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
        return s._replace(x=s.x.reshape(len(s.x), *shape))

    stats: dict[str, Any] = {}
    if ds.x_mean is not None and ds.x_std is not None:
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


Where = Callable[[tuple[int, ...]], str]  # an array index -> "row 3, column 1", "line 5"


def _where(idx: tuple[int, ...]) -> str:
    cols = ", ".join(str(i) for i in idx[1:])
    return f"row {idx[0]}" + (f", column {cols}" if cols else "")


def _locator(lines: np.ndarray | None, positions: np.ndarray | None = None) -> Where:
    """Messages' place for arrays whose row i is row ``positions[i]`` of a file.

    A CSV's rows are named by file line (``lines``: 1-based, the header counted) and
    columns from 1, as an editor shows them; an NPZ's (``lines`` None) by array index.
    """

    def where(idx: tuple[int, ...]) -> str:
        row = int(positions[idx[0]]) if positions is not None else idx[0]
        if lines is None:
            return _where((row, *idx[1:]))
        cols = ", ".join(str(j + 1) for j in idx[1:])
        return f"line {int(lines[row])}" + (f", column {cols}" if cols else "")

    return where


def split_where(ds: Dataset, split_name: str) -> Where | None:
    """How messages name the examples of split ``split_name`` (``train``, ``val``, ``test``):
    by their place in the file for data read from one (``line 57``), else None (array rows).
    """
    o = ds.origin
    if o is None or len(o.index[split_name]) != len(getattr(ds, split_name).x):
        return None  # no file, or splits replaced after loading: array rows it is
    return _locator(o.lines, o.index[split_name])


def _check_array(a: object, what: str, where: Where = _where) -> np.ndarray:
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
        raise DataError(f"{what} has {arr[idx]} (not finite) at {where(idx)}.")
    return arr


def validate_arrays(
    x: object,
    y: object,
    *,
    name: str = "data",
    features: int | None = None,
    classes: int | None = None,
    allow_empty: bool = False,
    where: Where | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check one (x, y) pair on the host; return them as NumPy arrays.

    Args:
      x: features, shape (n, features...); y: targets, shape (n,) or (n, targets).
      name: how messages name the pair (``"train"``, ``"my.csv"``).
      features: required size of x's last axis, if known.
      classes: labels must be integers in [0, classes) (classification); None: any reals.
      allow_empty: accept n == 0 (e.g. an absent validation split).
      where: how messages name an array index (default ``row i, column j``); see
        ``split_where`` for the file line of a split's example.

    Raises:
      DataError: non-numeric/object arrays, NaN/Inf (first bad row and column), x/y
        length mismatch, wrong feature count, labels outside [0, classes), empty data.
    """
    where = where or _where
    x = _check_array(x, f"{name}: x", where)
    y = _check_array(y, f"{name}: y", where)
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
                f"{name}: label {y[idx]} at {where(idx)} is outside [0, {classes}) "
                "(labels must be integers 0..classes-1)."
            )
    return x, y


def validate_dataset(ds: Dataset, *, features: int | None = None) -> Dataset:
    """``validate_arrays`` on every split of ``ds`` (train and test must be non-empty),
    its sequence lengths (``validate_lengths``) and its standardisation statistics
    (both or neither, shaped like one example)."""
    _check_stats(ds)
    for split_name in ("train", "val", "test"):
        s = getattr(ds, split_name)
        if s.lengths is not None:
            validate_lengths(s.lengths, s.x, name=f"{ds.name} {split_name}")
        validate_arrays(
            s.x,
            s.y,
            name=f"{ds.name} {split_name}",
            features=features,
            classes=ds.classes,
            allow_empty=split_name == "val",
            where=split_where(ds, split_name),
        )
    return ds


def validate_lengths(lengths: object, x: np.ndarray, *, name: str = "data") -> np.ndarray:
    """Check per-example sequence lengths against padded inputs x; return them as int32.

    Args:
      lengths: valid steps of each example, shape (n,), integers in [1, time].
      x: the padded inputs, shape (n, time, features...).
      name: how messages name them (a file, a split).

    Raises:
      DataError: the wrong shape, a non-integer, or a length outside [1, time]; the
        message names the index and the value.

    Examples:
      >>> validate_lengths(np.array([3, 1]), np.zeros((2, 3, 4))).tolist()
      [3, 1]
      >>> validate_lengths(np.array([3, 4]), np.zeros((2, 3, 4)), name="seq.npz")
      Traceback (most recent call last):
      ...
      fbp.data.DataError: seq.npz: lengths[1] = 4 is outside [1, 3] (x has 3 time steps).
    """
    arr = _check_array(lengths, f"{name}: lengths", lambda idx: f"index {idx[0]}")
    n = np.shape(x)[0]
    if np.ndim(x) < 2:
        raise DataError(
            f"{name}: lengths given but x has shape {np.shape(x)}; padded sequences are "
            "(batch, time, features...)."
        )
    if arr.shape != (n,):
        raise DataError(f"{name}: lengths has shape {arr.shape}; expected ({n},), one per example.")
    if arr.dtype.kind == "b":
        raise DataError(f"{name}: lengths has dtype bool; expected integers in [1, {x.shape[1]}].")
    if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
        i = int(np.argmax(arr != np.round(arr)))
        raise DataError(f"{name}: lengths[{i}] = {arr[i]:g} is not an integer.")
    time = np.shape(x)[1]
    bad = (arr < 1) | (arr > time)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise DataError(
            f"{name}: lengths[{i}] = {arr[i]:g} is outside [1, {time}] (x has {time} time steps)."
        )
    return arr.astype(np.int32)


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


def _refuse_binary(path: str) -> None:
    """DataError naming ``path`` unless its start reads as UTF-8 text without NUL bytes."""
    with open(path, "rb") as f:
        head = f.read(8192)
    kinds = {b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive (.npz, .xlsx...)"}
    kind = next((k for magic, k in kinds.items() if head.startswith(magic)), None)
    if kind is None and b"\x00" in head:
        kind = "binary (it has NUL bytes)"
    if kind is None:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as e:
            kind = f"binary, or text not in UTF-8 (byte {head[e.start]:#04x} at offset {e.start})"
    if kind is not None:
        raise DataError(f"{path}: not a CSV text file: {kind}.")


def _read_csv_rows(path: str) -> tuple[list[list[str]], list[int], list[str] | None]:
    """The non-blank rows of a CSV, the file line of each (1-based), and the header if any."""
    _refuse_binary(path)
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for r in reader:
                if r and any(c.strip() for c in r):
                    rows.append(r)
                    lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV text file ({e}).") from None
    header = None
    if rows:
        try:
            [float(c) for c in rows[0]]
        except ValueError:
            header, rows, lines = rows[0], rows[1:], lines[1:]
    return rows, lines, header


def _parse_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(table, lines)``: the numbers of a CSV, float64 (rows, columns), and the file line
    of each row (1-based, the header counted)."""
    rows, lines, header = _read_csv_rows(path)
    if not rows:
        raise DataError(f"{path}: no data rows.")
    width = len(rows[0])
    out = np.empty((len(rows), width), np.float64)
    for i, (r, line) in enumerate(zip(rows, lines, strict=True)):
        if len(r) != width:
            raise DataError(
                f"{path}: line {line} has {len(r)} columns but line {lines[0]} has {width}."
            )
        for j, cell in enumerate(r):
            try:
                out[i, j] = float(cell)
            except ValueError:
                named = f" ({header[j].strip()!r})" if header and j < len(header) else ""
                raise DataError(
                    f"{path}: line {line}, column {j + 1}{named}: {cell.strip()!r} is not a number."
                ) from None
    return out, np.asarray(lines)


def read_csv(path: str) -> np.ndarray:
    """A numeric CSV as a float64 (rows, columns) array; a non-numeric first row is a header.

    Raises:
      DataError: a binary file, a non-numeric cell or ragged rows (file line and column
        named, both counted from 1, the header line included), no rows.
    """
    return _parse_csv(path)[0]


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


def read_npz_lengths(path: str, x: np.ndarray) -> np.ndarray | None:
    """An ``.npz`` file's ``lengths`` array, shape (n,), checked against its x of shape
    (n, time, ...); None when it has none.

    Raises:
      DataError: as ``validate_lengths``, naming the file.
    """
    with np.load(path, allow_pickle=False) as f:
        if "lengths" not in f.files:
            return None
        try:
            lengths = f["lengths"]
        except ValueError as e:
            raise DataError(f"{path}: lengths is not a numeric array ({e}).") from None
    return validate_lengths(lengths, x, name=path)


def _read_file(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, y, lines)`` of a CSV (last column y; ``lines`` as ``_parse_csv``) or NPZ (None)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a .csv or .npz file.")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    if path.endswith(".npz"):
        return (*read_npz(path), None)  # lengths: read_npz_lengths
    if not path.endswith(".csv"):
        raise DataError(f"{path}: unknown file type; expected .csv or .npz.")
    table, lines = _parse_csv(path)
    if table.shape[1] < 2:
        raise DataError(f"{path}: needs at least one feature column and a target column.")
    return table[:, :-1], table[:, -1], lines


def _labels(path: str, y: np.ndarray, classes: int | None, where: Where) -> tuple[np.ndarray, int]:
    """Integer labels and the number of classes: ``classes`` if given, else the labels
    must be 0..K-1 with every class present (a typo such as 1000000 is named, not
    turned into a million-class model)."""
    bad = (y != np.round(y)) | (y < 0)
    if np.any(bad):
        idx = _first_bad(bad)
        raise DataError(f"{path}: label {y[idx]:g} at {where(idx)} is not an integer >= 0.")
    if classes is not None:
        if np.any(y >= classes):
            idx = _first_bad(y >= classes)
            raise DataError(
                f"{path}: label {y[idx]:.0f} at {where(idx)} is outside [0, {classes}) "
                f"(the stated number of classes is {classes})."
            )
        return y.astype(np.int32), classes
    present = np.unique(y)
    k = len(present)
    if present[-1] != k - 1:
        gap = int(np.argmax(present != np.arange(k)))  # the first class with no example
        idx = (int(np.argmax(y == present[gap])),)
        raise DataError(
            f"{path}: label {present[gap]:.0f} at {where(idx)} is not one of 0..K-1: labels "
            f"must be 0..K-1 with every class present, and no line has label {gap} ({k} "
            f"distinct labels, {present[0]:.0f} to {present[-1]:.0f}). Correct the label, or "
            "state the number of classes (fbp.data.load_file(..., classes=K))."
        )
    return y.astype(np.int32), k


def _check_train_classes(path: str, y: np.ndarray, train: np.ndarray, k: int, where: Where):
    """DataError unless every class 0..k-1 has an example in the training split."""
    missing = np.flatnonzero(np.bincount(y[train], minlength=k) == 0)
    if missing.size:
        c = int(missing[0])
        rows = np.flatnonzero(y == c)
        at = ", ".join(where((int(r),)) for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise DataError(
            f"{path}: class {c} has {len(rows)} example(s) ({at}) and none in the training "
            "split; give every class at least 2 examples, or state the number of classes "
            "(fbp.data.load_file(..., classes=K))."
        )


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

    An NPZ may also hold ``lengths`` (n,): padded sequences x of shape (n, time,
    features...) with that many valid steps each; they go with their examples through
    the split (``Split.lengths``) and standardisation ignores the padding.

    Args:
      path: ``.csv`` or ``.npz`` file.
      seed: split seed.
      classes: number of classes K; labels must then be in [0, K), and a class may have
        no example. Default: the labels must be 0..K-1 with every class present, also
        in the training split. Ignored for regression.
      regression: float targets of shape (n, 1) instead of integer labels.
      features: required feature count (checked before anything compiles).
      val_fraction, test_fraction, standardize_x: as in ``load``.

    Returns:
      A Dataset whose ``origin`` records where each example is in the file, so later
      messages (``validate_dataset``, ``split_where``) name file lines, not split rows.

    Raises:
      DataError: a directory, a missing, binary or unknown file, and any problem
        ``validate_arrays`` finds, named by the file's line (a CSV's, counting the header
        line, columns from 1) or array row (an NPZ's).
    """
    x, y, lines = _read_file(path)
    where = _locator(lines)
    x, y = validate_arrays(x, y, name=path, features=features, where=where)
    lengths = read_npz_lengths(path, x) if path.endswith(".npz") else None
    if regression:
        y, classes = y.astype(np.float32).reshape(len(y), -1), None
    else:
        if y.ndim > 1 and y.shape[1:] != (1,):
            raise DataError(
                f"{path}: y has shape {y.shape}; classification takes one label per row "
                "(regression=True for several float targets)."
            )
        stated = classes is not None
        y, classes = _labels(path, y.reshape(len(y)), classes, where)
    pos = split(
        np.arange(len(y)),
        y,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        stratify=not regression,
    )
    if not regression and not stated and classes is not None:
        _check_train_classes(path, y, pos[0].x, classes, where)
    x = x.astype(np.float32)
    tr, va, te = (Split(x[p.x], y[p.x], None if lengths is None else lengths[p.x]) for p in pos)
    ds = _finish(tr, va, te, classes, os.path.basename(path), standardize_x)
    index = {"train": pos[0].x, "val": pos[1].x, "test": pos[2].x}
    return ds._replace(origin=Origin(lines, index))


# ----------------------------------------------------------------------------- batching


def batch_order(key: Array, n: int, batch_size: int) -> Array:
    """Example indices for one epoch: a permutation drawn from ``key``, shape (steps, batch).

    The last ``n % batch_size`` examples of the permutation are left out.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_order: need 1 <= batch_size <= n={n}, got {batch_size}.")
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


def batches(split_: Split, batch_size: int, key: Array):
    """Yield shuffled host minibatches ``(x, y)`` of one epoch, in ``batch_order(key)``."""
    order = np.asarray(batch_order(key, len(split_.x), batch_size))
    for idx in order:
        yield split_.x[idx], split_.y[idx]
