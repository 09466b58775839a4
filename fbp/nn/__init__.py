"""Layers: one family per module, each with a hand-written backward."""

from fbp.core import Layer, Sequential, ShapeError
from fbp.nn import initializers
from fbp.nn.activations import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from fbp.nn.dense import Dense
from fbp.nn.wrappers import Frozen, Recompute

__all__ = [
    "ELU",
    "GELU",
    "Dense",
    "Frozen",
    "Recompute",
    "Identity",
    "Layer",
    "LeakyReLU",
    "ReLU",
    "Sequential",
    "ShapeError",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "initializers",
]
