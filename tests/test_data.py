"""fbp.data: bundled sets, user files, stratified splits, standardisation, validation."""

import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fbp import data
from fbp.run import cli


@pytest.mark.parametrize(
    "name, features, classes",
    [
        ("digits", 64, 10),
        ("iris", 4, 3),
        ("breast_cancer", 30, 2),
        ("wine", 13, 3),
        ("diabetes", 10, None),
    ],
)
def test_bundled_sets_split_and_standardise(name, features, classes):
    ds = data.load(name, seed=0)
    n = sum(len(s.x) for s in (ds.train, ds.val, ds.test))
    assert ds.classes == classes and ds.train.x.shape[1] == features
    assert abs(len(ds.test.x) / n - 0.2) < 0.02 and abs(len(ds.val.x) / n - 0.1) < 0.02
    assert ds.train.x.dtype == np.float32
    np.testing.assert_allclose(ds.train.x.mean(0), 0, atol=1e-4)
    # statistics come from train only: val/test are transformed with the same ones
    assert ds.x_mean.shape == (features,) and ds.x_std.shape == (features,)
    raw = data.load(name, seed=0, standardize_x=False)
    np.testing.assert_allclose((raw.test.x - ds.x_mean) / ds.x_std, ds.test.x, rtol=1e-5, atol=1e-5)
    if classes is None:
        assert ds.train.y.shape[1] == 1 and ds.train.y.dtype == np.float32
    else:
        assert ds.train.y.dtype == np.int32


def test_preprocess_maps_raw_features_as_the_data_set_did_and_reshape_keeps_statistics():
    ds, raw = data.load("digits", seed=0), data.load("digits", seed=0, standardize_x=False)
    np.testing.assert_allclose(data.preprocess(ds, raw.test.x), ds.test.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.preprocess(raw, raw.test.x), raw.test.x)  # raw set
    rows = data.reshape(ds, (8, 8), name="rows")
    assert rows.name == "rows" and rows.test.x.shape[1:] == rows.x_mean.shape == (8, 8)
    raw_rows = raw.test.x.reshape(-1, 8, 8)
    np.testing.assert_allclose(data.preprocess(rows, raw_rows), rows.test.x, rtol=1e-6, atol=1e-6)
    data.validate_dataset(rows)


def test_validate_dataset_refuses_statistics_that_do_not_fit_the_features():
    ds = data.load("digits", seed=0)
    rows = [data.Split(s.x.reshape(-1, 8, 8), s.y) for s in (ds.train, ds.val, ds.test)]
    stale = ds._replace(train=rows[0], val=rows[1], test=rows[2])  # stats still (64,)
    msg = r"digits: x_mean has shape \(64,\) but one example has shape \(8, 8\); reshape"
    with pytest.raises(data.DataError, match=msg):
        data.validate_dataset(stale)
    with pytest.raises(data.DataError, match="x_mean and x_std must be given together"):
        data.validate_dataset(ds._replace(x_std=None))


def test_splits_are_stratified_and_seeded():
    a, b, c = data.load("iris", seed=3), data.load("iris", seed=3), data.load("iris", seed=4)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.array_equal(a.train.x, c.train.x)
    for s in (a.train, a.val, a.test):
        counts = np.bincount(s.y, minlength=3)
        assert counts.max() - counts.min() <= 1  # iris is balanced: so is every split


def test_batches_shuffle_by_key():
    s = data.Split(np.arange(10, dtype=np.float32)[:, None], np.arange(10))
    order = np.asarray(data.batch_order(jax.random.key(0), 10, 3))
    assert order.shape == (3, 3) and len(set(order.ravel())) == 9
    again = np.asarray(data.batch_order(jax.random.key(0), 10, 3))
    other = np.asarray(data.batch_order(jax.random.key(1), 10, 3))
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, other)
    got = [xb[:, 0].astype(int).tolist() for xb, _ in data.batches(s, 3, jax.random.key(0))]
    assert got == order.tolist()
    with pytest.raises(ValueError, match="need 1 <= batch_size <= n=10"):
        data.batch_order(jax.random.key(0), 10, 11)


X = np.ones((5, 3), np.float32)
Y = np.array([0, 1, 2, 1, 0])


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        (
            np.where(np.arange(15).reshape(5, 3) == 7, np.nan, X),
            Y,
            {},
            r"data: x has nan \(not finite\) at row 2, column 1",
        ),
        (
            np.where(np.arange(15).reshape(5, 3) == 12, np.inf, X),
            Y,
            {},
            r"x has inf \(not finite\) at row 4, column 0",
        ),
        (X, Y[:4], {}, "x has 5 rows but y has 4"),
        (X, Y, {"features": 4}, r"x has shape \(5, 3\) but the model expects 4 features"),
        (X, np.array([0, 1, 3, 1, 0]), {"classes": 3}, r"label 3 at row 2 is outside \[0, 3\)"),
        (X, np.array([0, -1, 2, 1, 0]), {"classes": 3}, r"label -1 at row 1 is outside"),
        (X, np.array([0, 1.5, 2, 1, 0]), {"classes": 3}, r"label 1.5 at row 1"),
        (np.array([["a", "b"]] * 5), Y, {}, "x has dtype <U1; expected a numeric"),
        (np.array([1, "x", None, 2, 3], dtype=object), Y, {}, "x is an object array"),
        (X[:0], Y[:0], {}, r"no examples \(x has shape \(0, 3\)\)"),
        (X, np.array([0, 1, np.nan, 1, 0]), {}, r"y has nan \(not finite\) at row 2"),
    ],
)
def test_validate_arrays_names_the_problem(x, y, kwargs, match):
    with pytest.raises(data.DataError, match=match):
        data.validate_arrays(x, y, **kwargs)


def test_validate_dataset_checks_every_split():
    ds = data.load("iris", seed=0)
    bad = ds._replace(test=data.Split(ds.test.x, ds.test.y + 3))
    with pytest.raises(data.DataError, match=r"iris test: label \d at row 0 is outside \[0, 3\)"):
        data.validate_dataset(bad)
    data.validate_dataset(ds._replace(val=data.Split(ds.val.x[:0], ds.val.y[:0])))


def _csv(tmp_path, text):
    p = tmp_path / "d.csv"
    p.write_text(text)
    return str(p)


def test_csv_with_header_is_loaded_and_split(tmp_path):
    rows = "\n".join(f"{i % 7},{i * 0.5},{i % 2}" for i in range(40))
    ds = data.load_file(_csv(tmp_path, "a,b,label\n" + rows + "\n"), seed=1)
    assert ds.classes == 2 and ds.train.x.shape[1] == 2
    assert sum(len(s.x) for s in (ds.train, ds.val, ds.test)) == 40
    again = data.load_file(_csv(tmp_path, "a,b,label\n" + rows + "\n"), seed=1)
    np.testing.assert_array_equal(ds.train.x, again.train.x)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1,2,0\n3,x,1\n", r"d\.csv: line 2, column 2: 'x' is not a number"),
        ("a,b,y\n1,2,0\n3,x,1\n", r"line 3, column 2 \('b'\): 'x' is not a number"),
        ("a,b,y\n\n1,2,0\n\n3,4,1\n5,6,x\n", r"line 6, column 3 \('y'\): 'x' is not"),
        ("1,2,0\n3,4\n", "line 2 has 2 columns but line 1 has 3"),
        ("a,b,y\n1,nan,0\n3,4,1\n", r"x has nan \(not finite\) at line 2, column 2"),
        ("a,b\n", "no data rows"),
        ("a,b,y\n1,2,0\n3,4,1.5\n", r"label 1.5 at line 3 is not an integer >= 0"),
        ("1,2,0\n3,4,-1\n", r"label -1 at line 2 is not an integer >= 0"),
    ],
)
def test_bad_csv_is_refused_naming_file_line_and_column(tmp_path, text, match):
    """Lines and columns as an editor shows them: from 1, the header and blank lines counted."""
    with pytest.raises(data.DataError, match=match):
        data.load_file(_csv(tmp_path, text), seed=0)


def _labelled_csv(tmp_path, labels, name="d.csv"):
    """A CSV with a header, four features (the first is the line's number) and ``labels``."""
    rows = [f"{i + 2},{i % 3},{i % 5},{i % 7},{y}" for i, y in enumerate(labels)]
    p = tmp_path / name
    p.write_text("line,b,c,d,label\n" + "\n".join(rows) + "\n")
    return str(p)


def test_a_label_typo_is_named_by_line_not_made_a_million_classes(tmp_path):
    labels = [0, 1, 2] * 10
    labels[20] = 1000000  # line 22 of the file
    msg = (
        r"d\.csv: label 1000000 at line 22 is not one of 0\.\.K-1: labels must be 0\.\.K-1 "
        r"with every class present, and no line has label 3 \(4 distinct labels, 0 to 1000000\)"
    )
    with pytest.raises(data.DataError, match=msg):
        data.load_file(_labelled_csv(tmp_path, labels))


def test_labels_must_start_at_zero_and_leave_no_class_out(tmp_path):
    with pytest.raises(data.DataError, match=r"label 1 at line 2 .* no line has label 0"):
        data.load_file(_labelled_csv(tmp_path, [1, 2, 3] * 10))
    with pytest.raises(data.DataError, match=r"label 3 at line 4 .* no line has label 2 "):
        data.load_file(_labelled_csv(tmp_path, [0, 1, 3] * 10))


def test_stated_classes_allow_absent_classes_and_bound_the_labels(tmp_path):
    ds = data.load_file(_labelled_csv(tmp_path, [0, 2] * 15), classes=5)
    assert ds.classes == 5 and set(ds.train.y.tolist()) == {0, 2}
    msg = r"label 7 at line 5 is outside \[0, 5\) \(the stated number of classes is 5\)"
    with pytest.raises(data.DataError, match=msg):
        data.load_file(_labelled_csv(tmp_path, [0, 2, 1, 7] * 5), classes=5)


def test_every_class_needs_an_example_in_the_training_split(tmp_path):
    """A class seen once (line 42) is refused exactly when the split leaves it out of train."""
    path = _labelled_csv(tmp_path, [0, 1] * 20 + [2])
    outcomes = set()
    for seed in range(12):
        try:
            ds = data.load_file(path, seed=seed)
        except data.DataError as e:
            msg = r"class 2 has 1 example\(s\) \(line 42\) and none in the training split"
            assert re.search(msg, str(e)), e
            outcomes.add("refused")
        else:
            assert 2 in ds.train.y.tolist() and ds.classes == 3
            outcomes.add("loaded")
    assert outcomes == {"refused", "loaded"}


def test_split_examples_are_named_by_their_file_line(tmp_path):
    """After the shuffled split, a message names the example's line in the file."""
    ds = data.load_file(_labelled_csv(tmp_path, [0, 1, 2] * 10), seed=3, standardize_x=False)
    for name in ("train", "val", "test"):
        s = getattr(ds, name)
        first_line = int(s.x[0, 0])  # the first feature is the example's line
        bad = ds._replace(**{name: data.Split(s.x, np.where(np.arange(len(s.y)) == 0, 9, s.y))})
        msg = rf"d\.csv {name}: label 9 at line {first_line} is outside \[0, 3\)"
        with pytest.raises(data.DataError, match=msg):
            data.validate_dataset(bad)
    # a split replaced after loading is named by its rows again
    moved = ds._replace(train=data.Split(ds.train.x[:5], ds.train.y[:5] + 7))
    with pytest.raises(data.DataError, match=r"d\.csv train: label \d+ at row 0 is outside"):
        data.validate_dataset(moved)


def test_a_directory_or_a_binary_file_is_named_as_such(tmp_path):
    with pytest.raises(data.DataError, match=r"/d\.csv: is a directory; expected a \.csv or \.npz"):
        (tmp_path / "d.csv").mkdir()
        data.load_file(str(tmp_path / "d.csv"))
    cases = {
        "gz.csv": (gzip.compress(b"a,b,y\n1,2,0\n"), "gzip-compressed"),
        "nul.csv": (b"a,b,y\n1,2,0\n\x00\x00\x01", r"binary \(it has NUL bytes\)"),
        "latin.csv": (
            "a,caf\u00e9,y\n1,2,0\n".encode("latin-1"),
            r"binary, or text not in UTF-8 \(byte 0xe9 at offset 5\)",
        ),
        "zip.csv": (b"PK\x03\x04rest", r"a zip archive"),
    }
    for name, (blob, what) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(data.DataError, match=rf"/{name}: not a CSV text file: {what}"):
            data.load_file(str(tmp_path / name))


def test_a_utf8_bom_from_a_spreadsheet_is_not_a_header_cell(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffx,y\n".encode() + b"1,0\n2,1\n" * 10)
    assert data.load_file(str(tmp_path / "bom.csv")).classes == 2


def _fbp_env():
    root = str(Path(__file__).parents[1])
    experiments = str(Path(__file__).parent / "experiments")
    return {
        **os.environ,
        "PYTHONPATH": root,
        "FBP_EXPERIMENTS": experiments,
        "JAX_PLATFORMS": "cpu",
    }


def test_fbp_train_with_a_label_typo_exits_2_naming_file_line_and_value(tmp_path):
    labels = [0, 1, 2] * 10
    labels[20] = 1000000
    path = _labelled_csv(tmp_path, labels, "bad.csv")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fbp.run.cli", "train", "tiny", "--data", path, "--out", str(out)]
    r = subprocess.run(cmd, env=_fbp_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"fbp: error: {path}: label 1000000 at line 22 is not one of")
    assert r.stderr.count("\n") == 1 and not out.exists()


def test_fbp_train_refuses_a_file_with_more_classes_than_the_model_outputs(tmp_path, capsys):
    """tiny's model has 3 outputs; a file with labels 0..4 is refused before training,
    naming both numbers (a typo of one label is named by its line: the test above)."""
    path = _labelled_csv(tmp_path, [0, 1, 2, 3, 4] * 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", str(Path(__file__).parent / "experiments"))
        assert cli.main(["train", "tiny", "--data", path, "--out", str(tmp_path / "r")]) == 2
        assert (
            cli.main(["train", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
        )
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"fbp: error: run: the model has 3 outputs but \S*d\.csv has 5 classes; .*", err[0]
    ), err[0]
    assert err[1] == f"fbp: error: {tmp_path}: is a directory; expected a .csv or .npz file."
    assert not (tmp_path / "r").exists()


def test_npz_loads_numeric_arrays(tmp_path):
    p = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    ds = data.load_file(str(p), seed=0, features=4)
    assert ds.classes == 3
    with pytest.raises(data.DataError, match="expects 5 features"):
        data.load_file(str(p), seed=0, features=5)
    reg = data.load_file(str(p), seed=0, regression=True)
    assert reg.classes is None and reg.train.y.shape[1] == 1


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npz_with_pickled_objects_is_refused_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.npz"
    np.savez(p, x=np.array([_Evil(str(marker))] * 4, dtype=object), y=np.zeros(4))
    assert not marker.exists()
    with pytest.raises(data.DataError, match="object arrays, which need pickle"):
        data.load_file(str(p), seed=0)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(str(marker)))).close()
    assert marker.exists()  # the payload is live: it is refusing it that kept it inert


def test_unknown_files_are_refused(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_file(str(tmp_path / "none.csv"))
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.load_file(str(tmp_path / "d.txt"))
    (tmp_path / "e.npz").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.load_file(str(tmp_path / "e.npz"))


def _padded(n=60, time=6, features=3, seed=0):
    """Padded sequences (n, time, features), labels 0..2 and lengths in [1, time]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, time + 1, size=n)
    return rng.normal(size=(n, time, features)), np.arange(n) % 3, lengths


def test_npz_lengths_go_with_their_examples_through_the_split(tmp_path):
    x, y, lengths = _padded()
    x[:, :, 0] = np.arange(len(x))[:, None]  # feature 0 of every step: the example's row
    p = tmp_path / "seq.npz"
    np.savez(p, x=x, y=y, lengths=lengths)
    ds = data.load_file(str(p), standardize_x=False)
    for s in (ds.train, ds.val, ds.test):
        rows = s.x[:, 0, 0].astype(int)
        assert s.lengths.dtype == np.int32
        np.testing.assert_array_equal(s.lengths, lengths[rows])
        np.testing.assert_array_equal(s.y, y[rows])
    assert data.load_file(str(p)).train.lengths is not None  # standardised too
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    assert data.load_file(str(tmp_path / "plain.npz")).train.lengths is None


def test_standardisation_ignores_the_padding(tmp_path):
    x, y, lengths = _padded()
    noisy = x.copy()
    pad = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    noisy[pad] = 1e3 * np.random.default_rng(1).normal(size=noisy[pad].shape)
    np.savez(tmp_path / "a.npz", x=x, y=y, lengths=lengths)
    np.savez(tmp_path / "b.npz", x=noisy, y=y, lengths=lengths)
    a, b = (data.load_file(str(tmp_path / f)) for f in ("a.npz", "b.npz"))
    np.testing.assert_array_equal(a.x_mean, b.x_mean)
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        valid = np.arange(x.shape[1])[None, :] < sa.lengths[:, None]
        np.testing.assert_array_equal(sa.x[valid], sb.x[valid])


@pytest.mark.parametrize(
    "lengths, match",
    [
        (np.full((60, 1), 3), r"lengths has shape \(60, 1\); expected \(60,\)"),
        (np.full(59, 3), r"lengths has shape \(59,\); expected \(60,\)"),
        (np.where(np.arange(60) == 7, 0, 3), r"lengths\[7\] = 0 is outside \[1, 6\]"),
        (np.where(np.arange(60) == 9, 7, 3), r"lengths\[9\] = 7 is outside \[1, 6\] \(x has 6"),
        (np.where(np.arange(60) == 4, 2.5, 3.0), r"lengths\[4\] = 2\.5 is not an integer"),
        (np.where(np.arange(60) == 2, np.nan, 3.0), r"lengths has nan \(not finite\) at index 2"),
        (np.full(60, "3"), r"lengths has dtype <U1"),
    ],
)
def test_bad_npz_lengths_name_the_file_and_the_index(tmp_path, lengths, match):
    x, y, _ = _padded()
    p = tmp_path / "seq.npz"
    np.savez(p, x=x, y=y, lengths=lengths)
    with pytest.raises(data.DataError, match=re.escape(str(p)) + ".*" + match):
        data.load_file(str(p))


def test_lengths_need_a_time_axis():
    with pytest.raises(data.DataError, match=r"seq: lengths given but x has shape \(4,\)"):
        data.validate_lengths(np.ones(4), np.zeros(4), name="seq")
