"""Test configuration: float64 everywhere (parity at ~1e-10), CPU only, quiet hypothesis."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "fbp",
    max_examples=20,
    derandomize=bool(os.environ.get("CI")),  # CI replays the same examples every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("fbp")
