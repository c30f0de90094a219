"""Frequency scaling for context extension (x+YaRN, x+PI, NTK), applied *before* the FoPE floor.

The formulas follow megatron-core's ``YarnRotaryEmbedding`` (a ramp over dims between the
``beta_fast`` and ``beta_slow`` rotation counts of the original length, blending interpolated
``w / factor`` and extrapolated ``w``), position interpolation (``w / factor`` everywhere, the
same as positions divided by ``factor``; transformers' ``linear``), NTK-aware scaling (the base
raised to ``base * factor ** (d_r / (d_r - 2))``, bloc97's formula) and dynamic NTK (transformers'
``dynamic``: ``base * (factor * s / L0 - (factor - 1)) ** (d_r / (d_r - 2))`` for a sequence of
``s > L0`` tokens, no change for ``s <= L0``). Pure torch.
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


SCALING_MODES = ("none", "pi", "ntk", "dynamic-ntk", "yarn")


def ntk_base(rotary_base: float, factor: float, rotary_dim: int) -> float:
    """NTK-aware base: ``base * factor ** (d_r / (d_r - 2))`` (the lowest frequency becomes
    ``w / factor``, the highest stays)."""
    return rotary_base * factor ** (rotary_dim / (rotary_dim - 2))


def dynamic_ntk_base(
    rotary_base: float, factor: float, rotary_dim: int, seq_len: int, original_len: int
) -> float:
    """transformers' dynamic NTK base for a sequence of ``seq_len`` tokens (``seq_len`` is
    raised to ``original_len`` first, so short sequences keep the trained base)."""
    s = max(seq_len, original_len)
    return rotary_base * (factor * s / original_len - (factor - 1)) ** (
        rotary_dim / (rotary_dim - 2)
    )


def scaled_frequencies(
    rotary_dim: int,
    rotary_base: float,
    scaling: str,
    factor: float,
    original_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Base frequencies ``[d_r/2]`` after ``scaling`` in :data:`SCALING_MODES`.

    ``seq_len`` (the length of the sequence being run) is used by ``dynamic-ntk`` only.
    """
    w = base_frequencies(rotary_dim, rotary_base)
    if scaling == "none":
        return w
    if scaling == "pi":
        return w / factor
    if scaling == "ntk":
        return base_frequencies(rotary_dim, ntk_base(rotary_base, factor, rotary_dim))
    if scaling == "dynamic-ntk":
        if seq_len is None:
            raise ValueError("dynamic-ntk scaling needs seq_len (the sequence length being run)")
        base = dynamic_ntk_base(rotary_base, factor, rotary_dim, seq_len, original_len)
        return base_frequencies(rotary_dim, base)
    if scaling != "yarn":
        raise ValueError(
            f"position scaling {scaling!r} unknown; allowed: {', '.join(SCALING_MODES)}"
        )
    low, high = yarn_correction_range(beta_fast, beta_slow, rotary_dim, rotary_base, original_len)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    inter = 1.0 / (factor * rotary_base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    return inter * (1 - extrapolate) + w * extrapolate
