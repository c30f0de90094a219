"""fope-plan: parameter count (``params``), per-GPU memory (``memory``, ``activations``), the
fixes worth trying (``suggest``) and the command (``cli``), without a GPU.

Every public name is re-exported here: ``from fope_megatron.plan import estimate, main``.
"""

from .activations import activation_bytes, layer_bytes, position_fusion_on_gpu
from .cli import build_parser, header_layout, main, render
from .memory import (
    DEFAULT_OVERHEAD_GB,
    GIB,
    MEMORY_TERMS,
    Layout,
    Plan,
    estimate,
    precision_of,
    state_bytes,
)
from .params import FoPEShape, ParamCount, count_parameters, fope_shape, local_groups
from .suggest import plan

__all__ = [
    "DEFAULT_OVERHEAD_GB",
    "GIB",
    "MEMORY_TERMS",
    "FoPEShape",
    "Layout",
    "ParamCount",
    "Plan",
    "activation_bytes",
    "build_parser",
    "count_parameters",
    "estimate",
    "fope_shape",
    "header_layout",
    "layer_bytes",
    "local_groups",
    "main",
    "plan",
    "position_fusion_on_gpu",
    "precision_of",
    "render",
    "state_bytes",
]
