"""DP-SGD in the runner: the ``dp_*`` options turned into a gradient and an accountant.

With ``dp_clip`` set (``fbp train ... --dp-clip C --dp-noise SIGMA``) the runner's step
takes ``fbp.extend.dp.grad_fn``'s gradient instead of the plain one: every example's
gradient clipped to norm C, summed, Gaussian noise of standard deviation SIGMA·C added
(its key is the per-step key that ``fbp.train.step_fn`` splits off the train state's
key), divided by the batch size. ``fbp.extend.accounting`` gives ε at δ = ``dp_delta``
for the steps taken so far; the loop logs it per epoch (``epsilon`` in
``metrics.jsonl``) and the report stores the final (ε, δ) in ``summary.json``.

Every check happens in ``check`` and ``gradient``, before the run's directory is
written or anything compiles.

Examples:
  >>> from fbp import nn, losses
  >>> from fbp.run.options import RunOptions
  >>> cfg = RunOptions(epochs=1, lr=0.1, dp_clip=1.0, dp_noise=1.0)
  >>> acc = accountant(cfg, batch_size=32, n=1000)
  >>> 0 < acc.epsilon(100) < 10
  True
  >>> check(RunOptions(epochs=1, lr=0.1, dp_noise=1.0), grad_fn=None, penalty=None)
  Traceback (most recent call last):
  ...
  ValueError: run: --dp-noise needs --dp-clip (a per-example clip norm > 0); got ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fbp.core import Layer, LossFunction
from fbp.extend import accounting, dp, registry
from fbp.extend.registry import UnsupportedLayerError
from fbp.run.options import RunOptions


def enabled(cfg: RunOptions) -> bool:
    return cfg.dp_clip is not None


def noise(cfg: RunOptions) -> float:
    """The noise multiplier σ of a DP run (0 when ``dp_noise`` is not given)."""
    return float(cfg.dp_noise or 0.0)


def check(
    cfg: RunOptions, *, grad_fn: Any, penalty: Any, devices: int | None = None, probe: Any = None
) -> None:
    """Refuse DP options that do not go together (each option's own range is
    ``fbp.run.options``'s check).

    Raises:
      ValueError: ``dp_noise`` without ``dp_clip``; DP with an experiment's own
        ``grad_fn``, a ``penalty``, a ``probe`` (it would log statistics of un-noised
        gradients) or several devices; noise > 0 without dp-accounting.
    """
    if not enabled(cfg):
        if cfg.dp_noise is not None:
            raise ValueError(
                "run: --dp-noise needs --dp-clip (a per-example clip norm > 0); "
                f"got --dp-noise {cfg.dp_noise} alone."
            )
        return
    if grad_fn is not None:
        raise ValueError(
            "run: --dp-clip replaces the gradient with DP-SGD's, but this experiment sets its "
            "own grad_fn; use one or the other (drop --dp-clip or the experiment's grad_fn)."
        )
    if penalty is not None:
        raise ValueError(
            "run: --dp-clip does not take an experiment penalty (the clipped gradient has no "
            "penalty term); use --weight-decay instead."
        )
    if probe is not None:
        raise ValueError(
            "run: --dp-clip cannot run with this experiment's probe: it logs statistics of "
            "the un-noised gradients, which the privacy budget does not cover."
        )
    if devices:
        raise ValueError(
            f"run: --dp-clip runs on one device; got --devices {devices} (leave --devices unset)."
        )
    if noise(cfg) > 0:
        try:
            accounting.require()
        except ImportError:
            raise ValueError(
                f"run: --dp-noise {cfg.dp_noise} > 0 needs the dp-accounting package to report "
                "epsilon: pip install 'fbp[dp]' (or --dp-noise 0 for clipping only)."
            ) from None


def gradient(model: Layer, loss: LossFunction, cfg: RunOptions) -> Callable:
    """``fbp.extend.dp.grad_fn`` for the run's options (fixed-size batches).

    Raises:
      ValueError: a layer of ``model`` without per-example rules (named).
    """
    if cfg.dp_clip is None:
        raise ValueError("run: privacy.gradient needs --dp-clip.")
    try:
        registry.check(model, train=True)  # the mode the step trains in (BatchNorm mixes)
        return dp.grad_fn(model, loss, clip=cfg.dp_clip, noise=noise(cfg))
    except UnsupportedLayerError as e:
        raise ValueError(f"run: --dp-clip needs per-example rules for every layer: {e}") from None


def accountant(cfg: RunOptions, *, batch_size: int, n: int) -> accounting.PrivacyAccountant:
    """The accountant of a run on batches of ``batch_size`` drawn from ``n`` examples.

    Raises:
      ValueError: a batch the accountant cannot handle (``batch_size`` > ``n``).
    """
    return accounting.PrivacyAccountant.for_batches(
        noise=noise(cfg), batch_size=batch_size, n=n, delta=cfg.dp_delta
    )


def epsilon(acc: accounting.PrivacyAccountant, steps: int) -> float | None:
    """ε after ``steps`` steps; None for an unbounded ε (no noise), so JSON stays JSON."""
    eps = acc.epsilon(int(steps))
    return eps if math.isfinite(eps) else None


def summary(cfg: RunOptions, acc: accounting.PrivacyAccountant, steps: int) -> dict[str, Any]:
    """What ``summary.json`` stores under ``privacy``."""
    return {
        "epsilon": epsilon(acc, steps),
        "delta": cfg.dp_delta,
        "clip": cfg.dp_clip,
        "noise": noise(cfg),
        "steps": int(steps),
        "sampling_rate": acc.sampling_rate,
        "accountant": acc.method,
    }
