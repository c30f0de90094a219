"""fope-eval's training-free scaling modes: each against its published formula (transformers'
``ROPE_INIT_FUNCTIONS``, bloc97's NTK base) and on a real megatron-core model."""

import math

import pytest
import torch

from fope_megatron.fope.scaling import ntk_base, scaled_frequencies, yarn_concentration
from fope_megatron.testing.distributed import run_distributed


def _hf_config(dim: int, theta: float, rope_type: str, factor: float, original: int):
    from transformers import LlamaConfig

    params = {"rope_type": rope_type, "rope_theta": theta, "factor": factor}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = original
    return LlamaConfig(
        hidden_size=dim * 4, num_attention_heads=4, head_dim=dim,
        max_position_embeddings=original, rope_parameters=params,
    )  # fmt: skip


@pytest.mark.parametrize(
    "dim, factor, original", [(32, 4.0, 128), (64, 16.0, 128), (128, 8.0, 4096)]
)
def test_pi_dynamic_yarn_match_transformers(dim, factor, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as F

    theta = 10000.0
    want, att = F["linear"](_hf_config(dim, theta, "linear", factor, original), "cpu")
    torch.testing.assert_close(scaled_frequencies(dim, theta, "pi", factor, original), want)
    cfg = _hf_config(dim, theta, "dynamic", factor, original)
    for seq_len in (original // 2, original, 3 * original):
        want, _ = F["dynamic"](cfg, "cpu", seq_len=seq_len)
        got = scaled_frequencies(dim, theta, "dynamic-ntk", factor, original, seq_len=seq_len)
        torch.testing.assert_close(got, want)
    want, att = F["yarn"](_hf_config(dim, theta, "yarn", factor, original), "cpu")
    torch.testing.assert_close(scaled_frequencies(dim, theta, "yarn", factor, original), want)
    # YaRN's attention temperature: cos and sin times 0.1 ln(factor) + 1
    assert yarn_concentration(factor) == pytest.approx(att, abs=1e-12)
    assert yarn_concentration(factor) == pytest.approx(0.1 * math.log(factor) + 1, abs=1e-12)


def test_ntk_base_formula():
    dim, theta, factor = 32, 10000.0, 8.0
    base = theta * factor ** (dim / (dim - 2))
    assert ntk_base(theta, factor, dim) == pytest.approx(base)
    w = scaled_frequencies(dim, theta, "ntk", factor, 128)
    want = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    torch.testing.assert_close(w, want)
    plain = scaled_frequencies(dim, theta, "none", 1.0, 128)
    assert w[0] == plain[0]  # the highest frequency is kept, the lowest is divided by factor
    torch.testing.assert_close(w[-1], plain[-1] / factor)
    with pytest.raises(ValueError, match="seq_len"):
        scaled_frequencies(dim, theta, "dynamic-ntk", 2.0, 128)


def _scaled_models(rank, world):
    from fope_megatron.eval.scaled import build_scaled_model, scaling_factor
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel
    from fope_megatron.testing.models import tiny_config

    init_model_parallel(tp=1)
    tokens = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32)[None].expand(2, -1)
    out = {}
    for kind in ("rope", "fope"):
        cfg = tiny_config(kind, 64)
        base = build_gpt(cfg).eval()
        state = base.state_dict()
        with torch.no_grad():
            ref = base(tokens, pos, None)
            pi = build_scaled_model(cfg, state, "t", "pi", 2.0, 128)
            pi_logits = pi(tokens, pos, None)
            one = build_scaled_model(cfg, state, "t", "yarn", 1.0, 64)(tokens, pos, None)
            yarn = build_scaled_model(cfg, state, "t", "yarn", 16.0, 1024)
        pe = base.decoder.layers[0].self_attention.encoder
        pi_pe = pi.decoder.layers[0].self_attention.encoder
        d = getattr(pe, "d_in", pe.frequencies.shape[0])
        attn = yarn.decoder.layers[0].self_attention
        coef = "decoder.layers.0.self_attention.fope.coef_cos"
        out[kind] = dict(
            pi_freq_err=float((pi_pe.frequencies[:d] - pe.frequencies[:d] / 2).abs().max()),
            pi_d_in=getattr(pi_pe, "d_in", None),
            d_in=getattr(pe, "d_in", None),
            pi_changed=float((pi_logits - ref).abs().max()),
            one_err=float((one - ref).abs().max()),
            yarn_scale=float(attn.core_attention.softmax_scale),
            yarn_coef=tuple(yarn.state_dict()[coef].shape) if kind == "fope" else None,
            base_coef=tuple(state[coef].shape) if kind == "fope" else None,
        )
    out["factor"] = [scaling_factor(m, None, 256, 64) for m in ("pi", "yarn", "dynamic-ntk")]
    try:
        build_scaled_model(tiny_config("fope", 64), state, "t", "ntk", 64.0, 4096)
        out["ntk_fope"] = "built"
    except ValueError as e:
        out["ntk_fope"] = str(e)
    return out


def test_scaled_models_on_megatron():
    res = run_distributed(_scaled_models, 1)[0]
    m = yarn_concentration(16.0)
    for kind in ("rope", "fope"):
        r = res[kind]
        assert r["pi_freq_err"] == 0.0 and r["pi_d_in"] == r["d_in"], r  # w / 2, same D_in
        assert r["pi_changed"] > 1e-3, r  # and the logits move
        assert r["one_err"] == 0.0, r  # factor 1: the unscaled model
        assert r["yarn_scale"] == pytest.approx(m * m / 16**0.5)  # head_dim 16
    assert res["fope"]["yarn_coef"] == res["fope"]["base_coef"]  # trained D_in kept
    assert res["factor"] == [4.0, 4.0, 1.0]
    assert res["ntk_fope"] == "built" or "floored frequency count" in res["ntk_fope"]
