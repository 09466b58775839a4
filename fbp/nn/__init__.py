"""Layers: one family per module, each with a hand-written backward."""

from fbp.core import Layer, Sequential, ShapeError
from fbp.nn import initializers
from fbp.nn.activations import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from fbp.nn.dense import Dense

__all__ = [
    "ELU",
    "GELU",
    "Dense",
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
