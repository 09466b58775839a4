"""fbp: hand-written backpropagation in JAX, checked against jax.grad."""

from fbp import (
    _moved,
    diagnostics,
    extend,
    finetune,
    losses,
    nn,
    precision,
    rules,
    testing,
    train,
)
from fbp.compile_cache import enable_compilation_cache
from fbp.core import Aux, Layer, Sequential, ShapeError, loss_fn, value_and_grad
from fbp.distributed import parallel
from fbp.memory import memory_report
from fbp.xla_config import configure_cpu

__version__ = "0.1.0"

_moved.install()  # old module paths (fbp.runner, fbp.parallel, ...) for one release

__all__ = [
    "Aux",
    "Layer",
    "Sequential",
    "ShapeError",
    "configure_cpu",
    "diagnostics",
    "enable_compilation_cache",
    "extend",
    "finetune",
    "loss_fn",
    "losses",
    "memory_report",
    "nn",
    "parallel",
    "precision",
    "rules",
    "testing",
    "train",
    "value_and_grad",
]
