"""megatron-core GPTModel with FoPE / RoPE: forward, backward, state, and TP=2 equals TP=1."""

import pytest
import torch

from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import tiny_config

COMBOS = [("fope", None), ("fope", 2), ("rope", None), ("rope", 2), ("fope", 1)]


def tiny(kind, groups, *extra):
    return tiny_config(kind, 32, f"model.num_query_groups={groups if groups else 'null'}", *extra)


def _logits_for_layout(rank, world, tp):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.comm import gather_vocab_logits
    from fope_megatron.parallel.setup import init_model_parallel

    init_model_parallel(tp=tp)
    out = {}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 258, (2, 32), generator=g)
    pos = torch.arange(32)[None].expand(2, -1)
    for kind, groups in COMBOS:
        if tp == 2 and groups == 1:
            continue
        model = build_gpt(tiny(kind, groups)).eval()
        with torch.no_grad():
            out[(kind, groups)] = gather_vocab_logits(model(tokens, pos, None))
    return out


@pytest.mark.slow
def test_tp2_logits_equal_tp1():
    single = run_distributed(_logits_for_layout, 1, 1)[0]
    double = run_distributed(_logits_for_layout, 2, 2)
    assert single[("fope", 2)].shape == (2, 32, 384)
    assert not torch.allclose(single[("fope", None)], single[("rope", None)], atol=1e-3)
    for key in double[0]:
        for rank_out in double:
            diff = (rank_out[key] - single[key]).abs().max().item()
            assert diff < 1e-5, (key, diff)


def _forward_backward(rank, world):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    init_model_parallel(tp=1)
    res = {}
    tokens = torch.randint(0, 258, (2, 32))
    pos = torch.arange(32)[None].expand(2, -1)
    for kind, learnable in [("fope", False), ("fope", True), ("rope", False), ("none", False)]:
        cfg = tiny(kind, 2, f"fope.learnable={str(learnable).lower()}")
        model = build_gpt(cfg)
        loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).mean()
        loss.backward()
        attn = model.decoder.layers[1].self_attention
        state = model.state_dict()
        res[(kind, learnable)] = dict(
            loss=loss.item(),
            coef_keys=sorted(k for k in state if "coef" in k),
            coef_shape=tuple(state["decoder.layers.1.self_attention.fope.coef_cos"].shape)
            if kind == "fope"
            else None,
            coef_grad=(
                None
                if kind != "fope" or attn.fope.coef_cos.grad is None
                else attn.fope.coef_cos.grad.abs().sum().item()
            ),
            coef_in_params=any("coef" in n for n, _ in model.named_parameters()),
            coef_tp_attr=getattr(attn.fope.coef_cos, "tensor_model_parallel", None)
            if kind == "fope"
            else None,
            qkv_grad=attn.linear_qkv.weight.grad.abs().sum().item(),
            coef_layer1_equals_init=bool(
                torch.equal(attn.fope.coef_cos[0], attn.fope.init_coefficients(1)[0])
            )
            if kind == "fope"
            else None,
        )
    return res


def test_gpt_forward_backward_frozen_and_learnable():
    res = run_distributed(_forward_backward, 1)[0]
    frozen = res[("fope", False)]
    assert torch.isfinite(torch.tensor(frozen["loss"]))
    assert abs(frozen["loss"] - torch.log(torch.tensor(384.0)).item()) < 1.0  # ~uniform at init
    assert frozen["coef_keys"] == [
        f"decoder.layers.{i}.self_attention.fope.coef_{t}" for i in (0, 1) for t in ("cos", "sin")
    ]
    # 1 layer held, 2 KV groups, D_in = D_out = 3 (head_dim 16, L 64: w = 1, .32, .1 >= 2pi/64)
    assert frozen["coef_shape"] == (1, 2, 3, 3)
    assert frozen["coef_layer1_equals_init"]
    assert not frozen["coef_in_params"] and frozen["coef_grad"] is None
    assert frozen["coef_tp_attr"] is True
    assert frozen["qkv_grad"] > 0
    learn = res[("fope", True)]
    assert learn["coef_in_params"] and learn["coef_grad"] > 0
    assert res[("rope", False)]["coef_keys"] == [] and res[("none", False)]["coef_keys"] == []
    for r in res.values():
        assert torch.isfinite(torch.tensor(r["loss"]))
