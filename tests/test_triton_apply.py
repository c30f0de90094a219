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
from fope_megatron.fope import triton_kernel as tk  # noqa: E402
from fope_megatron.fope.math import apply_tables  # noqa: E402
from fope_megatron.fope.triton_apply import (  # noqa: E402
    KernelPath,
    fope_apply_qk,
    interpreted,
    kernel_path,
    rope_apply_qk,
)
from fope_megatron.parallel.positions import cp_chunk_positions, packed_positions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ONE_CONFIG_TUNER = tk.autotuned([tk.ONE_CONFIG])


@pytest.fixture(autouse=True)
def _one_autotune_config(monkeypatch):
    """On CUDA every case compiles one config, not one per autotune config (the interpreter has
    only one anyway)."""
    if DEVICE.type == "cuda":
        monkeypatch.setattr(tk, "_fope_qk_tuned", _ONE_CONFIG_TUNER)


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
    # name: (heads, groups, d, L, FoPEConfig extras). head_dim 32: the table product over all
    # pairs; 64: over the Fourier columns only. Up to 8 query heads per group: heads as a tile.
    "mha": (4, 4, 32, 24, {}),
    "gqa": (4, 2, 32, 24, {}),
    "mqa": (4, 1, 32, 24, {}),
    "interleaved": (4, 2, 32, 24, {"interleaved": True}),
    "rotary_percent_0.5": (4, 2, 32, 24, {"rotary_percent": 0.5}),
    "zero_freq_sin_0": (4, 2, 32, 24, {"zero_freq_sin": 0.0}),
    "d_out_eq_half": (4, 2, 16, 4096, {"floor_ratio": 0.0, "d_out": 8}),
    "d_out_lt_half_odd_dims": (6, 3, 24, 40, {}),
    "d64": (4, 2, 64, 24, {}),
    "d64_interleaved": (4, 2, 64, 24, {"interleaved": True}),
    "mqa_12_heads": (12, 1, 32, 24, {}),
    "d64_mqa_12_heads": (12, 1, 64, 24, {}),
}


def _path_of(name: str) -> KernelPath:
    heads, groups, d, L, extra = CASES[name]
    fope = _fope(heads, groups, d, L, **extra)
    return kernel_path(fope.d_out, fope.config.rotary_dim, heads // groups)


def test_cases_cover_every_path_training_can_take():
    """Both table products and both head modes (all four combinations) are among CASES, so the
    tests below run every path ``kernel_path`` picks; the trainable-coefficient and RoPE tests
    take both products / both head modes too."""
    paths = {_path_of(name) for name in CASES}
    assert paths == {KernelPath(n, t) for n in (False, True) for t in (False, True)}
    assert _path_of("d64") == KernelPath(narrow=True, tile=True)
    assert _path_of("mqa_12_heads") == KernelPath(narrow=False, tile=False)


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


@pytest.mark.parametrize("d", [32, 64])
def test_learnable_coefficient_gradients(d):
    """Trainable coefficients (the coefficient-gradient backward), with the table product over
    all pairs (head_dim 32) and over the Fourier columns only (64)."""
    fope = _fope(4, 2, d, 24, learnable=True)
    assert isinstance(fope.coef_cos, torch.nn.Parameter)
    assert kernel_path(fope.d_out, d, 2).narrow == (d == 64)
    q, k = _qk(45, 2, 4, 2, d)
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


@pytest.mark.parametrize("heads, groups", [(8, 2), (12, 1)])  # heads as a tile / one at a time
def test_rope_limit_equals_torch_rope(heads, groups):
    assert kernel_path(None, 32, heads // groups) == KernelPath(False, heads // groups <= 8)
    for interleaved in (False, True):
        rope = RotaryEmbeddingTables(32, 10000.0, interleaved).to(DEVICE)
        q, k = _qk(30, 2, heads, groups, 32)
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


def test_kernel_path_picks_the_measured_fastest():
    """``kernel_path``: the Fourier-column product as 3xTF32 where those columns fill half the
    pairs (D_out 17-32 of 64: head_dim 128 at L 512 and 4096), else the fp32 product over all
    pairs; one tile up to 8 query heads per group. The model's path is exactly that one."""
    assert kernel_path(32, 128, 4) == kernel_path(17, 128, 4) == KernelPath(True, True)
    assert kernel_path(33, 128, 4) == kernel_path(16, 128, 4) == KernelPath(False, True)
    assert kernel_path(8, 32, 4) == KernelPath(False, True)  # 16 pairs: nothing narrower than 16
    assert kernel_path(32, 128, 8).tile and not kernel_path(32, 128, 9).tile
    assert kernel_path(None, 128, 4) == KernelPath(False, True)  # RoPE: no product
    assert str(KernelPath(True, True)) == (
        "table product 3xTF32 over the Fourier columns, a group's heads as one tile"
    )
    fope = _fope(4, 2, 64, 24)
    q, k = _qk(23, 2, 4, 2, 64)
    pos = torch.arange(23, device=DEVICE) * 5 + 40
    a_cos, a_sin = fope._local(1, None)
    w = fope.frequencies[: fope.d_in]
    with torch.no_grad():
        model = fope.apply_qk(q, k, pos, 1, fusion="triton")
        named = fope_apply_qk(q, k, pos, w, a_cos, a_sin, 64, path=KernelPath(True, True))
    assert torch.equal(model[0], named[0]) and torch.equal(model[1], named[1])


def test_narrow_path_where_it_cannot_run_is_a_clear_error():
    """A named path is checked against the shapes before any launch."""
    fope = _fope(4, 2, 32, 24)  # 16 pairs: the narrow product does not fit
    q, k = _qk(16, 1, 4, 2, 32)
    pos = torch.arange(16, device=DEVICE)
    a_cos, a_sin = fope._local(0, None)
    w = fope.frequencies[: fope.d_in]
    narrow = KernelPath(narrow=True, tile=True)
    with pytest.raises(ValueError, match="narrow product needs the Fourier columns"):
        fope_apply_qk(q, k, pos, w, a_cos, a_sin, 32, path=narrow)
    with pytest.raises(ValueError, match="RoPE has no product"):
        rope_apply_qk(q, k, pos, RotaryEmbeddingTables(32).frequencies.to(DEVICE), 32, path=narrow)


def _forced_paths(fope, q_heads_per_group: int) -> list[KernelPath]:
    """Every path these shapes can take (the narrow product only where it fits) but the one
    ``kernel_path`` picks."""
    auto = kernel_path(fope.d_out, fope.config.rotary_dim, q_heads_per_group)
    every = [KernelPath(n, t) for n in (False, auto.narrow) for t in (False, True)]
    return [p for p in dict.fromkeys(every) if p != auto]


def _layer1_kernel_and_torch(fope, q, k, pos, paths) -> dict:
    """Layer 1's outputs and gradients (q, k and, when trainable, the coefficients) through the
    torch path and through ``fope_apply_qk`` along each of ``paths``."""
    cfg = fope.config
    res = {}
    for way in ("torch", *paths):
        fope.zero_grad(set_to_none=True)
        q.grad = k.grad = None
        if way == "torch":
            oq, ok = fope.apply_qk(q, k, pos, 1)
        else:
            a_cos, a_sin = fope._local(1, None)
            w = fope.frequencies[: fope.d_in]
            oq, ok = fope_apply_qk(
                q, k, pos, w, a_cos, a_sin, cfg.rotary_dim, cfg.zero_freq_sin, cfg.interleaved,
                path=way,
            )  # fmt: skip
        (((oq * oq).sum() + ok.sum()) / q.numel() ** 0.5).backward()
        grads = (fope.coef_cos.grad, fope.coef_sin.grad) if cfg.learnable else ()
        res[way] = (oq, ok, q.grad, k.grad, *grads)
    return res


VARIANT_CASES = ("gqa", "interleaved", "d_out_eq_half", "rotary_percent_0.5", "d64", "mqa_12_heads")


@pytest.mark.kernel_variant
@pytest.mark.parametrize("name", VARIANT_CASES)
def test_forced_paths_equal_torch(name):
    """Every path named at shapes where ``kernel_path`` picks another (as the benchmark's
    variants do: e.g. the product over all pairs where the narrow one fits, one head at a time
    up to 8 heads per group, a tile above) equals the torch path in outputs and q/k gradients,
    frozen (backward along the same path) and trainable (coefficient gradients too)."""
    heads, groups, d, L, extra = CASES[name]
    q, k = _qk(19, 2, heads, groups, d)
    pos = torch.arange(19, device=DEVICE) * 7 + 300
    for learnable in (False, True):
        fope = _fope(heads, groups, d, L, learnable=learnable, **extra)
        paths = _forced_paths(fope, heads // groups)
        assert len(paths) == (3 if name == "d64" else 1)
        res = _layer1_kernel_and_torch(fope, q, k, pos, paths)
        for way in paths:
            for a, b in zip(res[way], res["torch"], strict=True):
                assert _maxdiff(a, b) <= 1e-5, (way, learnable)


@pytest.mark.kernel_variant
def test_rope_forced_paths_equal_torch_rope():
    """The RoPE limit one head at a time where ``kernel_path`` tiles (4 query heads per key
    head) and as one tile where it goes head by head (12)."""
    rope = RotaryEmbeddingTables(32).to(DEVICE)
    for heads, groups, tile in ((8, 2, False), (12, 1, True)):
        assert kernel_path(None, 32, heads // groups).tile != tile
        q, k = _qk(19, 2, heads, groups, 32)
        pos = torch.arange(19, device=DEVICE) * 13
        res = {}
        for way in ("torch", "forced"):
            q.grad = k.grad = None
            if way == "torch":
                oq, ok = rope.apply_qk(q, k, pos, fusion="torch")
            else:
                path = KernelPath(narrow=False, tile=tile)
                oq, ok = rope_apply_qk(q, k, pos, rope.frequencies, 32, path=path)
            (oq.sum() + (ok * ok).sum()).backward()
            res[way] = (oq.detach(), ok.detach(), q.grad.clone(), k.grad.clone())
        for a, b in zip(res["forced"], res["torch"], strict=True):
            assert _maxdiff(a, b) <= 1e-5, (heads, groups)


@pytest.mark.kernel_variant
def test_tile_launches_prune_the_large_blocks():
    """The autotuner's early prune keeps every config for head-by-head launches and only blocks
    up to TILE_MAX_BLOCK for tile launches (never an empty list)."""
    every = [triton.Config({"BLOCK_S": bs}, num_warps=nw) for bs, nw in tk.CONFIGS]
    assert tk.prune_configs(every, {}, HEAD_TILE=False, ROPE=False) == every
    tile = tk.prune_configs(every, {}, HEAD_TILE=True, ROPE=False)
    assert [(c.kwargs["BLOCK_S"], c.num_warps) for c in tile] == [
        (bs, nw) for bs, nw in tk.CONFIGS if bs <= tk.TILE_MAX_BLOCK
    ]
    assert len(tile) == 5 and max(c.kwargs["BLOCK_S"] for c in tile) == 32
    big = [triton.Config({"BLOCK_S": 64}, num_warps=4)]
    assert tk.prune_configs(big, {}, HEAD_TILE=True) == big
    assert tk.autotuned(every).early_config_prune is tk.prune_configs


@pytest.mark.kernel_variant
def test_autotuner_calls_the_prune_with_head_tile(monkeypatch):
    """Through triton's own Autotuner: with a 16- and a 64-position config, a tile launch is
    pruned to the 16 one (a single config: no timing, so this runs under the interpreter too) and
    gives the torch path's result."""
    tuner = tk.autotuned([tk.ONE_CONFIG, triton.Config({"BLOCK_S": 64}, num_warps=4)])
    monkeypatch.setattr(tk, "_fope_qk_tuned", tuner)
    fope = _fope(4, 2, 32, 24)
    q, k = _qk(20, 1, 4, 2, 32)
    pos = torch.arange(20, device=DEVICE)
    a_cos, a_sin = fope._local(0, None)
    w = fope.frequencies[: fope.d_in]
    with torch.no_grad():
        oq, ok = fope_apply_qk(q, k, pos, w, a_cos, a_sin, 32, path=KernelPath(False, True))
        rq, rk = fope.apply_qk(q, k, pos, 0, fusion="torch")
    assert [c.kwargs["BLOCK_S"] for c in tuner.cache.values()] == [16]
    assert _maxdiff(oq, rq) <= 1e-5 and _maxdiff(ok, rk) <= 1e-5
