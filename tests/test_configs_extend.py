"""The paper's context-extension protocol configs (train at 512, extend to 1024) load, validate
and give the coefficient shapes their comments promise."""

from pathlib import Path

import pytest
import torch

from fope_megatron.config import load_config
from fope_megatron.fope import FourierPositionEmbedding
from fope_megatron.model.builder import position_frequencies

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fope_shape(cfg):
    f = position_frequencies(cfg)
    m = FourierPositionEmbedding(
        cfg.to_fope_config(), layers=[0], frequencies=None if f is None else torch.tensor(f)
    )
    return m.d_in, m.d_out


@pytest.mark.parametrize("path", sorted((CONFIGS / "extend").glob("*.yaml")), ids=lambda p: p.stem)
def test_extension_config_validates(path, tmp_path):
    cfg = load_config(path, [f"train.init_from={tmp_path}"])
    cfg.validate(8)
    assert cfg.train.seq_length == 1024
    source = load_config(CONFIGS / f"{path.stem.split('_')[0]}_60m.yaml", [])
    assert source.train.seq_length == 512
    assert cfg.model.position_embedding == source.model.position_embedding
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        assert getattr(cfg.model, key) == getattr(source.model, key)
    assert cfg.train.init_from == str(tmp_path)


def test_extension_coefficient_shapes(tmp_path):
    base = load_config(CONFIGS / "fope_60m.yaml", [])
    xfope = load_config(
        CONFIGS / "extend" / "fope_60m_xfope_1024.yaml", [f"train.init_from={tmp_path}"]
    )
    xyarn = load_config(
        CONFIGS / "extend" / "fope_60m_xyarn_1024.yaml", [f"train.init_from={tmp_path}"]
    )
    assert fope_shape(base) == (16, 16)
    assert fope_shape(xfope) == (18, 16) and xfope.fope.expand_on_extension
    assert fope_shape(xyarn) == (14, 14) and xyarn.fope.expand_on_extension
    assert xyarn.position.scaling == "yarn" and xyarn.position.factor == 2.0


def test_plan_applies_position_scaling(tmp_path):
    from fope_megatron.plan import fope_shape as plan_shape

    for name in ("fope_60m_xyarn_1024", "fope_60m_xfope_1024"):
        cfg = load_config(CONFIGS / "extend" / f"{name}.yaml", [f"train.init_from={tmp_path}"])
        planned = plan_shape(cfg)
        assert (planned.d_in, planned.d_out) == fope_shape(cfg)  # the model's own numbers
