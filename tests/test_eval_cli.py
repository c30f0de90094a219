"""fope-eval end to end on tiny trained runs: report, independent perplexity, --compare."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fope_megatron.testing import launch
from fope_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.integration

LENGTHS = [128, 256]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    runs = {}
    for kind in ("fope", "rope"):
        run_dir = root / kind
        launch.train(
            run_dir,
            ["data.synthetic=true", "train.steps=3", f"model.position_embedding={kind}"],
        )
        out = root / f"eval_{kind}"
        proc = subprocess.run(
            [sys.executable, "-m", "fope_megatron.eval", "--run", str(run_dir), "--lengths",
             ",".join(map(str, LENGTHS)), "--passkey-trials", "3", "--ppl-chunks", "2",
             "--out", str(out), "--no-progress"],
            env=launch.env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[kind] = (run_dir, out)
    return runs


def _model_loss(rank, world, run_dir, chunks):
    from fope_megatron.checkpoint.full_state import load_model

    model, cfg, _ = load_model(run_dir)
    out = {}
    for length, tokens in chunks.items():
        pos = torch.arange(length)[None].expand(tokens.shape[0], -1)
        # megatron's own (vocab-parallel) cross entropy, not fope-eval's log-softmax
        loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:])
        out[length] = loss.double().mean().item()
    return out


def test_eval_report_and_independent_perplexity(trained):
    from fope_megatron.checkpoint.full_state import load_run_config
    from fope_megatron.data.tokenizer import get_tokenizer
    from fope_megatron.eval.__main__ import heldout_tokens

    run_dir, out = trained["fope"]
    result = json.loads((out / "eval.json").read_text())
    for key in ("perplexity", "passkey", "train_seq_len", "checkpoint"):
        assert key in result
    assert result["train_seq_len"] == 64  # the trained floor, not the eval length
    assert set(result["perplexity"]) == {"128", "256"} and set(result["passkey"]) == {"128", "256"}
    assert result["checkpoint"].endswith("step_00000003")
    for png in ("perplexity.png", "passkey.png", "passkey_depth.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same tokens, chunked the same way, scored by megatron's loss
    cfg = load_run_config(run_dir)
    tokens = heldout_tokens(cfg, get_tokenizer("byte"), max(LENGTHS) * 2, None)
    chunks = {L: tokens[: (len(tokens) // L) * L].view(-1, L) for L in LENGTHS}
    losses = run_distributed(_model_loss, 1, run_dir, chunks)[0]
    for length in LENGTHS:
        want = math.exp(losses[length])
        assert result["perplexity"][str(length)] == pytest.approx(want, rel=1e-4)


def test_compare_two_runs(trained, tmp_path):
    outs = [str(trained[k][1]) for k in ("fope", "rope")]
    proc = subprocess.run(
        [sys.executable, "-m", "fope_megatron.eval", "--compare", *outs, "--out", str(tmp_path)],
        env=launch.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "compare.md").read_text()
    assert "fope" in table and "rope" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_missing_run_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fope_megatron.eval", "--run", str(tmp_path / "nope"), "--out",
         str(tmp_path / "o")],
        env=launch.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "config.yaml" in proc.stderr


def _same_length_logits(rank, world, run_dir):
    import dataclasses

    from fope_megatron.checkpoint.extension import load_init_weights
    from fope_megatron.checkpoint.full_state import load_model
    from fope_megatron.checkpoint.store import resolve_checkpoint
    from fope_megatron.model.builder import build_gpt

    loaded, cfg, _ = load_model(run_dir)
    ext = dataclasses.replace(cfg, fope=dataclasses.replace(cfg.fope, expand_on_extension=True))
    extended = build_gpt(ext).eval()
    load_init_weights(extended, ext, resolve_checkpoint(run_dir))
    tokens = torch.randint(0, 258, (2, 96), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(96)[None].expand(2, -1)
    with torch.no_grad():
        return loaded(tokens, pos, None), extended(tokens, pos, None)


def test_extending_to_the_same_length_changes_nothing(trained):
    a, b = run_distributed(_same_length_logits, 1, trained["fope"][0])[0]
    assert torch.equal(a, b)


def test_init_from_x_fope_grows_coefficients_in_training(trained, tmp_path):
    src = trained["fope"][0] / "checkpoints" / "step_00000003"
    run_dir = tmp_path / "ext"
    launch.train(
        run_dir,
        ["data.synthetic=true", "train.steps=2", "train.seq_length=256",
         f"train.init_from={src}", "fope.expand_on_extension=true"],
    )  # fmt: skip
    from fope_megatron.checkpoint.full_state import checkpoint_full_state

    old = checkpoint_full_state(src)
    new = checkpoint_full_state(run_dir / "checkpoints" / "step_00000002")
    key = "decoder.layers.1.self_attention.fope.coef_cos"
    # head_dim 16: D_in 3 at L=64 (w = 1, .32, .1), 4 at L=256 (+ .032); D_out = min(D_in, 4)
    assert old[key].shape == (1, 4, 3, 3) and new[key].shape == (1, 4, 4, 4)
    assert torch.equal(new[key][:, :, :3, :3], old[key])  # frozen: the trained block, exactly
    assert launch.metrics(run_dir)[0]["step"] == 1  # a new run: step 0, fresh optimizer
    # without the switch the shape change is refused before training starts
    proc = launch.train(
        tmp_path / "refused",
        ["data.synthetic=true", "train.steps=2", "train.seq_length=256", f"train.init_from={src}"],
        check=False,
    )
    assert proc.returncode != 0 and "expand_on_extension" in proc.stderr
