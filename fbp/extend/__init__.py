"""Quantities beyond the gradient, from the layers' own backward rules.

Per-example gradients and their norms (``per_example``), DP-SGD (``dp``) with a
privacy accountant (``accounting``), and curvature: Hessian- and Gauss-Newton-vector
products, the exact GGN diagonal and K-FAC factors (``curvature``), plus K-FAC
(``kfac``: an optax transformation, or a standalone optimizer). Per-layer rules live
in a registry keyed by layer type (``registry``); the layers themselves are unchanged.
"""

from fbp.extend import accounting, curvature, dp, kfac
from fbp.extend.per_example import (
    NAMES,
    per_example_grads,
    per_example_norms,
    quantities,
)
from fbp.extend.registry import (
    Node,
    Rule,
    UnsupportedLayerError,
    check,
    quantity,
    register,
    supported,
    walk,
)

__all__ = [
    "NAMES",
    "Node",
    "Rule",
    "accounting",
    "curvature",
    "dp",
    "kfac",
    "UnsupportedLayerError",
    "check",
    "per_example_grads",
    "per_example_norms",
    "quantities",
    "quantity",
    "register",
    "supported",
    "walk",
]
