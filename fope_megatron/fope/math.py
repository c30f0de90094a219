"""FoPE math as free functions (spec sections 1-3). No process-group code, no megatron import.

Parallel layout enters only as arguments: which positions (a tensor) and which KV groups (a range).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def base_frequencies(rotary_dim: int, rotary_base: float) -> Tensor:
    """RoPE frequencies ``w_i = theta**(-2i/d_r)``, float32, descending (megatron-core's formula)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return 1.0 / (rotary_base**exponent)


def floor_frequencies(w: Tensor, train_seq_len: int, floor_ratio: float) -> tuple[Tensor, int]:
    """Zero every frequency below ``floor_ratio * 2*pi / train_seq_len``.

    Returns the floored frequencies and ``D_in``, the number of non-zero ones (a prefix, as ``w``
    descends).
    """
    floor = floor_ratio * 2 * math.pi / train_seq_len
    keep = w >= floor
    w = torch.where(keep, w, torch.zeros_like(w))
    d_in = int(keep.sum())
    if d_in and not bool(keep[:d_in].all()):
        raise ValueError("frequencies must be descending so that the kept ones form a prefix")
    return w, d_in


def default_d_out(d_in: int, rotary_dim: int) -> int:
    """Reference default ``D_out = min(D_in, d_r // 4)``."""
    return min(d_in, rotary_dim // 4)


def coefficient_generator(seed: int, layer: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, layer)`` alone, so every rank and layout agrees."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(layer) * 7_919 + 17) % (2**63 - 1))
    return g


def xavier_std(groups: int, d_in: int, d_out: int, sigma: float) -> float:
    """torch's xavier-normal std for a ``[G, D_in, D_out]`` tensor with gain ``sigma``."""
    fan_in, fan_out = d_in * d_out, groups * d_out
    return sigma * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0


def step_identity(groups: int, d_in: int, d_out: int) -> Tensor:
    """``E[:, k*step, k] = 1`` with ``step = ceil(D_in / D_out)`` for ``k*step < D_in``."""
    e = torch.zeros(groups, d_in, d_out, dtype=torch.float32)
    if d_in and d_out:
        step = math.ceil(d_in / d_out)
        for k in range(d_out):
            if k * step < d_in:
                e[:, k * step, k] = 1.0
    return e


def init_coefficients(
    groups: int, d_in: int, d_out: int, sigma: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Full ``(A_cos, A_sin)``, each ``[G, D_in, D_out]`` float32: xavier(sigma) + step identity.

    ``A_cos`` is drawn first, then ``A_sin``, from the same generator.
    """
    std = xavier_std(groups, d_in, d_out, sigma)
    eye = step_identity(groups, d_in, d_out)
    out = []
    for _ in range(2):
        noise = torch.randn(groups, d_in, d_out, generator=generator, dtype=torch.float32)
        out.append(noise * std + eye)
    return out[0], out[1]


def fope_tables(
    positions: Tensor,
    w_in: Tensor,
    a_cos: Tensor,
    a_sin: Tensor,
    rotary_dim: int,
    zero_freq_sin: float = 1.0,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor]:
    """Tables ``(C_full, S_full)``, float32 ``[P, n_groups, d_r]``.

    Args:
        positions: integer positions ``[P]``.
        w_in: the ``D_in`` non-zero frequencies.
        a_cos, a_sin: coefficients ``[n_groups, D_in, D_out]`` of the groups wanted.
        rotary_dim: ``d_r``; pairs ``j >= D_out`` are zero-frequency (C = 1, S = zero_freq_sin).
    """
    n_groups, d_in, d_out = a_cos.shape
    half = rotary_dim // 2
    angles = positions.to(torch.float32)[:, None] * w_in.to(torch.float32)[None, :]  # [P, D_in]
    c = torch.einsum("pk,gkj->pgj", torch.cos(angles), a_cos.to(torch.float32))
    s = torch.einsum("pk,gkj->pgj", torch.sin(angles), a_sin.to(torch.float32))
    if d_out < half:
        shape = (positions.shape[0], n_groups, half - d_out)
        c = torch.cat([c, c.new_ones(shape)], dim=-1)
        s = torch.cat([s, s.new_full(shape, float(zero_freq_sin))], dim=-1)
    return expand_pairs(c, interleaved), expand_pairs(s, interleaved)


def rope_tables(positions: Tensor, w: Tensor, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Plain RoPE tables ``(cos, sin)``, float32 ``[P, 1, d_r]`` (one group: heads share them)."""
    angles = positions.to(torch.float32)[:, None] * w.to(torch.float32)[None, :]
    return (
        expand_pairs(torch.cos(angles)[:, None, :], interleaved),
        expand_pairs(torch.sin(angles)[:, None, :], interleaved),
    )


def expand_pairs(t: Tensor, interleaved: bool) -> Tensor:
    """Per-pair values ``[..., d_r/2]`` to per-dim ``[..., d_r]``: ``[t, t]`` or interleaved."""
    if interleaved:
        return torch.repeat_interleave(t, 2, dim=-1)
    return torch.cat([t, t], dim=-1)


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` (or per interleaved pair ``(a, b) -> (-b, a)``)."""
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_tables(x: Tensor, c: Tensor, s: Tensor, interleaved: bool = False) -> Tensor:
    """``x' = x*C + rotate_half(x)*S`` on the first ``d_r`` dims, float32 math, ``x``'s dtype out.

    Args:
        x: ``[s, b, heads, head_dim]``.
        c, s: ``[s, n_groups, d_r]`` tables; ``heads`` must be a multiple of ``n_groups`` or
            ``n_groups == 1``. Local head ``i`` uses group ``i // (heads // n_groups)``.
    Only the tables (not ``x``) are kept for backward when they need no gradient.
    """
    seq, batch, heads, _ = x.shape
    n_groups, d_r = c.shape[1], c.shape[2]
    if heads % n_groups:
        raise ValueError(f"{heads} heads cannot be split over {n_groups} KV groups")
    x_rot, x_pass = x[..., :d_r], x[..., d_r:]
    xf = x_rot.float().view(seq, batch, n_groups, heads // n_groups, d_r)
    out = xf * c[:, None, :, None, :] + rotate_half(xf, interleaved) * s[:, None, :, None, :]
    out = out.view(seq, batch, heads, d_r).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out
