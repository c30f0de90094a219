"""Fused FoPE (and RoPE) for q AND k in one Triton launch, forward and backward.

One program covers a block of ``BLOCK_S`` positions and one KV group ``g`` (or ``GROUP_BLOCK``
groups, which then share step 1's cos/sin and mix them per group):

1. the ``D_in`` angles ``p * w_k`` of its positions are computed once (float32, the same rounded
   product as the torch path), reduced to ``[-pi, pi]`` (Cody-Waite, so large positions keep full
   accuracy whatever ``sin``/``cos`` the backend emits), and mixed with the group's
   ``[D_in, D_out]`` coefficients into ``C, S`` ``[BLOCK_S, d_r/2]`` in registers; pairs
   ``j >= D_out`` are constants (``C = 1``, ``S = zero_freq_sin``);
2. ``x*C + rotate_half(x)*S`` is applied to every batch row of the group's query heads and key
   heads; dims beyond ``d_r`` are copied.

Backward is the same kernel with the sign of ``S`` flipped (the transpose of the rotation-like
map); nothing activation-sized is saved: only positions, frequencies and the small coefficient
tensors. With trainable coefficients the backward also forms ``dC, dS`` per position in
registers and writes per-block partial ``dA = sum_p cos/sin(p w_k) dC/dS`` (no atomics); a torch
sum over blocks finishes the reduction deterministically (the inputs q, k are then saved).

RoPE is the limit ``D_in = D_out = d_r/2``, identity coefficients: the ``ROPE`` constexpr computes
``cos(p w_j)``, ``sin(p w_j)`` directly instead of mixing.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests): loads are cast to float32
before any arithmetic and a single autotune config is used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

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
def _cols(
    xb, ob, gb, j, m2, C, Sn, sx_d, so_d, sg_d, dC, dS, Out,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, SIGN: tl.constexpr,
    COEF_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    """One head-row tile of pairs ``j``: ``o1 = x1*C - x2*S``, ``o2 = x2*C + x1*S`` (SIGN -1:
    the transpose); with COEF_GRAD also accumulate ``dC``, ``dS`` from the saved input."""
    if INTERLEAVED:
        d1 = 2 * j
        d2 = 2 * j + 1
    else:
        d1 = j
        d2 = j + HALF
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
    if INTERLEAVED:
        d1 = 2 * jh
        d2 = 2 * jh + 1
    else:
        d1 = jh
        d2 = jh + HALF
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
def _fope_qk_kernel(
    Q, K, OQ, OK, GQ, GK, POS, W, ACOS, ASIN, DACOS, DASIN, S, B,
    sq_s, sq_b, sq_h, sq_d, sk_s, sk_b, sk_h, sk_d,
    soq_s, soq_b, soq_h, soq_d, sok_s, sok_b, sok_h, sok_d,
    sgq_s, sgq_b, sgq_h, sgq_d, sgk_s, sgk_b, sgk_h, sgk_d,
    zero_freq_sin,
    QH_PER_G: tl.constexpr, KH_PER_G: tl.constexpr, N_GROUPS: tl.constexpr,
    D_R: tl.constexpr, D_PASS: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
    HALF_P2: tl.constexpr, PASS_P2: tl.constexpr,
    ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, SIGN: tl.constexpr,
    COEF_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, ROUND_BF16: tl.constexpr = False,
    MIX_DOT: tl.constexpr = False, IN_P2: tl.constexpr = 16, DOT_PREC: tl.constexpr = "ieee",
    NARROW: tl.constexpr = False, OUT_P2: tl.constexpr = 16, GROUP_BLOCK: tl.constexpr = 1,
    HEAD_TILE: tl.constexpr = False, QH_P2: tl.constexpr = 1, KH_P2: tl.constexpr = 1,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    HALF: tl.constexpr = D_R // 2
    s_idx = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s_idx < S
    # Every pair as one tile per half (aligned, vectorised loads); Fourier columns jh < D_OUT,
    # zero-frequency constants beyond (all pairs are Fourier in the RoPE limit).
    jh = tl.arange(0, HALF_P2)
    f_mask = jh < D_OUT
    pj = tl.arange(0, PASS_P2)
    pos = tl.load(POS + s_idx, mask=s_mask, other=0).to(tl.float32)

    if HEAD_TILE:
        hq = tl.arange(0, QH_P2)
        hk = tl.arange(0, KH_P2)
        j3 = (jh < HALF)[None, None, :]
        mq = s_mask[:, None, None] & (hq < QH_PER_G)[None, :, None] & j3
        mk = s_mask[:, None, None] & (hk < KH_PER_G)[None, :, None] & j3

    for gi in tl.static_range(GROUP_BLOCK):
        g = pid_g * GROUP_BLOCK + gi
        if HEAD_TILE:
            # Batch row 0 of the group's heads is loaded before its tables are formed, so the
            # table math runs while these bytes are in flight.
            xq1, xq2 = _tile_load(
                Q, s_idx, mq, 0, g * QH_PER_G, hq, jh, sq_s, sq_b, sq_h, sq_d, HALF, INTERLEAVED
            )
            xk1, xk2 = _tile_load(
                K, s_idx, mk, 0, g * KH_PER_G, hk, jh, sk_s, sk_b, sk_h, sk_d, HALF, INTERLEAVED
            )
        if gi == 0:
            # What does not depend on the group is computed once for the program's GROUP_BLOCK groups:
            # the RoPE tables, or the [BLOCK_S, D_in] cos/sin tile that the dot mixes per group.
            if ROPE:
                w = tl.load(W + jh, mask=f_mask, other=0.0).to(tl.float32)
                ang = _reduce(pos[:, None] * w[None, :])
                C = tl.cos(ang)
                Sn = tl.sin(ang)
            elif MIX_DOT:
                # cos/sin of the [BLOCK_S, D_in] angles once per element, then one float32 matrix
                # product per table and group: C = cos(p w) @ A_cos[g], S = sin(p w) @ A_sin[g], in
                # IEEE fp32 (FMA units) or 3xTF32 (tensor cores, split operands: about fp32 accuracy).
                ki = tl.arange(0, IN_P2)
                k_mask = ki < D_IN
                w = tl.load(W + ki, mask=k_mask, other=0.0).to(tl.float32)
                ang = _reduce(pos[:, None] * w[None, :])
                cos_t = tl.where(k_mask[None, :], tl.cos(ang), 0.0)
                sin_t = tl.where(k_mask[None, :], tl.sin(ang), 0.0)
                a_m = k_mask[:, None] & f_mask[None, :]
        if not ROPE:
            if MIX_DOT:
                if NARROW:
                    # Only the OUT_P2 = HALF_P2 / 2 Fourier columns are multiplied; the tile is
                    # then widened with constant columns ([c | 1] side by side).
                    jo = tl.arange(0, OUT_P2)
                    n_off = g * D_IN * D_OUT + ki[:, None] * D_OUT + jo[None, :]
                    n_m = k_mask[:, None] & (jo < D_OUT)[None, :]
                    c_n = tl.dot(
                        cos_t, tl.load(ACOS + n_off, mask=n_m, other=0.0), input_precision=DOT_PREC
                    )
                    s_n = tl.dot(
                        sin_t, tl.load(ASIN + n_off, mask=n_m, other=0.0), input_precision=DOT_PREC
                    )
                    one = tl.full((BLOCK_S, OUT_P2), 1.0, tl.float32)
                    C = tl.reshape(tl.permute(tl.join(c_n, one), (0, 2, 1)), (BLOCK_S, HALF_P2))
                    Sn = tl.reshape(tl.permute(tl.join(s_n, one), (0, 2, 1)), (BLOCK_S, HALF_P2))
                else:
                    a_off = g * D_IN * D_OUT + ki[:, None] * D_OUT + jh[None, :]
                    C = tl.dot(
                        cos_t, tl.load(ACOS + a_off, mask=a_m, other=0.0), input_precision=DOT_PREC
                    )
                    Sn = tl.dot(
                        sin_t, tl.load(ASIN + a_off, mask=a_m, other=0.0), input_precision=DOT_PREC
                    )
            else:
                C = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
                Sn = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
                a_base = g * D_IN * D_OUT
                for kk in tl.static_range(D_IN):
                    w_k = tl.load(W + kk).to(tl.float32)
                    ang = _reduce(pos * w_k)
                    ac = tl.load(ACOS + a_base + kk * D_OUT + jh, mask=f_mask, other=0.0)
                    asn = tl.load(ASIN + a_base + kk * D_OUT + jh, mask=f_mask, other=0.0)
                    C += tl.cos(ang)[:, None] * ac[None, :]
                    Sn += tl.sin(ang)[:, None] * asn[None, :]
            C = tl.where(f_mask[None, :], C, 1.0)
            Sn = tl.where(f_mask[None, :], Sn, zero_freq_sin)

        dC = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
        dS = tl.full((BLOCK_S, HALF_P2), 0.0, tl.float32)
        if HEAD_TILE:  # (no COEF_GRAD: that launch goes head by head)
            _tile_store(
                xq1, xq2, OQ, s_idx, mq, 0, g * QH_PER_G, hq, jh,
                soq_s, soq_b, soq_h, soq_d, C, Sn, HALF, INTERLEAVED, SIGN, ROUND_BF16,
            )  # fmt: skip
            _tile_store(
                xk1, xk2, OK, s_idx, mk, 0, g * KH_PER_G, hk, jh,
                sok_s, sok_b, sok_h, sok_d, C, Sn, HALF, INTERLEAVED, SIGN, ROUND_BF16,
            )  # fmt: skip
            for bi in range(1, B):
                yq1, yq2 = _tile_load(
                    Q, s_idx, mq, bi, g * QH_PER_G, hq, jh, sq_s, sq_b, sq_h, sq_d,
                    HALF, INTERLEAVED,
                )  # fmt: skip
                yk1, yk2 = _tile_load(
                    K, s_idx, mk, bi, g * KH_PER_G, hk, jh, sk_s, sk_b, sk_h, sk_d,
                    HALF, INTERLEAVED,
                )  # fmt: skip
                _tile_store(
                    yq1, yq2, OQ, s_idx, mq, bi, g * QH_PER_G, hq, jh,
                    soq_s, soq_b, soq_h, soq_d, C, Sn, HALF, INTERLEAVED, SIGN, ROUND_BF16,
                )  # fmt: skip
                _tile_store(
                    yk1, yk2, OK, s_idx, mk, bi, g * KH_PER_G, hk, jh,
                    sok_s, sok_b, sok_h, sok_d, C, Sn, HALF, INTERLEAVED, SIGN, ROUND_BF16,
                )  # fmt: skip
            if D_PASS > 0:
                _tile_pass(
                    Q, OQ, s_idx, s_mask, B, g * QH_PER_G, hq, hq < QH_PER_G, pj,
                    sq_s, sq_b, sq_h, sq_d, soq_s, soq_b, soq_h, soq_d, D_R, D_PASS,
                )  # fmt: skip
                _tile_pass(
                    K, OK, s_idx, s_mask, B, g * KH_PER_G, hk, hk < KH_PER_G, pj,
                    sk_s, sk_b, sk_h, sk_d, sok_s, sok_b, sok_h, sok_d, D_R, D_PASS,
                )  # fmt: skip
        else:
            dC, dS = _rotate_heads(
                Q, OQ, GQ, s_idx, s_mask, jh, pj, C, Sn, g * QH_PER_G, B,
                sq_s, sq_b, sq_h, sq_d, soq_s, soq_b, soq_h, soq_d, sgq_s, sgq_b, sgq_h, sgq_d,
                dC, dS, QH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, SIGN, COEF_GRAD, ROUND_BF16,
            )  # fmt: skip
            dC, dS = _rotate_heads(
                K, OK, GK, s_idx, s_mask, jh, pj, C, Sn, g * KH_PER_G, B,
                sk_s, sk_b, sk_h, sk_d, sok_s, sok_b, sok_h, sok_d, sgk_s, sgk_b, sgk_h, sgk_d,
                dC, dS, KH_PER_G, HALF, D_R, D_PASS, INTERLEAVED, SIGN, COEF_GRAD, ROUND_BF16,
            )  # fmt: skip

        if COEF_GRAD:
            # Partial dA[k, j] = sum_p cos(p w_k) dC[p, j] over this block (rows past S are 0;
            # the constant columns j >= D_OUT are not stored).
            out_base = ((pid_s * N_GROUPS + g) * D_IN) * D_OUT
            if MIX_DOT:
                p_off = out_base + ki[:, None] * D_OUT + jh[None, :]
                pc = tl.dot(tl.trans(cos_t), dC, input_precision="ieee")
                tl.store(DACOS + p_off, pc, mask=a_m)
                ps = tl.dot(tl.trans(sin_t), dS, input_precision="ieee")
                tl.store(DASIN + p_off, ps, mask=a_m)
            for kk in tl.static_range(0 if MIX_DOT else D_IN):
                w_k = tl.load(W + kk).to(tl.float32)
                ang = _reduce(pos * w_k)
                pc = tl.sum(tl.cos(ang)[:, None] * dC, axis=0)
                ps = tl.sum(tl.sin(ang)[:, None] * dS, axis=0)
                tl.store(DACOS + out_base + kk * D_OUT + jh, pc, mask=f_mask)
                tl.store(DASIN + out_base + kk * D_OUT + jh, ps, mask=f_mask)


def _configs() -> list[triton.Config]:
    # One config under the interpreter, or when FOPE_TRITON_AUTOTUNE=0 (tests on CUDA: one
    # compile per case instead of one per config).
    if interpreted() or os.environ.get("FOPE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_S": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_S": bs}, num_warps=nw)
        for bs, nw in ((16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))
    ]


_fope_qk_tuned = triton.autotune(
    configs=_configs(),
    # every constexpr that changes the work: the table variants tune their own block size
    key=[
        "S",
        "B",
        "QH_PER_G",
        "KH_PER_G",
        "N_GROUPS",
        "D_R",
        "D_PASS",
        "D_IN",
        "D_OUT",
        "ROPE",
        "SIGN",
        "INTERLEAVED",
        "MIX_DOT",
        "DOT_PREC",
        "NARROW",
        "GROUP_BLOCK",
        "HEAD_TILE",
    ],
)(_fope_qk_kernel)

MIXES = ("dot", "dot_tf32x3", "dot_narrow", "dot_narrow_tf32x3", "loop")
"""How the fused kernel forms its tables (see :func:`fope_apply_qk`)."""

HEADS = ("each", "tile")
"""How a program walks its group's heads (see :func:`fope_apply_qk`)."""

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
    out_p2 = max(16, triton.next_power_of_2(d_out))
    common = dict(
        MIX_DOT=dot,
        NARROW=dot and mix.startswith("dot_narrow") and 2 * out_p2 == half_p2,
        OUT_P2=out_p2,
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
            ``dot``): ``dot`` (cos/sin of the whole ``[block, D_in]`` angle tile once per
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
            ``each``): ``each`` (one head at a time, loaded after the tables are formed) or
            ``tile`` (all of the group's query heads, and its key heads, as one
            ``[block, heads, pairs]`` tile per half, the first batch row loaded before the
            tables are formed so the table math overlaps the loads). The trainable-coefficient
            backward always goes head by head.

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
    if mix is None:
        mix = os.environ.get("FOPE_TRITON_MIX") or "dot"
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r} (argument or FOPE_TRITON_MIX) unknown; allowed: {MIXES}")
    gb = _group_block(group_block, a_cos.shape[0])
    return _FusedFoPE.apply(
        q, k, positions, w_in.float().contiguous(), a_cos.contiguous(), a_sin.contiguous(),
        int(rotary_dim), float(zero_freq_sin), bool(interleaved), mix, gb, _heads(heads),
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
        bool(interleaved), "loop", gb, _heads(heads),
    )  # fmt: skip


def _heads(heads: str | None) -> str:
    """How programs walk their heads: the argument, else ``$FOPE_TRITON_HEADS``, else each."""
    where = "heads"
    if heads is None:
        where, heads = "FOPE_TRITON_HEADS", os.environ.get("FOPE_TRITON_HEADS") or "each"
    if heads not in HEADS:
        raise ValueError(f"{where}={heads!r} unknown; allowed: {HEADS}")
    return heads


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
