"""XLA:CPU settings for fbp: measured library-fusion flags, applied before JAX starts.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend (the first array or
computation, not ``import jax``). ``configure_cpu`` adds fbp's chosen flags to
``XLA_FLAGS`` before that moment; after it, it changes nothing and warns
(``XlaConfigWarning``). The choice depends on the layers (benchmarks/RESULTS.md,
"CPU flags study", jaxlib 0.10.2): XLA's default hands single dots, convolutions
and reductions to the YNNPACK library (``individual_dot``, ``individual_convolution``,
``reduce`` in ``--xla_cpu_experimental_ynn_fusion_type``); for convolutional
models XLA's own convolution was faster than YNNPACK's, so the ``"conv"`` setting
removes ``individual_convolution`` from that list. A model without a convolution
compiles to the same program under both settings (``benchmarks/cpu_setting.py``:
MLP in float32 and bfloat16, LSTM, the char-lm transformer, a digits-mlp epoch), so
``"conv"`` is the default for every process, with or without a model.

Three rules keep it safe:

* fbp sets only flags the installed jaxlib accepts (XLA aborts the process on an
  unknown flag or value). Support is probed once in a subprocess (0.4-1.4 s) and cached
  per jaxlib version under ``$FBP_CACHE_DIR`` (default ``~/.cache/fbp``).
* A flag the user already put in ``XLA_FLAGS`` wins over fbp's (flag by flag).
* ``FBP_XLA=off`` turns fbp's setting off; ``FBP_XLA=NAME`` forces a named setting
  (``xla``, ``conv``) whatever the model.

The ``fbp`` command applies the setting of the experiment it runs before JAX starts
(``setting_for_experiment``: by name, else by the layers its file names); scripts call
``fbp.configure_cpu()`` (or ``fbp.configure_cpu(model=...)``) at the top. The glibc
allocator tunables (``GLIBC_TUNABLES``) act only when given at process start; see
the README's "Speed on CPU".

Examples:
  >>> from fbp import nn, xla_config
  >>> xla_config.setting_for(nn.Sequential([nn.Conv2D(8, 3), nn.ReLU()]))
  'conv'
  >>> xla_config.setting_for(nn.Sequential([nn.Dense(8), nn.ReLU()]))
  'conv'
  >>> xla_config.parse_flags("--a=1 --xla_b --c=x,y")
  {'a': '1', 'xla_b': 'true', 'c': 'x,y'}
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from fbp.core import Layer
from fbp.nn.conv import ConvND

ENV_SWITCH = "FBP_XLA"
OFF = frozenset({"off", "0", "false", "no", "none"})

SETTINGS: dict[str, dict[str, str]] = {
    # XLA's own defaults: YNNPACK for single dots, convolutions and reductions.
    "xla": {},
    # Convolutions by XLA's own emitter, dots and reductions by YNNPACK.
    "conv": {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"},
}
# For every process, also one whose model is unknown (tests, scripts without a model):
# the conv setting changes only convolutions (same programs for other models).
DEFAULT = "conv"

# Per-experiment overrides by name, for the ``fbp`` command (see setting_for_experiment).
EXPERIMENTS: dict[str, str] = {}

GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
)

_PROBE_CODE = (
    "try:\n"
    "    from jaxlib import xla_client\n"
    "    xla_client.make_cpu_client()\n"
    "except (ImportError, AttributeError):\n"
    "    import jax\n"
    "    jax.devices('cpu')\n"
)
_BAD_FLAG = (
    re.compile(r"Unknown flag in XLA_FLAGS: --?(\w+)"),
    re.compile(r"Illegal value for --?(\w+)"),
    re.compile(r"Couldn't interpret value .* for flag (\w+)"),
)

Probe = Callable[[Mapping[str, str]], dict[str, bool]]


class XlaConfigWarning(RuntimeWarning):
    """fbp's XLA setting could not take effect (JAX had already started)."""


def parse_flags(text: str) -> dict[str, str]:
    """``XLA_FLAGS`` text -> {name: value}; a bare ``--flag`` means ``true``."""
    out = {}
    for token in shlex.split(text or ""):
        name, sep, value = token.lstrip("-").partition("=")
        out[name] = value if sep else "true"
    return out


def format_flags(flags: Mapping[str, str]) -> str:
    """{name: value} -> ``--name=value ...``."""
    return " ".join(f"--{k}={v}" for k, v in flags.items())


def jax_started() -> bool:
    """Whether JAX has started a backend in this process (XLA_FLAGS already read).

    False when JAX is not even imported. Relies on jax's private
    ``xla_bridge.backends_are_initialized``; if that is gone, returns False.
    """
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def _layers(obj: Any, depth: int = 0):
    """Every Layer inside ``obj`` (fields of dataclasses, lists, tuples, dicts)."""
    if depth > 50:
        return
    if isinstance(obj, Layer):
        yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _layers(getattr(obj, f.name), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _layers(v, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _layers(v, depth + 1)


def setting_for(model: Any) -> str:
    """The setting fbp uses for ``model``: ``"conv"`` if it has a convolution, else DEFAULT
    (also ``"conv"`` since the conv setting was measured to change nothing else).

    Args:
      model: an fbp Layer (a Sequential, a wrapper, ...); nested layers count.
    """
    if any(isinstance(layer, ConvND) for layer in _layers(model)):
        return "conv"
    return DEFAULT


def setting_for_experiment(experiment: Any) -> str:
    """The setting for an experiment, known before its file runs (before JAX starts).

    Building the model needs the data, and an experiment file may create arrays
    when it is imported, so this decides without running it: ``EXPERIMENTS`` by
    name first; else ``"conv"`` if the experiment's source names a convolution
    layer (``Conv1D``, ``Conv2D``; read with ``ast``, not executed); else DEFAULT.
    Once a model exists, ``setting_for(model)`` decides from its layers instead.

    Args:
      experiment: an experiment name (``digits-cnn``), a path to its file, an object
        with a ``name`` attribute, or None.
    """
    if experiment is None:
        return DEFAULT
    name = str(getattr(experiment, "name", experiment))
    path = Path(name) if name.endswith(".py") else None
    if path is not None:
        name = path.stem.replace("_", "-")
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    if path is None:
        from fbp.run import experiment as fbp_experiment

        path = fbp_experiment.available().get(name)
    return "conv" if path is not None and _names_conv(path) else DEFAULT


def _names_conv(path: Path) -> bool:
    """Whether a Python file mentions a convolution layer class (by name, statically)."""
    conv = {c.__name__ for c in ConvND.__subclasses__()}
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if getattr(node, "id", None) in conv or getattr(node, "attr", None) in conv:
            return True
    return False


def flags_for(setting: str | Mapping[str, str]) -> dict[str, str]:
    """The XLA flags of a named setting, or of explicit flags (a dict or ``--a=b`` text)."""
    if isinstance(setting, Mapping):
        return dict(setting)
    if setting in SETTINGS:
        return dict(SETTINGS[setting])
    if setting.strip().startswith("-"):
        return parse_flags(setting)
    names = ", ".join(sorted(SETTINGS))
    raise ValueError(
        f"fbp.configure_cpu: unknown setting {setting!r}; expected one of {names}, "
        f"'auto', 'off', or flags like '--xla_cpu_use_xnnpack=true'."
    )


# ----------------------------------------------------------------------------- support probe


def _cache_file() -> Path:
    root = os.environ.get("FBP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fbp"
    )
    return Path(root) / "xla_flags.json"


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _run_probe(flags: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env.update(XLA_FLAGS=format_flags(flags), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, ""
    return proc.returncode == 0, proc.stderr


def probe_flags(flags: Mapping[str, str], *, timeout: float = 60.0) -> dict[str, bool]:
    """Which of ``flags`` (name -> value) the installed jaxlib accepts, by trying them.

    Each try is a fresh subprocess creating an XLA:CPU client with those flags
    (~0.4 s): an unknown flag or value aborts that subprocess, never this one. A
    rejected flag is dropped and the rest tried again; if the failure names no flag,
    each flag is tried alone.

    Returns:
      name -> True (accepted) or False.
    """
    result: dict[str, bool] = {}
    left = dict(flags)
    while left:
        ok, err = _run_probe(left, timeout)
        if ok:
            result.update(dict.fromkeys(left, True))
            break
        bad = {m.group(1) for pat in _BAD_FLAG for m in pat.finditer(err)} & set(left)
        if not bad:  # unexplained failure: judge each flag on its own
            for name, value in left.items():
                result[name] = _run_probe({name: value}, timeout)[0]
            break
        for name in bad:
            result[name] = False
            del left[name]
    return result


def supported(flags: Mapping[str, str]) -> dict[str, bool]:
    """``probe_flags`` with a cache per jaxlib version (``$FBP_CACHE_DIR/xla_flags.json``)."""
    path, version = _cache_file(), _jaxlib_version()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    known = cache.get(version, {})
    keys = {name: f"{name}={value}" for name, value in flags.items()}
    missing = {n: flags[n] for n, k in keys.items() if k not in known}
    if missing:
        for name, ok in probe_flags(missing).items():
            known[keys[name]] = ok
        cache[version] = known
        try:  # atomic write; an unwritable cache only costs a probe next time
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass
    return {n: bool(known.get(k, False)) for n, k in keys.items()}


# ----------------------------------------------------------------------------- applying


def _uses_cpu(environ: Mapping[str, str]) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "") or environ.get("JAX_PLATFORM_NAME", "")
    return not platforms or "cpu" in platforms.lower().split(",")


def configure_cpu(
    setting: str | Mapping[str, str] = "auto",
    *,
    model: Any = None,
    experiment: Any = None,
    environ: MutableMapping[str, str] | None = None,
    probe: Probe | None = None,
) -> dict[str, str]:
    """Put fbp's XLA:CPU flags into ``XLA_FLAGS``; call before JAX's first computation.

    Args:
      setting: ``"auto"`` (by ``model``, else by ``experiment``, else DEFAULT), a name
        in ``SETTINGS``, ``"off"``, or explicit flags (dict or ``--name=value`` text).
      model: the fbp model to choose for (``setting_for``).
      experiment: an experiment name or object (``setting_for_experiment``).
      environ: the environment to edit (default ``os.environ``).
      probe: name -> value mapping -> {name: accepted}; default ``supported``
        (cached subprocess probe).

    Returns:
      The flags fbp added (name -> value); empty when there was nothing to add, the
      setting is off, JAX uses no CPU, or JAX had already started.

    Warns:
      XlaConfigWarning: JAX had already started, so XLA_FLAGS are read already; the
        message says what to do.
    """
    environ = os.environ if environ is None else environ
    switch = environ.get(ENV_SWITCH, "").strip().lower()
    if switch in OFF or (isinstance(setting, str) and setting.lower() in OFF):
        return {}
    if switch and switch != "auto":
        if switch not in SETTINGS:
            raise ValueError(
                f"{ENV_SWITCH}={switch!r} is not a setting; use off, auto or one of "
                f"{', '.join(sorted(SETTINGS))}."
            )
        setting = switch
    elif setting == "auto":
        setting = setting_for(model) if model is not None else setting_for_experiment(experiment)
    wanted = flags_for(setting)
    user = parse_flags(environ.get("XLA_FLAGS", ""))
    wanted = {k: v for k, v in wanted.items() if k not in user}  # the user's flags win
    if not wanted or not _uses_cpu(environ):
        return {}
    if jax_started():
        warnings.warn(
            f"fbp.configure_cpu({setting!r}) ran after JAX started, so XLA has read "
            f"XLA_FLAGS already and {format_flags(wanted)} does not apply. Call it "
            "before the first JAX array or computation (top of the script), or set "
            "XLA_FLAGS in the environment before Python starts.",
            XlaConfigWarning,
            stacklevel=2,
        )
        return {}
    ok = (probe or supported)(wanted)
    applied = {k: v for k, v in wanted.items() if ok.get(k)}
    if applied:
        environ["XLA_FLAGS"] = " ".join(
            s for s in (environ.get("XLA_FLAGS", "").strip(), format_flags(applied)) if s
        )
    return applied
