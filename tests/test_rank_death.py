"""A rank dies mid-training (SIGKILL, as the OOM killer or a lost node does): the job ends in
bounded time, the latest complete checkpoint is intact, and resuming reproduces the per-step
losses of an uninterrupted run. Under the local Slurm cluster the kill ends the job step and the
requeued job finishes the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fope_megatron.testing import launch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 150  # tiny steps take ~30 ms: long enough to kill a rank mid-run


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    recs = [json.loads(x) for x in text.splitlines() if x.strip()]
    return [r for r in recs if "save_total_s" not in r]  # one per step, not the saves' timings


def trainer_pid(rank: int, under: int | None = None) -> int | None:
    """The pid of the trainer process with ``RANK=rank`` (a child of ``under`` if given)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"fope_megatron.train" not in cmd or b"torch.distributed.run" in cmd:
            continue
        if f"RANK={rank}".encode() in env and (under is None or ppid == under):
            return int(entry.name)
    return None


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_one_rank_of_torchrun(corpus, tmp_path):
    common = [f"data.path=[{corpus}]", f"train.steps={STEPS}", "train.save_interval=20",
              "train.keep_last=2", "deepspeed.zero_stage=1", "dist.timeout_minutes=1"]  # fmt: skip
    straight = tmp_path / "straight"
    launch.train(straight, common, "torchrun", 2)
    run_dir = tmp_path / "killed"
    args = [*launch.TINY, f"run.dir={run_dir}", *common]
    proc = subprocess.Popen(
        launch.command("torchrun", 2, args), env=launch.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and len(rows(run_dir)) >= 30, 120, "step 30")
    victim = trainer_pid(1, under=proc.pid)
    assert victim is not None and len(rows(run_dir)) < STEPS, "the run ended before the kill"
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=180)
    took = time.time() - t0
    print(f"kill-to-exit: {took:.1f} s")
    assert proc.returncode != 0 and took < 90, (proc.returncode, took, err[-3000:])
    killed_at = max(r["step"] for r in rows(run_dir))
    assert killed_at < STEPS
    # the latest complete checkpoint is intact (manifest verified) and the run resumes from it
    from fope_megatron.checkpoint import manifest, store

    tag = store.find_latest(run_dir / "checkpoints")
    assert manifest.damaged_files(run_dir / "checkpoints" / tag) == []
    saved = int(tag.split("_")[1])
    launch.train(run_dir, common, "torchrun", 2)
    recs = rows(run_dir)
    resumed = recs[killed_at:]
    assert [r["step"] for r in resumed] == list(range(saved + 1, STEPS + 1))
    want = launch.losses(straight)
    assert {r["step"]: r["loss"] for r in resumed} == {
        s: want[s] for s in range(saved + 1, STEPS + 1)
    }
    assert {r["step"]: r["loss"] for r in recs[:killed_at]} == {
        s: want[s] for s in range(1, killed_at + 1)
    }


SLURM_YAML = """\
run: {seed: 7, log_interval: 10, tensorboard: false}
train: {steps: %d, micro_batch_size: 2, global_batch_size: 4, seq_length: 64, lr: 2.0e-3,
        min_lr: 2.0e-4, warmup_steps: 5, save_interval: 20, eval_interval: 0}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, ffn_hidden_size: 128}
deepspeed: {zero_stage: 1}
dist: {timeout_minutes: 1}
data: {path: [%s]}
"""


@pytest.mark.slurm
def test_sigkill_one_rank_under_slurm_requeues_and_finishes(slurm_cluster, tmp_path, corpus):
    config = tmp_path / "tiny.yaml"
    config.write_text(SLURM_YAML % (STEPS, corpus))
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    env = {"CONFIG": str(config), "RUN_DIR": str(run_dir), "FOPE_CPU": "1",
           "PYTHON": sys.executable, "FOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    job = slurm_cluster.sbatch(
        f"--output={out}", f"--chdir={REPO}", "--gpus-per-node=0",
        str(REPO / "slurm/pretrain.sbatch"), env=env,
    )  # fmt: skip

    def why() -> str:
        log = out.read_text(errors="replace")[-6000:] if out.exists() else "(no job output)"
        return f"----- job output -----\n{log}\n{slurm_cluster.diagnostics()}"

    latest = run_dir / "checkpoints" / "latest"

    def ready() -> bool:
        state = slurm_cluster.job(job).get("JobState")
        return (latest.exists() and len(rows(run_dir)) >= 30) or state not in (
            "PENDING", "CONFIGURING", "RUNNING")  # fmt: skip

    slurm_cluster.poll(ready, 240, "step 30 and a checkpoint")
    victim = trainer_pid(1)
    assert victim is not None and len(rows(run_dir)) < STEPS, why()
    os.kill(victim, signal.SIGKILL)  # the node-2 rank; its torchrun and the srun step end
    t0 = time.time()
    slurm_cluster.poll(lambda: "training step exited with status" in out.read_text(), 120,
                       "the job step to end")  # fmt: skip
    print(f"kill-to-step-end: {time.time() - t0:.1f} s")
    info = slurm_cluster.wait_job(job, 360)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", why()
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status == {"reason": "finished", "step": STEPS, "exit_code": 0}, why()
    steps = [r["step"] for r in rows(run_dir)]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1)), why()
    log = out.read_text(errors="replace")
    assert "requeueing job" in log and "resumed from" in log, why()
