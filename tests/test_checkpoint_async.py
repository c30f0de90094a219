"""Asynchronous save (``train.async_save``): the writer thread writes an interval checkpoint from a
host snapshot while the next steps run; it is marked complete only after every rank's writer is
done, it resumes bitwise like a synchronous one, and a kill while it is being written leaves the
previous checkpoint ``latest``."""

import shutil

import pytest

from fope_megatron.testing import faults
from fope_megatron.testing.launch import losses, saves, train

pytestmark = pytest.mark.integration

STEPS = 6


def _base(corpus):
    return [f"data.path=[{corpus}]", f"train.steps={STEPS}", "train.save_interval=2",
            "deepspeed.zero_stage=1"]  # fmt: skip


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("sync") / "run"
    train(run, _base(corpus))
    return losses(run)


def test_async_save_completes_later_and_resumes_bitwise(corpus, straight, tmp_path):
    run = tmp_path / "async"
    proc = train(run, [*_base(corpus), "train.async_save=true", "train.exit_at_step=3"])
    log = proc.stdout + proc.stderr
    # step 2's save returned at once and was completed after step 3's update
    queued = log.index("step_00000002 (asynchronous)")
    done = log.index("saved checkpoint", queued)
    assert "step_00000002" in log[done : log.index("\n", done)]
    assert queued < done  # (console lines are batched, so no order against step 3's line)
    timed = saves(run)
    assert [r["save"] for r in timed] == ["step_00000002", "step_00000003"]
    assert timed[0]["save_total_s"] > timed[0]["save_blocked_s"]  # written after the loop went on
    assert all(0 <= r["save_blocked_s"] <= r["save_total_s"] for r in timed)
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000002" / "COMPLETE").is_file()
    assert losses(run) == {k: v for k, v in straight.items() if k <= 3}
    shutil.rmtree(ckpts / "step_00000003")  # resume from the asynchronous one
    (ckpts / "latest").unlink()
    train(run, [*_base(corpus), "train.async_save=true"])
    got = losses(run)
    assert {k: got[k] for k in range(3, STEPS + 1)} == {
        k: straight[k] for k in range(3, STEPS + 1)
    }  # bitwise


def test_kill_during_the_background_write_keeps_the_last_checkpoint(corpus, straight, tmp_path):
    run = tmp_path / "killed"
    args = [*_base(corpus), "train.async_save=true"]
    kill = {"FOPE_FAULT_KILL_IN_SAVE": "4"}
    proc = train(run, args, extra_env=kill, check=False, module=faults.MODULE)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL with step 4's writes in flight
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004" / "COMPLETE").exists()
    train(run, args)  # resumes from step 2, bitwise
    got = losses(run)
    assert {k: got[k] for k in range(3, STEPS + 1)} == {k: straight[k] for k in range(3, STEPS + 1)}
