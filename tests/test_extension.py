"""Context extension: YaRN / PI frequencies, x+FoPE coefficient growth, init_from."""

import math

import pytest
import torch

from fope_megatron.checkpoint.extension import adapt_fope_coefficients
from fope_megatron.config import ConfigError
from fope_megatron.fope import FoPEConfig, FourierPositionEmbedding
from fope_megatron.fope.scaling import scaled_frequencies, yarn_concentration


@pytest.mark.parametrize("dim, factor, original", [(64, 4.0, 128), (128, 8.0, 4096), (32, 2.0, 64)])
def test_yarn_frequencies_match_megatron(dim, factor, original):
    # megatron's YarnRotaryEmbedding cannot be built on CPU (it moves to CUDA in __init__), so
    # compose its own helpers exactly as its get_emb does.
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as y

    extra = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inter = 1.0 / (factor * 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = y._yarn_find_correction_range(32.0, 1.0, dim, 10000.0, original, True)
    mask = 1.0 - y._yarn_linear_ramp_mask(low, high, dim // 2, device="cpu").float()
    want = inter * (1 - mask) + extra * mask
    got = scaled_frequencies(dim, 10000.0, "yarn", factor, original, 32.0, 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, extra)  # something was scaled
    for mscale, all_dim in [(1.0, 0.0), (0.707, 0.707), (1.0, 1.0)]:
        assert yarn_concentration(factor, mscale, all_dim) == pytest.approx(
            y._yarn_get_concentration_factor(factor, mscale, all_dim), abs=1e-12
        )


def test_pi_divides_every_frequency():
    w = scaled_frequencies(64, 10000.0, "none", 1.0, 128)
    torch.testing.assert_close(scaled_frequencies(64, 10000.0, "pi", 4.0, 128), w / 4)


def test_yarn_then_floor_lowers_d_in():
    # YaRN with factor 4 turns low frequencies into w/4: more of them fall under the floor of L0
    cfg = FoPEConfig(head_dim=64, train_seq_len=128, num_attention_heads=4, num_layers=1)
    plain = FourierPositionEmbedding(cfg)
    yarn = FourierPositionEmbedding(cfg, frequencies=scaled_frequencies(64, 1e4, "yarn", 4.0, 128))
    assert yarn.d_in < plain.d_in


class Holder(torch.nn.Module):
    def __init__(self, fope):
        super().__init__()
        self.fope = fope


def fope_at(train_len, **kw):
    cfg = FoPEConfig(head_dim=64, train_seq_len=train_len, num_attention_heads=4,
                     num_query_groups=2, num_layers=3, sigma=0.4, **kw)  # fmt: skip
    return FourierPositionEmbedding(cfg, layers=[1])


def test_x_fope_expansion_keeps_old_block_and_inits_new_rows():
    old = fope_at(128)
    new = fope_at(1024)
    assert (old.d_in, old.d_out) == (11, 11) and (new.d_in, new.d_out) == (18, 16)
    trained = {"fope.coef_cos": old.coef_cos + 0.01, "fope.coef_sin": old.coef_sin - 0.02}
    out = adapt_fope_coefficients(trained, Holder(new), expand=True)
    for kind, init in (("cos", new.init_coefficients(1)[0]), ("sin", new.init_coefficients(1)[1])):
        t = out[f"fope.coef_{kind}"]
        assert t.shape == (1, 2, 18, 16)
        assert torch.equal(t[:, :, :11, :11], trained[f"fope.coef_{kind}"])  # old block exact
        assert torch.equal(t[0, :, 11:, :], init[:, 11:, :])  # new rows: spec init, new shape
        assert torch.equal(t[0, :, :11, 11:], init[:, :11, 11:])  # new columns too
    # without the switch a changed shape is an error naming both fixes
    with pytest.raises(ConfigError, match="expand_on_extension"):
        adapt_fope_coefficients(trained, Holder(new), expand=False)
    # shrinking keeps the leading block
    back = adapt_fope_coefficients(out, Holder(fope_at(128)), expand=True)
    assert torch.equal(back["fope.coef_cos"], trained["fope.coef_cos"])
    # same length: nothing changes
    same = adapt_fope_coefficients(trained, Holder(old), expand=True)
    assert torch.equal(same["fope.coef_cos"], trained["fope.coef_cos"])


def test_floor_growth_numbers():
    # D_in grows when L grows: 2*pi/L halves per doubling, log_theta spacing of w is 2/d_r
    d = [fope_at(L).d_in for L in (128, 256, 512, 1024)]
    assert d == sorted(d) and d[-1] > d[0]
    assert d[0] == 1 + math.floor(32 * math.log(128 / (2 * math.pi)) / math.log(1e4))
