"""Checkpoint resharding: a (perturbed, i.e. "trained") TP=2 model saved as a full state dict loads
at TP=1 and back at TP=2 with the same logits; FoPE coefficients, fused QKV, SwiGLU fc1 (stride 2),
vocab-parallel embedding/output layer and biases included."""

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import layout_config

SEQ, VOCAB = 32, 258
CASES = [
    (
        "fope",
        ("model.num_query_groups=2", "model.add_bias_linear=true", "model.untie_embeddings=true"),
    ),
    ("rope", ("model.swiglu=false",)),
]


def _logits(model):
    from fope_megatron.parallel.comm import gather_vocab_logits

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    with torch.no_grad():
        return gather_vocab_logits(model.eval()(tokens, torch.arange(SEQ)[None], None))


def _perturb(model, tp_rank):
    """Move every weight and buffer away from its init: TP shards differently on each rank,
    replicated tensors (norms, row-parallel biases) identically."""
    with torch.no_grad():
        for i, t in enumerate(model.state_dict(keep_vars=True).values()):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                sharded = getattr(t, "tensor_model_parallel", False)
                g = torch.Generator().manual_seed(1000 * i + (tp_rank if sharded else 0))
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def _reshard_job(rank, world, tmpdir):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fope_megatron.checkpoint.reshard import (
        full_state_dict,
        load_full_checkpoint,
        save_full_checkpoint,
    )
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    out = []
    for i, (kind, extra) in enumerate(CASES):
        path1, path2 = f"{tmpdir}/tp2-{i}.pt", f"{tmpdir}/tp1-{i}.pt"
        init_model_parallel(tp=2)
        tp2 = build_gpt(layout_config(kind, SEQ, *extra, tp=2))
        _perturb(tp2, ps.get_tensor_model_parallel_rank())
        state2 = {k: v.clone() for k, v in tp2.state_dict().items() if v is not None}
        logits2 = _logits(tp2)
        save_full_checkpoint(tp2, path1)
        dist.barrier()

        init_model_parallel(tp=1)
        tp1 = build_gpt(layout_config(kind, SEQ, *extra))
        fresh = (_logits(tp1) - logits2).abs().max().item()
        load_full_checkpoint(tp1, path1)
        logits1 = _logits(tp1)
        full1 = full_state_dict(tp1)
        if rank == 0:
            save_full_checkpoint(tp1, path2)
        dist.barrier()

        init_model_parallel(tp=2)
        back = build_gpt(layout_config(kind, SEQ, *extra, tp=2))
        load_full_checkpoint(back, path2)
        logits_back = _logits(back)
        same_state = all(
            torch.equal(v, state2[k]) for k, v in back.state_dict().items() if v is not None
        )
        coef = "decoder.layers.1.self_attention.fope.coef_cos"
        out.append(
            dict(
                fresh=fresh,
                tp1=(logits1 - logits2).abs().max().item(),
                back=(logits_back - logits2).abs().max().item(),
                same_state=same_state,
                coef_full_shape=tuple(full1[coef].shape) if kind == "fope" else None,
                coef_local_shape=tuple(state2[coef].shape) if kind == "fope" else None,
                qkv_full_rows=full1["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0],
            )
        )
    return out


@pytest.mark.slow
def test_reshard_tp2_tp1_tp2(tmp_path):
    results = run_distributed(_reshard_job, 2, str(tmp_path))
    for rank_res in results:
        for case, r in zip(CASES, rank_res, strict=True):
            assert r["fresh"] > 1e-3, (case, r)  # loading really changed the TP=1 model
            assert r["tp1"] < 1e-5, (case, r)
            assert r["back"] < 1e-5, (case, r)
            assert r["same_state"], (case, r)
            # MHA: q, k, v of 4 heads; GQA: 4 query heads + k, v of 2 groups (head dim 16).
            assert r["qkv_full_rows"] == (3 * 64 if case[0] == "rope" else 64 + 2 * 2 * 16)
        fope = rank_res[0]
        assert fope["coef_full_shape"] == (1, 2, 3, 3) and fope["coef_local_shape"] == (1, 1, 3, 3)
