"""Nothing is gathered at save: evaluation, export and ``train.init_from`` join the TP ranks' own
files on one process; ``fope-ckpt consolidate`` writes the full state as one file on demand, and
checkpoints of the earlier format (with ``model_full.pt``) still load."""

import shutil
import subprocess
import sys

import pytest
import torch

from fope_megatron.checkpoint import manifest
from fope_megatron.checkpoint.full_state import checkpoint_full_state
from fope_megatron.testing import launch
from fope_megatron.testing.launch import train

pytestmark = pytest.mark.integration


def test_tp2_checkpoint_is_joined_consolidated_and_the_old_format_loads(corpus, tmp_path):
    run = tmp_path / "tp2"
    train(run, [f"data.path=[{corpus}]", "train.steps=1", "parallel.tp=2",
                "deepspeed.zero_stage=1"], "torchrun", 2, timeout=600)  # fmt: skip
    folder = run / "checkpoints" / "step_00000001"
    names = {p.name for p in folder.iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "layout.json"} <= names
    assert "model_full.pt" not in names  # each rank wrote what it owns
    joined = checkpoint_full_state(folder)
    shards = [torch.load(folder / f"mp_rank_0{r}_model_states.pt", weights_only=False)["module"]
              for r in range(2)]  # fmt: skip
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    assert torch.equal(joined[qkv], torch.cat([s[qkv] for s in shards], 0))  # column-parallel
    assert torch.equal(joined[proj], torch.cat([s[proj] for s in shards], 1))  # row-parallel

    out = tmp_path / "full.pt"
    cli = [sys.executable, "-m", "fope_megatron.checkpoint.cli"]
    done = subprocess.run([*cli, "consolidate", "--run", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)  # its own output only
    payload = torch.load(out, weights_only=False)
    assert payload["format"] == "fope-megatron/full-state/v1"
    assert payload["state_dict"].keys() == joined.keys()
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in joined.items())

    old = tmp_path / "old"  # the earlier format: model_full.pt beside DeepSpeed's files
    shutil.copytree(run, old)
    old_folder = old / "checkpoints" / "step_00000001"
    state = {k: v * 2 if v.is_floating_point() else v for k, v in joined.items()}
    torch.save({**payload, "state_dict": state}, old_folder / "model_full.pt")
    manifest.write(old_folder)
    got = checkpoint_full_state(old_folder)
    assert all(torch.equal(got[k], state[k]) for k in state)  # read from model_full.pt
    export = subprocess.run(
        [sys.executable, "-m", "fope_megatron.checkpoint.hf.export", "--run", str(old),
         "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()

    # fope-ckpt convert ahead of the job, its work shared by two torchrun processes
    port = launch.free_port()
    made = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         f"--master-port={port}", "-m", "fope_megatron.checkpoint.cli", "convert", "--run-dir",
         str(run)], capture_output=True, text=True, timeout=300, env=launch.env(),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert "(once, on 2 ranks)" in made.stderr
    universal = run / "checkpoints" / "step_00000001_universal"
    assert (universal / "COMPLETE").is_file() and not manifest.problems(universal)
    merged = torch.load(universal / "zero" / qkv / "fp32.pt", weights_only=False)["param"]
    assert torch.equal(merged, joined[qkv].float())  # merged over TP from the ZeRO partitions


def test_zero3_tp2_resumes_and_its_partitions_join_to_the_one_process_model(corpus, tmp_path):
    base = [f"data.path=[{corpus}]", "train.steps=4", "model.num_query_groups=2"]
    train(tmp_path / "one", [*base, "deepspeed.zero_stage=1"], "python", 1, timeout=600)
    z3 = [*base, "parallel.tp=2", "deepspeed.zero_stage=3"]
    run = tmp_path / "z3tp2"
    train(run, [*z3, "train.exit_at_step=2"], "torchrun", 2, timeout=600)
    train(run, z3, "torchrun", 2, timeout=600)  # resumed at step 2, same layout
    ref, got = launch.losses(tmp_path / "one"), launch.losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - ref[s]) < 1e-5 for s in ref), (got, ref)
    folder = run / "checkpoints" / "step_00000004"
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"
            } <= {p.name for p in folder.iterdir()}  # fmt: skip
    joined = checkpoint_full_state(folder)  # each TP rank's partitions consolidated, then joined
    want = checkpoint_full_state(tmp_path / "one" / "checkpoints" / "step_00000004")
    assert joined.keys() == {k for k, v in want.items() if v is not None}
    for k, v in joined.items():
        assert v.shape == want[k].shape and torch.allclose(v, want[k].float(), atol=1e-5), k
