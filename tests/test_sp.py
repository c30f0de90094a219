"""Megatron sequence parallelism on CPU: TP=2 + SP equals TP=1 (logits, loss, every gradient).

One 2-rank job builds the TP=1 reference (dp=2 layout) and the TP=2 + SP model in the same
processes, so no second spawn is needed.
"""

import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import layout_config, random_batch

SEQ, VOCAB = 32, 258

# (position embedding, extra overrides): RMSNorm without biases, LayerNorm with biases (the
# row-parallel bias is a sequence-parallel parameter too), GQA.
CASES = [
    ("fope", ("fope.learnable=true",)),
    ("rope", ("model.normalization=LayerNorm", "model.add_bias_linear=true")),
    ("fope", ("model.num_query_groups=2",)),
]


def _batch():
    return random_batch(SEQ, VOCAB)


def _run(model, hooks=False):
    """Logits (full vocab), per-token loss and full-shape gradients after SP finalisation."""
    from fope_megatron.checkpoint.reshard import full_grads
    from fope_megatron.parallel.comm import gather_vocab_logits
    from fope_megatron.parallel.grads import finalize_sp_grads

    tokens, labels, pos = _batch()
    with torch.no_grad():
        logits = gather_vocab_logits(model(tokens, pos, None))
    loss = model(tokens, pos, None, labels=labels)
    loss.mean().backward()
    raw = {k: v.clone() for k, v in full_grads(model).items()}
    reduced = 0 if hooks else finalize_sp_grads(model)
    return logits, loss.detach(), raw, full_grads(model), reduced


def _sp_job(rank, world):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.grads import register_sp_grad_hooks, sequence_parallel_params
    from fope_megatron.parallel.setup import init_model_parallel

    out = []
    for kind, extra in CASES:
        init_model_parallel(tp=1)
        ref = _run(build_gpt(layout_config(kind, SEQ, *extra)))
        init_model_parallel(tp=2)
        model = build_gpt(layout_config(kind, SEQ, *extra, tp=2, sp=True))
        sp_names = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", 0)}
        got = _run(model)
        model.zero_grad(set_to_none=True)
        handles = register_sp_grad_hooks(model)
        hooked = _run(model, hooks=True)
        for h in handles:
            h.remove()
        res = dict(
            sp_names=sorted(sp_names),
            n_sp=len(sequence_parallel_params(model)),
            reduced=got[4],
            local_seq=None,
        )
        res["logits"] = (got[0] - ref[0]).abs().max().item()
        res["loss"] = (got[1] - ref[1]).abs().max().item()
        res["grad_keys_equal"] = sorted(got[3]) == sorted(ref[3])
        res["grads"] = max((got[3][k] - ref[3][k]).abs().max().item() for k in ref[3])
        res["grads_hooked"] = max((hooked[2][k] - ref[3][k]).abs().max().item() for k in ref[3])
        # Before finalisation the SP parameters' gradients are per-rank partial sums.
        res["raw_sp_grads"] = max((got[2][k] - ref[3][k]).abs().max().item() for k in sp_names)
        res["grad_scale"] = max(g.abs().max().item() for g in ref[3].values())
        out.append(res)
    # The embedding output really is sequence-sharded under SP.
    captured = []
    h = model.decoder.layers[0].input_layernorm.register_forward_hook(
        lambda m, i, o: captured.append(tuple(i[0].shape))
    )
    tokens, _, pos = _batch()
    with torch.no_grad():
        model(tokens, pos, None)
    h.remove()
    out[-1]["local_seq"] = captured[0]
    # megatron's RNG tracker on CPU: fork() draws from the TP-rank stream and restores the
    # default CPU RNG afterwards (SP dropout masks differ per TP rank, as on GPU).
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        draw = torch.rand(4)
    out[-1]["rng_restored"] = torch.equal(before, torch.get_rng_state())
    out[-1]["rng_draw"] = draw
    return out


def test_tp2_sequence_parallel_equals_tp1():
    results = run_distributed(_sp_job, 2)
    for rank_res in results:
        for (kind, extra), r in zip(CASES, rank_res, strict=True):
            case = (kind, extra)
            assert r["logits"] < 1e-5, (case, r)
            assert r["loss"] < 1e-5, (case, r)
            assert r["grad_keys_equal"], case
            assert r["grads"] < 1e-5, (case, r)
            assert r["grads_hooked"] < 1e-5, (case, r)
            # Norm weights of both layers + the final norm (and biases with LayerNorm/bias).
            assert r["n_sp"] >= 5 and r["reduced"] == r["n_sp"], (case, r)
            assert "decoder.final_layernorm.weight" in r["sp_names"], r["sp_names"]
            assert r["raw_sp_grads"] > 1e-4 * r["grad_scale"], (case, r)
        assert rank_res[-1]["local_seq"] == (SEQ // 2, 2, 64)
        assert rank_res[-1]["rng_restored"]
    assert not torch.equal(results[0][-1]["rng_draw"], results[1][-1]["rng_draw"])
