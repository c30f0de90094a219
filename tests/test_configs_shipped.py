"""Every shipped config loads, validates for the layout it is meant for and fits it per fope-plan;
the small ones (< 100M parameters) build a megatron-core model whose size fope-plan predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fope_megatron.config import load_config
from fope_megatron.plan import Layout, count_parameters, estimate, header_layout
from fope_megatron.testing.distributed import run_distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
FOPE_WITH_TWIN = [p for p in SHIPPED if "fope" in p.stem]  # twin: "fope" -> "rope" in the name
SMALL = 100_000_000


def _world(path: Path) -> int:
    """The world size a config is meant for: its ``# fope-plan:`` line, else one rank."""
    layout = header_layout(path)
    return int(layout.get("nodes", 1) * layout.get("gpus_per_node", 1))


def _small() -> list[Path]:
    return [p for p in SHIPPED if count_parameters(load_config(p, [])).total < SMALL]


def test_the_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    for size in ("60m", "180m", "1b2"):
        assert {f"fope_{size}", f"rope_{size}"} <= names
    for size in ("1b", "3b", "7b"):
        assert {f"llama_{size}_fope", f"llama_{size}_rope"} <= names
    assert {p.stem for p in _small()} >= {"smoke", "fope_60m", "rope_60m"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_config_validates_for_its_world_size(path):
    cfg = load_config(path, [])
    dims = cfg.validate(_world(path))
    assert dims.world == _world(path)
    header = header_layout(path)
    if header:  # the recipes: fope-plan says the intended layout fits
        result = estimate(cfg, Layout(**header))
        assert result.fits, result.reason


@pytest.mark.parametrize("path", FOPE_WITH_TWIN, ids=lambda p: p.stem)
def test_twins_differ_only_in_the_position_embedding(path):
    stem = path.stem
    twin = load_config(CONFIGS / f"{stem.replace('fope', 'rope')}.yaml", []).to_dict()
    this = load_config(path, []).to_dict()
    assert this["model"].pop("position_embedding") == "fope"
    assert twin["model"].pop("position_embedding") == "rope"
    for section in this:
        if section not in ("fope", "run"):
            assert this[section] == twin[section], (stem, section)
    assert this["run"]["dir"] != twin["run"]["dir"]


def _build_small(rank, world, paths):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    init_model_parallel(tp=1)
    out = {}
    for path in paths:
        cfg = load_config(path, ["parallel.tp=1", "parallel.sp=false"])
        model = build_gpt(cfg).eval()
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 16))
        with torch.no_grad():
            logits = model(tokens, torch.arange(16)[None], None)
        out[path.stem] = (sum(p.numel() for p in model.parameters()), tuple(logits.shape))
        del model
    return out


@pytest.mark.slow
def test_small_configs_build_a_model():
    small = _small()
    built = run_distributed(_build_small, 1, small)[0]
    for path in small:
        cfg = load_config(path, [])
        params, shape = built[path.stem]
        assert params == count_parameters(cfg).total, path.stem
        assert shape[:2] == (1, 16) and shape[2] >= cfg.model.vocab_size
