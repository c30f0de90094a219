"""megatron-core's fusions: on where the device supports them (CUDA: bias + SwiGLU / GeLU and
bias-dropout-add), off on CPU, and the fused code path computes what the unfused one does."""

import pytest
import torch

from fope_megatron.model.builder import megatron_fusions, transformer_config
from fope_megatron.testing.distributed import run_distributed
from fope_megatron.testing.models import tiny_config


def test_fusions_follow_the_device():
    assert megatron_fusions(cuda=True) == {
        "bias_activation_fusion": True, "bias_dropout_fusion": True,
        "masked_softmax_fusion": False, "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False, "persist_layer_norm": False,
    }  # fmt: skip
    assert not any(megatron_fusions(cuda=False).values())
    if not torch.cuda.is_available():  # CPU numerics unchanged: nothing fused here
        tconf = transformer_config(tiny_config("fope", 32))
        assert not tconf.bias_activation_fusion and not tconf.bias_dropout_fusion


def _loss_and_grads(rank, world, fused):
    from fope_megatron.model import builder
    from fope_megatron.parallel.setup import init_model_parallel

    init_model_parallel(tp=1)
    chosen = builder.megatron_fusions(cuda=fused)
    builder.megatron_fusions = lambda cuda=None: chosen  # this spawned process only
    model = builder.build_gpt(tiny_config("fope", 32, "model.hidden_dropout=0.1"))
    assert model.config.bias_activation_fusion == model.config.bias_dropout_fusion == fused
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 258, (2, 32), generator=g)
    pos = torch.arange(32)[None].expand(2, -1)
    torch.manual_seed(3)  # the same dropout masks
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
def test_fused_code_path_equals_unfused(monkeypatch):
    # megatron's fused functions are torch.compile'd; eager here (compiling on CPU takes ~30 s,
    # and compiled dropout draws other masks), so this checks the fused code path's math
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    plain = run_distributed(_loss_and_grads, 1, False)[0]
    fused = run_distributed(_loss_and_grads, 1, True)[0]
    assert fused[0] == plain[0]
    for name, grad in plain[1].items():
        assert torch.allclose(fused[1][name], grad, atol=1e-6, rtol=0), name
