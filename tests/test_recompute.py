"""train.recompute: megatron-core's own activation recompute, checked, wired and exact.

Training runs go through the real trainer (fp32 on CPU, dropout on so that the RNG states the
recomputation restores matter); the saved-for-backward bytes are measured on a tiny model with
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from fope_megatron.config import ConfigError, load_config
from fope_megatron.testing import launch
from fope_megatron.testing.distributed import run_distributed

STEPS = 5
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
FULL = ["train.recompute=full"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """``runs(name, *overrides)``: (loss, grad norm) of each step; every run trains once."""
    root = tmp_path_factory.mktemp("recompute")
    common = [f"data.path=[{corpus}]", f"train.steps={STEPS}", *DROPOUT]

    @functools.cache
    def train(name, *overrides, launcher="python", nproc=1):
        launch.train(root / name, [*common, *overrides], launcher=launcher, nproc=nproc)
        return [(r["loss"], r["grad_norm"]) for r in launch.metrics(root / name)]

    return train


def same_steps(got, ref, tol=1e-6):
    assert len(got) == len(ref) == STEPS
    for step, (mine, theirs) in enumerate(zip(got, ref, strict=True), start=1):
        (loss, norm), (ref_loss, ref_norm) = mine, theirs
        assert abs(loss - ref_loss) <= tol, (step, loss, ref_loss)
        assert abs(norm - ref_norm) <= tol, (step, norm, ref_norm)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["train.recompute=partial"], ["train.recompute", "'selective'", "'full'"]),
        (["train.recompute_num_layers=1"], ["train.recompute_num_layers=1", "no effect"]),
        (["train.recompute=selective", "train.recompute_method=block"], ["recompute_method"]),
        ([*FULL, "train.recompute_num_layers=3"], ["out of range", "model.num_layers=2"]),
        ([*FULL, "train.recompute_num_layers=0"], ["out of range"]),
        ([*FULL, "model.num_layers=4", "train.recompute_num_layers=3"], ["must divide"]),
    ],
)
def test_bad_recompute_settings_are_named_config_errors(overrides, needles):
    with pytest.raises(ConfigError) as err:  # unknown values fail on load, the rest on validate
        load_config(None, ["data.synthetic=true", "model.num_layers=2", *overrides]).validate(1)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    block = ["train.recompute_num_layers=3", "train.recompute_method=block"]
    load_config(None, ["data.synthetic=true", *FULL, "model.num_layers=4", *block]).validate(1)


@pytest.mark.integration
def test_bad_recompute_fails_before_process_groups(tmp_path, corpus):
    # WORLD_SIZE=2 with no second rank: a process group would hang, so exit 2 proves the order
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29998"}
    t0 = time.time()
    bad = [f"data.path=[{corpus}]", *FULL, "train.recompute_num_layers=5"]
    proc = launch.train(tmp_path / "bad", bad, extra_env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - t0 < 60 and "train.recompute_num_layers=5" in proc.stderr


@pytest.mark.integration
def test_recompute_trains_exactly_like_no_recompute(runs):
    ref = runs("none")
    assert ref[-1][0] < ref[0][0]  # it learns
    same_steps(runs("selective", "train.recompute=selective"), ref)
    same_steps(runs("full", *FULL), ref)  # uniform, one layer per chunk
    block = ["train.recompute_method=block", "train.recompute_num_layers=1"]
    same_steps(runs("full_block1", *FULL, *block), ref)  # 1 of the 2 layers recomputed


@pytest.mark.integration
def test_full_recompute_with_tp2_sequence_parallel(runs):
    """SP dropout draws from megatron's model-parallel RNG tracker, which recompute restores."""
    tp = ["parallel.tp=2", "parallel.sp=true"]
    two = dict(launcher="torchrun", nproc=2)
    same_steps(runs("tp2_full", *tp, *FULL, **two), runs("tp2", *tp, **two))


def _saved_bytes(rank, world):
    """Bytes (and count) of non-parameter tensors the transformer layers save for backward."""
    from fope_megatron.model.builder import build_gpt
    from fope_megatron.parallel.setup import init_model_parallel
    from fope_megatron.testing.models import random_batch, tiny_config

    init_model_parallel(tp=1)
    tokens, labels, pos = random_batch(32, 258)
    out = {}
    for name, overrides in [
        ("none", []),
        ("selective", ["train.recompute=selective"]),
        ("full", FULL),
        ("full_chunk2", [*FULL, "train.recompute_num_layers=2"]),
        ("full_block1", [*FULL, "train.recompute_method=block", "train.recompute_num_layers=1"]),
    ]:
        model = build_gpt(tiny_config("fope", 32, *DROPOUT, *overrides)).train()
        weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
        recording, saved = [False], []

        def pack(t, recording=recording, saved=saved, weights=weights):
            if recording[0] and t.data_ptr() not in weights:
                saved.append(t.numel() * t.element_size())
            return t

        # the layers only: from the decoder's start to its final norm (a checkpointed chunk
        # saves its input after its layers ran, so hooks on the layers would miss it)
        model.decoder.register_forward_pre_hook(lambda *_, r=recording: r.__setitem__(0, True))
        norm = model.decoder.final_layernorm
        norm.register_forward_pre_hook(lambda *_, r=recording: r.__setitem__(0, False))
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        c = model.decoder.config
        out[name] = dict(
            bytes=sum(saved),
            tensors=len(saved),
            config=(c.recompute_granularity, c.recompute_method, c.recompute_num_layers),
            modules=list(c.recompute_modules or []),
            core_attn=model.decoder.layers[0].self_attention.checkpoint_core_attention,
            grads=torch.cat([p.grad.flatten() for p in model.parameters()]),
        )
    return out


def test_recompute_takes_effect_in_megatron():
    res = run_distributed(_saved_bytes, 1)[0]
    assert res["none"]["config"] == (None, None, None) and not res["none"]["core_attn"]
    assert res["selective"]["config"][0] == "selective" and res["selective"]["core_attn"]
    assert res["selective"]["modules"] == ["core_attn"]
    assert res["full"]["config"] == ("full", "uniform", 1)
    assert res["full_chunk2"]["config"] == ("full", "uniform", 2)
    assert res["full_block1"]["config"] == ("full", "block", 1)
    for name in res:  # same dropout draws, same gradients, bit for bit
        assert torch.equal(res[name]["grads"], res["none"]["grads"]), name
    layer_input = 32 * 2 * 64 * 4  # [s, b, h] float32
    per_layer = res["none"]["bytes"] / 2  # both layers save the same
    # full: each checkpointed chunk keeps only its input hidden states, nothing inside the layer
    # (so neither the FoPE tables nor q/k are kept: FoPE runs inside the recomputed region)
    assert res["full"]["tensors"] == 2 and res["full"]["bytes"] == 2 * layer_input
    assert res["full_chunk2"]["tensors"] == 1 and res["full_chunk2"]["bytes"] == layer_input
    assert res["full_block1"]["bytes"] == layer_input + per_layer  # layer 2 keeps everything
    assert per_layer > 10 * layer_input
    # selective: the core attention keeps its q, k, v inputs instead of its internals
    assert res["full"]["bytes"] < res["selective"]["bytes"] < res["none"]["bytes"]
