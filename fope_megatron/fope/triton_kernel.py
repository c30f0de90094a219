"""The Triton kernels of fused FoPE (and RoPE) for q AND k in one launch, forward and backward
(the Python side, launches, autograd and the choice of path, is :mod:`.triton_apply`).

One program covers a block of ``BLOCK_S`` positions and one KV group ``g``:

1. the ``D_in`` angles ``p * w_k`` of its positions are computed once (float32, the same rounded
   product as the torch path), reduced to ``[-pi, pi]`` (Cody-Waite, so large positions keep full
   accuracy whatever ``sin``/``cos`` the backend emits), and their cos/sin tile ``[BLOCK_S, D_in]``
   is mixed with the group's ``[D_in, D_out]`` coefficients by one matrix product per table
   into ``C, S`` ``[BLOCK_S, d_r/2]`` in registers; pairs ``j >= D_out`` are constants
   (``C = 1``, ``S = zero_freq_sin``). ``NARROW``: the product over the Fourier columns only, as
   3xTF32, where they fill half the padded pairs; else the IEEE fp32 product over all pairs;
2. ``x*C + rotate_half(x)*S`` is applied to every batch row of the group's query heads and key
   heads, as one ``[BLOCK_S, heads, pairs]`` tile per half (``HEAD_TILE``: batch row 0 loaded
   before the tables are formed) or one head at a time; dims beyond ``d_r`` are copied.

Backward is :func:`_fope_qk_kernel` with the sign of ``S`` flipped (the transpose of the
rotation-like map); nothing activation-sized is saved: only positions, frequencies and the
small coefficient tensors. With trainable coefficients the backward is
:func:`_fope_qk_coef_grad_kernel`: it also forms ``dC, dS`` per position in registers and writes
per-block partial ``dA = sum_p cos/sin(p w_k) dC/dS`` (no atomics); a torch sum over blocks
finishes the reduction deterministically (the inputs q, k are then saved).

RoPE is the limit ``D_in = D_out = d_r/2``, identity coefficients: the ``ROPE`` constexpr computes
``cos(p w_j)``, ``sin(p w_j)`` directly instead of mixing.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests): loads are cast to float32
before any arithmetic and a single autotune config is used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fusion import interpreted

# 2*pi split for Cody-Waite reduction: _TWO_PI_A has 8 significant bits, so k * _TWO_PI_A is
# exact in float32 for |k| < 2**16 (positions up to ~4e5 at w = 1).
_TWO_PI_A = 6.28125
_TWO_PI_B = 0.0019353071795864769253
_TWO_PI_B32 = float(torch.tensor(_TWO_PI_B, dtype=torch.float32))
_TWO_PI_C = float(2 * math.pi - _TWO_PI_A - _TWO_PI_B32)


_TWO_PI_C_CONST = tl.constexpr(_TWO_PI_C)


@triton.jit
def _reduce(a):
    """``a`` reduced to about ``[-pi, pi]`` (three-part 2*pi; explicit fma keeps each step exact)."""
    k = tl.floor(a * 0.15915494309189535 + 0.5)
    r = tl.fma(-k, 6.28125, a)
    r = tl.fma(-k, 0.0019353071795864769, r)
    r = tl.fma(-k, _TWO_PI_C_CONST, r)
    return r


@triton.jit
def _rne_bf16(v):
    """float32 rounded to the nearest bfloat16 (ties to even), still float32: the interpreter's
    float32 -> bfloat16 cast truncates, so the kernel rounds first there."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _out(v, PTR, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        if PTR.dtype.element_ty == tl.bfloat16:
            v = _rne_bf16(v)
    return v.to(PTR.dtype.element_ty)


@triton.jit
def _pair_dims(j, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The two dims of pairs ``j``: ``(2j, 2j+1)`` interleaved, else ``(j, j + HALF)``."""
    if INTERLEAVED:
        d1 = 2 * j
        d2 = 2 * j + 1
    else:
        d1 = j
        d2 = j + HALF
    return d1, d2


@triton.jit
def _cols(
    xb, ob, gb, j, m2, C, Sn, sx_d, so_d, sg_d, dC, dS, Out,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, SIGN: tl.constexpr,
    COEF_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """One head-row tile of pairs ``j``: ``o1 = x1*C - x2*S``, ``o2 = x2*C + x1*S`` (SIGN -1:
    the transpose); with COEF_GRAD also accumulate ``dC``, ``dS`` from the saved input."""
    d1, d2 = _pair_dims(j, HALF, INTERLEAVED)
    x1 = tl.load(xb + d1[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(xb + d2[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
    o1 = x1 * C - SIGN * (x2 * Sn)
    o2 = x2 * C + SIGN * (x1 * Sn)
    tl.store(ob + d1[None, :] * so_d, _out(o1, Out, ROUND_BF16), mask=m2)
    tl.store(ob + d2[None, :] * so_d, _out(o2, Out, ROUND_BF16), mask=m2)
    if COEF_GRAD:
        # x holds the output gradient here, g the forward input: out1 = g1*C - g2*S,
        # out2 = g2*C + g1*S, so dC = x1*g1 + x2*g2, dS = x2*g1 - x1*g2.
        g1 = tl.load(gb + d1[None, :] * sg_d, mask=m2, other=0.0).to(tl.float32)
        g2 = tl.load(gb + d2[None, :] * sg_d, mask=m2, other=0.0).to(tl.float32)
        dC += x1 * g1 + x2 * g2
        dS += x2 * g1 - x1 * g2
    return dC, dS


@triton.jit
def _rotate_heads(
    X, Out, Gx, s_idx, s_mask, jh, pj, C, Sn, head0, B,
    sx_s, sx_b, sx_h, sx_d, so_s, so_b, so_h, so_d, sg_s, sg_b, sg_h, sg_d, dC, dS,
    N_HEADS: tl.constexpr, HALF: tl.constexpr, D_R: tl.constexpr, D_PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr, SIGN: tl.constexpr, COEF_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """Heads ``[head0, head0 + N_HEADS)`` of every batch row: all ``d_r/2`` pairs ``jh`` as one
    aligned tile per half (the constant pairs already hold ``C = 1``, ``S = zero_freq_sin``),
    pass-through dims ``pj`` copied."""
    mh = s_mask[:, None] & (jh < HALF)[None, :]
    mp = s_mask[:, None] & (pj < D_PASS)[None, :]
    for bi in range(B):
        for hh in tl.static_range(N_HEADS):
            h = head0 + hh
            xb = X + s_idx[:, None] * sx_s + bi * sx_b + h * sx_h
            ob = Out + s_idx[:, None] * so_s + bi * so_b + h * so_h
            gb = Gx + s_idx[:, None] * sg_s + bi * sg_b + h * sg_h
            dC, dS = _cols(
                xb, ob, gb, jh, mh, C, Sn, sx_d, so_d, sg_d, dC, dS, Out,
                HALF, INTERLEAVED, SIGN, COEF_GRAD, ROUND_BF16,
            )  # fmt: skip
            if D_PASS > 0:
                xp = tl.load(xb + (D_R + pj[None, :]) * sx_d, mask=mp, other=0.0)
                tl.store(ob + (D_R + pj[None, :]) * so_d, xp.to(Out.dtype.element_ty), mask=mp)
    return dC, dS


@triton.jit
def _tile_offsets(
    s_idx, bi, head0, hh, jh, s_s, s_b, s_h, s_d, HALF: tl.constexpr, INTERLEAVED: tl.constexpr
):  # fmt: skip
    """Offsets ``[BLOCK_S, heads, pairs]`` of both halves of heads ``head0 + hh`` of row ``bi``."""
    row = s_idx[:, None, None] * s_s + bi * s_b + (head0 + hh)[None, :, None] * s_h
    d1, d2 = _pair_dims(jh, HALF, INTERLEAVED)
    return row + d1[None, None, :] * s_d, row + d2[None, None, :] * s_d


@triton.jit
def _tile_load(
    X, s_idx, m3, bi, head0, hh, jh, sx_s, sx_b, sx_h, sx_d,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """Both halves of a group's heads of batch row ``bi`` as two ``[BLOCK_S, heads, pairs]``
    tiles in the input dtype (one load each: every head's bytes in flight together)."""
    o1, o2 = _tile_offsets(s_idx, bi, head0, hh, jh, sx_s, sx_b, sx_h, sx_d, HALF, INTERLEAVED)
    return tl.load(X + o1, mask=m3, other=0.0), tl.load(X + o2, mask=m3, other=0.0)


@triton.jit
def _tile_store(
    x1, x2, Out, s_idx, m3, bi, head0, hh, jh, so_s, so_b, so_h, so_d, C, Sn,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, SIGN: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """``x*C + rotate_half(x)*S`` (SIGN -1: the transpose) on loaded tiles, stored to ``Out``."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    c = C[:, None, :]
    sn = Sn[:, None, :]
    o1 = x1 * c - SIGN * (x2 * sn)
    o2 = x2 * c + SIGN * (x1 * sn)
    p1, p2 = _tile_offsets(s_idx, bi, head0, hh, jh, so_s, so_b, so_h, so_d, HALF, INTERLEAVED)
    tl.store(Out + p1, _out(o1, Out, ROUND_BF16), mask=m3)
    tl.store(Out + p2, _out(o2, Out, ROUND_BF16), mask=m3)


@triton.jit
def _tile_pass(
    X, Out, s_idx, s_mask, B, head0, hh, h_mask, pj, sx_s, sx_b, sx_h, sx_d,
    so_s, so_b, so_h, so_d, D_R: tl.constexpr, D_PASS: tl.constexpr,
):  # fmt: skip
    """Pass-through dims ``D_R + pj`` of a group's heads copied, every batch row."""
    mp = s_mask[:, None, None] & h_mask[None, :, None] & (pj < D_PASS)[None, None, :]
    for bi in range(B):
        xi = s_idx[:, None, None] * sx_s + bi * sx_b + (head0 + hh)[None, :, None] * sx_h
        oi = s_idx[:, None, None] * so_s + bi * so_b + (head0 + hh)[None, :, None] * so_h
        xp = tl.load(X + xi + (D_R + pj[None, None, :]) * sx_d, mask=mp, other=0.0)
        tl.store(Out + oi + (D_R + pj[None, None, :]) * so_d, xp.to(Out.dtype.element_ty), mask=mp)


@triton.jit
def _positions(POS, S, BLOCK_S: tl.constexpr):
    """The program's block of rows: indices, mask, and positions as float32."""
    s_idx = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s_idx < S
    return s_idx, s_mask, tl.load(POS + s_idx, mask=s_mask, other=0).to(tl.float32)


@triton.jit
def _angle_tiles(pos, W, D_IN: tl.constexpr, IN_P2: tl.constexpr):
    """cos and sin of the ``[BLOCK_S, D_in]`` angles ``p * w_k``, once per element (0 past D_in)."""
    ki = tl.arange(0, IN_P2)
    k_mask = ki < D_IN
    w = tl.load(W + ki, mask=k_mask, other=0.0).to(tl.float32)
    ang = _reduce(pos[:, None] * w[None, :])
    return tl.where(k_mask[None, :], tl.cos(ang), 0.0), tl.where(k_mask[None, :], tl.sin(ang), 0.0)


@triton.jit
def _fope_tables(
    cos_t, sin_t, ACOS, ASIN, g, zero_freq_sin, BLOCK_S: tl.constexpr, D_IN: tl.constexpr,
    D_OUT: tl.constexpr, IN_P2: tl.constexpr, HALF_P2: tl.constexpr, OUT_P2: tl.constexpr,
    NARROW: tl.constexpr,
):  # fmt: skip
    """Group ``g``'s tables ``C = cos(p w) @ A_cos[g]``, ``S = sin(p w) @ A_sin[g]``
    ``[BLOCK_S, HALF_P2]``, constants past the Fourier columns (``C = 1``, ``S = zero_freq_sin``).

    NARROW: only the ``OUT_P2 = HALF_P2 / 2`` Fourier columns are multiplied, on tensor cores as
    3xTF32 (split operands: about fp32 accuracy), and the tile is widened with constant columns
    (``[c | 1]`` side by side); else one IEEE fp32 product over all pairs."""
    ki = tl.arange(0, IN_P2)
    jh = tl.arange(0, HALF_P2)
    f_mask = jh < D_OUT
    if NARROW:
        jo = tl.arange(0, OUT_P2)
        off = g * D_IN * D_OUT + ki[:, None] * D_OUT + jo[None, :]
        m = (ki < D_IN)[:, None] & (jo < D_OUT)[None, :]
        c_n = tl.dot(cos_t, tl.load(ACOS + off, mask=m, other=0.0), input_precision="tf32x3")
        s_n = tl.dot(sin_t, tl.load(ASIN + off, mask=m, other=0.0), input_precision="tf32x3")
        one = tl.full((BLOCK_S, OUT_P2), 1.0, tl.float32)
        C = tl.reshape(tl.permute(tl.join(c_n, one), (0, 2, 1)), (BLOCK_S, HALF_P2))
        Sn = tl.reshape(tl.permute(tl.join(s_n, one), (0, 2, 1)), (BLOCK_S, HALF_P2))
    else:
        off = g * D_IN * D_OUT + ki[:, None] * D_OUT + jh[None, :]
        m = (ki < D_IN)[:, None] & f_mask[None, :]
        C = tl.dot(cos_t, tl.load(ACOS + off, mask=m, other=0.0), input_precision="ieee")
        Sn = tl.dot(sin_t, tl.load(ASIN + off, mask=m, other=0.0), input_precision="ieee")
    return tl.where(f_mask[None, :], C, 1.0), tl.where(f_mask[None, :], Sn, zero_freq_sin)


@triton.jit
def _tile_group(
    Q, K, OQ, OK, xq1, xq2, xk1, xk2, s_idx, s_mask, mq, mk, hq, hk, jh, pj, g, B,
    sq_s, sq_b, sq_h, sq_d, sk_s, sk_b, sk_h, sk_d,
    soq_s, soq_b, soq_h, soq_d, sok_s, sok_b, sok_h, sok_d, C, Sn,
    QH_PER_G: tl.constexpr, KH_PER_G: tl.constexpr, HALF: tl.constexpr, D_R: tl.constexpr,
    D_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, SIGN: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """Group ``g``'s query and key heads as tiles: batch row 0 (loaded before the tables were
    formed) stored, then rows ``1..B-1`` loaded and stored, then the pass-through dims."""
    hq0 = g * QH_PER_G
    hk0 = g * KH_PER_G
    _tile_store(
        xq1, xq2, OQ, s_idx, mq, 0, hq0, hq, jh, soq_s, soq_b, soq_h, soq_d, C, Sn,
        HALF, INTERLEAVED, SIGN, ROUND_BF16,
    )  # fmt: skip
    _tile_store(
        xk1, xk2, OK, s_idx, mk, 0, hk0, hk, jh, sok_s, sok_b, sok_h, sok_d, C, Sn,
        HALF, INTERLEAVED, SIGN, ROUND_BF16,
    )  # fmt: skip
    for bi in range(1, B):
        yq1, yq2 = _tile_load(
            Q, s_idx, mq, bi, hq0, hq, jh, sq_s, sq_b, sq_h, sq_d, HALF, INTERLEAVED
        )  # fmt: skip
        yk1, yk2 = _tile_load(
            K, s_idx, mk, bi, hk0, hk, jh, sk_s, sk_b, sk_h, sk_d, HALF, INTERLEAVED
        )  # fmt: skip
        _tile_store(
            yq1, yq2, OQ, s_idx, mq, bi, hq0, hq, jh, soq_s, soq_b, soq_h, soq_d, C, Sn,
            HALF, INTERLEAVED, SIGN, ROUND_BF16,
        )  # fmt: skip
        _tile_store(
            yk1, yk2, OK, s_idx, mk, bi, hk0, hk, jh, sok_s, sok_b, sok_h, sok_d, C, Sn,
            HALF, INTERLEAVED, SIGN, ROUND_BF16,
        )  # fmt: skip
    if D_PASS > 0:
        _tile_pass(
            Q, OQ, s_idx, s_mask, B, hq0, hq, hq < QH_PER_G, pj,
            sq_s, sq_b, sq_h, sq_d, soq_s, soq_b, soq_h, soq_d, D_R, D_PASS,
        )  # fmt: skip
        _tile_pass(
            K, OK, s_idx, s_mask, B, hk0, hk, hk < KH_PER_G, pj,
            sk_s, sk_b, sk_h, sk_d, sok_s, sok_b, sok_h, sok_d, D_R, D_PASS,
        )  # fmt: skip


@triton.jit
def _fope_qk_kernel(
    Q, K, OQ, OK, POS, W, ACOS, ASIN, S, B, n_groups,
    sq_s, sq_b, sq_h, sq_d, sk_s, sk_b, sk_h, sk_d,
    soq_s, soq_b, soq_h, soq_d, sok_s, sok_b, sok_h, sok_d, zero_freq_sin,
    QH_PER_G: tl.constexpr, KH_PER_G: tl.constexpr, QH_P2: tl.constexpr, KH_P2: tl.constexpr,
    D_R: tl.constexpr, D_PASS: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
    IN_P2: tl.constexpr, HALF_P2: tl.constexpr, OUT_P2: tl.constexpr, PASS_P2: tl.constexpr,
    ROPE: tl.constexpr, NARROW: tl.constexpr, HEAD_TILE: tl.constexpr,
    INTERLEAVED: tl.constexpr, SIGN: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Forward (SIGN 1) and, with frozen coefficients, backward (SIGN -1) of one block of
    positions and one KV group ``g``: the group's tables, then every batch row of its heads
    (``n_groups``, the launch's groups, is an autotune key only)."""
    g = tl.program_id(1)
    HALF: tl.constexpr = D_R // 2
    s_idx, s_mask, pos = _positions(POS, S, BLOCK_S)
    jh = tl.arange(0, HALF_P2)
    pj = tl.arange(0, PASS_P2)
    if HEAD_TILE:
        # Batch row 0 of the group's heads is loaded before its tables are formed, so the table
        # math runs while these bytes are in flight.
        hq = tl.arange(0, QH_P2)
        hk = tl.arange(0, KH_P2)
        mq = s_mask[:, None, None] & (hq < QH_PER_G)[None, :, None] & (jh < HALF)[None, None, :]
        mk = s_mask[:, None, None] & (hk < KH_PER_G)[None, :, None] & (jh < HALF)[None, None, :]
        xq1, xq2 = _tile_load(
            Q, s_idx, mq, 0, g * QH_PER_G, hq, jh, sq_s, sq_b, sq_h, sq_d, HALF, INTERLEAVED
        )
        xk1, xk2 = _tile_load(
            K, s_idx, mk, 0, g * KH_PER_G, hk, jh, sk_s, sk_b, sk_h, sk_d, HALF, INTERLEAVED
        )
    if ROPE:
        # the RoPE limit: cos(p w_j), sin(p w_j) of every pair directly, no product
        w = tl.load(W + jh, mask=jh < D_OUT, other=0.0).to(tl.float32)
        ang = _reduce(pos[:, None] * w[None, :])
        C = tl.cos(ang)
        Sn = tl.sin(ang)
    else:
        cos_t, sin_t = _angle_tiles(pos, W, D_IN, IN_P2)
        C, Sn = _fope_tables(
            cos_t, sin_t, ACOS, ASIN, g, zero_freq_sin, BLOCK_S, D_IN, D_OUT, IN_P2, HALF_P2,
            OUT_P2, NARROW,
        )  # fmt: skip
    if HEAD_TILE:
        _tile_group(
            Q, K, OQ, OK, xq1, xq2, xk1, xk2, s_idx, s_mask, mq, mk, hq, hk, jh, pj, g, B,
            sq_s, sq_b, sq_h, sq_d, sk_s, sk_b, sk_h, sk_d,
            soq_s, soq_b, soq_h, soq_d, sok_s, sok_b, sok_h, sok_d, C, Sn,
            QH_PER_G, KH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, SIGN, ROUND_BF16,
        )  # fmt: skip
    else:
        zero = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)  # (no coefficient gradients here)
        _rotate_heads(
            Q, OQ, Q, s_idx, s_mask, jh, pj, C, Sn, g * QH_PER_G, B,
            sq_s, sq_b, sq_h, sq_d, soq_s, soq_b, soq_h, soq_d, sq_s, sq_b, sq_h, sq_d,
            zero, zero, QH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, SIGN, False, ROUND_BF16,
        )  # fmt: skip
        _rotate_heads(
            K, OK, K, s_idx, s_mask, jh, pj, C, Sn, g * KH_PER_G, B,
            sk_s, sk_b, sk_h, sk_d, sok_s, sok_b, sok_h, sok_d, sk_s, sk_b, sk_h, sk_d,
            zero, zero, KH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, SIGN, False, ROUND_BF16,
        )  # fmt: skip


@triton.jit
def _fope_qk_coef_grad_kernel(
    GQ, GK, DQ, DK, Q, K, POS, W, ACOS, ASIN, DACOS, DASIN, S, B,
    sgq_s, sgq_b, sgq_h, sgq_d, sgk_s, sgk_b, sgk_h, sgk_d,
    sdq_s, sdq_b, sdq_h, sdq_d, sdk_s, sdk_b, sdk_h, sdk_d,
    sq_s, sq_b, sq_h, sq_d, sk_s, sk_b, sk_h, sk_d, zero_freq_sin,
    QH_PER_G: tl.constexpr, KH_PER_G: tl.constexpr, N_GROUPS: tl.constexpr,
    D_R: tl.constexpr, D_PASS: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
    IN_P2: tl.constexpr, HALF_P2: tl.constexpr, OUT_P2: tl.constexpr, PASS_P2: tl.constexpr,
    NARROW: tl.constexpr, INTERLEAVED: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Backward with trainable coefficients, head by head: ``dq``, ``dk`` from the output
    gradients ``GQ``, ``GK`` (the transpose), and this block's partial
    ``dA[k, j] = sum_p cos/sin(p w_k) dC/dS[p, j]`` from the saved inputs ``Q``, ``K``."""
    g = tl.program_id(1)
    HALF: tl.constexpr = D_R // 2
    s_idx, s_mask, pos = _positions(POS, S, BLOCK_S)
    jh = tl.arange(0, HALF_P2)
    pj = tl.arange(0, PASS_P2)
    cos_t, sin_t = _angle_tiles(pos, W, D_IN, IN_P2)
    C, Sn = _fope_tables(
        cos_t, sin_t, ACOS, ASIN, g, zero_freq_sin, BLOCK_S, D_IN, D_OUT, IN_P2, HALF_P2,
        OUT_P2, NARROW,
    )  # fmt: skip
    dC = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
    dS = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
    dC, dS = _rotate_heads(
        GQ, DQ, Q, s_idx, s_mask, jh, pj, C, Sn, g * QH_PER_G, B,
        sgq_s, sgq_b, sgq_h, sgq_d, sdq_s, sdq_b, sdq_h, sdq_d, sq_s, sq_b, sq_h, sq_d,
        dC, dS, QH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, -1, True, ROUND_BF16,
    )  # fmt: skip
    dC, dS = _rotate_heads(
        GK, DK, K, s_idx, s_mask, jh, pj, C, Sn, g * KH_PER_G, B,
        sgk_s, sgk_b, sgk_h, sgk_d, sdk_s, sdk_b, sdk_h, sdk_d, sk_s, sk_b, sk_h, sk_d,
        dC, dS, KH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, -1, True, ROUND_BF16,
    )  # fmt: skip
    # Rows past S hold dC = dS = 0; the constant columns j >= D_OUT are not stored.
    ki = tl.arange(0, IN_P2)
    off = ((tl.program_id(0) * N_GROUPS + g) * D_IN + ki[:, None]) * D_OUT + jh[None, :]
    m = (ki < D_IN)[:, None] & (jh < D_OUT)[None, :]
    tl.store(DACOS + off, tl.dot(tl.trans(cos_t), dC, input_precision="ieee"), mask=m)
    tl.store(DASIN + off, tl.dot(tl.trans(sin_t), dS, input_precision="ieee"), mask=m)


CONFIGS = ((16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))
"""``(BLOCK_S, num_warps)`` the autotuner tries on a GPU."""

ONE_CONFIG = triton.Config({"BLOCK_S": 16}, num_warps=4)
"""The only config under the interpreter (and for tests that compile one config per case)."""

TILE_MAX_BLOCK = 32
"""Largest position block tried for ``HEAD_TILE`` launches: in the H100 autotuning logs
(docs/results/gpu/README.md: 32 tile-launch decisions over all of CONFIGS), no tile launch chose
a block above 32 and 27 chose 16 with 4 warps; the larger blocks only cost compile time."""


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune: tile launches try blocks up to :data:`TILE_MAX_BLOCK` only
    (all configs when that would leave none, e.g. a single forced config)."""
    if not kwargs.get("HEAD_TILE"):
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_S"] <= TILE_MAX_BLOCK]
    return small or configs


def autotuned(configs: list[triton.Config]):
    """:func:`_fope_qk_kernel` autotuned over ``configs``, keyed on everything that changes the
    work (each path tunes its own block size)."""
    return triton.autotune(
        configs=configs,
        prune_configs_by={"early_config_prune": prune_configs},
        key=(
            "S B n_groups QH_PER_G KH_PER_G D_R D_PASS D_IN D_OUT ROPE NARROW HEAD_TILE INTERLEAVED "
            "SIGN"
        ).split(),
    )(_fope_qk_kernel)


_fope_qk_tuned = autotuned(
    [ONE_CONFIG]
    if interpreted()
    else [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in CONFIGS]
)
