"""Frequency scaling for context extension (x+YaRN, x+PI), applied *before* the FoPE floor.

The formulas follow megatron-core's ``YarnRotaryEmbedding`` (a ramp over dims between the
``beta_fast`` and ``beta_slow`` rotation counts of the original length, blending interpolated
``w / factor`` and extrapolated ``w``) and position interpolation (``w / factor`` everywhere,
the same as positions divided by ``factor``). Pure torch.
"""

from __future__ import annotations

import math

import torch

from .math import base_frequencies


def _correction_dim(rotations: float, dim: int, base: float, original_len: int) -> float:
    return (dim * math.log(original_len / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int
) -> tuple[int, int]:
    low = math.floor(_correction_dim(beta_fast, dim, base, original_len))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_len))
    return max(low, 0), min(high, dim - 1)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_concentration(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """The factor YaRN multiplies cos and sin by (megatron-core's concentration factor)."""
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)


def scaled_frequencies(
    rotary_dim: int,
    rotary_base: float,
    scaling: str,
    factor: float,
    original_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """Base frequencies ``[d_r/2]`` after ``scaling`` in ``none`` | ``pi`` | ``yarn``."""
    w = base_frequencies(rotary_dim, rotary_base)
    if scaling == "none":
        return w
    if scaling == "pi":
        return w / factor
    if scaling != "yarn":
        raise ValueError(f"position scaling {scaling!r} unknown; allowed: none, pi, yarn")
    low, high = yarn_correction_range(beta_fast, beta_slow, rotary_dim, rotary_base, original_len)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    inter = 1.0 / (factor * rotary_base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return inter * (1 - extrapolate) + w * extrapolate
