"""Combined layouts on 4 CPU ranks: TP=2 x CP=2 and TP=2 x Ulysses=2, both with megatron
sequence parallelism, equal to one rank (per-token loss, logits, every gradient).

Proves the groups are orthogonal (Ulysses inside megatron's data-parallel group, CP beside TP)
and that SP's gather and CP's / Ulysses' positions compose (~20 s on 2 cores).
"""

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import layout_config, random_batch

SEQ, VOCAB = 32, 258


LEARNABLE = "fope.learnable=true"


def _batch():
    return random_batch(SEQ, VOCAB)


def _step(model, tokens, labels, pos):
    from fope_megatron.parallel.comm import gather_vocab_logits

    with torch.no_grad():
        logits = gather_vocab_logits(model(tokens, pos, None))
    loss = model(tokens, pos, None, labels=labels)
    (loss.sum() / (2 * SEQ)).backward()
    return logits, loss.detach()


def _all_gather(t, group):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _combo_job(rank, world):
    from megatron.core import parallel_state as ps

    from fope_megatron.checkpoint.reshard import full_grads
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel import setup
    from fope_megatron.parallel.grads import all_reduce_grads, finalize_sp_grads
    from fope_megatron.parallel.sequence import (
        cp_unshard,
        shard_batch_for_cp,
        shard_batch_for_ulysses,
    )

    setup.init_model_parallel()
    ref_model = build_gpt(layout_config("fope", SEQ, LEARNABLE))
    ref_logits, ref_loss = _step(ref_model, *_batch())
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    out = {}

    setup.init_model_parallel(tp=2, cp=2)
    model = build_gpt(layout_config("fope", SEQ, LEARNABLE, tp=2, sp=True, cp=2))
    group = ps.get_context_parallel_group()
    tokens, labels, pos = _batch()
    tokens, labels, _, pos = shard_batch_for_cp(
        tokens, labels, ps.get_context_parallel_rank(), 2, None, pos
    )
    logits, loss = _step(model, tokens, labels, pos)
    finalize_sp_grads(model)
    all_reduce_grads(model, group)
    grads = full_grads(model)
    out["tp2_cp2"] = dict(
        ranks=(ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()),
        logits=(cp_unshard(_all_gather(logits, group)) - ref_logits).abs().max().item(),
        loss=(cp_unshard(_all_gather(loss, group)) - ref_loss).abs().max().item(),
        grads=max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
    )

    setup.init_model_parallel(tp=2, ulysses=2)
    model = build_gpt(layout_config("fope", SEQ, LEARNABLE, tp=2, sp=True, ulysses=2))
    group, u = setup.get_ulysses_group(), setup.get_ulysses_rank()
    tokens, labels, pos = _batch()
    tokens, labels, _, pos = shard_batch_for_ulysses(tokens, labels, u, 2, None, pos)
    logits, loss = _step(model, tokens, labels, pos)
    finalize_sp_grads(model)
    all_reduce_grads(model, group)
    grads = full_grads(model)
    out["tp2_ulysses2"] = dict(
        ranks=(ps.get_tensor_model_parallel_rank(), u),
        tp_group=sorted(
            torch.distributed.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        ),
        ulysses_group=sorted(torch.distributed.get_process_group_ranks(group)),
        logits=(torch.cat(_all_gather(logits, group), 1) - ref_logits).abs().max().item(),
        loss=(torch.cat(_all_gather(loss, group), 1) - ref_loss).abs().max().item(),
        grads=max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
    )
    return out


@pytest.mark.slow
def test_tp2_cp2_and_tp2_ulysses2_with_sp_equal_one_rank():
    results = run_distributed(_combo_job, 4)
    for rank, res in enumerate(results):
        for layout, r in res.items():
            assert r["logits"] < 1e-5 and r["loss"] < 1e-5, (rank, layout, r)
            assert r["grads"] < 1e-5, (rank, layout, r)
        # megatron order tp-cp-dp: rank = tp_rank + 2 * (cp_rank or dp_rank).
        assert res["tp2_cp2"]["ranks"] == (rank % 2, rank // 2)
        assert res["tp2_ulysses2"]["ranks"] == (rank % 2, rank // 2)
        assert res["tp2_ulysses2"]["tp_group"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert res["tp2_ulysses2"]["ulysses_group"] == [rank % 2, rank % 2 + 2]
