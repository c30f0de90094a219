"""``position.fusion``: the megatron-core model and the trainer with the Triton path equal the
torch path. On CPU the kernel runs under Triton's interpreter; on a GPU node on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, here and in spawned ranks

from fope_megatron.testing import launch  # noqa: E402
from fope_megatron.testing.distributed import run_distributed  # noqa: E402
from fope_megatron.testing.models import random_batch, tiny_config  # noqa: E402

SEQ = 32


def _logits_and_grads(rank, world, kind, fusion, extra):
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel

    init_model_parallel(tp=1)
    cfg = tiny_config(kind, SEQ, f"position.fusion={fusion}", "train.precision=fp32", *extra)
    model = build_gpt(cfg)
    attn = model.decoder.layers[0].self_attention
    tokens, labels, pos = random_batch(SEQ, 258)
    dev = next(model.parameters()).device
    logits = model(tokens.to(dev), pos.to(dev), None)
    loss = model(tokens.to(dev), pos.to(dev), None, labels=labels.to(dev)).float().mean()
    loss.backward()
    grads = {
        n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return attn.position.fusion, logits.detach().cpu(), grads, attn.kernel_path()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, extra",
    [
        ("fope", ()),
        ("fope", ("model.num_query_groups=2", "fope.interleaved=true")),
        ("fope", ("model.num_query_groups=1", "fope.learnable=true", "model.rotary_percent=0.5")),
        ("rope", ("model.num_query_groups=2",)),
    ],
)
def test_model_triton_equals_torch(kind, extra):
    fused = run_distributed(_logits_and_grads, 1, kind, "triton", extra)[0]
    ref = run_distributed(_logits_and_grads, 1, kind, "torch", extra)[0]
    assert fused[0] == "triton" and ref[0] == "torch"
    # head_dim 16: the table product over all pairs; at most 4 query heads per group: one tile
    assert str(fused[3]) == "table product fp32 over all pairs, a group's heads as one tile"
    assert ref[3] is None
    assert (fused[1] - ref[1]).abs().max().item() <= 1e-5
    assert sorted(fused[2]) == sorted(ref[2])
    if "fope.learnable=true" in extra:
        assert any("coef_cos" in n for n in fused[2])
    for name in ref[2]:
        diff = (fused[2][name] - ref[2][name]).abs().max().item()
        assert diff <= 1e-5, (name, diff)


@pytest.mark.integration
def test_trainer_records_fusion_and_matches_torch(tmp_path, corpus):
    """A 3-step run with position.fusion=triton logs the choice and the kernel's path, writes the
    choice into config.yaml, and gives the torch run's losses and grad norms."""
    common = [f"data.path=[{corpus}]", "train.steps=3", *TINY_ARGS]
    res = {}
    for fusion in ("triton", "torch"):
        run = tmp_path / fusion
        proc = launch.train(run, [*common, f"position.fusion={fusion}"], launcher="python", nproc=1)
        logged = "position kernel (triton, from the shapes): table product" in proc.stderr
        assert logged == (fusion == "triton"), proc.stderr[-3000:]
        head = (run / "config.yaml").read_text().splitlines()[0]
        assert head.startswith("# resolved at start: position.fusion: ")
        assert f"-> {fusion} (fope" in head
        res[fusion] = [r for r in launch.metrics(run) if "grad_norm" in r]
    assert len(res["torch"]) == 3
    for a, b in zip(res["triton"], res["torch"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, b["grad_norm"])


TINY_ARGS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "train.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.precision=fp32",
    "run.tensorboard=false",
    "data.num_workers=0",
]


@pytest.mark.integration
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA, where position.fusion=triton is valid"
)
def test_fusion_triton_without_cuda_is_a_config_error(tmp_path):
    """Asking for the kernel where it cannot run fails before any process group (exit 2)."""
    env = {"TRITON_INTERPRET": "0"}
    proc = launch.train(
        tmp_path / "bad", ["position.fusion=triton", *TINY_ARGS], launcher="python", nproc=1,
        extra_env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "position.fusion=triton needs CUDA" in proc.stderr
