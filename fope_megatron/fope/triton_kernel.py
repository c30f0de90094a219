"""The Triton kernel of fused FoPE (and RoPE) for q AND k in one launch, forward and backward
(the Python side, launches and autograd, is :mod:`.triton_apply`).

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


CONFIGS = ((16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))
"""``(BLOCK_S, num_warps)`` the autotuner tries on a GPU."""

TILE_MAX_BLOCK = 32
"""Largest position block tried for ``HEAD_TILE`` launches. In the H100 autotuning logs of
2026-11-27 (docs/results/gpu/variants: 32 tile-launch decisions over all of CONFIGS, 8 of them in
the uncontended timed suite), no tile launch chose a block above 32 and 27 chose 16 with 4
warps; the larger blocks only cost compile time."""


def _configs() -> list[triton.Config]:
    # One config under the interpreter, or when FOPE_TRITON_AUTOTUNE=0 (tests on CUDA: one
    # compile per case instead of one per config).
    if interpreted() or os.environ.get("FOPE_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_S": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in CONFIGS]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune: tile launches try blocks up to :data:`TILE_MAX_BLOCK` only
    (all configs when that would leave none, e.g. a single forced config)."""
    if not kwargs.get("HEAD_TILE"):
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_S"] <= TILE_MAX_BLOCK]
    return small or configs


_fope_qk_tuned = triton.autotune(
    configs=_configs(),
    prune_configs_by={"early_config_prune": prune_configs},
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
