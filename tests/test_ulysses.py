"""DeepSpeed-Ulysses on CPU: Ulysses=2 equals one rank (per-token loss, logits, gradients)."""

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import layout_config

SEQ, VOCAB = 32, 258
CASES = [("fope", ()), ("rope", ()), ("fope", ("model.num_query_groups=2",))]


def _run(model, rank, size):
    from fope_megatron.parallel.sequence import shard_batch_for_ulysses

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels, pos = tokens.roll(-1, 1), torch.arange(SEQ)[None].expand(2, -1)
    tokens, labels, _, pos = shard_batch_for_ulysses(tokens, labels, rank, size, None, pos)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    loss = model(tokens, pos, None, labels=labels)
    (loss.sum() / (2 * SEQ)).backward()
    return logits, loss.detach()


def _gather_seq(t, group):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _ulysses_job(rank, world):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.model.ulysses_attention import UlyssesCoreAttention
    from fope_megatron.parallel import setup
    from fope_megatron.parallel.grads import all_reduce_grads

    out = []
    for kind, extra in CASES:
        setup.init_model_parallel()
        ref_model = build_gpt(layout_config(kind, SEQ, "fope.learnable=true", *extra))
        ref = _run(ref_model, 0, 1)
        ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
        setup.init_model_parallel(ulysses=2)
        group = setup.get_ulysses_group()
        model = build_gpt(layout_config(kind, SEQ, "fope.learnable=true", *extra, ulysses=2))
        attn = model.decoder.layers[0].self_attention
        logits, loss = _run(model, setup.get_ulysses_rank(), 2)
        local = {n: p.grad.clone() for n, p in model.named_parameters()}
        all_reduce_grads(model, group)
        out.append(
            dict(
                wrapped=isinstance(attn.core_attention, UlyssesCoreAttention),
                shard=attn.sequence_shard,
                sample_rank=setup.sample_parallel_rank_and_size(),
                local_len=loss.shape[1],
                logits=(_gather_seq(logits, group) - ref[0]).abs().max().item(),
                loss=(_gather_seq(loss, group) - ref[1]).abs().max().item(),
                grads=max(
                    (p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()
                ),
                local_grads=max((local[n] - ref_grads[n]).abs().max().item() for n in local),
            )
        )
    return out


@pytest.mark.slow
def test_ulysses2_equals_single_rank():
    results = run_distributed(_ulysses_job, 2)
    for rank, rank_res in enumerate(results):
        for case, r in zip(CASES, rank_res, strict=True):
            assert r["wrapped"] and r["shard"] == (rank, 2), (case, r)
            assert r["sample_rank"] == (0, 1) and r["local_len"] == SEQ // 2, (case, r)
            assert r["logits"] < 1e-5, (case, r)
            assert r["loss"] < 1e-5, (case, r)
            assert r["grads"] < 1e-5, (case, r)
            assert r["local_grads"] > 1e-4, (case, r)
