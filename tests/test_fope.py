"""FoPE math against its statement (docs/fope.md sections 1-3) and megatron-core's RoPE."""

import math

import pytest
import torch

from fope_megatron.fope import (
    FoPEConfig,
    FoPEConfigError,
    FourierPositionEmbedding,
    RotaryEmbeddingTables,
    xavier_std,
)


def make(**kw):
    base = dict(head_dim=32, train_seq_len=64, num_attention_heads=4, num_layers=3)
    base.update(kw)
    return FourierPositionEmbedding(FoPEConfig(**base))


@pytest.mark.parametrize(
    "head_dim, train_seq_len, base, expected",
    [
        (64, 512, 1e4, (16, 16)),
        (128, 512, 1e4, (31, 31)),
        (128, 1024, 1e4, (36, 32)),
        (64, 2048, 1e4, (21, 16)),
        (128, 8192, 5e5, (35, 32)),
    ],
)
def test_floor_gives_paper_d_in_d_out(head_dim, train_seq_len, base, expected):
    m = make(head_dim=head_dim, train_seq_len=train_seq_len, rotary_base=base)
    assert (m.d_in, m.d_out) == expected
    w = m.frequencies
    assert w.dtype == torch.float32
    floor = 2 * math.pi / train_seq_len
    assert bool((w[: m.d_in] >= floor).all()) and bool((w[m.d_in :] == 0).all())


def test_no_floor_keeps_every_frequency():
    m = make(floor_ratio=0.0)
    assert m.d_in == 16 and bool((m.frequencies > 0).all())


def test_step_identity_and_xavier_std():
    # sigma=0: exactly the step identity. D_in=36, D_out=32 -> step 2, k*2 < 36 -> k < 18
    m = make(head_dim=128, train_seq_len=1024, num_attention_heads=8, sigma=0.0)
    a_cos, a_sin = m.coefficients(0)
    assert a_cos.shape == (8, 36, 32) and a_cos.dtype == torch.float32
    expected = torch.zeros(8, 36, 32)
    for k in range(18):
        expected[:, 2 * k, k] = 1
    assert torch.equal(a_cos, expected) and torch.equal(a_sin, expected)
    # large draw: empirical std of (A - E) within 5% of sigma*sqrt(2/(D_out*(D_in+G)))
    big = make(head_dim=128, train_seq_len=1024, num_attention_heads=64, sigma=0.6)
    a_cos, a_sin = big.coefficients(1)
    want = 0.6 * math.sqrt(2 / (32 * (36 + 64)))
    assert want == pytest.approx(xavier_std(64, 36, 32, 0.6))
    for a in (a_cos, a_sin):
        got = (a - expected[:1].expand(64, -1, -1)).std().item()
        assert abs(got / want - 1) < 0.05, (got, want)
    assert not torch.equal(a_cos, a_sin)


def test_coefficients_deterministic_per_layer():
    a = make(sigma=0.4)
    b = make(sigma=0.4)
    for layer in range(3):
        assert torch.equal(a.coefficients(layer)[0], b.coefficients(layer)[0])
    assert not torch.allclose(a.coefficients(0)[0], a.coefficients(1)[0])
    shared = make(sigma=0.4, shared_across_layers=True)
    assert torch.equal(shared.coefficients(0)[0], shared.coefficients(2)[0])
    # a TP slice holds exactly the rows of the full tensor
    part = FourierPositionEmbedding(a.config, groups=range(2, 4))
    assert torch.equal(part.coef_cos[1], a.coefficients(1)[0][2:4])


def reference_tables(m, positions, layer):
    """Spec section 3 with plain loops."""
    cfg = m.config
    a_cos, a_sin = m.coefficients(layer)
    half = cfg.rotary_dim // 2
    w = m.frequencies
    G = cfg.groups
    C = torch.ones(len(positions), G, half, dtype=torch.float64)
    S = torch.full((len(positions), G, half), cfg.zero_freq_sin, dtype=torch.float64)
    for pi, p in enumerate(positions.tolist()):
        for g in range(G):
            for j in range(m.d_out):
                C[pi, g, j] = sum(
                    math.cos(p * float(w[k])) * float(a_cos[g, k, j]) for k in range(m.d_in)
                )
                S[pi, g, j] = sum(
                    math.sin(p * float(w[k])) * float(a_sin[g, k, j]) for k in range(m.d_in)
                )
    return C, S


def reference_apply(m, x, positions, layer):
    cfg = m.config
    C, S = reference_tables(m, positions, layer)
    out = x.double().clone()
    H = x.shape[2]
    half = cfg.rotary_dim // 2
    for h in range(H):
        g = h // (H // cfg.groups)
        for j in range(half):
            i1, i2 = (2 * j, 2 * j + 1) if cfg.interleaved else (j, j + half)
            x1, x2 = x[:, :, h, i1].double(), x[:, :, h, i2].double()
            c, s = C[:, g, j][:, None], S[:, g, j][:, None]
            out[:, :, h, i1] = x1 * c - x2 * s
            out[:, :, h, i2] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize(
    "heads, groups, interleaved, percent, zero_sin",
    [
        (4, None, False, 1.0, 1.0),  # MHA
        (4, 2, False, 1.0, 1.0),  # GQA
        (4, 1, True, 1.0, 0.0),  # MQA, interleaved, sin padding 0
        (6, 3, False, 0.5, 1.0),  # rotary_percent < 1
    ],
)
def test_tables_and_apply_match_spec_reference(heads, groups, interleaved, percent, zero_sin):
    m = make(
        head_dim=16,
        train_seq_len=24,
        num_attention_heads=heads,
        num_query_groups=groups,
        interleaved=interleaved,
        rotary_percent=percent,
        zero_freq_sin=zero_sin,
        sigma=0.5,
    )
    assert m.d_out < m.config.rotary_dim // 2 or percent < 1  # padding path exercised
    positions = torch.tensor([0, 1, 5, 23, 40, 97])
    C, S = reference_tables(m, positions, 1)
    c_full, s_full = m.tables(positions, 1)
    d_r = m.config.rotary_dim
    assert c_full.shape == (6, m.config.groups, d_r) and c_full.dtype == torch.float32
    pairs = (lambda t: t[..., ::2]) if interleaved else (lambda t: t[..., : d_r // 2])
    torch.testing.assert_close(pairs(c_full).double(), C, atol=1e-5, rtol=0)
    torch.testing.assert_close(pairs(s_full).double(), S, atol=1e-5, rtol=0)
    x = torch.randn(6, 2, heads, 16)
    ref = reference_apply(m, x, positions, 1)
    torch.testing.assert_close(m.apply(x, positions, 1).double(), ref, atol=1e-5, rtol=0)
    # a group slice applied to its own heads equals the corresponding part of the full result
    if m.config.groups > 1:
        per = heads // m.config.groups
        part = m.apply(x[:, :, per : 2 * per], positions, 1, groups=range(1, 2))
        torch.testing.assert_close(part.double(), ref[:, :, per : 2 * per], atol=1e-5, rtol=0)


def test_rope_limit_equals_megatron_rope():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for interleaved in (False, True):
        m = make(
            head_dim=64,
            train_seq_len=128,
            sigma=0.0,
            floor_ratio=0.0,
            d_out=32,
            interleaved=interleaved,
        )
        rope = RotaryEmbedding(64, 1.0, interleaved, use_cpu_initialization=True)
        freqs = rope.get_freqs_non_repeated(300)
        if interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        x = torch.randn(300, 2, 4, 64)
        want = _apply_rotary_pos_emb_bshd(x, emb[:, None, None, :], rotary_interleaved=interleaved)
        pos = torch.arange(300)
        torch.testing.assert_close(m.apply(x, pos, 0), want, atol=1e-6, rtol=0)
        ours = RotaryEmbeddingTables(64, 10000.0, interleaved)
        torch.testing.assert_close(ours.apply(x, pos), want, atol=1e-6, rtol=0)


def test_dtype_preserved_math_in_fp32():
    m = make(sigma=0.3)
    pos = torch.arange(500, 700)
    x = torch.randn(200, 1, 4, 32)
    out_bf16 = m.apply(x.bfloat16(), pos, 0)
    assert out_bf16.dtype == torch.bfloat16
    # fp32 math then one rounding: the bf16 result is the rounded fp32 result of the bf16 input
    want = m.apply(x.bfloat16().float(), pos, 0).bfloat16()
    assert torch.equal(out_bf16, want)
    c, s = m.tables(pos, 0)
    assert c.dtype == s.dtype == torch.float32
    # model.bfloat16() keeps the coefficients in float32
    m.bfloat16()
    assert m.coef_cos.dtype == torch.float32


def test_only_tables_saved_for_backward():
    m = make(sigma=0.3)
    x = torch.randn(64, 2, 4, 32, requires_grad=True)
    pos = torch.arange(64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.apply(x, pos, 0).sum().backward()
    big = [t for t in saved if t.numel() >= x.numel()]
    assert not big, [tuple(t.shape) for t in big]  # nothing of x's size is kept
    assert sum(t.numel() for t in saved) <= 2 * 64 * 4 * 32


def test_learnable_coefficients_get_gradients():
    m = make(learnable=True, sigma=0.3)
    assert isinstance(m.coef_cos, torch.nn.Parameter)
    x = torch.randn(8, 1, 4, 32)
    m.apply(x, torch.arange(8), 2).pow(2).sum().backward()
    assert m.coef_cos.grad is not None and m.coef_cos.grad[2].abs().sum() > 0
    frozen = make()
    assert "coef_cos" in frozen.state_dict() and not list(frozen.parameters())


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(head_dim=15), "rotary_percent"),
        (dict(rotary_percent=0.0), "rotary_percent"),
        (dict(num_query_groups=3), "num_query_groups"),
        (dict(zero_freq_sin=0.5), "zero_freq_sin"),
        (dict(sigma=-1.0), "sigma"),
        (dict(train_seq_len=0), "train_seq_len"),
        (dict(d_out=100), "d_out"),
        (dict(floor_ratio=-0.1), "floor_ratio"),
    ],
)
def test_invalid_config_names_field(kw, field):
    base = dict(head_dim=32, train_seq_len=64, num_attention_heads=4, num_layers=3)
    base.update(kw)
    with pytest.raises(FoPEConfigError, match=field):
        FoPEConfig(**base)


def test_module_apply_still_walks_submodules():
    m = make()
    seen = []
    m.apply(lambda mod: seen.append(type(mod).__name__))
    assert seen == ["FourierPositionEmbedding"]
    r = RotaryEmbeddingTables(32)
    assert r.apply(lambda mod: None) is r
