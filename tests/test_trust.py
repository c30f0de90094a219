"""Trust: a diverged step is never saved, damaged checkpoints are skipped, changed settings on
resume are applied or refused, held-out data is what the user gave. Real trainer processes, real
files; faults are injected with FOPE_FAULT_LOSS (rank 0's loss of a step scaled or made NaN, under
``fope_megatron.testing.faults``) and by truncating checkpoint files after they were written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fope_megatron.testing import faults, launch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def steps_of(run_dir):
    return [r["step"] for r in launch.metrics(run_dir)]


def test_diverged_run_stops_unsaved_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    from fope_megatron.train.guard import NONFINITE_EXIT_CODE

    run_dir = tmp_path / "diverged"
    common = [f"data.path=[{corpus}]", "train.steps=8", "train.save_interval=2",
              "train.keep_last=1"]  # fmt: skip
    nan = {"FOPE_FAULT_LOSS": ",".join(f"{s}:nan" for s in range(5, 9))}  # NaN from step 5 on
    proc = launch.train(run_dir, common, extra_env=nan, check=False, module=faults.MODULE)
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-3000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["reason"] == "nonfinite" and status["step"] == 5
    assert status["last_checkpoint"] == "step_00000004" and "non-finite loss" in status["detail"]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004"]  # kept, none newer
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    # the run is not lost: it resumes from the good checkpoint and finishes
    launch.train(run_dir, [*common, "train.resume=auto"])
    recs = launch.metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in recs[5:])


def test_skip_drops_updates_the_same_under_zero0_and_zero1(corpus, tmp_path):
    """NaN at steps 3,4 and 6,7,8 with max 3 consecutive skips: 3,4 dropped, 5 trains, the run
    stops at 8 (the third skip in a row). ZeRO-0 (trainer's drop, 1 process) and ZeRO-1
    (DeepSpeed's overflow skip, 2 ranks) give the same losses, and the lr holds while skipping."""
    env = {"FOPE_FAULT_LOSS": "3:nan,4:nan,6:nan,7:nan,8:nan"}
    common = [f"data.path=[{corpus}]", "train.steps=10", "train.on_nonfinite=skip",
              "train.max_consecutive_skips=3"]  # fmt: skip
    runs = {}
    for name, stage, launcher, nproc in (("z0", 0, "python", 1), ("z1", 1, "torchrun", 2)):
        run_dir = tmp_path / name
        launch.train(run_dir, [*common, f"deepspeed.zero_stage={stage}"], launcher, nproc,
                     extra_env=env, check=False, module=faults.MODULE)  # fmt: skip
        status = json.loads((run_dir / "exit_status.json").read_text())
        assert status["step"] == 8 and "3 consecutive" in status["detail"], status
        runs[name] = launch.metrics(run_dir)
    for recs in runs.values():
        assert [r["skipped"] for r in recs] == [False, False, True, True, False, True, True, False]
        assert recs[6]["skipped_total"] == 4 and not recs[7]["skipped"]  # 8 stopped, not skipped
        assert recs[2]["lr"] == recs[3]["lr"] == recs[4]["lr"]  # the schedule held
        assert math.isfinite(recs[4]["loss"])
    for a, b in zip(runs["z0"], runs["z1"], strict=True):
        if math.isfinite(a["loss"]):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def test_loss_spike_is_skipped(corpus, tmp_path):
    run_dir = tmp_path / "spike"
    overrides = [f"data.path=[{corpus}]", "train.steps=6", "train.on_nonfinite=skip",
                 "train.loss_spike=3", "train.loss_spike_window=2"]  # fmt: skip
    launch.train(run_dir, overrides, extra_env={"FOPE_FAULT_LOSS": "4:20"}, module=faults.MODULE)
    recs = launch.metrics(run_dir)
    assert [r["skipped"] for r in recs] == [False, False, False, True, False, False]
    assert recs[3]["lr"] == recs[4]["lr"]


def test_changed_settings_on_resume_are_applied_or_refused(corpus, tmp_path):
    from fope_megatron.train.schedule import lr_at

    run_dir = tmp_path / "changes"
    first = [f"data.path=[{corpus}]", "train.steps=6", "train.exit_at_step=3"]
    launch.train(run_dir, first)
    changed = [f"data.path=[{corpus}]", "train.steps=8", "train.lr=5e-4", "train.adam_beta2=0.99",
               "train.weight_decay=0.05"]  # fmt: skip
    refused = launch.train(run_dir, [*changed, "train.resume_changes=refuse"], check=False)
    assert refused.returncode == 2
    for needle in ("train.lr: checkpoint 0.001, config 0.0005", "train.steps: checkpoint 6",
                   "train.adam_beta2", "train.weight_decay", "step_00000003"):  # fmt: skip
        assert needle in refused.stderr, (needle, refused.stderr[-2000:])
    assert steps_of(run_dir) == [1, 2, 3]  # refused before anything ran
    applied = launch.train(run_dir, changed)  # apply is the default
    for needle in ("train.lr changed 0.001 -> 0.0005", "train.steps changed 6 -> 8",
                   "train.adam_beta2 changed 0.95 -> 0.99"):  # fmt: skip
        assert needle in applied.stderr, (needle, applied.stderr[-2000:])
    recs = launch.metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    for r in recs[3:]:  # the new peak lr and length shape the schedule from the resumed step on
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 5e-4, 1e-4, 1, 8), rel=1e-9)


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(corpus, tmp_path):
    from fope_megatron.checkpoint import store

    run_dir = tmp_path / "damaged"
    common = [f"data.path=[{corpus}]", "train.save_interval=2", "train.keep_last=2",
              "train.steps=6"]  # fmt: skip
    launch.train(run_dir, [*common, "train.exit_at_step=4"])
    first = launch.losses(run_dir)
    ckpts = run_dir / "checkpoints"
    states = ckpts / "step_00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-4096])  # truncated after it was written
    # rotation keeps the newest intact checkpoint even when it is beyond keep_last
    store.prune(ckpts, 1)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    proc = launch.train(run_dir, common)
    assert "DAMAGED CHECKPOINT" in proc.stderr and str(states) in proc.stderr, proc.stderr[-3000:]
    recs = launch.metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from step 2
    assert {r["step"]: r["loss"] for r in recs[4:6]} == {3: first[3], 4: first[4]}  # bitwise
    assert (ckpts / "latest").read_text().strip() == "step_00000006"


def test_preprocess_skips_bad_lines_and_counts_them(tmp_path, capsys):
    from fope_megatron.data.preprocess import main

    src = tmp_path / "mixed.jsonl"
    src.write_text('{"text": "one"}\n{"text": "tw\n[1, 2]\n{"text": "three"}\n\n{"text": "four"}\n')
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "out"),
                 "--skip-bad-lines"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["skipped_bad_lines"] == 2 and meta["num_docs"] == 3
    assert "skipped 2 malformed lines" in capsys.readouterr().out


def test_eval_data_is_the_whole_prefix_or_a_file(corpus, tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from fope_megatron.config import load_config
    from fope_megatron.data.tokenizer import get_tokenizer
    from fope_megatron.eval.heldout import heldout_tokens

    tok = get_tokenizer("byte")
    cfg = load_config(None, [f"data.path=[{corpus}]", "data.split=100,0,0"])
    with pytest.raises(ValueError, match="trained on all of it"):
        heldout_tokens(cfg, tok, 256)  # the run's own data: nothing was held out
    ds = IndexedDataset(corpus, mmap=True)
    first = np.concatenate([np.asarray(ds[i]) for i in range(3)])
    got = heldout_tokens(cfg, tok, 256, corpus)  # a given prefix: all of it, from document 0
    assert got.tolist() == first[:256].tolist()
    text = tmp_path / "held.jsonl"
    text.write_text('{"text": "abc"}\n{"text": "de"}\n')
    assert heldout_tokens(cfg, tok, 100, str(text)).tolist() == [97, 98, 99, 256, 100, 101, 256]
    plain = tmp_path / "held.txt"
    plain.write_text("xyz")
    assert heldout_tokens(cfg, tok, 100, str(plain)).tolist() == [120, 121, 122, 256]
    split = load_config(None, [f"data.path=[{corpus}]", "data.split=98,2,0"])
    start = round(0.98 * len(ds))  # the run's own data: after its training part
    assert heldout_tokens(split, tok, 50).tolist() == np.asarray(ds[start])[:50].tolist()


def test_checkpoints_carry_a_manifest_that_catches_damage(tmp_path, corpus):
    from fope_megatron.checkpoint import manifest

    run_dir = tmp_path / "m"
    launch.train(run_dir, [f"data.path=[{corpus}]", "train.steps=1"])
    folder = run_dir / "checkpoints" / "step_00000001"
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"layout.json", "mp_rank_00_model_states.pt", "train_settings.json"} <= set(listed)
    assert "model_full.pt" not in listed  # nothing gathered at save
    assert manifest.damaged_files(folder) == []
    model = folder / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model.write_bytes(bytes(data))
    assert manifest.problems(folder, checksums=False) == []  # sizes alone do not see it
    with pytest.raises(manifest.CheckpointDamaged, match="mp_rank_00_model_states.pt: CRC-32"):
        manifest.verify(folder)
    assert Path(folder / "COMPLETE").is_file()
