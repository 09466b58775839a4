"""What each layer keeps for backward: residual bytes, from shapes alone.

``memory_report`` traces ``model.forward`` (no computation, like ``jax.eval_shape``)
and counts the bytes of every layer's residuals. A buffer kept by two layers (a
Tanh's output is also the next Dense's input) is counted once, for the first layer
that keeps it, and shown as shared for the other. ``nn.Recompute`` trades these
bytes for a second forward in backward.

Examples:
  >>> import jax, jax.numpy as jnp, fbp
  >>> from fbp import nn
  >>> model = nn.Sequential([nn.Dense(100), nn.Tanh(), nn.Dense(10)])
  >>> x = jnp.ones((32, 50), jnp.float32)
  >>> report = fbp.memory_report(model, model.init(jax.random.key(0), x), x)
  >>> [(r.index, r.residual_bytes, r.shared_bytes) for r in report.rows]
  [(0, 6400, 0), (1, 12800, 0), (2, 0, 12800)]
  >>> report.total_bytes
  19200
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from fbp.core import Layer, Params, Sequential, as_struct, layer_name


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One layer's line of a MemoryReport."""

    index: int
    name: str
    residual_bytes: int  # bytes of residual buffers first kept by this layer
    shared_bytes: int  # bytes of residuals that are buffers an earlier layer already keeps
    param_bytes: int
    output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    rows: tuple[LayerMemory, ...]

    @property
    def total_bytes(self) -> int:
        """Residual bytes kept between forward and backward (each buffer once)."""
        return sum(r.residual_bytes for r in self.rows)

    def __str__(self) -> str:
        head = f"{'layer':<5} {'name':<40} {'residual':>12} {'shared':>12} {'params':>12}"
        lines = [head + "  output"]
        for r in self.rows:
            lines.append(
                f"{r.index:<5} {r.name[:40]:<40} {r.residual_bytes:>12,} {r.shared_bytes:>12,} "
                f"{r.param_bytes:>12,}  {r.output_shape}"
            )
        lines.append(f"total residual bytes: {self.total_bytes:,}")
        return "\n".join(lines)


def _name(layer: Any) -> str:
    if isinstance(layer, Sequential):
        return "Sequential[" + ", ".join(_name(sub) for sub in layer.layers) + "]"
    inner = getattr(layer, "layer", None)
    if isinstance(inner, Layer):
        return f"{type(layer).__name__}({_name(inner)})"
    return layer_name(layer)


def _nbytes(aval: Any) -> int:
    return int(aval.size) * aval.dtype.itemsize


def memory_report(
    model: Layer,
    params: Params,
    x: Any,
    *,
    key: Any = None,
    state: Any = None,
    train: bool = True,
) -> MemoryReport:
    """Residual bytes each layer keeps for backward, for an input shaped like ``x``.

    Args:
      model: a ``Sequential`` (one row per layer) or any layer (one row).
      params: its parameters (arrays or ShapeDtypeStructs).
      x: input or ShapeDtypeStruct, shape (batch, ...).
      key, state, train: as for ``model.forward``.

    Returns:
      A MemoryReport; ``str(report)`` is a table, ``report.total_bytes`` the sum.
    """
    layers = model.layers if isinstance(model, Sequential) else (model,)

    def fwd(p, v):
        y, res = model.forward(p, v, key=key, state=state, train=train)
        res = tuple(res) if isinstance(model, Sequential) else (res,)
        return tuple(jax.tree.leaves(r) for r in res), jax.tree.leaves(y)

    closed = jax.make_jaxpr(fwd)(params, as_struct(x))
    outs = closed.jaxpr.outvars
    shapes = jax.eval_shape(fwd, params, as_struct(x))[0]
    seen: set = set()
    rows, pos, v = [], 0, as_struct(x)
    for i, layer in enumerate(layers):
        own = shared = 0
        for aval in shapes[i]:
            var = outs[pos]
            pos += 1
            ident = None if hasattr(var, "val") else id(var)  # literals have no buffer identity
            if ident is not None and ident in seen:
                shared += _nbytes(aval)
            else:
                own += _nbytes(aval)
                if ident is not None:
                    seen.add(ident)
        p = params[str(i)] if isinstance(model, Sequential) else params
        v = layer.output_shape(p, v)
        rows.append(
            LayerMemory(
                i,
                _name(layer),
                own,
                shared,
                sum(_nbytes(a) for a in jax.tree.leaves(p)),
                tuple(v.shape),
            )
        )
    return MemoryReport(tuple(rows))


# ----------------------------------------------------------------------------- will it fit


class RunBytes(NamedTuple):
    """Bytes of one training run, and bytes runs of a sweep share (one data set)."""

    per_run: int
    shared: int


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs; a PRNG key as 8)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += 8 * int(np.prod(leaf.shape, dtype=np.int64))
        else:
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def run_bytes(
    model: Layer,
    state: Any,
    x: Any,
    batch_size: int,
    data_bytes: int,
    *,
    own_data: bool,
) -> RunBytes:
    """An estimate of one training run's bytes (a single run's, or one run's of a sweep).

    Args:
      model: the model.
      state: the run's ``TrainState`` (ShapeDtypeStructs from ``jax.eval_shape``).
      x: training inputs or their ShapeDtypeStruct, shape (n, ...).
      batch_size: examples per step.
      data_bytes: bytes of the run's train and validation splits.
      own_data: each run has its own data split (seeds differ); else one copy is shared.
    """
    params = tree_bytes(state.params)
    xb = jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype)
    try:
        key = jax.random.key(0)
        acts = memory_report(model, state.params, xb, key=key, state=state.model_state or None)
        activations = acts.total_bytes
    except (TypeError, ValueError):  # a model memory_report cannot trace: count no activations
        activations = 0
    steps = max(int(x.shape[0]) // batch_size, 1)
    per_run = 2 * tree_bytes(state) + 3 * params + 2 * activations + 4 * steps * batch_size
    return RunBytes(per_run + (data_bytes if own_data else 0), 0 if own_data else data_bytes)


def available_bytes(device: Any = None) -> int | None:
    """Free memory of ``device`` (default the first): the accelerator's, or the host's on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_run_fits(need: int, available: int | None) -> None:
    """Raise ValueError (one line: what to change) unless one run's ``need`` bytes fit.

    Examples:
      >>> check_run_fits(10**9, 2 * 10**9)
      >>> try:
      ...     check_run_fits(3 * 10**9, 2 * 10**9)
      ... except ValueError as e:
      ...     print(str(e)[:47])
      run: needs about 3.0 GB but 2.0 GB is free; use
    """
    if available is None or need <= available:
        return
    raise ValueError(
        f"run: needs about {format_bytes(need)} but {format_bytes(available)} is free; use a "
        'smaller --batch-size (or window), or memory="linear" / nn.Recompute to keep fewer '
        "activations."
    )


def format_bytes(n: int) -> str:
    """``1.5 GB`` (from 0.1 GB) or ``12.3 MB``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
