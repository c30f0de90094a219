"""Fused Triton FoPE/RoPE vs the torch reference path, forward and backward.

On a CUDA machine the kernel runs on the GPU; without one it runs under Triton's interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set before triton is imported). Same tests either way.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

from fope_megatron.fope import FoPEConfig, FourierPositionEmbedding, RotaryEmbeddingTables  # noqa: E402
from fope_megatron.fope.math import apply_tables  # noqa: E402
from fope_megatron.fope.triton_apply import (  # noqa: E402
    fope_apply_qk,
    interpreted,
    resolve_heads,
    resolve_mix,
    rope_apply_qk,
)
from fope_megatron.parallel.positions import cp_chunk_positions, packed_positions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fope(heads=4, groups=2, d=32, L=24, **kw) -> FourierPositionEmbedding:
    cfg = FoPEConfig(
        head_dim=d, train_seq_len=L, num_attention_heads=heads, num_query_groups=groups,
        num_layers=2, sigma=0.5, **kw,
    )  # fmt: skip
    return FourierPositionEmbedding(cfg).to(DEVICE)


def _qk(s, b, heads, groups, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(s, b, groups, d, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k


def _both(fope, q, k, pos, layer=1, groups=None):
    """(fused q', k'), (torch q', k') and their q/k gradients for one random upstream grad."""
    out = {}
    gen = torch.Generator().manual_seed(7)
    up = None
    for fusion in ("triton", "torch"):
        q.grad = k.grad = None
        oq, ok = fope.apply_qk(q, k, pos, layer, groups, fusion=fusion)
        if up is None:
            up = (
                torch.randn(oq.shape, generator=gen).to(DEVICE, oq.dtype),
                torch.randn(ok.shape, generator=gen).to(DEVICE, ok.dtype),
            )
        ((oq.float() * up[0].float()).sum() + (ok.float() * up[1].float()).sum()).backward()
        out[fusion] = (oq.detach(), ok.detach(), q.grad.clone(), k.grad.clone())
    return out["triton"], out["torch"]


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


CASES = {
    # name: (heads, groups, d, L, FoPEConfig extras)
    "mha": (4, 4, 32, 24, {}),
    "gqa": (4, 2, 32, 24, {}),
    "mqa": (4, 1, 32, 24, {}),
    "interleaved": (4, 2, 32, 24, {"interleaved": True}),
    "rotary_percent_0.5": (4, 2, 32, 24, {"rotary_percent": 0.5}),
    "zero_freq_sin_0": (4, 2, 32, 24, {"zero_freq_sin": 0.0}),
    "d_out_eq_half": (4, 2, 16, 4096, {"floor_ratio": 0.0, "d_out": 8}),
    "d_out_lt_half_odd_dims": (6, 3, 24, 40, {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_equals_torch_float32(name):
    heads, groups, d, L, extra = CASES[name]
    fope = _fope(heads, groups, d, L, **extra)
    if name == "d_out_eq_half":
        assert fope.d_out == fope.config.rotary_dim // 2
    else:
        assert fope.d_out < fope.config.rotary_dim // 2
    q, k = _qk(37, 2, heads, groups, d)
    pos = torch.arange(37, device=DEVICE) + 900  # large angles: range reduction matters
    fused, ref = _both(fope, q, k, pos)
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _maxdiff(a, b) <= 1e-5
    if "rotary_percent" in name:  # pass-through dims untouched
        d_r = fope.config.rotary_dim
        assert torch.equal(fused[0][..., d_r:], q.detach()[..., d_r:])
        assert torch.equal(fused[2][..., d_r:], ref[2][..., d_r:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_one_rounding_of_float32(dtype):
    fope = _fope(4, 2, 32, 24)
    q, k = _qk(33, 1, 4, 2, 32, dtype)
    pos = torch.arange(33, device=DEVICE)
    oq, ok = fope.apply_qk(q, k, pos, 0, fusion="triton")
    assert oq.dtype == dtype and ok.dtype == dtype
    c, s = fope.tables(pos, 0)
    for x, out in ((q, oq), (k, ok)):
        ref = apply_tables(x.detach().float(), c, s)  # float32 math on the same inputs
        eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        err = (out.float() - ref).abs()
        assert bool((err <= ref.abs() * eps + 1e-6).all()), err.max().item()


def test_cp_chunk_and_packed_positions():
    fope = _fope(4, 2, 32, 24)
    for pos in (
        cp_chunk_positions(64, 1, 2, DEVICE),  # CP rank 1 of 2: chunks 1 and 2 of 4
        packed_positions(torch.tensor([0, 5, 17, 32], device=DEVICE), 0, 1, DEVICE),
    ):
        q, k = _qk(pos.shape[0], 1, 4, 2, 32)
        fused, ref = _both(fope, q, k, pos.to(DEVICE))
        for a, b in zip(fused, ref, strict=True):
            assert _maxdiff(a, b) <= 1e-5
    packed = packed_positions(torch.tensor([0, 5, 17, 32]), 0, 1, "cpu")
    assert packed[5].item() == 0 and packed[4].item() == 4  # restarts per sequence


def test_strided_views_of_mixed_qkv():
    """k as megatron's view of the fused QKV output ([s, b, G, (R+2)*d] split per group) and q a
    view with a padded head stride: neither is copied before the kernel."""
    heads, groups, d, s = 4, 2, 32, 29
    fope = _fope(heads, groups, d)
    r = heads // groups
    mixed = torch.randn(s, 2, groups, (r + 2) * d, device=DEVICE, requires_grad=True)
    wide = torch.randn(s, 2, heads, 2 * d, device=DEVICE, requires_grad=True)
    k = mixed[..., r * d : (r + 1) * d]
    q = wide[..., d:]
    assert not k.is_contiguous() and not q.is_contiguous()
    pos = torch.arange(s, device=DEVICE)
    outs = {}
    for fusion in ("triton", "torch"):
        mixed.grad = wide.grad = None
        oq, ok = fope.apply_qk(q, k, pos, 0, fusion=fusion)
        (oq.sum() * 0.5 + (ok * ok).sum()).backward()
        outs[fusion] = (oq.detach(), ok.detach(), mixed.grad.clone(), wide.grad.clone())
    for a, b in zip(outs["triton"], outs["torch"], strict=True):
        assert _maxdiff(a, b) <= 1e-5


def test_tp_slice_of_groups():
    """A TP rank holding groups [2, 4) of 4 uses exactly those groups' coefficients."""
    full = _fope(8, 4, 32)
    cfg = full.config
    half = FourierPositionEmbedding(cfg, groups=range(2, 4)).to(DEVICE)
    q, k = _qk(21, 2, 4, 2, 32)
    pos = torch.arange(21, device=DEVICE)
    fused, ref = _both(half, q, k, pos)
    for a, b in zip(fused, ref, strict=True):
        assert _maxdiff(a, b) <= 1e-5
    # and the slice equals the full module's tables for those groups
    c_full, _ = full.tables(pos, 1)
    c_half, _ = half.tables(pos, 1)
    assert _maxdiff(c_full[:, 2:4], c_half) <= 1e-6


def test_learnable_coefficient_gradients():
    fope = _fope(4, 2, 32, 24, learnable=True)
    assert isinstance(fope.coef_cos, torch.nn.Parameter)
    q, k = _qk(45, 2, 4, 2, 32)
    pos = torch.arange(45, device=DEVICE) + 3
    grads = {}
    scale = 1.0 / q.numel() ** 0.5  # gradients of order 1, so 1e-5 is a float32-level bound

    def loss(oq, ok):
        return ((oq * oq).sum() + ok.sum() * 0.3) * scale

    for fusion in ("triton", "torch"):
        fope.zero_grad(set_to_none=True)
        q.grad = k.grad = None
        oq, ok = fope.apply_qk(q, k, pos, 1, fusion=fusion)
        loss(oq, ok).backward()
        grads[fusion] = (q.grad, k.grad, fope.coef_cos.grad, fope.coef_sin.grad)
    for a, b in zip(grads["triton"], grads["torch"], strict=True):
        assert a is not None and _maxdiff(a, b) <= 1e-5
        assert b.abs().max() > 1e-3  # not vacuous
    assert grads["triton"][2][0].abs().max() == 0  # layer 0 was not used
    # deterministic: the same call twice gives bitwise the same coefficient gradient
    fope.zero_grad(set_to_none=True)
    oq, ok = fope.apply_qk(q, k, pos, 1, fusion="triton")
    loss(oq, ok).backward()
    assert torch.equal(fope.coef_cos.grad, grads["triton"][2])


def test_rope_limit_equals_torch_rope():
    for interleaved in (False, True):
        rope = RotaryEmbeddingTables(32, 10000.0, interleaved).to(DEVICE)
        q, k = _qk(30, 2, 8, 2, 32)
        pos = torch.arange(30, device=DEVICE) * 37
        res = {}
        for fusion in ("triton", "torch"):
            q.grad = k.grad = None
            oq, ok = rope.apply_qk(q, k, pos, fusion=fusion)
            (oq.sum() + (ok * ok).sum()).backward()
            res[fusion] = (oq.detach(), ok.detach(), q.grad.clone(), k.grad.clone())
        for a, b in zip(res["triton"], res["torch"], strict=True):
            assert _maxdiff(a, b) <= 1e-5


def test_fope_limit_is_rope_through_the_kernel():
    """sigma=0, no floor, D_out = d_r/2: fused FoPE equals fused/torch RoPE (spec limit)."""
    cfg = FoPEConfig(
        head_dim=32, train_seq_len=24, num_attention_heads=4, num_query_groups=2,
        num_layers=1, sigma=0.0, floor_ratio=0.0, d_out=16,
    )  # fmt: skip
    fope = FourierPositionEmbedding(cfg).to(DEVICE)
    rope = RotaryEmbeddingTables(32).to(DEVICE)
    q, k = _qk(25, 1, 4, 2, 32)
    pos = torch.arange(25, device=DEVICE) * 11
    a = fope.apply_qk(q, k, pos, 0, fusion="triton")
    b = rope.apply_qk(q, k, pos, fusion="torch")
    assert _maxdiff(a[0], b[0]) <= 1e-5 and _maxdiff(a[1], b[1]) <= 1e-5


def _saved_bytes(fn) -> tuple[int, list[tuple[int, ...]]]:
    storages, shapes = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    sum(o.float().sum() for o in out).backward()
    return sum(storages.values()), shapes


def test_fused_saves_nothing_activation_sized():
    """Frozen coefficients: the fused path saves positions, frequencies and coefficients only;
    the torch path's saved bytes grow with s (its float32 tables)."""
    fope = _fope(4, 2, 32, 24)
    sizes = {}
    for s in (64, 256):
        q, k = _qk(s, 2, 4, 2, 32)
        pos = torch.arange(s, device=DEVICE)
        fused, shapes = _saved_bytes(
            lambda q=q, k=k, p=pos: fope.apply_qk(q, k, p, 0, fusion="triton")
        )
        torch_bytes, _ = _saved_bytes(lambda q=q, k=k, p=pos: fope.apply_qk(q, k, p, 0))
        sizes[s] = (fused, torch_bytes)
        # positions (int64 [s]) + frequencies + the two coefficient tensors; nothing [s, heads, ..]
        assert fused <= s * 8 + fope.frequencies.numel() * 4 + 2 * fope.coef_cos.numel() * 4, shapes
        assert all(len(sh) <= 1 or sh[-1] != 32 for sh in shapes), shapes
    assert sizes[256][0] - sizes[64][0] <= (256 - 64) * 8  # grows only by the positions
    assert sizes[256][1] - sizes[64][1] >= 2 * (256 - 64) * 2 * 32 * 4  # torch: two tables


def test_bad_inputs_named_errors():
    fope = _fope(4, 2, 32, 24)
    q, k = _qk(8, 1, 4, 2, 32)
    a_cos, a_sin = fope._local(0, None)
    w = fope.frequencies[: fope.d_in]
    with pytest.raises(ValueError, match="integer"):
        fope_apply_qk(q, k, torch.arange(8.0, device=DEVICE), w, a_cos, a_sin, 32)
    with pytest.raises(ValueError, match="positions must be"):
        fope_apply_qk(q, k, torch.arange(7, device=DEVICE), w, a_cos, a_sin, 32)
    with pytest.raises(ValueError, match="KV groups"):
        fope_apply_qk(q[:, :, :3], k, torch.arange(8, device=DEVICE), w, a_cos, a_sin, 32)
    with pytest.raises(ValueError, match="float32"):
        fope_apply_qk(q, k, torch.arange(8, device=DEVICE), w, a_cos.double(), a_sin, 32)


def test_interpreter_or_cuda():
    """The suite really exercised the kernel: on CPU only through the interpreter."""
    assert DEVICE.type == "cuda" or interpreted()


# head_dim 64: the Fourier columns fill half the pairs' tile, so ``dot_narrow`` really narrows
VARIANT_CASES = {
    **{n: CASES[n] for n in ("gqa", "interleaved", "d_out_eq_half", "rotary_percent_0.5")},
    "d64": (4, 2, 64, 24, {}),
    "d64_interleaved": (4, 2, 64, 24, {"interleaved": True}),
}


@pytest.mark.kernel_variant
@pytest.mark.parametrize("mix", ["loop", "dot_tf32x3", "dot_narrow", "dot_narrow_tf32x3"])
@pytest.mark.parametrize("name", sorted(VARIANT_CASES))
def test_mixing_variants_equal_torch(name, mix):
    """``mix='loop'`` (tables one frequency at a time), ``'dot_tf32x3'`` (the table product on
    tensor cores) and ``'dot_narrow'`` (the product over the Fourier columns only, then widened;
    the default is the IEEE fp32 ``dot`` over all pairs) equal the torch path in outputs, q/k
    gradients and, trainable, coefficient gradients."""
    heads, groups, d, L, extra = VARIANT_CASES[name]
    fope = _fope(heads, groups, d, L, learnable=True, **extra)
    cfg = fope.config
    if name.startswith("d64"):  # the narrow branch's condition: 2 x pow2(D_out) = d_r / 2
        assert 2 * max(16, triton.next_power_of_2(fope.d_out)) == cfg.rotary_dim // 2
    q, k = _qk(37, 2, heads, groups, d)
    pos = torch.arange(37, device=DEVICE) + 700
    res = _layer1_kernel_and_torch(fope, q, k, pos, {mix: dict(mix=mix)})
    for a, b in zip(res[mix], res["torch"], strict=True):
        assert _maxdiff(a, b) <= 1e-5


def _layer1_kernel_and_torch(fope, q, k, pos, ways: dict) -> dict:
    """Layer 1's outputs and gradients (q, k and, when trainable, the coefficients) through the
    torch path and through ``fope_apply_qk`` with each of ``ways``' keyword arguments."""
    cfg = fope.config
    res = {}
    for way in ("torch", *ways):
        fope.zero_grad(set_to_none=True)
        q.grad = k.grad = None
        if way == "torch":
            oq, ok = fope.apply_qk(q, k, pos, 1)
        else:
            a_cos, a_sin = fope._local(1, None)
            w = fope.frequencies[: fope.d_in]
            oq, ok = fope_apply_qk(
                q, k, pos, w, a_cos, a_sin, cfg.rotary_dim, cfg.zero_freq_sin, cfg.interleaved,
                **ways[way],
            )  # fmt: skip
        (((oq * oq).sum() + ok.sum()) / q.numel() ** 0.5).backward()
        grads = (fope.coef_cos.grad, fope.coef_sin.grad) if cfg.learnable else ()
        res[way] = (oq, ok, q.grad, k.grad, *grads)
    return res


def test_unknown_mix_is_a_clear_error(monkeypatch):
    """A bad ``FOPE_TRITON_MIX`` names the variable and the allowed values before any launch."""
    fope = _fope(8, 2, 32, 64)
    q, k = _qk(16, 1, 8, 2, 32)
    a_cos, a_sin = fope._local(0, None)
    w = fope.frequencies[: fope.d_in]
    monkeypatch.setenv("FOPE_TRITON_MIX", "fast")
    with pytest.raises(ValueError, match="FOPE_TRITON_MIX.*dot_tf32x3"):
        fope_apply_qk(q, k, torch.arange(16, device=DEVICE), w, a_cos, a_sin, 32)


@pytest.mark.kernel_variant
@pytest.mark.parametrize("mix", ["dot", "dot_narrow", "loop"])
def test_group_block_equals_one_group_per_program(mix, monkeypatch):
    """``group_block`` > 1 (a program's groups share the angles' cos/sin) gives the torch path's
    outputs and q/k gradients (frozen coefficients: backward runs grouped too); trainable, the
    forward is grouped and the coefficient gradients still equal torch's."""
    heads, groups, d = 8, 4, 64
    for learnable in (False, True):
        fope = _fope(heads, groups, d, 24, learnable=learnable)
        cfg = fope.config
        q, k = _qk(21, 2, heads, groups, d)
        pos = torch.arange(21, device=DEVICE) * 3 + 5
        ways = {gb: dict(mix=mix, group_block=gb) for gb in (2, 4)}
        res = _layer1_kernel_and_torch(fope, q, k, pos, ways)
        for way in (2, 4):
            for a, b in zip(res[way], res["torch"], strict=True):
                assert _maxdiff(a, b) <= 1e-5
    # the environment variable, and a value that does not divide the groups
    monkeypatch.setenv("FOPE_TRITON_GROUP_BLOCK", "4")
    a_cos, a_sin = fope._local(1, None)
    w = fope.frequencies[: fope.d_in]
    env = fope_apply_qk(q, k, pos, w, a_cos, a_sin, cfg.rotary_dim, mix=mix)
    assert _maxdiff(env[0], res[4][0]) == 0.0
    monkeypatch.setenv("FOPE_TRITON_GROUP_BLOCK", "3")
    with pytest.raises(ValueError, match=r"FOPE_TRITON_GROUP_BLOCK=3 .*4 groups.*\[1, 2, 4\]"):
        fope_apply_qk(q, k, pos, w, a_cos, a_sin, cfg.rotary_dim, mix=mix)


@pytest.mark.kernel_variant
@pytest.mark.parametrize("name", sorted(CASES))
def test_head_tile_equals_torch(name, monkeypatch):
    """``heads='tile'`` (a group's heads as one tile per half, batch row 0 loaded before the
    tables) equals the torch path in outputs and q/k gradients for every layout case, with one
    group and with all groups per program, frozen (backward tiled too) and trainable (the
    coefficient-gradient backward goes head by head); ``$FOPE_TRITON_HEADS`` selects it. So does
    ``heads='each'`` (one head at a time), which ``auto`` picks above 8 query heads per group."""
    heads, groups, d, L, extra = CASES[name]
    q, k = _qk(19, 2, heads, groups, d)
    pos = torch.arange(19, device=DEVICE) * 7 + 300
    for learnable in (False, True):
        fope = _fope(heads, groups, d, L, learnable=learnable, **extra)
        ways = {
            "dot": dict(mix="dot", heads="tile"),
            "each": dict(mix="dot", heads="each"),
            "loop_all_groups": dict(mix="loop", group_block=groups, heads="tile"),
        }
        res = _layer1_kernel_and_torch(fope, q, k, pos, ways)
        for way in ways:
            for a, b in zip(res[way], res["torch"], strict=True):
                assert _maxdiff(a, b) <= 1e-5, (way, learnable)
    cfg = fope.config
    a_cos, a_sin = fope._local(1, None)
    w = fope.frequencies[: fope.d_in]
    monkeypatch.setenv("FOPE_TRITON_HEADS", "tile")
    env = fope_apply_qk(q, k, pos, w, a_cos, a_sin, cfg.rotary_dim, cfg.zero_freq_sin,
                        cfg.interleaved, mix="dot")  # fmt: skip
    assert _maxdiff(env[0], res["dot"][0]) == 0.0 and _maxdiff(env[1], res["dot"][1]) == 0.0
    monkeypatch.setenv("FOPE_TRITON_HEADS", "rows")
    with pytest.raises(ValueError, match=r"FOPE_TRITON_HEADS='rows' unknown; allowed: \('auto'"):
        fope_apply_qk(q, k, pos, w, a_cos, a_sin, cfg.rotary_dim)


@pytest.mark.kernel_variant
def test_rope_tile_and_group_block_equal_torch_rope():
    """The RoPE limit head by head with all key heads sharing one program's tables
    (``group_block``), and with ``heads='tile'``, one key head and all key heads per program."""
    rope = RotaryEmbeddingTables(32).to(DEVICE)
    q, k = _qk(19, 2, 8, 4, 32)
    pos = torch.arange(19, device=DEVICE) * 13
    ways = {"each_4": ("each", 4), "tile_1": ("tile", 1), "tile_4": ("tile", 4)}
    res = {}
    for way in ("torch", *ways):
        q.grad = k.grad = None
        if way == "torch":
            oq, ok = rope.apply_qk(q, k, pos, fusion="torch")
        else:
            hw, gb = ways[way]
            oq, ok = rope_apply_qk(q, k, pos, rope.frequencies, 32, group_block=gb, heads=hw)
        (oq.sum() + (ok * ok).sum()).backward()
        res[way] = (oq.detach(), ok.detach(), q.grad.clone(), k.grad.clone())
    for way in ways:
        for a, b in zip(res[way], res["torch"], strict=True):
            assert _maxdiff(a, b) <= 1e-5, way


def test_auto_defaults_pick_the_measured_variants(monkeypatch):
    """``mix='auto'``: the Fourier-column product as 3xTF32 where those columns fill half the
    pairs (D_out 17-32 of 64: the issue's head_dim 128 at L 512 and 4096), else the fp32 product
    over all pairs; ``heads='auto'``: one tile up to 8 query heads per group. The default path
    (model and kernel) is exactly that variant, and equals the torch path."""
    assert resolve_mix(None, 32, 128) == resolve_mix(None, 17, 128) == "dot_narrow_tf32x3"
    assert resolve_mix(None, 33, 128) == resolve_mix(None, 16, 128) == "dot"
    assert resolve_mix(None, 8, 32) == "dot"  # 16 pairs: no narrower dot than 16 columns
    assert resolve_mix("loop", 32, 128) == "loop"
    assert resolve_heads(None, 4) == resolve_heads(None, 8) == "tile"
    assert resolve_heads(None, 16) == "each" and resolve_heads("tile", 16) == "tile"
    monkeypatch.setenv("FOPE_TRITON_MIX", "dot")
    monkeypatch.setenv("FOPE_TRITON_HEADS", "each")
    assert resolve_mix(None, 32, 128) == "dot" and resolve_heads(None, 4) == "each"
    monkeypatch.delenv("FOPE_TRITON_MIX")
    monkeypatch.delenv("FOPE_TRITON_HEADS")
    fope = _fope(4, 2, 64, 24)  # 32 pairs, D_out = 5: narrow (16 of 32 padded columns)
    assert resolve_mix(None, fope.d_out, fope.config.rotary_dim) == "dot_narrow_tf32x3"
    q, k = _qk(23, 2, 4, 2, 64)
    pos = torch.arange(23, device=DEVICE) * 5 + 40
    fused, ref = _both(fope, q, k, pos)
    for a, b in zip(fused, ref, strict=True):
        assert _maxdiff(a, b) <= 1e-5
    a_cos, a_sin = fope._local(1, None)
    w = fope.frequencies[: fope.d_in]
    explicit = fope_apply_qk(q, k, pos, w, a_cos, a_sin, 64, mix="dot_narrow_tf32x3", heads="tile")
    assert torch.equal(explicit[0], fused[0]) and torch.equal(explicit[1], fused[1])


@pytest.mark.kernel_variant
def test_tile_launches_prune_the_large_blocks():
    """The autotuner's early prune keeps every config for head-by-head launches and only blocks
    up to TILE_MAX_BLOCK for tile launches (never an empty list)."""
    from fope_megatron.fope import triton_kernel as tk

    every = [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in tk.CONFIGS]
    assert tk.prune_configs(every, {}, HEAD_TILE=False, ROPE=False) == every
    tile = tk.prune_configs(every, {}, HEAD_TILE=True, ROPE=False)
    assert [(c.kwargs["BLOCK_S"], c.num_warps) for c in tile] == [
        (bs, nw) for bs, nw in tk.CONFIGS if bs <= tk.TILE_MAX_BLOCK
    ]
    assert len(tile) == 5 and max(c.kwargs["BLOCK_S"] for c in tile) == 32
    big = [triton.Config({"BLOCK_S": 64}, num_warps=4)]
    assert tk.prune_configs(big, {}, HEAD_TILE=True) == big
    assert tk._fope_qk_tuned.early_config_prune is tk.prune_configs


@pytest.mark.kernel_variant
def test_autotuner_calls_the_prune_with_head_tile(monkeypatch):
    """Through triton's own Autotuner: with a 16- and a 64-position config, a tile launch is
    pruned to the 16 one (a single config: no timing, so this runs under the interpreter too) and
    gives the torch path's result."""
    from fope_megatron.fope import triton_apply as ta
    from fope_megatron.fope import triton_kernel as tk

    tuner = triton.autotune(
        configs=[
            triton.Config({"BLOCK_S": 16}, num_warps=4),
            triton.Config({"BLOCK_S": 64}, num_warps=4),
        ],
        key=list(tk._fope_qk_tuned.keys),
        prune_configs_by={"early_config_prune": tk.prune_configs},
    )(tk._fope_qk_kernel)
    monkeypatch.setattr(ta, "_fope_qk_tuned", tuner)
    fope = _fope(4, 2, 32, 24)
    q, k = _qk(20, 1, 4, 2, 32)
    pos = torch.arange(20, device=DEVICE)
    a_cos, a_sin = fope._local(0, None)
    w = fope.frequencies[: fope.d_in]
    with torch.no_grad():
        oq, ok = fope_apply_qk(q, k, pos, w, a_cos, a_sin, 32, heads="tile")
        rq, rk = fope.apply_qk(q, k, pos, 0, fusion="torch")
    assert [c.kwargs["BLOCK_S"] for c in tuner.cache.values()] == [16]
    assert _maxdiff(oq, rq) <= 1e-5 and _maxdiff(ok, rk) <= 1e-5
