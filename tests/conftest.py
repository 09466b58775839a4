"""Test configuration: float64 everywhere (parity at ~1e-10), CPU only under fbp's default
XLA:CPU setting (fbp.xla_config), quiet hypothesis."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In-process `fbp` runs never read or write the user's compilation cache; cache tests
# enable it explicitly under tmp_path.
os.environ.setdefault("FBP_COMPILATION_CACHE", "0")
# Tests compile hundreds of small programs and run each a few times, so LLVM's optimisation
# of the machine code costs more than it saves: level 0 takes 35-40% off the CPU time of
# the parity tests (docs/testing.md). XLA's HLO, which tests inspect, is the same, and
# results can differ only in rounding. A level already in XLA_FLAGS wins. Subprocesses
# inherit it, except where a test sets their XLA_FLAGS itself (multi-device workers) or
# runs what a user runs (the docs' blocks, the README quickstart).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()

from fbp import xla_config  # noqa: E402  (XLA reads XLA_FLAGS when JAX starts, not at import)

xla_config.configure_cpu()  # fbp's default XLA:CPU flags; FBP_XLA=off or FBP_XLA=NAME to change

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# float64 for the whole test process, on purpose: the parity suite compares hand-written
# gradients with jax.grad at ~1e-10, which needs float64 in every array, also in those
# built at import and collection time (registry inputs, hypothesis strategies, module
# constants) that a per-test `jax.enable_x64` context would miss. Library code and the
# README use the scoped `with jax.enable_x64(True):` instead; tests of float32 behaviour
# ask for float32 explicitly.
jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "fbp",
    max_examples=20,
    derandomize=bool(os.environ.get("CI")),  # CI replays the same examples every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("fbp")


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A finished 1-epoch sweep of the test experiment ``tiny`` over seeds 0 and 1 (one per
    test module; tests that change it work on a copy)."""
    from cli_runs import EXPERIMENTS, train

    out = tmp_path_factory.mktemp("sweep") / "sw"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FBP_EXPERIMENTS", EXPERIMENTS)
        assert train(out, "--epochs", 1, "--seeds", "0,1") == 0
    return out
