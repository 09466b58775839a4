"""Safe, atomic checkpoints: safetensors plus a JSON manifest with SHA-256 checksums.

A checkpoint is a directory ``ckpt-NNNNNN`` (a sequence number, newest highest) holding

* ``arrays.safetensors``: every array leaf, keyed by its tree path
  (``state/params/0/w``, ``state/opt_state/0/mu/0/w``); PRNG keys are stored as
  their ``jax.random.key_data`` (uint32) and re-wrapped on load;
* ``manifest.json``: format, the SHA-256 and size of the tensor file, each tensor's
  path, dtype, shape and SHA-256, and free-form JSON ``meta`` (step, epoch, config).

Writing goes to a hidden temporary directory; both files are fsynced, the directory
is fsynced, renamed to its final name and the parent fsynced. A write that fails
(a full disk) removes the temporary directory and raises the ``OSError``. A kill at any moment
therefore leaves either the previous checkpoints alone or the new one whole. Old
checkpoints are pruned only after the new one is committed. Nothing is ever
unpickled: files are parsed as JSON and safetensors only, and a file that looks like
a pickle is refused before anything reads it further.

Examples:
  >>> import tempfile, numpy as np
  >>> from fbp import checkpoint
  >>> d = tempfile.mkdtemp()
  >>> tree = {"w": np.ones((2, 3), np.float32), "step": np.int32(7)}
  >>> path = checkpoint.save(d, tree, meta={"epoch": 1})
  >>> restored, meta = checkpoint.load(path, tree)
  >>> restored["w"].shape, int(restored["step"]), meta["epoch"]
  ((2, 3), 7, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "fbp-checkpoint"
VERSION = 1
TENSORS = "arrays.safetensors"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d{6,})$")
# Leading bytes of formats that can execute code when loaded: pickle protocols 2-5
# (0x80), zip archives (torch/npz pickles), and protocol-0 pickles ("(dp0", "cos\n").
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04", b"(dp", b"(lp", b"cos\n", b"cposix", b"c__builtin")


class CheckpointError(ValueError):
    """A checkpoint cannot be used."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint is truncated, altered or incomplete (checksum or format)."""


class UnsafeCheckpoint(CheckpointError):
    """A file in place of a checkpoint could run code when loaded (e.g. a pickle)."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint's tree paths or shapes differ from the model's.

    The message lists the first ``SHOWN`` mismatched paths (parameters first);
    ``problems`` holds them all.
    """

    SHOWN = 4

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        ranked = sorted(problems, key=lambda p: not p.startswith("state/params/"))
        self.problems = ranked
        more = len(ranked) - self.SHOWN
        listed = "; ".join(ranked[: self.SHOWN]) + (f"; and {more} more" if more > 0 else "")
        self.summary = f"({len(ranked)} mismatches): {listed}"
        super().__init__(f"checkpoint {where} does not fit this model {self.summary}")


# ----------------------------------------------------------------------------- files


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary name, fsync and rename.

    On any error (a full disk) the temporary file is removed and ``path`` is untouched.
    ``sync_dir=False`` leaves the directory's fsync to the caller (several files in a row).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def looks_like_pickle(head: bytes) -> bool:
    """True when the first bytes of a file are those of a pickle or a zip archive.

    A safetensors file (an 8-byte little-endian header length, then the JSON header's
    ``{``) is not one, whatever its length's first byte (0x80 for a header of 128,
    384, 640... bytes).
    """
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**32:
        return False
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


# ----------------------------------------------------------------------------- trees


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def flatten(tree: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tree -> ({path: host array}, {path: PRNG impl name for key leaves})."""
    arrays: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _path_str(path)
        if _is_key(leaf):
            keys[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arrays[name] = np.asarray(leaf, order="C")
    return arrays, keys


def describe(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of a tree as it is stored (keys as their key data)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        out[_path_str(path)] = (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
    return out


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- save


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint entries ``ckpt-NNNNNN`` in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _next_name(d: Path) -> str:
    existing = list_checkpoints(d)
    last = _NAME.match(existing[-1].name) if existing else None
    seq = int(last.group(1)) + 1 if last else 1
    return f"ckpt-{seq:06d}"


def clean_temporaries(directory: str | os.PathLike) -> None:
    """Remove half-written (``.tmp-*``) and half-deleted (``.trash-*``) leftovers."""
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def save(
    directory: str | os.PathLike,
    tree: Any,
    *,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
    score: Callable[[dict[str, Any]], float | None] | None = None,
) -> Path:
    """Commit ``tree`` as the newest checkpoint in ``directory``, atomically.

    Args:
      directory: the checkpoints folder (created if missing).
      tree: any pytree of arrays (NumPy, JAX, PRNG key arrays).
      meta: JSON-serialisable metadata stored in the manifest.
      keep: after committing, keep only the newest ``keep`` checkpoints plus the one
        with the lowest ``score`` (``None`` keeps all).
      score: ``meta -> float | None``, lower is better (e.g. validation loss).

    Returns:
      The committed checkpoint's path.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays, keys = flatten(tree)
    blob = st_save(arrays) if arrays else st_save({"__empty__": np.zeros((0,), np.uint8)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "file": TENSORS,
        "file_sha256": _sha(blob),
        "file_bytes": len(blob),
        "tensors": {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _sha(v.tobytes())}
            for k, v in arrays.items()
        },
        "keys": keys,
        "meta": meta or {},
    }
    name = _next_name(d)
    tmp = d / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    final = d / name
    try:
        tmp.mkdir()
        _write_synced(tmp / TENSORS, blob)
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:  # a full disk, an I/O error: the previous checkpoints stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(d)
    if keep is not None:
        prune(d, keep=keep, score=score)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint, checked for format (no tensor data is read)."""
    p = Path(path)
    if not p.is_dir():
        _refuse_if_pickle(p)
        raise CorruptCheckpoint(f"checkpoint {p}: not a checkpoint directory.")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"checkpoint {p}: unreadable {MANIFEST} ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"checkpoint {p}: {MANIFEST} is not an fbp checkpoint manifest.")
    return manifest


def prune(
    directory: str | os.PathLike,
    *,
    keep: int,
    score: Callable[[dict[str, Any]], float | None] | None = None,
) -> None:
    """Delete all but the newest ``keep`` checkpoints and the best-scoring one.

    Deletion renames to a hidden ``.trash-*`` name first, so a kill mid-delete never
    leaves a half-deleted directory under a checkpoint name.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.prune: keep must be >= 1, got {keep}.")
    ckpts = list_checkpoints(directory)
    keepers = set(ckpts[-keep:])
    if score is not None:
        scored = []
        for p in ckpts:
            try:
                s = score(read_manifest(p).get("meta", {}))
            except CheckpointError:
                continue
            if s is not None and np.isfinite(s):
                scored.append((s, -ckpts.index(p), p))
        if scored:
            keepers.add(min(scored)[2])
    for p in ckpts:
        if p not in keepers:
            trash = p.with_name(f".trash-{p.name}-{os.getpid()}")
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(directory)


# ----------------------------------------------------------------------------- load


def _refuse_if_pickle(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return
    if looks_like_pickle(head):
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it looks like a Python pickle or zip archive, which can "
            "run code when loaded; fbp checkpoints are safetensors + JSON only. Remove the file."
        )


def read_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verified arrays and manifest of one checkpoint.

    Raises:
      UnsafeCheckpoint: the tensor file looks like a pickle (it is never parsed).
      CorruptCheckpoint: missing files, size or SHA-256 mismatch, bad safetensors.
    """
    p = Path(path)
    manifest = read_manifest(p)
    tensor_file = p / str(manifest.get("file", TENSORS))
    _refuse_if_pickle(tensor_file)
    try:
        blob = tensor_file.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"checkpoint {p}: cannot read {tensor_file.name} ({e}).") from None
    if len(blob) != manifest.get("file_bytes") or _sha(blob) != manifest.get("file_sha256"):
        raise CorruptCheckpoint(
            f"checkpoint {p}: {tensor_file.name} fails its SHA-256 check ({len(blob)} bytes, "
            f"manifest says {manifest.get('file_bytes')}); it is truncated or altered."
        )
    try:
        arrays = st_load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types
        raise CorruptCheckpoint(f"checkpoint {p}: not a valid safetensors file ({e}).") from None
    arrays.pop("__empty__", None)
    tensors = manifest.get("tensors", {})
    if set(arrays) != set(tensors):
        raise CorruptCheckpoint(f"checkpoint {p}: tensor names differ from the manifest's.")
    for k, v in arrays.items():
        if _sha(np.ascontiguousarray(v).tobytes()) != tensors[k].get("sha256"):
            raise CorruptCheckpoint(f"checkpoint {p}: tensor {k} fails its SHA-256 check.")
    return arrays, manifest


def check_compatible(arrays: dict[str, np.ndarray], template: Any, where: str) -> None:
    """Raise ArchitectureMismatch listing every path whose presence, shape or dtype differs."""
    want = describe(template)
    problems = []
    for k, (shape, dtype) in want.items():
        if k not in arrays:
            problems.append(f"{k}: missing from the checkpoint (model has {shape} {dtype})")
        elif tuple(arrays[k].shape) != shape or str(arrays[k].dtype) != dtype:
            problems.append(
                f"{k}: checkpoint has {tuple(arrays[k].shape)} {arrays[k].dtype}, "
                f"model has {shape} {dtype}"
            )
    for k in arrays:
        if k not in want:
            problems.append(
                f"{k}: in the checkpoint but not in the model "
                f"({tuple(arrays[k].shape)} {arrays[k].dtype})"
            )
    if problems:
        raise ArchitectureMismatch(where, problems)


def restore(arrays: dict[str, np.ndarray], manifest: dict[str, Any], template: Any) -> Any:
    """Rebuild ``template``'s tree from verified arrays (flatten/unflatten by its treedef)."""
    check_compatible(arrays, template, "(in memory)")
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = manifest.get("keys", {})
    leaves = []
    for path, leaf in leaves_with_path:
        name = _path_str(path)
        value = arrays[name]
        if _is_key(leaf):
            impl = keys.get(name) or str(jax.random.key_impl(leaf))
            value = jax.random.wrap_key_data(jnp.asarray(value), impl=impl)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """Load one checkpoint into ``template``'s tree structure.

    Args:
      path: a ``ckpt-NNNNNN`` directory.
      template: a tree of the expected structure, shapes and dtypes (e.g. a freshly
        initialised train state); its leaves' values are not used.

    Returns:
      (tree, meta).

    Raises:
      UnsafeCheckpoint: the directory holds a pickle.
      CorruptCheckpoint: a file is missing, unreadable or fails its checksum.
      ArchitectureMismatch: the arrays do not match ``template``'s paths and shapes.
    """
    arrays, manifest = read_arrays(path)
    check_compatible(arrays, template, str(path))
    return restore(arrays, manifest, template), manifest.get("meta", {})


def _reason(path: Path, error: CheckpointError) -> str:
    """One line: the checkpoint's name and why it was refused."""
    text = str(error).removeprefix(f"checkpoint {path}: ")
    return f"  {path.name}: {text}"


def refusal(directory: str | os.PathLike, refused: list[tuple[Path, CheckpointError]]) -> str:
    """The message for a directory none of whose checkpoints can be used: a line for each."""
    kind = "corrupt" if all(isinstance(e, CorruptCheckpoint) for _, e in refused) else "refused"
    head = f"no usable checkpoint in {directory}: all {len(refused)} are {kind}; nothing changed:"
    return "\n".join([head, *(_reason(p, e) for p, e in refused)])


def load_latest(
    directory: str | os.PathLike,
    template: Any,
    *,
    warn: Callable[[str], None] = print,
) -> tuple[Path, Any, dict[str, Any]] | None:
    """The newest checkpoint that verifies, falling back past corrupt ones.

    Corrupt (truncated, bit-flipped, half-written) checkpoints are reported through
    ``warn`` and skipped. An unsafe file (a pickle) or a checkpoint of a different
    architecture is an error, never skipped silently.

    Returns:
      (path, tree, meta) or None when there is no checkpoint at all.

    Raises:
      UnsafeCheckpoint: some checkpoint looks like a pickle (each refused one listed).
      CorruptCheckpoint: checkpoints exist but none verifies (each listed with why).
      ArchitectureMismatch: the newest verified checkpoint does not fit ``template``.
    """
    ckpts = list_checkpoints(directory)
    refused: list[tuple[Path, CheckpointError]] = []
    found = None
    for p in reversed(ckpts):
        try:
            tree, meta = load(p, template)
        except (CorruptCheckpoint, UnsafeCheckpoint) as e:
            refused.append((p, e))
            continue
        found = (p, tree, meta)
        break
    unsafe = [(p, e) for p, e in refused if isinstance(e, UnsafeCheckpoint)]
    if found is None and refused:
        raise (UnsafeCheckpoint if unsafe else CorruptCheckpoint)(refusal(directory, refused))
    if unsafe:
        raise UnsafeCheckpoint(
            f"refusing to resume from {directory}: files that could run code when loaded "
            "(fbp checkpoints are safetensors + JSON only); remove them:\n"
            + "\n".join(_reason(p, e) for p, e in unsafe)
        )
    for _, err in refused:
        warn(f"warning: {err} Skipping it.")
    return found
