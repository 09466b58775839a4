"""A persistent, size-bounded XLA compilation cache: one call for scripts.

``enable_compilation_cache()`` points JAX's persistent compilation cache at
``$XDG_CACHE_HOME/fbp/xla`` (default ``~/.cache/fbp/xla``), bounds it to
``max_bytes`` (least recently used entries are evicted, under JAX's file lock, so
several processes may share it) and caches every compilation, however short. A
second identical run then loads its executables instead of compiling them.

It is off when ``FBP_COMPILATION_CACHE=0`` (or ``off``/``false``/``no``) is set,
whatever the caller asks. Some CPUs reject every cache entry on reload (jax issue
38445): the call compiles a probe twice, and when the second compile does not come
back from the cache it switches the cache off again and warns once, so the run
carries on uncached.

Examples:
  >>> import fbp
  >>> fbp.enable_compilation_cache  # doctest: +ELLIPSIS
  <function enable_compilation_cache at ...>
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache as jax_cc

ENV_VAR = "FBP_COMPILATION_CACHE"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
_OFF = {"0", "off", "false", "no"}
_REJECT_MSG = "Error reading persistent compilation cache entry"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fbp/xla``, or ``~/.cache/fbp/xla`` when XDG_CACHE_HOME is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "fbp" / "xla"


def disabled_by_env() -> bool:
    """Whether ``FBP_COMPILATION_CACHE`` switches the cache off."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _OFF


def _probe_hits() -> bool:
    """Compile one tiny function twice; True when the second compile came from disk."""
    hits: list[str] = []

    def listener(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # a fresh function each time: a fresh trace, a cache lookup
                jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)(jnp.arange(3.0)).block_until_ready()
                jax.clear_caches()
        rejected = any(_REJECT_MSG in str(w.message) for w in caught)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return bool(hits) and not rejected


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    enabled: bool = True,
    check: bool = True,
) -> Path | None:
    """Use a persistent compilation cache for every later compilation of this process.

    Args:
      path: cache directory (default ``default_cache_dir()``); created if missing.
      max_bytes: size bound in bytes; least recently used entries go first (> 0).
      enabled: False (as ``FBP_COMPILATION_CACHE=0``) leaves the cache off.
      check: compile a tiny probe twice to detect a runtime that rejects cache
        entries (then the cache is switched off with one warning).

    Returns:
      The cache directory in use, or None when the cache is off.

    Raises:
      ValueError: ``max_bytes`` is not a positive int.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(
            f"enable_compilation_cache: max_bytes must be a positive int, got {max_bytes!r}."
        )
    if not enabled or disabled_by_env():
        return None
    directory = Path(path) if path is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_enable_compilation_cache", True)
    jax_cc.set_cache_dir(str(directory))
    jax_cc.reset_cache()  # takes effect even when something was compiled before
    if check and not _probe_hits():
        disable_compilation_cache()
        warnings.warn(
            f"fbp: the persistent compilation cache in {directory} could not be read back "
            "on this machine (entries rejected on reload); compiling without it. Set "
            f"{ENV_VAR}=0 to skip this check.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return directory


def disable_compilation_cache() -> None:
    """Switch the persistent compilation cache off for the rest of this process."""
    jax.config.update("jax_enable_compilation_cache", False)
    jax_cc.reset_cache()
