"""fope-plan: its parameter count equals the built model's, its memory arithmetic, its verdicts.

Models are built in one spawned 2-rank gloo process: small configs for real on the CPU, large ones
on the meta device (megatron-core's CPU initialisation runs as no-ops on meta tensors). The FoPE
module alone is built on the CPU inside the meta context: it reads ``D_in`` off a tensor and draws
its coefficients from a CPU generator, neither of which a meta tensor allows (its tensors are tiny).
The second rank checks the per-rank count at tp=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fope_megatron.config import ConfigError, load_config
from fope_megatron.plan import (
    GIB,
    Layout,
    activation_bytes,
    count_parameters,
    estimate,
    header_layout,
    main,
    plan,
)
from fope_megatron.testing.distributed import run_distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TP1 = ["parallel.tp=1", "parallel.sp=false"]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4"]

# (name, config file, overrides, device) built at tp=1; every branch of count_parameters is hit.
BUILDS = [
    ("smoke", "smoke.yaml", [], "cpu"),
    ("fope_60m", "fope_60m.yaml", [], "cpu"),
    ("rope_60m_2layers", "rope_60m.yaml", ["model.num_layers=2"], "cpu"),
    ("learnable_gqa", None, [*TINY, "model.num_query_groups=2", "fope.learnable=true"], "cpu"),
    (
        "layernorm_bias_gelu_untied",
        None,
        [*TINY, "model.normalization=LayerNorm", "model.add_bias_linear=true"]
        + ["model.swiglu=false", "model.untie_embeddings=true", "model.position_embedding=none"],
        "cpu",
    ),
    ("fope_180m", "fope_180m.yaml", [], "meta"),
    ("fope_1b2", "fope_1b2.yaml", [], "meta"),
    ("rope_1b2", "rope_1b2.yaml", [], "meta"),
    ("llama_1b_fope", "llama_1b_fope.yaml", TP1, "meta"),
    ("llama_3b_fope", "llama_3b_fope.yaml", TP1, "meta"),
    ("llama_7b_fope", "llama_7b_fope.yaml", TP1, "meta"),
    ("llama_7b_rope", "llama_7b_rope.yaml", TP1, "meta"),
]
# built at tp=2 (meta): per-rank counts
BUILDS_TP2 = [
    ("llama_7b_fope", "llama_7b_fope.yaml", []),
    ("smoke_bias_tp2", "smoke.yaml", ["parallel.tp=2", "model.add_bias_linear=true"]),
]


def _cfg(file, overrides):
    return load_config(None if file is None else CONFIGS / file, overrides)


def _counts(model) -> tuple[int, int]:
    """(parameters, FoPE coefficient buffers) of a built model."""
    params = sum(p.numel() for p in model.parameters())
    coef = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("coef_cos", "coef_sin")))
    return params, coef


def _build_all(rank, world):
    from fope_megatron.fope import FourierPositionEmbedding
    from fope_megatron.model import attention
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    class CpuFoPE(FourierPositionEmbedding):
        def __init__(self, *args, **kwargs):
            with torch.device("cpu"):
                super().__init__(*args, **kwargs)

    attention.FourierPositionEmbedding = CpuFoPE  # this spawned process only
    out = {}
    init_model_parallel(tp=1)
    for name, file, overrides, device in BUILDS:
        if device == "cpu" and rank != 0:
            continue
        with torch.device(device):
            model = build_gpt(_cfg(file, overrides))
        out[(name, 1)] = _counts(model)
        out[(name, "device")] = str(next(model.parameters()).device)
        del model
    init_model_parallel(tp=2)
    for name, file, overrides in BUILDS_TP2:
        with torch.device("meta"):
            out[(name, 2)] = _counts(build_gpt(_cfg(file, overrides)))
    return out


@pytest.fixture(scope="module")
def built():
    return run_distributed(_build_all, 2)


@pytest.mark.slow
def test_parameter_count_equals_built_model(built):
    rank0 = built[0]
    for name, file, overrides, device in BUILDS:
        count = count_parameters(_cfg(file, overrides), tp=1)
        params, coef = rank0[(name, 1)]
        assert rank0[(name, "device")] == device, name
        assert count.total == params, (name, count.total, params)
        if count.fope_learnable:  # coefficients are parameters, in the total
            assert coef == 0 and count.fope_coefficients > 0
        else:
            assert count.fope_coefficients == coef, (name, count.fope_coefficients, coef)
    # the configs' famous sizes (exact values from the built models above)
    assert rank0[("llama_1b_fope", 1)][0] == 1_235_814_400  # Llama-3.2-1B
    assert rank0[("llama_7b_rope", 1)][0] == 8_030_261_248  # Llama-3-8B


@pytest.mark.slow
def test_parameter_count_per_tp_rank(built):
    for name, file, overrides in BUILDS_TP2:
        count = count_parameters(_cfg(file, overrides), tp=2)
        for rank_out in built:
            assert rank_out[(name, 2)] == (count.total, count.fope_coefficients), name


def test_embedding_split():
    count = count_parameters(_cfg("fope_60m.yaml", []))
    assert count.embeddings == 2 * 50304 * 512  # padded vocab, untied
    assert count.non_embedding == count.total - count.embeddings
    tied = count_parameters(_cfg("llama_1b_fope.yaml", []))
    assert tied.output_layer == 0 and tied.embeddings == 128256 * 2048


def test_plan_json_has_the_keys(capsys):
    rc = main(
        ["--config", str(CONFIGS / "fope_60m.yaml"), "--nodes", "1", "--gpus-per-node", "8"]
        + ["--gpu-memory-gb", "80", "--json", "train.micro_batch_size=32"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ("config", "overrides", "layout", "params", "memory_bytes", "memory_gib"):
        assert key in out
    for key in ("tokens_per_step", "tokens_per_micro_batch", "fits", "dominant", "reason"):
        assert key in out
    assert set(out["params"]) >= {"total", "embedding", "non_embedding", "fope_coefficients"}
    memory = {"weights", "gradients", "optimizer", "activations", "logits", "total", "capacity"}
    assert set(out["memory_gib"]) >= memory
    assert out["layout"]["world"] == 8 and out["layout"]["micro_batch_size"] == 32
    assert out["tokens_per_step"] == 1024 * 512 and out["fits"] is True
    assert out["params"]["fope_d_in"] == 16 and out["params"]["fope_d_out"] == 16


def test_human_table_and_layout_from_header(capsys):
    assert header_layout(CONFIGS / "llama_7b_fope.yaml") == dict(
        nodes=2, gpus_per_node=8, gpu_memory_gb=80.0
    )
    assert main(["--config", str(CONFIGS / "llama_7b_fope.yaml")]) == 0
    text = capsys.readouterr().out
    assert "2 node(s) x 8 GPU(s) = 16" in text and "FITS" in text and "FoPE coeffs" in text


@pytest.mark.parametrize("cp", [1, 2])
def test_zero_stages_divide_by_the_zero_group(cp):
    path = CONFIGS / "llama_1b_fope.yaml"
    layout = Layout(nodes=2, gpus_per_node=8, gpu_memory_gb=80)
    mem = {
        stage: estimate(
            load_config(path, [f"deepspeed.zero_stage={stage}", f"parallel.cp={cp}"]), layout
        )
        for stage in (0, 1, 2, 3)
    }
    dp = 16 // cp  # world / (tp * cp * ulysses)
    shards = dp * cp  # ZeRO partitions over every rank holding the same TP shard: dp * cp
    assert mem[0].layout["dp"] == dp and mem[0].layout["zero_shards"] == shards
    count = count_parameters(load_config(path, []))
    n = count.total
    zero0 = mem[0].memory_bytes
    assert zero0["optimizer"] == 12 * n and zero0["gradients"] == zero0["weights"] == 2 * n
    assert mem[3].memory_bytes["optimizer"] == pytest.approx(zero0["optimizer"] / shards)
    assert mem[1].memory_bytes["optimizer"] == pytest.approx(zero0["optimizer"] / shards)
    assert mem[1].memory_bytes["gradients"] == zero0["gradients"]
    assert mem[2].memory_bytes["gradients"] == pytest.approx(zero0["gradients"] / shards)
    assert mem[2].memory_bytes["weights"] == zero0["weights"]
    gathered = 2 * 2 * count.largest_module  # two modules' full bf16 weights (the embedding)
    assert count.largest_module == count.embedding
    assert mem[3].memory_bytes["weights"] == pytest.approx(zero0["weights"] / shards + gathered)


def _mha_gelu(s: int, b: int, h: int, a: int, layers: int) -> list[str]:
    """Korthikanti et al.'s model: MHA, GeLU MLP of 4h, dropout on, no position tables."""
    return [
        f"model.num_layers={layers}",
        f"model.hidden_size={h}",
        f"model.num_attention_heads={a}",
        f"model.ffn_hidden_size={4 * h}",
        "model.swiglu=false",
        "model.position_embedding=none",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        f"train.seq_length={s}",
        f"train.micro_batch_size={b}",
    ]


def test_activation_formula_reduces_to_korthikanti():
    """MHA, GeLU MLP of 4h, dropout on, no flash: s*b*h*(34 + 5as/h) per layer, tp with sp
    divides all of it, tp without sp gives s*b*h*(10 + 24/t + 5as/(ht))."""
    s, b, h, a, layers = 256, 2, 128, 4, 3
    base = _mha_gelu(s, b, h, a, layers)
    for tp, sp, factor in [
        (1, False, 34 + 5 * a * s / h),
        (2, True, (34 + 5 * a * s / h) / 2),
        (2, False, 10 + 24 / 2 + 5 * a * s / (h * 2)),
    ]:
        cfg = load_config(None, [*base, f"parallel.tp={tp}", f"parallel.sp={sp}"])
        dims = cfg.validate(tp)
        act = activation_bytes(cfg, dims, count_parameters(cfg, tp), flash=False)["activations"]
        assert act == pytest.approx(layers * s * b * h * factor), (tp, sp)
    flash = activation_bytes(cfg, dims, count_parameters(cfg, 2), flash=True)["activations"]
    assert flash == pytest.approx(layers * s * b * h * (10 + 24 / 2))


def test_7b_on_one_16gb_gpu_does_not_fit(capsys):
    layout = Layout(nodes=1, gpus_per_node=1, gpu_memory_gb=16)
    result = plan(CONFIGS / "llama_7b_fope.yaml", layout, TP1)
    assert not result.fits
    assert result.dominant == "optimizer"  # 12 bytes x 8.03B parameters, unsharded on one rank
    assert result.memory_bytes["optimizer"] == 12 * 8_030_261_248
    assert "optimizer" in result.reason and "16 GiB" in result.reason
    assert result.suggestions and "offload" in result.suggestions[0]
    argv = ["--config", str(CONFIGS / "llama_7b_fope.yaml"), "--nodes", "1"]
    argv += ["--gpus-per-node", "1", "--gpu-memory-gb", "16", *TP1]
    assert main(argv) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_suggestion_fixes_activation_bound_plan():
    layout = Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=40)
    result = plan(CONFIGS / "llama_7b_fope.yaml", layout)
    assert not result.fits and result.dominant == "activations"
    assert "parallel.tp=4" in result.reason  # the first suggestion that fits
    assert result.memory_bytes["total"] > 40 * GIB


def test_impossible_layout_gives_the_config_error(capsys):
    with pytest.raises(ConfigError, match="world_size=3 is not divisible"):
        plan(CONFIGS / "llama_7b_fope.yaml", Layout(nodes=1, gpus_per_node=3, gpu_memory_gb=80))
    with pytest.raises(ConfigError, match="global_batch_size=1024 must be divisible"):
        plan(CONFIGS / "fope_60m.yaml", Layout(nodes=3, gpus_per_node=1, gpu_memory_gb=80))
    argv = ["--config", str(CONFIGS / "llama_7b_fope.yaml"), "--nodes", "1", "--gpus-per-node"]
    offload = ["deepspeed.zero_stage=3", "deepspeed.offload=true"]
    assert main([*argv, "8", "--gpu-memory-gb", "80", *offload]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "deepspeed.offload=true with parallel.tp=2" in err


def test_zero3_with_tp_partitions_each_tp_shard_over_its_data_parallel_group():
    layout = Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=80)
    path = CONFIGS / "llama_7b_fope.yaml"
    z1, z3 = (plan(path, layout, ["parallel.tp=2", f"deepspeed.zero_stage={s}"]) for s in (1, 3))
    assert z3.layout["zero_shards"] == 4  # 8 GPUs / tp 2
    # ZeRO-3 keeps 1/4 of the TP shard's weights (plus the gathered layers), ZeRO-1 all of it
    assert z3.memory_bytes["weights"] < z1.memory_bytes["weights"] / 2
    assert z3.memory_bytes["optimizer"] == pytest.approx(z1.memory_bytes["optimizer"])


def test_recompute_in_the_activation_formula():
    """Korthikanti's MHA/GeLU case (per layer s*b*h*(34 + 5as/h) without flash): selective keeps
    s*b*h*34; full keeps each chunk's bf16 input 2sbh plus one chunk's layers in backward."""
    s, b, h, a, layers = 256, 2, 128, 4, 4
    base = _mha_gelu(s, b, h, a, layers)
    layer, kept = s * b * h * (34 + 5 * a * s / h), 2 * s * b * h
    full = ["train.recompute=full"]
    block = [*full, "train.recompute_method=block"]
    for extra, flash, tp, expected in [
        ([], False, 1, layers * layer),
        (["train.recompute=selective"], False, 1, layers * s * b * h * 34),
        (["train.recompute=selective"], True, 1, layers * s * b * h * 34),  # flash: = none
        ([], True, 1, layers * s * b * h * 34),
        (full, False, 1, layers * kept + layer),  # uniform, one layer per chunk
        ([*full, "train.recompute_num_layers=2"], False, 1, 2 * kept + 2 * layer),
        ([*full, "train.recompute_num_layers=4"], False, 1, kept + 4 * layer),
        ([*block, "train.recompute_num_layers=1"], False, 1, kept + 3 * layer),
        (block, False, 1, layers * kept + layer),  # block default: all layers
        (full, False, 2, (layers * kept + layer) / 2),  # tp=2 with sp divides everything
    ]:
        sp = [f"parallel.tp={tp}", f"parallel.sp={tp > 1}"]
        cfg = load_config(None, [*base, *sp, *extra])
        dims = cfg.validate(tp)
        mem = activation_bytes(cfg, dims, count_parameters(cfg, tp), flash=flash)
        assert mem["activations"] == pytest.approx(expected), (extra, flash, tp)
        plain = load_config(None, [*base, *sp])
        logits = activation_bytes(plain, dims, count_parameters(plain, tp), flash)["logits"]
        assert mem["logits"] == logits  # recompute leaves the head alone


def test_full_recompute_keeps_one_layer_of_fope_tables():
    """FoPE/RoPE tables are made inside the layer: under full recompute only the layer being
    recomputed holds them, like the rest of its activations."""
    cfg = load_config(None, [*TINY, "train.seq_length=128"])
    dims = cfg.validate(1)
    count = count_parameters(cfg)
    none = activation_bytes(cfg, dims, count)["activations"]
    full_cfg = load_config(None, [*TINY, "train.seq_length=128", "train.recompute=full"])
    full = activation_bytes(full_cfg, dims, count)["activations"]
    kept = 2 * 128 * cfg.train.micro_batch_size * 64
    assert full == pytest.approx(2 * kept + none / 2)


def test_plan_suggests_recompute_only_where_it_fits():
    path = CONFIGS / "llama_7b_fope.yaml"  # 32 layers, s 4096, b 2, 32 heads, tp 2 with sp
    scores = 32 * 4096 * 2 * (32 * 4096 * 2) / 2  # L * s*b * a*s*2 / tp: the score matrices
    math = Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=60, flash_attention=False)
    none = estimate(load_config(path, []), math)
    selective = estimate(load_config(path, ["train.recompute=selective"]), math)
    assert none.memory_bytes["total"] - selective.memory_bytes["total"] == scores  # 32 GiB
    assert not none.fits and selective.fits and none.dominant == "activations"
    result = plan(path, math)
    want = f"(train.recompute=selective): {selective.memory_bytes['total'] / GIB:.1f} GiB, fits"
    assert result.suggestions[0].endswith(want) and want in result.reason  # cheap one first
    # with flash attention there is no score matrix: selective would change nothing
    flash = Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=40)
    full = estimate(load_config(path, ["train.recompute=full"]), flash)
    result = plan(path, flash)
    assert not any("selective" in s for s in result.suggestions)
    want = f"(train.recompute=full): {full.memory_bytes['total'] / GIB:.1f} GiB, fits"
    assert any(s.endswith(want) for s in result.suggestions), result.suggestions
    # 32 bf16 layer inputs [s/tp, b, h] + one layer instead of 32 layers
    layer = estimate(load_config(path, []), flash).memory_bytes["activations"] / 32
    kept = 2 * 4096 * 2 * 4096 / 2
    assert full.memory_bytes["activations"] == pytest.approx(32 * kept + layer)
    # not suggested where it does not fit, nor when already on
    small = Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=20)
    assert not any("recompute" in s for s in plan(path, small).suggestions)
    on = plan(path, Layout(nodes=1, gpus_per_node=8, gpu_memory_gb=30), ["train.recompute=full"])
    assert not on.fits and not any("recompute" in s for s in on.suggestions)
    assert "full recompute" in on.assumptions[1]


def test_position_tables_depend_on_fusion():
    """position.fusion=torch keeps two float32 tables [s, G, d_r] per layer (selective recompute
    swaps them for the bf16 q, k inputs of the checkpointed apply); the fused kernel keeps none."""
    base = [*TINY, "train.seq_length=128"]
    torch_cfg = load_config(None, [*base, "position.fusion=torch"])
    dims = torch_cfg.validate(1)
    count = count_parameters(torch_cfg)
    m = torch_cfg.model
    d = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    tables = m.num_layers * 2 * 128 * groups * d * 4
    fused = activation_bytes(load_config(None, base), dims, count)["activations"]
    plain = activation_bytes(torch_cfg, dims, count)["activations"]
    assert plain - fused == tables
    sel = load_config(None, [*base, "position.fusion=torch", "train.recompute=selective"])
    sel_fused = load_config(None, [*base, "train.recompute=selective"])
    qk = m.num_layers * 128 * torch_cfg.train.micro_batch_size * 2 * (m.hidden_size + groups * d)
    diff = activation_bytes(sel, dims, count)["activations"]
    assert diff - activation_bytes(sel_fused, dims, count)["activations"] == qk
