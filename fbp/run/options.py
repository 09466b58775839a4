"""The run options, defined once: the Experiment's fields, ``fbp train``'s flags, the saved config.

Every option is a field of ``TrainingOptions`` (options an experiment sets, which
``fbp.run.experiment.Experiment`` inherits) or of ``RunOptions`` (those plus options of
one run: chunking, a data file, devices). Each field's ``option(...)`` metadata holds
its help text, its check and how it behaves on the command line and on resume, so:

* ``add_arguments(parser)`` derives the ``fbp train`` flags (``--weight-decay`` for
  ``weight_decay``, choices and types from the field);
* ``resolve(exp, saved, overrides)`` gives the run's ``RunOptions``: the experiment's
  values, then a resumed checkpoint's, then explicit overrides, each checked;
* ``RunOptions.to_config`` is what ``summary.json`` and every checkpoint store.

A new option (say ``dp_noise: float | None = option(None, help=..., check=positive)``)
is one field here; it then appears on the command line, in experiments and in the
saved config, and is checked, with nothing else to edit.

Examples:
  >>> opts = resolve(TrainingOptions(epochs=3, lr=0.1), overrides={"lr": 0.5})
  >>> opts.lr, opts.epochs, opts.keep
  (0.5, 3, 3)
  >>> resolve(TrainingOptions(epochs=3, lr=0.1), overrides={"keep": 0})
  Traceback (most recent call last):
  ...
  ValueError: run: keep must be >= 1, got 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

SCHEDULES = ("constant", "cosine", "warmup-cosine", "linear", "plateau")
NONFINITE = ("skip", "halt")
RESUME_RULES = ("change", "fixed", "process")
PRECISIONS = ("f32", "bf16-mixed", "bf16")  # fbp.precision's policy names


class Check(NamedTuple):
    """A predicate on an option's (non-None) value and what it requires, for the error."""

    ok: Callable[[Any], bool]
    need: str  # completes "run: NAME ... , got VALUE": "must be >= 1"


def at_least(lo: float) -> Check:
    return Check(lambda v: v >= lo, f"must be >= {lo}")


positive = Check(lambda v: v > 0, "must be > 0")
unit_open = Check(lambda v: 0 < v < 1, "must be in (0, 1)")
host_port = Check(
    lambda v: (
        bool(re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", v)) and 0 < int(v.rpartition(":")[2]) < 65536
    ),
    "must be HOST:PORT with a port in 1..65535",
)


@dataclasses.dataclass(frozen=True)
class Option:
    """How one option field is documented, checked and offered (a field's metadata).

    Attributes:
      help: one line for ``fbp train --help``.
      check: what a given value must satisfy (besides its type and choices).
      choices: the allowed strings, for a string option.
      flag: the command-line flag; default ``--`` + the name with dashes.
      metavar: the flag's value placeholder.
      resume: what a resumed run does with this option (``RESUME_RULES``): ``"change"``
        takes it from the checkpoint and a new value given on resume is recorded as a
        change at the epoch it takes effect (``lr``, ``epochs``); ``"fixed"`` refuses a new
        value (``seed``, ``batch_size``: the run would no longer be the same run);
        ``"process"`` is not taken from the checkpoint (``devices``: one process's).
      sweepable: runs of one sweep (``fbp.run.sweep``) may differ in this option: a
        number that enters the compiled step as a per-run value (``lr``) or only the
        host's bookkeeping (``patience``), never a shape.
    """

    help: str
    check: Check | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | None = None
    resume: str = "change"
    sweepable: bool = False

    def __post_init__(self) -> None:
        if self.resume not in RESUME_RULES:
            raise ValueError(f"Option.resume must be one of {RESUME_RULES}, got {self.resume!r}.")


def option(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field that is a run option; ``meta`` are ``Option``'s attributes."""
    return dataclasses.field(default=default, metadata={"option": Option(**meta)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """Options an experiment sets and the command line overrides (``Experiment``'s fields)."""

    epochs: int = option(help="total epochs of the run, also when resuming", check=at_least(1))
    lr: float = option(help="learning rate", check=positive, sweepable=True)
    batch_size: int | None = option(
        None, help="minibatch size (default: the experiment's)", check=at_least(1), resume="fixed"
    )
    seed: int = option(0, help="seed for init, data split and shuffling", resume="fixed")
    patience: int | None = option(
        None,
        help="early stopping: epochs without a better validation loss",
        check=at_least(1),
        sweepable=True,
    )
    clip: float | None = option(
        None, help="clip gradients to this global norm", check=positive, sweepable=True
    )
    weight_decay: float = option(
        0.0, help="weight decay added to the gradient (coupled)", check=at_least(0), sweepable=True
    )
    schedule: str = option(
        "constant", help="learning-rate schedule", choices=SCHEDULES, resume="fixed"
    )
    plateau_factor: float = option(0.5, help="reduce-on-plateau factor (0.5)", check=unit_open)
    plateau_patience: int = option(5, help="reduce-on-plateau patience (5)", check=at_least(1))
    nonfinite: str = option(
        "skip",
        help="non-finite loss/gradient: skip the step (default) or halt",
        choices=NONFINITE,
    )
    precision: str = option(
        "f32",
        help="f32 (default), bf16-mixed (float32 parameters, bfloat16 compute) or bf16",
        choices=PRECISIONS,
        resume="fixed",  # parameters and optimizer state are stored in its dtypes
    )
    keep: int = option(3, help="checkpoints to keep (plus the best)", check=at_least(1))
    checkpoint_every: int | None = option(
        None, help="epochs between checkpoints (default a tenth of the epochs)", check=at_least(1)
    )
    dp_clip: float | None = option(
        None,
        help="DP-SGD: clip each example's gradient to this norm (fbp.extend.dp)",
        check=positive,
        resume="fixed",
    )
    dp_noise: float | None = option(
        None,
        help="DP-SGD noise multiplier sigma (needs --dp-clip; default 0)",
        check=at_least(0),
        resume="fixed",
    )
    dp_delta: float = option(
        1e-5, help="DP-SGD: delta of the reported epsilon (1e-5)", check=unit_open, resume="fixed"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions(TrainingOptions):
    """Every option of one run: the training options plus those of this run only."""

    chunk_steps: int = option(
        128, help="steps per jitted call; signals are served between calls (128)", check=at_least(1)
    )
    data_file: str | None = option(
        None,
        help="train on a CSV (last column the target) or NPZ (x, y) file",
        flag="--data",
        metavar="FILE",
    )
    devices: int | None = option(
        None,
        help="data-parallel over N devices, the batch split evenly (fbp.distributed.parallel)",
        check=at_least(1),
        resume="process",
    )
    shard_params: bool = option(
        False,
        help="shard parameters and optimizer state over the devices (needs 2 or more)",
        resume="process",
    )
    num_processes: int | None = option(
        None,
        help="processes in the run (default: JAX_NUM_PROCESSES, SLURM's task count, or 1)",
        check=at_least(1),
        resume="process",
    )
    process_id: int | None = option(
        None,
        help="this process's index, 0..num_processes-1 (default: JAX_PROCESS_ID or SLURM's)",
        check=at_least(0),
        resume="process",
    )
    coordinator: str | None = option(
        None,
        help="HOST:PORT where process 0 listens (default: JAX_COORDINATOR_ADDRESS or SLURM's)",
        check=host_port,
        metavar="HOST:PORT",
        resume="process",
    )
    coordinator_timeout: float = option(
        60.0,
        help="seconds to wait for the coordinator and the other processes (60)",
        check=positive,
        metavar="SECONDS",
        resume="process",
    )

    def to_config(self) -> dict[str, Any]:
        """The JSON form stored in ``summary.json`` and in checkpoints."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- schema


class Field(NamedTuple):
    """One option as the schema sees it: name, value type, default and metadata."""

    name: str
    type: type  # int, float, str or bool (the non-None member of the annotation)
    optional: bool  # None is allowed ("not set": e.g. no clipping)
    default: Any  # dataclasses.MISSING for a required option
    meta: Option


@functools.cache
def fields(cls: type = RunOptions) -> tuple[Field, ...]:
    """The option fields of ``cls`` (``TrainingOptions`` or ``RunOptions``), in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "option" not in f.metadata:
            continue
        hint = hints[f.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = [t for t in members if t is not type(None)]
        out.append(
            Field(f.name, base[0], len(base) < len(members), f.default, f.metadata["option"])
        )
    return tuple(out)


def names(cls: type = RunOptions) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def sweepable() -> tuple[str, ...]:
    """The options a sweep's runs may differ in (``Option.sweepable``), in schema order."""
    return tuple(f.name for f in fields() if f.meta.sweepable)


def flag(f: Field) -> str:
    return f.meta.flag or "--" + f.name.replace("_", "-")


def check(name: str, value: Any) -> None:
    """Raise ValueError (``run: NAME must ..., got VALUE.``) unless ``value`` suits option NAME."""
    f = {f.name: f for f in fields()}[name]
    if value is None:
        if not f.optional:
            raise ValueError(f"run: {name} must be set, got None.")
        return
    kind = {int: "an int", float: "a number", str: "a string", bool: "True or False"}[f.type]
    if f.type is bool:
        good_type = isinstance(value, bool)
    elif f.type is float:
        good_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        good_type = isinstance(value, f.type) and not isinstance(value, bool)
    if not good_type or (f.type is float and not math.isfinite(value)):
        raise ValueError(f"run: {name} must be {kind}, got {value!r}.")
    if f.meta.choices is not None and value not in f.meta.choices:
        raise ValueError(f"run: {name} must be one of {f.meta.choices}, got {value!r}.")
    if f.meta.check is not None and not f.meta.check.ok(value):
        raise ValueError(f"run: {name} {f.meta.check.need}, got {value!r}.")


def resolve(
    exp: TrainingOptions,
    saved: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunOptions:
    """The run's options: the experiment's, then a resumed run's saved ones, then overrides.

    Args:
      exp: the experiment (any ``TrainingOptions``), giving the defaults.
      saved: a checkpoint's stored config, its recorded ``changes`` applied
        (``effective``); options with ``resume="process"`` and keys that are not
        options (the experiment's name) are ignored.
      overrides: explicit values (command line, keyword arguments); None means "not
        given". An unknown name is an error.

    Raises:
      ValueError: an unknown override, or a value that fails its option's check.
    """
    known = names()
    unknown = sorted(set(overrides or {}) - set(known))
    if unknown:
        raise ValueError(f"run: unknown option(s) {unknown}; known: {sorted(known)}.")
    values = {f.name: getattr(exp, f.name, f.default) for f in fields()}
    saved = effective(saved) if saved else saved
    for f in fields():
        if saved and f.meta.resume != "process" and f.name in saved:
            values[f.name] = saved[f.name]
        if overrides and overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
    for name, value in values.items():
        check(name, value)
    return RunOptions(**values)


def effective(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with its recorded ``changes`` applied, in order: the values in force now.

    Examples:
      >>> saved = {"lr": 0.1, "changes": [{"epoch": 3, "step": 6, "option": "lr", "to": 0.5}]}
      >>> effective(saved)["lr"]
      0.5
    """
    out = dict(saved)
    for c in saved.get("changes") or ():
        if c.get("option") in names():
            out[c["option"]] = c["to"]
    return out


def resume_changes(saved: Mapping[str, Any], cfg: RunOptions) -> dict[str, tuple[Any, Any]]:
    """The options ``cfg`` changes against a resumed run's ``saved`` config: ``{name: (old, new)}``.

    Raises:
      ValueError: an option whose ``resume`` rule is ``"fixed"`` is changed (one line,
        naming it and both values).
    """
    now, out = effective(saved), {}
    for f in fields():
        if f.meta.resume == "process" or f.name not in now:
            continue
        old, new = now[f.name], getattr(cfg, f.name)
        if old == new:
            continue
        if f.meta.resume == "fixed":
            raise ValueError(
                f"run: {flag(f)} cannot change on resume (the run has {old!r}, given {new!r}); "
                f"resume with {flag(f)} {old}, or start a new run in another --out."
            )
        out[f.name] = (old, new)
    return out


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per run option to ``parser`` (dest = the option's name, default None)."""
    for f in fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.meta.help}
        if f.type is bool:  # --shard-params / --no-shard-params
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.meta.choices:  # checked by ``check``: one line, exit 2
            kwargs["metavar"] = "{" + ",".join(f.meta.choices) + "}"
        else:
            kwargs["type"] = f.type
        if f.meta.metavar:
            kwargs["metavar"] = f.meta.metavar
        parser.add_argument(flag(f), **kwargs)


def from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line: ``{name: value}`` (None: not given)."""
    return {name: getattr(args, name) for name in names()}
