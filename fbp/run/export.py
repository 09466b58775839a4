"""Reload a run from its directory; evaluate it; export its inference function.

``fbp export DIR`` writes ``DIR/export/``:

* ``model.jaxexport``: the inference function ``(arrays, x) -> outputs`` serialized
  with ``jax.export`` (StableHLO; the batch axis is symbolic), the data set's
  preprocessing included (``fbp.data.preprocess``: the train split's mean and std for
  every experiment whose data is standardised), so ``x`` is raw features, shape
  (batch, features...), float32 (int32 token ids for integer data), and ``y`` what
  the trained model predicts for them; for a sequence experiment with ``lengths``
  (padded sequences) the function is ``(arrays, x, lengths) -> outputs``, lengths
  int32 of shape (batch,), and ``export.json`` says ``"lengths": true``;
* ``params.safetensors``: its arrays (parameters, running state, input statistics);
* ``export.json``: the order of the arrays, the input shape, classes, ``params_sha256``;
* ``README.txt``: the loader below, which needs only jax, numpy and safetensors:

    import json, jax, numpy as np
    from safetensors.numpy import load_file
    d = "DIR/export"
    fn = jax.export.deserialize(bytearray(open(f"{d}/model.jaxexport", "rb").read()))
    arrays = load_file(f"{d}/params.safetensors")
    names = json.load(open(f"{d}/export.json"))["inputs"]
    y = fn.call([arrays[k] for k in names], np.asarray(x, np.float32))
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save as st_save

from fbp import checkpoint as ckpt
from fbp import train as fbp_train
from fbp.run import experiment, fingerprint, options, runner
from fbp.run.metrics import params_sha256

LOADER = """import json, jax, numpy as np
from safetensors.numpy import load_file
d = "{d}"
fn = jax.export.deserialize(bytearray(open(f"{{d}}/model.jaxexport", "rb").read()))
arrays = load_file(f"{{d}}/params.safetensors")
names = json.load(open(f"{{d}}/export.json"))["inputs"]
y = fn.call([arrays[k] for k in names], np.asarray(x, {dtype}){lengths})  # x: raw features
"""


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config: from summary.json, else from its newest readable checkpoint."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: no such run directory.")
    if (d / "comparison.json").exists() and not (d / "summary.json").exists():
        runs = sorted(p.name for p in d.iterdir() if (p / "summary.json").exists())
        raise ValueError(
            f"{d}: a run of several variants; name one of them: "
            + ", ".join(str(d / r) for r in runs)
            + "."
        )
    if (d / "sweep.json").exists() and not (d / "summary.json").exists():
        runs = sorted(str(p) for p in d.iterdir() if (p / "checkpoints").is_dir())
        raise ValueError(
            f"{d}: a sweep's directory, not one run's; name one of its runs: "
            + (", ".join(runs) or "(none has a checkpoint)")
            + "."
        )
    summary = d / "summary.json"
    if summary.exists():
        try:
            return json.loads(summary.read_text())["config"]
        except (json.JSONDecodeError, KeyError):
            pass
    for p in reversed(ckpt.list_checkpoints(d / "checkpoints")):
        try:
            return ckpt.read_manifest(p)["meta"]["config"]
        except (ckpt.CorruptCheckpoint, KeyError):
            continue
    raise ValueError(f"{d}: not an fbp run directory (no summary.json or checkpoint).")


def load_run(
    run_dir: str | Path,
    *,
    which: str = "best",
    warn=print,
    data_file: str | None = None,
    accept_changed_data: bool = False,
) -> dict[str, Any]:
    """Rebuild a run's experiment, data and model, and load its newest valid checkpoint.

    Args:
      run_dir: a directory written by ``fbp train --out``.
      which: ``best`` (best validation loss; the latest when there is no validation
        split) or ``last`` (the train state's parameters).
      data_file: where the run's data file is now (default: its recorded absolute path).
      accept_changed_data: use data whose fingerprint changed since the run
        (``fbp.run.fingerprint``); otherwise it is refused.

    Returns:
      dict with ``exp, config, dataset, model, params, model_state, checkpoint``.

    Raises:
      DataChanged: the data changed (or its file is missing): one line, how to proceed.
    """
    if which not in ("best", "last"):
        raise ValueError(f"load_run: which must be 'best' or 'last', got {which!r}.")
    cfg = options.effective(run_config(run_dir))  # with the changes made on resume
    exp = _experiment_of(run_dir, cfg)
    cfg["data_file"] = fingerprint.data_file(cfg.get("data_file"), data_file, f"{run_dir}")
    ds = runner.load_data(exp, cfg)
    fingerprint.check(
        fingerprint.recorded(cfg),
        fingerprint.describe(ds, cfg["data_file"]),
        where=str(run_dir),
        accept=accept_changed_data,
    )
    model = exp.model(ds)
    x = jnp.asarray(ds.train.x)
    bs = cfg["batch_size"] or x.shape[0]
    opt, _ = runner.build_optimizer(exp, cfg, cfg["epochs"] * (x.shape[0] // bs))
    ts = fbp_train.init(model, opt, jax.random.key(cfg["seed"]), x)
    template = {
        "state": ts,
        "best": {"params": ts.params, "model_state": ts.model_state},
        "order_key": jax.random.key(0),
    }
    found = ckpt.load_latest(Path(run_dir) / "checkpoints", template, warn=warn)
    if found is None:
        raise ValueError(f"{run_dir}: no checkpoint to load.")
    path, tree, _ = found
    src = tree["best"] if which == "best" else tree["state"]._asdict()
    return {
        "exp": exp,
        "config": cfg,
        "dataset": ds,
        "model": model,
        "params": src["params"],
        "model_state": src["model_state"],
        "checkpoint": path,
    }


def _experiment_of(run_dir: str | Path, cfg: dict[str, Any]) -> Any:
    """The run's experiment; for a variant's run (``NAME/VARIANT``), that variant's spec."""
    base, _, variant = cfg["experiment"].partition("/")
    path = cfg.get("experiment_path")
    exp = experiment.get(path if path and Path(path).is_file() else base)
    if not variant:
        return exp
    if variant not in (exp.variants or {}):
        raise ValueError(
            f"{run_dir}: a run of variant {variant!r}, which {exp.name} no longer defines "
            f"(variants: {sorted(exp.variants or {})})."
        )
    over = {
        "report": None,
        **(exp.variants or {})[variant],
        "variants": None,
        "name": cfg["experiment"],
    }
    return dataclasses.replace(exp, **over)


def evaluate_dir(run_dir: str | Path, *, which: str = "best", **data: Any) -> dict[str, Any]:
    """Test metrics of a run's checkpoint; also written to ``DIR/eval.json``.

    ``data``: ``data_file`` and ``accept_changed_data``, as in ``load_run``.
    """
    r = load_run(run_dir, which=which, **data)
    ds = r["dataset"]
    test = fbp_train.evaluate(
        r["model"],
        r["exp"].loss,
        r["params"],
        jnp.asarray(ds.test.x),
        jnp.asarray(ds.test.y),
        state=r["model_state"],
        lengths=None if ds.test.lengths is None else jnp.asarray(ds.test.lengths),
    )
    out = {
        "test": test,
        "params": which,
        "checkpoint": r["checkpoint"].name,
        "params_sha256": params_sha256(r["params"]),
    }
    ckpt.atomic_write(Path(run_dir) / "eval.json", json.dumps(out, indent=1) + "\n")
    return out


def export_model(
    model: Any,
    params: Any,
    model_state: Any,
    example_x: Any,
    out: str | Path,
    *,
    x_mean: np.ndarray | None = None,
    x_std: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
    lengths: bool = False,
) -> Path:
    """Serialize ``x -> model.apply(params, (x - mean) / std)`` with ``jax.export``.

    Args:
      model: the fbp model.
      params, model_state: its trained parameters and running state.
      example_x: inputs shaped like the model's, shape (batch, features...); only the
        feature shape is used (the batch axis is exported symbolic).
      out: directory to write (created).
      x_mean, x_std: standardisation statistics, shape (features...), baked in
        (``fbp.data.preprocess``'s map); None: the model takes raw features as they are.
      info: extra JSON fields for ``export.json``.
      lengths: the model takes ``lengths`` (batch,) int32 (padded sequences): the
        exported function is then ``(arrays, x, lengths)``.

    Returns:
      ``out`` as a Path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feat = tuple(np.shape(example_x)[1:])
    inputs = {"params": params, "model_state": model_state}
    if x_mean is not None:
        inputs["input"] = {
            "mean": np.asarray(x_mean, np.float32),
            "std": np.asarray(x_std, np.float32),
        }
    arrays, _ = ckpt.flatten(inputs)
    names = list(arrays)
    leaves, treedef = jax.tree.flatten(inputs)

    x_dtype = np.int32 if np.issubdtype(np.asarray(example_x).dtype, np.integer) else np.float32

    def infer(flat, x, *seq_lengths):
        tree = jax.tree.unflatten(treedef, flat)
        if "input" in tree:
            x = (x - tree["input"]["mean"]) / tree["input"]["std"]
        kw = {"lengths": seq_lengths[0]} if seq_lengths else {}
        return model.apply(tree["params"], x, state=tree["model_state"] or None, train=False, **kw)

    specs = [jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for v in leaves]
    (batch,) = jax.export.symbolic_shape("batch")
    args = [jax.ShapeDtypeStruct((batch, *feat), x_dtype)]
    if lengths:
        args.append(jax.ShapeDtypeStruct((batch,), np.int32))
    exported = jax.export.export(jax.jit(infer))(specs, *args)
    ckpt.atomic_write(out / "model.jaxexport", _serialized(exported))
    ckpt.atomic_write(out / "params.safetensors", st_save(arrays))
    meta = {
        "inputs": names,
        "x_shape": ["batch", *feat],
        "x_dtype": np.dtype(x_dtype).name,
        "lengths": lengths,
        "standardized_inside": x_mean is not None,
        "params_sha256": params_sha256(params),
        "platforms": list(exported.platforms),
        **(info or {}),
    }
    ckpt.atomic_write(out / "export.json", json.dumps(meta, indent=1) + "\n")
    loader = LOADER.format(
        d=out, dtype=f"np.{np.dtype(x_dtype).name}", lengths=", lengths" if lengths else ""
    )
    ckpt.atomic_write(out / "README.txt", loader)
    return out


def _serialized(exported: Any) -> bytes:
    """``exported.serialize()``, or the one-line error when flatbuffers is missing."""
    try:
        return bytes(exported.serialize())
    except ImportError as e:  # jax.export serializes with flatbuffers, an optional jax dep
        raise ValueError(
            f"fbp export: jax.export needs the 'flatbuffers' package ({e}); "
            "pip install 'fbp[export]'."
        ) from None


def export_dir(
    run_dir: str | Path, *, out: str | Path | None = None, which: str = "best", **data: Any
) -> Path:
    """``fbp export DIR``: export a run's model (best parameters by default).

    ``data``: ``data_file`` and ``accept_changed_data``, as in ``load_run``. A failed
    export leaves no ``export/`` folder behind (only what it made is removed).
    """
    r = load_run(run_dir, which=which, **data)
    ds = r["dataset"]
    target = Path(out) if out is not None else Path(run_dir) / "export"
    made = not target.exists()
    try:
        return _export_run(r, ds, target)
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _export_run(r: dict[str, Any], ds: Any, target: Path) -> Path:
    """``export_model`` of a ``load_run`` result into ``target``."""
    return export_model(
        r["model"],
        r["params"],
        r["model_state"],
        ds.train.x,
        target,
        x_mean=ds.x_mean,
        x_std=ds.x_std,
        info={
            "experiment": r["exp"].name,
            "classes": ds.classes,
            "checkpoint": r["checkpoint"].name,
        },
        lengths=ds.train.lengths is not None,
    )
