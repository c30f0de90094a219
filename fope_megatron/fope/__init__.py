"""Pure-torch Fourier Position Embedding (no megatron import)."""

from .config import FoPEConfig, FoPEConfigError
from .math import (
    apply_tables,
    base_frequencies,
    default_d_out,
    floor_frequencies,
    fope_tables,
    init_coefficients,
    rope_tables,
    rotate_half,
    xavier_std,
)
from .module import FourierPositionEmbedding, RotaryEmbeddingTables

__all__ = [
    "FoPEConfig",
    "FoPEConfigError",
    "FourierPositionEmbedding",
    "RotaryEmbeddingTables",
    "apply_tables",
    "base_frequencies",
    "default_d_out",
    "floor_frequencies",
    "fope_tables",
    "init_coefficients",
    "rope_tables",
    "rotate_half",
    "xavier_std",
]
