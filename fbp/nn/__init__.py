"""Layers: one family per module, each with a hand-written backward."""

from fbp.core import Layer, Sequential, ShapeError
from fbp.losses import causal_lm_loss
from fbp.nn import initializers
from fbp.nn.activations import (
    ELU,
    GELU,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)
from fbp.nn.attention import sdpa, sdpa_backward, sdpa_forward
from fbp.nn.combinators import Residual
from fbp.nn.conv import Conv1D, Conv2D
from fbp.nn.dense import Dense
from fbp.nn.dropout import Dropout
from fbp.nn.embedding import Embedding
from fbp.nn.mha import MultiHeadAttention
from fbp.nn.norm import BatchNorm, LayerNorm
from fbp.nn.pooling import AvgPool2D, Flatten, GlobalAvgPool, MaxPool2D, Reshape
from fbp.nn.positional import (
    LearnedPositions,
    SinusoidalPositions,
    rope_backward,
    rope_forward,
    sinusoid_table,
)
from fbp.nn.recurrent import GRU, LSTM, SimpleRNN
from fbp.nn.sequence import Bidirectional, LastStep, length_mask, reverse_padded
from fbp.nn.transformer import TransformerBlock
from fbp.nn.wrappers import Frozen, Recompute

__all__ = [
    "LearnedPositions",
    "MultiHeadAttention",
    "SinusoidalPositions",
    "TransformerBlock",
    "causal_lm_loss",
    "rope_backward",
    "rope_forward",
    "sdpa",
    "sdpa_backward",
    "sdpa_forward",
    "sinusoid_table",
    "AvgPool2D",
    "BatchNorm",
    "Conv1D",
    "Conv2D",
    "Dropout",
    "Embedding",
    "Flatten",
    "GlobalAvgPool",
    "LayerNorm",
    "MaxPool2D",
    "Reshape",
    "Residual",
    "GRU",
    "LSTM",
    "SimpleRNN",
    "Bidirectional",
    "LastStep",
    "length_mask",
    "reverse_padded",
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
