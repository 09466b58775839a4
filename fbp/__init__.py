"""fbp: hand-written backpropagation in JAX, checked against jax.grad."""

from fbp import losses, nn, testing, train
from fbp.core import Aux, Layer, Sequential, ShapeError, loss_fn, value_and_grad

__version__ = "0.1.0"

__all__ = [
    "Aux",
    "Layer",
    "Sequential",
    "ShapeError",
    "loss_fn",
    "losses",
    "nn",
    "testing",
    "train",
    "value_and_grad",
]
