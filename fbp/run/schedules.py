"""A run's optimizer and learning-rate schedule, built from its options.

``build_optimizer`` chains clipping, weight decay, the experiment's optimizer (given
the schedule as its ``lr``) and, for ``schedule='plateau'``, a reduce-on-plateau
scale whose state is the last of the chain, so it is checkpointed with the rest of
the optimizer state; ``plateau_update`` feeds it one epoch's validation loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fbp.run.experiment import Experiment
from fbp.run.options import RunOptions


def build_schedule(cfg: RunOptions, total_steps: int) -> float | Callable:
    """The learning rate (a float) or an optax schedule of the optimizer step."""
    lr, total = cfg.lr, max(total_steps, 1)
    if cfg.schedule in ("constant", "plateau"):
        return lr
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total)
    if cfg.schedule == "linear":
        return optax.linear_schedule(lr, 0.0, total)
    warmup = max(1, total // 20)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))


def _scale_by_plateau(cfg: RunOptions) -> optax.GradientTransformation:
    """Multiply updates by a reduce-on-plateau scale that the runner updates once per epoch.

    The state is ``optax.contrib.reduce_on_plateau``'s own; the step only reads its
    ``scale``, and ``plateau_update`` feeds it the epoch's validation loss.
    """
    plateau = optax.contrib.reduce_on_plateau(
        factor=cfg.plateau_factor, patience=cfg.plateau_patience, accumulation_size=1
    )

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: (state.scale * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(plateau.init, update)


def build_optimizer(
    exp: Experiment, cfg: RunOptions, total_steps: int
) -> tuple[optax.GradientTransformation, float | Callable]:
    """(optimizer, schedule): clip -> weight decay -> the experiment's -> plateau scale.

    ``cfg.lr``, ``cfg.weight_decay`` and ``cfg.clip`` may be traced arrays (one run's
    values inside ``fbp.run.sweep``'s vmapped step); a traced weight decay always adds
    its term, which for a value of 0 changes no update.
    """
    schedule = build_schedule(cfg, total_steps)
    parts = []
    if cfg.clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip))
    if not isinstance(cfg.weight_decay, (int, float)) or cfg.weight_decay:  # traced: fbp.run.sweep
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(exp.optimizer(schedule, total_steps))
    if cfg.schedule == "plateau":
        parts.append(_scale_by_plateau(cfg))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


@functools.lru_cache(maxsize=16)
def _plateau_fn(factor: float, patience: int) -> Callable:
    plateau = optax.contrib.reduce_on_plateau(factor=factor, patience=patience, accumulation_size=1)

    @jax.jit
    def update(state, value):
        return plateau.update(jnp.zeros(()), state, value=value)[1]

    return update


def plateau_update(cfg: RunOptions, opt_state: Any, value: float) -> Any:
    """Feed one epoch's monitored loss to the reduce-on-plateau state (last in the chain)."""
    update = _plateau_fn(float(cfg.plateau_factor), int(cfg.plateau_patience))
    return (*opt_state[:-1], update(opt_state[-1], jnp.asarray(value, jnp.float32)))


def lr_now(cfg: RunOptions, schedule: float | Callable, opt_state: Any, step: Any) -> float:
    """The learning rate at optimizer step ``step`` (times the plateau scale)."""
    lr = float(schedule(step)) if callable(schedule) else float(schedule)
    if cfg.schedule == "plateau":
        lr *= float(opt_state[-1].scale)
    return lr
