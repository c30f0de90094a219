"""The MFU FLOP count against Megatron-LM's ``num_floating_point_operations``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fope_megatron.config import load_config
from fope_megatron.model.vocab import padded_vocab_size
from fope_megatron.train.metrics import MetricsLogger, flops_per_token, peak_tflops_for

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def megatron_lm_flops(args, batch_size: int) -> float:
    """Megatron-LM ``megatron/training/training.py::num_floating_point_operations``,
    ``transformer_flops`` branch, transcribed for a dense GPT (no MoE, MLA, MTP or linear
    attention; ``attention_output_gate`` off)."""
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    num_dense_layers = args.num_layers
    forward_backward_expansion_factor = 3
    fma_expansion_factor = 2
    ffn_expansion_factor = 3 if args.swiglu else 2
    query_projection_size = args.kv_channels * args.num_attention_heads
    key_projection_size = args.kv_channels * args.num_query_groups
    value_projection_size = args.kv_channels * args.num_query_groups
    standard_self_attn_term = (
        forward_backward_expansion_factor
        * fma_expansion_factor
        * (
            args.hidden_size * (query_projection_size + key_projection_size + value_projection_size)
            + query_projection_size * args.seq_length / 2 * 2
            + query_projection_size * args.hidden_size
        )
    )
    self_attn_term = standard_self_attn_term * args.num_layers
    return (
        batch_size
        * args.seq_length
        * (
            forward_backward_expansion_factor
            * fma_expansion_factor
            * args.hidden_size
            * (args.ffn_hidden_size * ffn_expansion_factor) * num_dense_layers
            + self_attn_term
            + forward_backward_expansion_factor
            * fma_expansion_factor
            * args.hidden_size
            * args.padded_vocab_size
        )
    )  # fmt: skip


def megatron_args(cfg) -> SimpleNamespace:
    """Megatron-LM's argument names for ``cfg``'s model, as its arguments.py fills them in."""
    m = cfg.model
    return SimpleNamespace(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        group_query_attention=m.num_query_groups is not None,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        swiglu=m.swiglu,
        seq_length=cfg.train.seq_length,
        padded_vocab_size=padded_vocab_size(cfg),
    )


@pytest.mark.parametrize(
    "name", ["smoke.yaml", "fope_180m.yaml", "llama_1b_fope.yaml", "llama_7b_rope.yaml"]
)
def test_flops_per_token_matches_megatron_lm(name):
    cfg = load_config(CONFIGS / name)
    batch = 3
    expected = megatron_lm_flops(megatron_args(cfg), batch) / (batch * cfg.train.seq_length)
    assert flops_per_token(cfg) == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_is_not_6n_with_embeddings_and_full_attention():
    """The old count (6N with the embedding, 12*L*h*s) over-reports the 1B Llama: with tied
    embeddings its 6N term equals ours (the embedding stands in for the output layer), and the
    non-causal attention term is twice the causal one."""
    cfg = load_config(CONFIGS / "llama_1b_fope.yaml")
    m, s = cfg.model, cfg.train.seq_length
    h, kv = m.hidden_size, m.num_query_groups * m.hidden_size // m.num_attention_heads
    params = padded_vocab_size(cfg) * h + m.num_layers * (2 * h * h + 2 * h * kv + 3 * h * 8192)
    old = 6.0 * params + 12.0 * m.num_layers * h * s
    assert old - flops_per_token(cfg) == 6.0 * m.num_layers * h * s
    # no-GQA and GeLU variants change the count as Megatron-LM's does
    for override in (["model.num_query_groups=null"], ["model.swiglu=false"]):
        other = load_config(CONFIGS / "llama_1b_fope.yaml", override)
        ref = megatron_lm_flops(megatron_args(other), 1) / s
        assert flops_per_token(other) == pytest.approx(ref, rel=1e-12)


def test_peak_table_and_per_gpu_mfu(tmp_path):
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some Future GPU") is None
    metrics = MetricsLogger(tmp_path, 0, 1, 0, tensorboard=False, progress=False)
    metrics.peak = 1000.0
    record = {"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 8e3,
              "world_size": 4}  # fmt: skip
    metrics.train_step(record, 1e9, console=False)
    assert record["tflops"] == pytest.approx(2.0)  # 8e12 FLOP/s over 4 GPUs
    assert record["mfu"] == pytest.approx(0.002)
    metrics.close()
