"""Fused FoPE (and RoPE) for q AND k in one Triton launch, forward and backward: the Python
side (checks, launches, autograd, the choice of path). The kernels are :mod:`.triton_kernel`.

The path a launch takes is chosen from its shapes (:func:`kernel_path`), the fastest measured on
an H100 (docs/results/gpu/README.md): the table product over the Fourier columns only, on tensor
cores as 3xTF32, where those columns fill half the padded pairs (else the IEEE fp32 product over
all pairs), and a group's heads as one tile loaded before the tables are formed, up to
:data:`TILE_MAX_HEADS` query heads per group (else one head at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import triton_kernel
from .fusion import interpreted

__all__ = [
    "TILE_MAX_HEADS",
    "KernelPath",
    "fope_apply_qk",
    "interpreted",
    "kernel_path",
    "narrow_fits",
    "rope_apply_qk",
]

TILE_MAX_HEADS = 8
"""A group's heads go as one tile up to this many query heads per group (measured: 4)."""


@dataclass(frozen=True)
class KernelPath:
    """Which of the kernel's compiled paths a launch takes (:func:`kernel_path` picks it)."""

    narrow: bool
    """Tables by the 3xTF32 product over the Fourier columns only (where :func:`narrow_fits`);
    else by the IEEE fp32 product over all pairs. Always False in the RoPE limit (no product)."""
    tile: bool
    """A group's query heads, and its key heads, as one ``[block, heads, pairs]`` tile per
    half, batch row 0 loaded before the tables are formed; else one head at a time, after them.
    The trainable-coefficient backward always goes head by head."""

    def __str__(self) -> str:
        tables = "3xTF32 over the Fourier columns" if self.narrow else "fp32 over all pairs"
        heads = "a group's heads as one tile" if self.tile else "one head at a time"
        return f"table product {tables}, {heads}"


def narrow_fits(d_out: int, rotary_dim: int) -> bool:
    """Whether the Fourier columns' padded width is exactly half of the padded pairs (e.g.
    ``D_out`` 17-32 of 64 pairs), so that the narrow product can multiply only them."""
    half_p2 = max(16, triton.next_power_of_2(rotary_dim // 2))
    return 2 * max(16, triton.next_power_of_2(d_out)) == half_p2


def kernel_path(d_out: int | None, rotary_dim: int, q_heads_per_group: int) -> KernelPath:
    """The path of a launch with these shapes (``d_out`` None: the RoPE limit): the narrow
    product where :func:`narrow_fits`, one tile up to :data:`TILE_MAX_HEADS` query heads per
    group."""
    return KernelPath(
        narrow=d_out is not None and narrow_fits(d_out, rotary_dim),
        tile=q_heads_per_group <= TILE_MAX_HEADS,
    )


# The coefficient-gradient launch writes per-block partials, so it runs one fixed block size.
_COEF_GRAD_BLOCK = 16


def _check(q: Tensor, k: Tensor, positions: Tensor, n_groups: int, rotary_dim: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [s, b, heads, head_dim]; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in s, b or head_dim")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must match")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fused FoPE supports float32/bfloat16/float16, got {q.dtype}")
    if positions.dim() != 1 or positions.shape[0] != q.shape[0]:
        raise ValueError(
            f"positions must be [s] = [{q.shape[0]}] integers, got {tuple(positions.shape)}"
        )
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    if rotary_dim % 2 or not 0 < rotary_dim <= q.shape[3]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, {q.shape[3]}]")
    if q.shape[2] % n_groups or k.shape[2] % n_groups:
        raise ValueError(
            f"{q.shape[2]} query heads and {k.shape[2]} key heads cannot be split over "
            f"{n_groups} KV groups"
        )
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"the Triton FoPE kernel needs CUDA tensors (got {q.device}); use the torch path, "
            "or TRITON_INTERPRET=1 to run it on the CPU"
        )


def _path(path: KernelPath | None, d_out: int | None, rotary_dim: int, q: Tensor, groups: int):
    """``path``, checked against what these shapes can take, else :func:`kernel_path`."""
    if path is None:
        return kernel_path(d_out, rotary_dim, q.shape[2] // groups)
    if path.narrow and (d_out is None or not narrow_fits(d_out, rotary_dim)):
        raise ValueError(
            f"{path}: the narrow product needs the Fourier columns to fill half the padded pairs "
            f"(D_out {d_out}, rotary_dim {rotary_dim}; RoPE has no product)"
        )
    return path


def _launch(
    x_q: Tensor,
    x_k: Tensor,
    positions: Tensor,
    w: Tensor,
    a_cos: Tensor | None,
    a_sin: Tensor | None,
    n_groups: int,
    rotary_dim: int,
    zero_freq_sin: float,
    interleaved: bool,
    sign: int,
    path: KernelPath,
    grad_inputs: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One launch over (position blocks, KV groups). ``a_cos is None``: RoPE limit.
    ``grad_inputs``: the forward inputs, for the trainable-coefficient backward."""
    s, b, hq, d = x_q.shape
    hk = x_k.shape[2]
    rope = a_cos is None
    d_in = w.shape[0] if not rope else rotary_dim // 2
    d_out = a_cos.shape[2] if not rope else rotary_dim // 2
    out_q = torch.empty(x_q.shape, dtype=x_q.dtype, device=x_q.device)
    out_k = torch.empty(x_k.shape, dtype=x_k.dtype, device=x_k.device)
    if s == 0 or b == 0:
        return out_q, out_k, None, None
    d_pass = d - rotary_dim
    coef = (w, w) if rope else (a_cos, a_sin)  # (unused pointers in the RoPE limit)
    shapes = dict(
        QH_PER_G=hq // n_groups,
        KH_PER_G=hk // n_groups,
        D_R=rotary_dim,
        D_PASS=d_pass,
        D_IN=d_in,
        D_OUT=d_out,
        IN_P2=max(16, triton.next_power_of_2(d_in)),  # tl.dot needs every dim >= 16
        HALF_P2=max(1 if rope else 16, triton.next_power_of_2(rotary_dim // 2)),
        OUT_P2=max(16, triton.next_power_of_2(d_out)),
        PASS_P2=triton.next_power_of_2(max(d_pass, 1)),
        NARROW=path.narrow,
        INTERLEAVED=bool(interleaved),
        ROUND_BF16=interpreted(),
    )
    io = (*x_q.stride(), *x_k.stride(), *out_q.stride(), *out_k.stride())
    if grad_inputs is None:
        grid = lambda meta: (triton.cdiv(s, meta["BLOCK_S"]), n_groups)  # noqa: E731
        triton_kernel._fope_qk_tuned[grid](
            x_q, x_k, out_q, out_k, positions, w, *coef, s, b, n_groups, *io,
            float(zero_freq_sin), QH_P2=triton.next_power_of_2(hq // n_groups),
            KH_P2=triton.next_power_of_2(hk // n_groups), ROPE=rope, HEAD_TILE=path.tile,
            SIGN=sign, **shapes,
        )  # fmt: skip
        return out_q, out_k, None, None
    gq, gk = grad_inputs
    blocks = triton.cdiv(s, _COEF_GRAD_BLOCK)  # >= 16 rows: tl.dot's minimum
    part = torch.zeros(2, blocks, n_groups, d_in, d_out, dtype=torch.float32, device=x_q.device)
    triton_kernel._fope_qk_coef_grad_kernel[(blocks, n_groups)](
        x_q, x_k, out_q, out_k, gq, gk, positions, w, *coef, part[0], part[1], s, b,
        *io, *gq.stride(), *gk.stride(), float(zero_freq_sin), N_GROUPS=n_groups,
        BLOCK_S=_COEF_GRAD_BLOCK, num_warps=4, **shapes,
    )  # fmt: skip
    sums = part.sum(dim=1)
    return out_q, out_k, sums[0], sums[1]


class _FusedFoPE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, positions, w, a_cos, a_sin, rotary_dim, zero_freq_sin, interleaved, path
    ):
        n_groups = a_cos.shape[0] if a_cos is not None else k.shape[2]
        args = (positions, w, a_cos, a_sin, n_groups, rotary_dim, zero_freq_sin, interleaved)
        out_q, out_k, _, _ = _launch(q, k, *args, 1, path)
        learn = a_cos is not None and (a_cos.requires_grad or a_sin.requires_grad)
        ctx.meta = (args[4:], learn, q.shape, k.shape, path)
        # Frozen coefficients: nothing activation-sized is kept (positions, w and the
        # [G, D_in, D_out] coefficients only). Trainable ones need the inputs for dA.
        if learn:
            ctx.save_for_backward(positions, w, a_cos, a_sin, q, k)
        else:
            ctx.save_for_backward(positions, w, a_cos, a_sin)
        return out_q, out_k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        launch_args, learn, shape_q, shape_k, path = ctx.meta
        saved = ctx.saved_tensors
        inputs = (saved[4], saved[5]) if learn else None
        like = grad_k if grad_q is None else grad_q
        if grad_q is None:  # only k' was used
            grad_q = like.new_zeros(shape_q)
        if grad_k is None:
            grad_k = like.new_zeros(shape_k)
        dq, dk, da_cos, da_sin = _launch(
            grad_q, grad_k, *saved[:4], *launch_args, -1, path, inputs
        )  # fmt: skip
        return dq, dk, None, None, da_cos, da_sin, None, None, None, None


def fope_apply_qk(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    w_in: Tensor,
    a_cos: Tensor,
    a_sin: Tensor,
    rotary_dim: int,
    zero_freq_sin: float = 1.0,
    interleaved: bool = False,
    path: KernelPath | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused FoPE on ``q`` ``[s, b, Hq, d]`` and ``k`` ``[s, b, Hk, d]`` (any strides).

    Args:
        positions: integer positions ``[s]`` of the rows (CP chunks, shards, packed sequences).
        w_in: the ``D_in`` non-zero (floored) frequencies, float32.
        a_cos, a_sin: ``[n_groups, D_in, D_out]`` float32 coefficients of the groups q/k hold;
            local query head ``h`` uses group ``h // (Hq / n_groups)``, key head ``h`` group
            ``h // (Hk / n_groups)``.
        rotary_dim: ``d_r``; dims beyond it pass through.
        path: the kernel path (default: :func:`kernel_path` of these shapes; benchmarks and
            tests name one to compare the paths at the same shapes).

    Returns ``(q', k')``, new contiguous tensors of q's dtype; math in float32.
    """
    if a_cos.dim() != 3 or a_cos.shape != a_sin.shape:
        raise ValueError(
            f"coefficients must be [groups, D_in, D_out] alike; got {tuple(a_cos.shape)} and "
            f"{tuple(a_sin.shape)}"
        )
    if w_in.shape != (a_cos.shape[1],):
        raise ValueError(f"w_in {tuple(w_in.shape)} must be [D_in] = [{a_cos.shape[1]}]")
    if a_cos.shape[2] > rotary_dim // 2:
        raise ValueError(f"D_out {a_cos.shape[2]} exceeds d_r/2 = {rotary_dim // 2}")
    _check(q, k, positions, a_cos.shape[0], rotary_dim)
    if a_cos.dtype != torch.float32 or a_sin.dtype != torch.float32:
        raise ValueError(f"coefficients must be float32, got {a_cos.dtype} / {a_sin.dtype}")
    path = _path(path, a_cos.shape[2], rotary_dim, q, a_cos.shape[0])
    return _FusedFoPE.apply(
        q, k, positions, w_in.float().contiguous(), a_cos.contiguous(), a_sin.contiguous(),
        int(rotary_dim), float(zero_freq_sin), bool(interleaved), path,
    )  # fmt: skip


def rope_apply_qk(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    w: Tensor,
    rotary_dim: int,
    interleaved: bool = False,
    path: KernelPath | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused RoPE (FoPE's limit: identity coefficients, no floor) on q and k in one launch.

    ``w``: the ``d_r/2`` frequencies, float32. Shapes, strides and ``path`` (``narrow`` False)
    as :func:`fope_apply_qk`.
    """
    if w.shape != (rotary_dim // 2,):
        raise ValueError(f"w {tuple(w.shape)} must be [d_r/2] = [{rotary_dim // 2}]")
    # Heads share RoPE's tables: split them into as many groups as there are key heads, so the
    # launch has enough programs.
    _check(q, k, positions, k.shape[2], rotary_dim)
    path = _path(path, None, rotary_dim, q, k.shape[2])
    return _FusedFoPE.apply(
        q, k, positions, w.float().contiguous(), None, None, int(rotary_dim), 1.0,
        bool(interleaved), path,
    )  # fmt: skip
