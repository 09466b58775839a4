"""Weight initialisers, by name or as callables ``init(key, shape, dtype) -> array``.

The fan-in/fan-out maths is JAX's own (``jax.nn.initializers``); this module gives
the names users know and one place to look them up.

| name | distribution | scale |
| --- | --- | --- |
| ``glorot_uniform`` / ``xavier_uniform`` | U(-a, a) | a = sqrt(6 / (fan_in + fan_out)) |
| ``glorot_normal`` / ``xavier_normal`` | truncated N | var = 2 / (fan_in + fan_out) |
| ``he_uniform`` / ``kaiming_uniform`` | U(-a, a) | a = sqrt(6 / fan_in) |
| ``he_normal`` / ``kaiming_normal`` | truncated N | var = 2 / fan_in |
| ``lecun_uniform`` | U(-a, a) | a = sqrt(3 / fan_in) |
| ``lecun_normal`` | truncated N | var = 1 / fan_in |
| ``normal`` | N(0, 0.01²) | |
| ``zeros`` / ``ones`` | constant | |
"""

from __future__ import annotations

from collections.abc import Callable

from jax.nn import initializers as _jinit

Initializer = Callable  # (key, shape, dtype) -> Array

INITIALIZERS: dict[str, Initializer] = {
    "glorot_uniform": _jinit.glorot_uniform(),
    "xavier_uniform": _jinit.glorot_uniform(),
    "glorot_normal": _jinit.glorot_normal(),
    "xavier_normal": _jinit.glorot_normal(),
    "he_uniform": _jinit.he_uniform(),
    "kaiming_uniform": _jinit.he_uniform(),
    "he_normal": _jinit.he_normal(),
    "kaiming_normal": _jinit.he_normal(),
    "lecun_uniform": _jinit.lecun_uniform(),
    "lecun_normal": _jinit.lecun_normal(),
    "normal": _jinit.normal(0.01),
    "zeros": _jinit.zeros,
    "ones": _jinit.ones,
}


def normal(stddev: float) -> Initializer:
    """N(0, stddev²) initialiser, e.g. the "small init" of the vanishing-gradient demos."""
    if not stddev > 0:
        raise ValueError(f"normal: stddev must be > 0, got {stddev}.")
    return _jinit.normal(stddev)


def get(init: str | Initializer, owner: str = "initializer") -> Initializer:
    """Look up an initialiser by name, or pass a callable through.

    Raises:
      ValueError: the name is unknown (the message lists the known ones).
    """
    if callable(init):
        return init
    if init not in INITIALIZERS:
        raise ValueError(
            f"{owner}: unknown initializer {init!r}; expected one of {sorted(INITIALIZERS)} "
            "or a callable (key, shape, dtype) -> array."
        )
    return INITIALIZERS[init]
