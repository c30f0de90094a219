"""Context parallelism: positions / tables per CP rank (no process group), and CP=2 equals CP=1
at the model level on CPU (per-token loss, logits, gradients), plain and packed (THD)."""

import types

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import layout_config, random_batch

SEQ, VOCAB = 32, 258


# ----------------------------------------------------------------------------- unit: tables
def _attention_positions(local_len, cp_rank, cp_size, cu_seqlens=None):
    """PositionalSelfAttention.positions on a stand-in (the real method, no process groups)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from fope_megatron.model.attention import PositionalSelfAttention

    cp = types.SimpleNamespace(size=lambda: cp_size, rank=lambda: cp_rank)
    packed = None
    if cu_seqlens is not None:
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens
        )
    fake = types.SimpleNamespace(
        pg_collection=types.SimpleNamespace(cp=cp),
        _packed_seq_params=packed,
        sequence_shard=None,
    )
    return PositionalSelfAttention.positions(fake, local_len, None)


def _encoders():
    from fope_megatron.fope import FoPEConfig, FourierPositionEmbedding, RotaryEmbeddingTables

    cfg = FoPEConfig(
        head_dim=16,
        train_seq_len=64,
        num_attention_heads=4,
        num_layers=2,
        num_query_groups=2,
        sigma=0.5,
        floor_ratio=1.0,
    )
    return {"fope": FourierPositionEmbedding(cfg), "rope": RotaryEmbeddingTables(16)}


def close(a, b):
    # Same numbers up to float32 rounding of the einsum over a different number of rows.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_rank_tables_equal_global_tables(cp):
    from fope_megatron.parallel.sequence import cp_shard, shard_packed_for_cp

    total = 48 if cp == 2 else 64
    # Packed: three sequences, each a multiple of 2*cp (transformer-engine's THD+CP padding).
    lengths = [8 * cp // 2, 4 * cp, total - 8 * cp // 2 - 4 * cp]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed_global = torch.cat([torch.arange(n) for n in lengths])  # restart per sequence
    for enc in _encoders().values():
        for layer in (0, 1):
            full_c, full_s = enc.tables(torch.arange(total), layer)
            packed_c, packed_s = enc.tables(packed_global, layer)
            seen, seen_packed = [], []
            for r in range(cp):
                pos = _attention_positions(total // cp, r, cp)
                c, s = enc.tables(pos, layer)
                # The model's tables equal the global tables at the tokens the data path gives r.
                close(c, cp_shard(full_c, r, cp, dim=0))
                close(s, cp_shard(full_s, r, cp, dim=0))
                seen.append(pos)
                pos_p = _attention_positions(total // cp, r, cp, cu)
                cp_, sp_ = enc.tables(pos_p, layer)
                close(cp_, shard_packed_for_cp(packed_c, cu, r, cp, dim=0))
                close(sp_, shard_packed_for_cp(packed_s, cu, r, cp, dim=0))
                seen_packed.append(shard_packed_for_cp(torch.arange(total), cu, r, cp, dim=0))
            # Ranks partition the sequence: every position exactly once, chunk r and 2cp-1-r.
            assert torch.equal(torch.cat(seen).sort().values, torch.arange(total))
            assert torch.equal(torch.cat(seen_packed).sort().values, torch.arange(total))
            chunk = total // (2 * cp)
            assert seen[0][0] == 0 and seen[0][chunk] == (2 * cp - 1) * chunk
    # A different layout would give different tables (the check above can fail).
    c0, _ = _encoders()["fope"].tables(_attention_positions(total // cp, 0, cp), 0)
    c1, _ = _encoders()["fope"].tables(_attention_positions(total // cp, 1, cp), 0)
    assert not torch.allclose(c0, c1)


def test_cp_shard_roundtrip_and_packed_indices():
    from fope_megatron.parallel.positions import packed_cp_indices
    from fope_megatron.parallel.sequence import cp_shard, cp_unshard, shard_batch_for_cp

    x = torch.arange(2 * 24).view(2, 24)
    for cp in (1, 2, 3):
        parts = [cp_shard(x, r, cp) for r in range(cp)]
        assert torch.equal(cp_unshard(parts), x)
    tok, lab, mask, pos = shard_batch_for_cp(x, x + 1, 1, 2, None, x)
    assert mask is None and torch.equal(tok, pos) and torch.equal(lab, tok + 1)
    assert tok[0].tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    # Naive THD reference: per sequence, chunks r and 2cp-1-r.
    cu = torch.tensor([0, 8, 20])
    got = packed_cp_indices(cu, 1, 2)
    assert got.tolist() == [2, 3, 4, 5, 8 + 3, 8 + 4, 8 + 5, 8 + 6, 8 + 7, 8 + 8]


# ----------------------------------------------------------------------------- model: CP=2
CASES = [("fope", ()), ("rope", ()), ("fope", ("model.num_query_groups=2",))]


def _batch():
    return random_batch(SEQ, VOCAB)


def _thd(cp_rank, cp):
    """One packed row: sequences of 12 and 20 tokens (multiples of 2*cp), sharded for CP."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from fope_megatron.parallel.sequence import shard_packed_for_cp

    tokens, labels, _ = _batch()
    tokens, labels = tokens[:1], labels[:1]
    cu = torch.tensor([0, 12, 32], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=20, max_seqlen_kv=20
    )
    pos = torch.cat([torch.arange(12), torch.arange(20)])[None]
    shard = [shard_packed_for_cp(t, cu, cp_rank, cp, dim=1) for t in (tokens, labels, pos)]
    return (*shard, params)


def _run(model, cp_rank, cp):
    """Per-token loss and logits of this rank's tokens; grads of sum(loss) / global tokens."""
    from fope_megatron.parallel.sequence import shard_batch_for_cp

    tokens, labels, pos = _batch()
    tokens, labels, _, pos = shard_batch_for_cp(tokens, labels, cp_rank, cp, None, pos)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    loss = model(tokens, pos, None, labels=labels)
    (loss.sum() / (2 * SEQ)).backward()
    t, lab, p, params = _thd(cp_rank, cp)
    with torch.no_grad():
        thd_loss = model(t, p, None, labels=lab, packed_seq_params=params)
    return logits, loss.detach(), thd_loss


def _gather_cp(t, group):
    import torch.distributed as dist

    from fope_megatron.parallel.sequence import cp_unshard

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return cp_unshard(parts, dim=1)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def _cp_job(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fope_megatron.model.builder import build_gpt
    from fope_megatron.model.cp_attention import ContextParallelCoreAttention
    from fope_megatron.parallel.grads import all_reduce_grads
    from fope_megatron.parallel.positions import packed_cp_indices
    from fope_megatron.parallel.setup import init_model_parallel

    out = []
    for kind, extra in CASES:
        init_model_parallel(cp=1)
        ref_model = build_gpt(layout_config(kind, SEQ, "fope.learnable=true", *extra))
        ref = _run(ref_model, 0, 1)
        ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
        # Independent check of the packed reference: sequence 2 alone, positions from 0.
        tokens, labels, _ = _batch()
        with torch.no_grad():
            alone = ref_model(tokens[:1, 12:], torch.arange(20)[None], None, labels=labels[:1, 12:])

        init_model_parallel(cp=2)
        group = ps.get_context_parallel_group()
        model = build_gpt(layout_config(kind, SEQ, "fope.learnable=true", *extra, cp=2))
        core = model.decoder.layers[0].self_attention.core_attention
        logits, loss, thd = _run(model, ps.get_context_parallel_rank(), 2)
        local_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        all_reduce_grads(model, group)  # megatron's convention: CP gradients are summed
        grads = {n: p.grad for n, p in model.named_parameters()}
        # Reassemble the packed per-token loss from both ranks' THD shards.
        parts = [torch.empty_like(thd) for _ in range(2)]
        dist.all_gather(parts, thd.contiguous(), group=group)
        thd_full = torch.empty_like(ref[2])
        for r, part in enumerate(parts):
            thd_full[:, packed_cp_indices(torch.tensor([0, 12, 32]), r, 2)] = part
        coef = model.decoder.layers[1].self_attention.encoder
        out.append(
            dict(
                is_cp_attn=isinstance(core, ContextParallelCoreAttention),
                local_len=loss.shape[1],
                logits=(_gather_cp(logits, group) - ref[0]).abs().max().item(),
                loss=(_gather_cp(loss, group) - ref[1]).abs().max().item(),
                grads=_max_diff(grads, ref_grads),
                local_grads=_max_diff(local_grads, ref_grads),
                coef_grad=coef.coef_cos.grad.abs().sum().item() if kind == "fope" else None,
                thd=(thd_full - ref[2]).abs().max().item(),
                thd_alone=(ref[2][:, 12:] - alone).abs().max().item(),
                thd_vs_unpacked=(ref[2][:, 12:] - ref[1][:1, 12:]).abs().max().item(),
            )
        )
    return out


@pytest.mark.slow
def test_cp2_equals_cp1():
    results = run_distributed(_cp_job, 2)
    for rank_res in results:
        for case, r in zip(CASES, rank_res, strict=True):
            assert r["is_cp_attn"] and r["local_len"] == SEQ // 2, (case, r)
            assert r["logits"] < 1e-5, (case, r)
            assert r["loss"] < 1e-5, (case, r)
            assert r["grads"] < 1e-5, (case, r)
            assert r["local_grads"] > 1e-4, (case, r)  # one rank alone is not the full gradient
            assert r["coef_grad"] is None or r["coef_grad"] > 0, (case, r)
            # Packed THD: CP=2 equals CP=1, and the 2nd packed sequence equals running it alone
            # (positions restart at 0), which differs from its place in an unpacked sample.
            assert r["thd"] < 1e-5, (case, r)
            assert r["thd_alone"] < 1e-5, (case, r)
            assert r["thd_vs_unpacked"] > 1e-3, (case, r)
