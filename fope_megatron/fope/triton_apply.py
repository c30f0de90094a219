"""Fused FoPE (and RoPE) for q AND k in one Triton launch, forward and backward: the Python
side (checks, launches, autograd, the variants' defaults). The kernel is :mod:`.triton_kernel`.

Defaults (``mix='auto'``, ``heads='auto'``) are the fastest variants measured on an H100
(docs/results/gpu): the table product over the Fourier columns only, on tensor cores as 3xTF32,
where those columns fill half the pairs (else the IEEE fp32 product over all pairs), and a
group's heads as one tile loaded before the tables are formed (up to 8 query heads per group).
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from .fusion import interpreted
from .triton_kernel import _fope_qk_kernel, _fope_qk_tuned

__all__ = [
    "HEADS",
    "MIXES",
    "TILE_MAX_HEADS",
    "fope_apply_qk",
    "interpreted",
    "narrow_fits",
    "resolve_heads",
    "resolve_mix",
    "rope_apply_qk",
]

MIXES = ("auto", "dot", "dot_tf32x3", "dot_narrow", "dot_narrow_tf32x3", "loop")
"""How the fused kernel forms its tables (see :func:`fope_apply_qk`)."""

HEADS = ("auto", "each", "tile")
"""How a program walks its group's heads (see :func:`fope_apply_qk`)."""

TILE_MAX_HEADS = 8
"""``heads='auto'`` tiles a group's heads up to this many query heads per group (measured: 4)."""


def narrow_fits(d_out: int, rotary_dim: int) -> bool:
    """Whether the ``dot_narrow*`` mixes multiply only the Fourier columns: their padded width
    is exactly half of the padded pairs (e.g. ``D_out`` 17-32 of 64 pairs); else they fall back
    to the product over all pairs."""
    half_p2 = max(16, triton.next_power_of_2(rotary_dim // 2))
    return 2 * max(16, triton.next_power_of_2(d_out)) == half_p2


def resolve_mix(mix: str | None, d_out: int, rotary_dim: int) -> str:
    """The table variant a launch uses: ``mix``, else ``$FOPE_TRITON_MIX``, else ``auto``, which
    is ``dot_narrow_tf32x3`` where :func:`narrow_fits`, else ``dot``."""
    if mix is None:
        mix = os.environ.get("FOPE_TRITON_MIX") or "auto"
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r} (argument or FOPE_TRITON_MIX) unknown; allowed: {MIXES}")
    if mix == "auto":
        return "dot_narrow_tf32x3" if narrow_fits(d_out, rotary_dim) else "dot"
    return mix


def resolve_heads(heads: str | None, q_heads_per_group: int) -> str:
    """How programs walk their heads: ``heads``, else ``$FOPE_TRITON_HEADS``, else ``auto``,
    which is ``tile`` up to :data:`TILE_MAX_HEADS` query heads per group, else ``each``."""
    where = "heads"
    if heads is None:
        where, heads = "FOPE_TRITON_HEADS", os.environ.get("FOPE_TRITON_HEADS") or "auto"
    if heads not in HEADS:
        raise ValueError(f"{where}={heads!r} unknown; allowed: {HEADS}")
    if heads == "auto":
        return "tile" if q_heads_per_group <= TILE_MAX_HEADS else "each"
    return heads


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
    grad_inputs: tuple[Tensor, Tensor] | None = None,
    mix: str = "dot",
    group_block: int = 1,
    heads: str = "each",
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One launch over (position blocks, blocks of ``group_block`` groups). ``a_cos is None``:
    RoPE limit."""
    s, b, hq, d = x_q.shape
    hk = x_k.shape[2]
    rope = a_cos is None
    d_in = w.shape[0] if not rope else rotary_dim // 2
    d_out = a_cos.shape[2] if not rope else rotary_dim // 2
    out_q = torch.empty(x_q.shape, dtype=x_q.dtype, device=x_q.device)
    out_k = torch.empty(x_k.shape, dtype=x_k.dtype, device=x_k.device)
    if s == 0 or b == 0:
        return out_q, out_k, None, None
    half = rotary_dim // 2
    d_pass = d - rotary_dim
    dummy = w  # unused pointer arguments (constexpr-disabled branches)
    coef = (dummy, dummy) if rope else (a_cos, a_sin)
    gq, gk = grad_inputs if grad_inputs is not None else (x_q, x_k)
    dot = mix != "loop" and not rope  # tl.dot needs every dim >= 16: pad D_in, HALF, BLOCK_S
    half_p2 = max(16 if dot else 1, triton.next_power_of_2(half))
    common = dict(
        MIX_DOT=dot,
        NARROW=dot and mix.startswith("dot_narrow") and narrow_fits(d_out, rotary_dim),
        OUT_P2=max(16, triton.next_power_of_2(d_out)),
        DOT_PREC="tf32x3" if mix.endswith("tf32x3") else "ieee",
        IN_P2=max(16, triton.next_power_of_2(d_in)),
        QH_PER_G=hq // n_groups,
        KH_PER_G=hk // n_groups,
        N_GROUPS=n_groups,
        D_R=rotary_dim,
        D_PASS=d_pass,
        D_IN=d_in,
        D_OUT=d_out,
        HALF_P2=half_p2,
        PASS_P2=triton.next_power_of_2(max(d_pass, 1)),
        ROPE=rope,
        INTERLEAVED=bool(interleaved),
        SIGN=sign,
        ROUND_BF16=interpreted(),
    )
    args = (
        x_q, x_k, out_q, out_k, gq, gk, positions, w, coef[0], coef[1],
    )  # fmt: skip
    strides = (
        *x_q.stride(), *x_k.stride(), *out_q.stride(), *out_k.stride(), *gq.stride(), *gk.stride(),
    )  # fmt: skip
    if grad_inputs is None:
        grid = lambda meta: (triton.cdiv(s, meta["BLOCK_S"]), n_groups // group_block)  # noqa: E731
        _fope_qk_tuned[grid](
            *args, dummy, dummy, s, b, *strides, float(zero_freq_sin), COEF_GRAD=False,
            GROUP_BLOCK=group_block, HEAD_TILE=heads == "tile",
            QH_P2=triton.next_power_of_2(hq // n_groups),
            KH_P2=triton.next_power_of_2(hk // n_groups), **common,
        )  # fmt: skip
        return out_q, out_k, None, None
    blocks = triton.cdiv(s, _COEF_GRAD_BLOCK)  # >= 16 rows: tl.dot's minimum
    part = torch.zeros(2, blocks, n_groups, d_in, d_out, dtype=torch.float32, device=x_q.device)
    _fope_qk_kernel[(blocks, n_groups)](
        *args, part[0], part[1], s, b, *strides, float(zero_freq_sin),
        COEF_GRAD=True, BLOCK_S=_COEF_GRAD_BLOCK, num_warps=4, **common,
    )  # fmt: skip
    sums = part.sum(dim=1)
    return out_q, out_k, sums[0], sums[1]


class _FusedFoPE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, positions, w, a_cos, a_sin, rotary_dim, zero_freq_sin, interleaved, mix, gb,
        heads,
    ):  # fmt: skip
        n_groups = a_cos.shape[0] if a_cos is not None else k.shape[2]
        out_q, out_k, _, _ = _launch(
            q, k, positions, w, a_cos, a_sin, n_groups, rotary_dim, zero_freq_sin, interleaved, 1,
            mix=mix, group_block=gb, heads=heads,
        )  # fmt: skip
        learn = a_cos is not None and (a_cos.requires_grad or a_sin.requires_grad)
        shapes = (q.shape, k.shape)
        ctx.meta = (
            n_groups,
            rotary_dim,
            zero_freq_sin,
            interleaved,
            learn,
            *shapes,
            mix,
            gb,
            heads,
        )
        # Frozen coefficients: nothing activation-sized is kept (positions, w and the
        # [G, D_in, D_out] coefficients only). Trainable ones need the inputs for dA.
        if learn:
            ctx.save_for_backward(positions, w, a_cos, a_sin, q, k)
        else:
            ctx.save_for_backward(positions, w, a_cos, a_sin)
        return out_q, out_k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        n_groups, rotary_dim, zero_freq_sin, interleaved, learn, *shapes, mix, gb, heads = ctx.meta
        shape_q, shape_k = shapes
        saved = ctx.saved_tensors
        positions, w, a_cos, a_sin = saved[:4]
        inputs = (saved[4], saved[5]) if learn else None
        like = grad_k if grad_q is None else grad_q
        if grad_q is None:  # only k' was used
            grad_q = like.new_zeros(shape_q)
        if grad_k is None:
            grad_k = like.new_zeros(shape_k)
        dq, dk, da_cos, da_sin = _launch(
            grad_q, grad_k, positions, w, a_cos, a_sin, n_groups, rotary_dim, zero_freq_sin,
            interleaved, -1, inputs, mix, gb, heads,
        )  # fmt: skip
        return dq, dk, None, None, da_cos, da_sin, None, None, None, None, None, None


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
    mix: str | None = None,
    group_block: int | None = None,
    heads: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused FoPE on ``q`` ``[s, b, Hq, d]`` and ``k`` ``[s, b, Hk, d]`` (any strides).

    Args:
        positions: integer positions ``[s]`` of the rows (CP chunks, shards, packed sequences).
        w_in: the ``D_in`` non-zero (floored) frequencies, float32.
        a_cos, a_sin: ``[n_groups, D_in, D_out]`` float32 coefficients of the groups q/k hold;
            local query head ``h`` uses group ``h // (Hq / n_groups)``, key head ``h`` group
            ``h // (Hk / n_groups)``.
        rotary_dim: ``d_r``; dims beyond it pass through.
        mix: how the tables are formed in registers (default: ``$FOPE_TRITON_MIX``, else
            ``auto``: see :func:`resolve_mix`): ``dot`` (cos/sin of the whole ``[block, D_in]`` angle tile once per
            element, then an IEEE fp32 ``tl.dot`` with the coefficients), ``dot_tf32x3`` (the
            same product on tensor cores as 3xTF32), ``dot_narrow`` (the product over the
            Fourier columns only, then widened, where they fill half the pairs),
            ``dot_narrow_tf32x3`` (that product as 3xTF32) or ``loop``
            (one ``D_in`` step at a time; each ``cos/sin(p w_k)`` is a row vector that Triton's
            layout evaluates once per thread holding that row).
        group_block: KV groups per program (default: ``$FOPE_TRITON_GROUP_BLOCK``, else 1); a
            divisor of the groups q/k hold. Above 1 a program computes the angles' cos/sin once
            for its groups and mixes them per group, with fewer programs in the launch.
        heads: how a program walks its group's heads (default: ``$FOPE_TRITON_HEADS``, else
            ``auto``: see :func:`resolve_heads`): ``each`` (one head at a time, loaded after the
            tables are formed) or ``tile`` (all of the group's query heads, and its key heads,
            as one ``[block, heads, pairs]`` tile per half, the first batch row loaded before
            the tables are formed so the table math overlaps the loads). The
            trainable-coefficient backward always goes head by head.

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
    mix = resolve_mix(mix, a_cos.shape[2], rotary_dim)
    gb = _group_block(group_block, a_cos.shape[0])
    hw = resolve_heads(heads, q.shape[2] // a_cos.shape[0])
    return _FusedFoPE.apply(
        q, k, positions, w_in.float().contiguous(), a_cos.contiguous(), a_sin.contiguous(),
        int(rotary_dim), float(zero_freq_sin), bool(interleaved), mix, gb, hw,
    )  # fmt: skip


def rope_apply_qk(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    w: Tensor,
    rotary_dim: int,
    interleaved: bool = False,
    group_block: int | None = None,
    heads: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused RoPE (FoPE's limit: identity coefficients, no floor) on q and k in one launch.

    ``w``: the ``d_r/2`` frequencies, float32. Shapes, strides, ``heads`` and ``group_block``
    (here: key heads per program, which share the tables) as :func:`fope_apply_qk`.
    """
    if w.shape != (rotary_dim // 2,):
        raise ValueError(f"w {tuple(w.shape)} must be [d_r/2] = [{rotary_dim // 2}]")
    # Heads share RoPE's tables: split them into as many groups as there are key heads, so the
    # launch has enough programs.
    _check(q, k, positions, k.shape[2], rotary_dim)
    gb = _group_block(group_block, k.shape[2])
    return _FusedFoPE.apply(
        q, k, positions, w.float().contiguous(), None, None, int(rotary_dim), 1.0,
        bool(interleaved), "loop", gb, resolve_heads(heads, q.shape[2] // k.shape[2]),
    )  # fmt: skip


def _group_block(group_block: int | None, n_groups: int) -> int:
    """Groups per program: the argument, else ``$FOPE_TRITON_GROUP_BLOCK``, else 1."""
    where = "group_block"
    if group_block is None:
        where = "FOPE_TRITON_GROUP_BLOCK"
        text = os.environ.get(where) or "1"
        try:
            group_block = int(text)
        except ValueError:
            raise ValueError(f"{where}={text!r} is not an integer") from None
    allowed = [d for d in range(1, n_groups + 1) if n_groups % d == 0]
    if group_block not in allowed:
        raise ValueError(
            f"{where}={group_block} must divide the {n_groups} groups of this launch; allowed: "
            f"{allowed}"
        )
    return group_block
