"""fbp.data: bundled sets, user files, stratified splits, standardisation, validation."""

import pickle

import jax
import numpy as np
import pytest

from fbp import data


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
        ("1,2,0\n3,x,1\n", r"row 1, column 1: 'x' is not a number"),
        ("1,2,0\n3,4\n", "row 1 has 2 columns but row 0 has 3"),
        ("1,nan,0\n3,4,1\n", r"has nan \(not finite\) at row 0, column 1"),
        ("a,b\n", "no data rows"),
        ("1,2,0\n3,4,1.5\n", r"label 1.5 at row 1 is not an integer"),
    ],
)
def test_bad_csv_is_refused_naming_row_and_column(tmp_path, text, match):
    with pytest.raises(data.DataError, match=match):
        data.load_file(_csv(tmp_path, text), seed=0)


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
