"""GPU-only checks of the transformer-engine path (marked ``gpu``; skipped without CUDA / TE).

- TE layer spec with FoPE: TE modules in use, same logits as the local (SDPA, torch norm) spec
  with the same weights, in fp32.
- CP=2 through transformer-engine's context-parallel attention (needs 2 GPUs, NCCL, bf16: TE's
  CP runs only in its flash / fused backends), equal to CP=1 to bf16 precision.
"""

import pytest
import torch

from fope_megatron.testing.distributed import free_port, run_distributed
from fope_megatron.testing.models import layout_config

SEQ, VOCAB = 64, 258


def _te_usable() -> bool:
    from fope_megatron.model.spec import transformer_engine_usable

    return transformer_engine_usable()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _te_usable(), reason="needs transformer-engine"
    ),
]


def _config(kind, precision, cp=1):
    """The tiny model at hidden 128 with GQA (2 groups), FoPE's floor at ``SEQ``."""
    return layout_config(
        kind,
        SEQ,
        "model.hidden_size=128",
        "model.num_query_groups=2",
        # Larger weights than the default 0.02 so attention is far from uniform and a wrong
        # position would show in the logits.
        "model.init_method_std=0.2",
        f"train.precision={precision}",
        f"fope.train_seq_len={SEQ}",
        cp=cp,
    )


def _tokens(device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return tokens.to(device), tokens.roll(-1, 1).to(device), torch.arange(SEQ, device=device)[None]


def _te_to_local_key(key: str) -> str:
    """TE fuses the pre-attention / pre-MLP norms into the following linear."""
    return key.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.").replace(
        "mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."
    )


def _te_vs_local_job(rank, world):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.set_device(0)
    init_model_parallel()
    tokens, labels, pos = _tokens("cuda")
    out = {}
    for kind in ("fope", "rope", "none"):
        cfg = _config(kind, "fp32")
        te = build_gpt(cfg)
        local = build_gpt(cfg, use_transformer_engine=False)
        state = {
            _te_to_local_key(k): v
            for k, v in te.state_dict().items()
            if not k.endswith("_extra_state")
        }
        missing, unexpected = local.load_state_dict(state, strict=False)
        attn = te.decoder.layers[0].self_attention
        loss = te(tokens, pos, None, labels=labels)
        loss.mean().backward()
        with torch.no_grad():
            out[kind] = dict(
                te_logits=te(tokens, pos, None).float().cpu(),
                local_logits=local(tokens, pos, None).float().cpu(),
                core=type(attn.core_attention).__name__,
                qkv=type(attn.linear_qkv).__name__,
                missing=[k for k in missing if not k.endswith("_extra_state")],
                unexpected=list(unexpected),
                loss=loss.mean().item(),
                qkv_grad=attn.linear_qkv.weight.grad.abs().sum().item(),
                coef_device=str(attn.fope.coef_cos.device) if kind == "fope" else None,
                coef_dtype=str(attn.fope.coef_cos.dtype) if kind == "fope" else None,
            )
    return out


def test_transformer_engine_spec_with_fope_matches_local_spec():
    res = run_distributed(_te_vs_local_job, 1)[0]
    for kind, r in res.items():
        assert r["core"] == "TEDotProductAttention", r["core"]
        assert r["qkv"] == "TELayerNormColumnParallelLinear", r["qkv"]
        assert not r["missing"] and not r["unexpected"], (kind, r["missing"], r["unexpected"])
        assert torch.isfinite(torch.tensor(r["loss"])) and r["qkv_grad"] > 0, kind
        diff = (r["te_logits"] - r["local_logits"]).abs().max().item()
        assert diff < 2e-3, (kind, diff)
    fope = res["fope"]
    assert fope["coef_device"].startswith("cuda") and fope["coef_dtype"] == "torch.float32"
    # Sensitivity: the position encoding moves the logits far more than the TE/local tolerance.
    moved = (fope["te_logits"] - res["none"]["te_logits"]).abs().max().item()
    assert moved > 50 * 2e-3, moved


def _te_cp_job(rank, world, port):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.sequence import cp_unshard, shard_batch_for_cp
    from fope_megatron.parallel.setup import init_model_parallel

    # run_distributed starts gloo; TE's CP attention needs NCCL on one GPU per rank.
    dist.destroy_process_group()
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out = {}
    for kind in ("fope", "rope"):
        tokens, labels, pos = _tokens("cuda")
        init_model_parallel(cp=1)
        ref = build_gpt(_config(kind, "bf16", cp=1))
        with torch.no_grad():
            ref_loss = ref(tokens, pos.expand(2, -1), None, labels=labels).float()
        state = ref.state_dict()
        init_model_parallel(cp=2)
        model = build_gpt(_config(kind, "bf16", cp=2))
        model.load_state_dict(state)
        cp_rank = ps.get_context_parallel_rank()
        t, lab, _, p = shard_batch_for_cp(tokens, labels, cp_rank, 2, None, pos.expand(2, -1))
        loss = model(t, p, None, labels=lab)
        loss.mean().backward()
        parts = [torch.empty_like(loss) for _ in range(2)]
        dist.all_gather(parts, loss.detach().contiguous(), group=ps.get_context_parallel_group())
        full = cp_unshard(parts, dim=1).float()
        out[kind] = dict(
            core=type(model.decoder.layers[0].self_attention.core_attention).__name__,
            max_diff=(full - ref_loss).abs().max().item(),
            mean_diff=(full - ref_loss).abs().mean().item(),
            grad=model.decoder.layers[0].self_attention.linear_qkv.weight.grad.abs().sum().item(),
        )
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="CP=2 through TE needs 2 GPUs")
def test_cp2_through_transformer_engine_equals_cp1():
    results = run_distributed(_te_cp_job, 2, free_port())
    for res in results:
        for kind, r in res.items():
            assert r["core"] == "TEDotProductAttention", (kind, r)
            # bf16 activations: per-token losses agree to bf16 rounding, not to 1e-5.
            assert r["mean_diff"] < 1e-2 and r["max_diff"] < 5e-2, (kind, r)
            assert r["grad"] > 0, (kind, r)
