"""fope-plan: parameter count, per-GPU memory and a fits verdict for a config and layout."""

from .activations import activation_bytes, layer_bytes
from .memory import (
    GIB,
    Layout,
    Plan,
    count_parameters,
    estimate,
    fope_shape,
    header_layout,
    main,
    plan,
    render,
)

__all__ = [
    "GIB",
    "Layout",
    "Plan",
    "activation_bytes",
    "count_parameters",
    "estimate",
    "fope_shape",
    "header_layout",
    "layer_bytes",
    "main",
    "plan",
    "render",
]
