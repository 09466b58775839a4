"""fbp.checkpoint: round trips, atomic commits, corruption, pickles refused, mismatches."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbp import checkpoint as ckpt
from fbp import nn, train


def _state(hidden=4, seed=0):
    model = nn.Sequential([nn.Dense(hidden), nn.Tanh(), nn.Dense(2)])
    x = jnp.ones((3, 5), jnp.float32)
    return train.init(model, optax.adam(1e-2), jax.random.key(seed), x)


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    for u, v in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        if not np.array_equal(np.asarray(u), np.asarray(v)) or u.dtype != v.dtype:
            return False
    return True


def test_round_trip_restores_train_state_with_key_and_optimizer_state(tmp_path):
    ts = _state(seed=1)
    path = ckpt.save(tmp_path, {"state": ts}, meta={"epoch": 3})
    fresh = _state(seed=2)
    tree, meta = ckpt.load(path, {"state": fresh})
    assert meta == {"epoch": 3}
    assert _equal(tree["state"], ts)
    assert not _equal(fresh, ts)
    assert jax.tree.structure(tree["state"].opt_state) == jax.tree.structure(fresh.opt_state)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert "state/opt_state/0/mu/0/w" in manifest["tensors"]
    assert manifest["keys"] == {"state/key": "threefry2x32"}
    assert manifest["tensors"]["state/step"]["shape"] == []


def test_save_leaves_no_temporaries_and_numbers_checkpoints(tmp_path):
    for i in range(3):
        ckpt.save(tmp_path, {"a": np.full(2, i, np.float32)})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "ckpt-000001",
        "ckpt-000002",
        "ckpt-000003",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_keep_last_n_and_the_best(tmp_path):
    losses_ = [0.5, 0.1, 0.4, 0.3, 0.2, 0.6]
    for v in losses_:
        ckpt.save(
            tmp_path, {"a": np.zeros(1)}, meta={"val": v}, keep=2, score=lambda m: m.get("val")
        )
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt-000002", "ckpt-000005", "ckpt-000006"]


def test_failed_commit_keeps_old_checkpoints(tmp_path, monkeypatch):
    ckpt.save(tmp_path, {"a": np.zeros(1)}, keep=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, {"a": np.ones(1)}, keep=1)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000001"]
    ckpt.clean_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001"]


def _two(tmp_path):
    a = ckpt.save(tmp_path, {"w": np.arange(6, dtype=np.float32)}, meta={"n": 1})
    b = ckpt.save(tmp_path, {"w": np.arange(6, dtype=np.float32) * 2}, meta={"n": 2})
    return a, b


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest", "missing"])
def test_corrupt_newest_is_reported_and_previous_used(tmp_path, damage):
    a, b = _two(tmp_path)
    f = b / ckpt.TENSORS
    blob = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(blob[: len(blob) // 2])
    elif damage == "bitflip":
        blob[-3] ^= 0x10
        f.write_bytes(bytes(blob))
    elif damage == "manifest":
        m = (b / ckpt.MANIFEST).read_text()
        (b / ckpt.MANIFEST).write_text(m[: len(m) // 2])
    else:
        f.unlink()
    warnings = []
    path, tree, meta = ckpt.load_latest(
        tmp_path, {"w": np.zeros(6, np.float32)}, warn=warnings.append
    )
    assert path == a and meta == {"n": 1}
    np.testing.assert_array_equal(tree["w"], np.arange(6, dtype=np.float32))
    assert len(warnings) == 1 and "ckpt-000002" in warnings[0]
    with pytest.raises(ckpt.CorruptCheckpoint, match="ckpt-000002"):
        ckpt.load(b, {"w": np.zeros(6, np.float32)})


def test_all_corrupt_is_an_error_and_none_is_none(tmp_path):
    assert ckpt.load_latest(tmp_path / "nothing", {"w": np.zeros(1)}) is None
    a, b = _two(tmp_path)
    for p in (a, b):
        (p / ckpt.TENSORS).write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpoint, match="all 2 are corrupt"):
        ckpt.load_latest(tmp_path, {"w": np.zeros(6, np.float32)}, warn=lambda s: None)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["tensor_file", "checkpoint_name"])
def test_planted_pickle_is_refused_and_never_executed(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    pickle.loads(payload).close()  # the payload does run when unpickled ...
    assert marker.exists()
    marker.unlink()
    d = tmp_path / "ckpts"
    a = ckpt.save(d, {"w": np.zeros(2, np.float32)})
    if where == "tensor_file":
        b = ckpt.save(d, {"w": np.ones(2, np.float32)})
        (b / ckpt.TENSORS).write_bytes(payload)
    else:
        (d / "ckpt-000009").write_bytes(payload)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="pickle"):
        ckpt.load_latest(d, {"w": np.zeros(2, np.float32)})
    assert not marker.exists()  # ... but fbp never unpickles it
    assert a.exists()


def test_architecture_mismatch_shows_a_few_paths_and_keeps_every_one(tmp_path):
    path = ckpt.save(tmp_path, {"state": _state(hidden=4)})
    with pytest.raises(ckpt.ArchitectureMismatch, match="mismatches") as e:
        ckpt.load_latest(tmp_path, {"state": _state(hidden=6)})
    msg, every = str(e.value), "\n".join(e.value.problems)
    for p in (
        "state/params/0/w",
        "state/params/0/b",
        "state/params/2/w",
        "state/opt_state/0/mu/0/w",
        "state/opt_state/0/nu/2/w",
    ):
        assert p in every
    assert "checkpoint has (5, 4) float32, model has (5, 6) float32" in msg
    assert msg.count("checkpoint has") == ckpt.ArchitectureMismatch.SHOWN
    assert msg.endswith(f"; and {len(e.value.problems) - ckpt.ArchitectureMismatch.SHOWN} more")
    assert path.exists()


def test_missing_and_extra_paths_are_named(tmp_path):
    path = ckpt.save(tmp_path, {"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ckpt.ArchitectureMismatch, match=r"b: in the checkpoint but not") as e:
        ckpt.load(path, {"a": np.zeros(2), "c": np.zeros(1)})
    assert "c: missing from the checkpoint" in str(e.value)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "s.json"
    ckpt.atomic_write(p, "one")
    ckpt.atomic_write(p, b"two")
    assert p.read_text() == "two"
    assert [q.name for q in tmp_path.iterdir()] == ["s.json"]


def test_prune_rejects_keep_zero(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune(tmp_path, keep=0)


def test_safetensors_header_of_128_bytes_is_not_taken_for_a_pickle(tmp_path):
    """A header length whose first byte is 0x80 (a pickle's first byte) still loads."""
    from safetensors.numpy import save as st_save

    for n in range(1, 400):  # a tree whose safetensors header is 128 mod 256 bytes long
        tree = {"a" * n: np.zeros(3, np.float32)}
        if st_save(tree)[0] == 0x80:
            break
    else:
        pytest.fail("no tree gave a header length whose first byte is 0x80")
    path = ckpt.save(tmp_path, tree)
    assert (path / ckpt.TENSORS).read_bytes()[0] == 0x80
    restored, _ = ckpt.load(path, tree)
    np.testing.assert_array_equal(restored["a" * n], tree["a" * n])
    assert ckpt.looks_like_pickle(b"\x80\x04\x95" + bytes(13))  # a real pickle's head
