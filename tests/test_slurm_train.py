"""The real trainer through the real Slurm scripts on the local two-node cluster (CPU mode).

2 nodes x 1 task, gloo, a tiny model: the job trains with dp=2, is signalled (as Slurm does before
the time limit), saves, requeues itself, resumes at the next step and finishes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 120
TINY_YAML = """\
run: {seed: 7, log_interval: 10, tensorboard: false}
train: {steps: %d, micro_batch_size: 2, global_batch_size: 4, seq_length: 64, lr: 2.0e-3,
        min_lr: 2.0e-4, warmup_steps: 5, save_interval: 1000, eval_interval: 0}
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, ffn_hidden_size: 128}
fope: {sigma: 0.3}
deepspeed: {zero_stage: 1}
data: {path: [%s]}
"""


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if "save_total_s" not in r]  # one per step, not the saves' timings


@pytest.mark.parametrize("script", ["slurm/pretrain.sbatch", "slurm/pretrain_deepspeed.sbatch"])
def test_real_trainer_trains_preempts_requeues_and_resumes(slurm_cluster, tmp_path, corpus, script):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML % (STEPS, corpus))
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    env = {"CONFIG": str(config), "RUN_DIR": str(run_dir), "FOPE_CPU": "1",
           "PYTHON": sys.executable, "FOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    job = slurm_cluster.sbatch(
        f"--output={out}", f"--chdir={REPO}", "--gpus-per-node=0", str(REPO / script), env=env
    )

    def why() -> str:
        log = out.read_text(errors="replace")[-6000:] if out.exists() else "(no job output)"
        return f"----- job output -----\n{log}\n{slurm_cluster.diagnostics()}"

    def stepping_or_ended() -> bool:
        state = slurm_cluster.job(job).get("JobState")
        return len(metrics(run_dir)) >= 3 or state not in ("PENDING", "CONFIGURING", "RUNNING")

    slurm_cluster.poll(stepping_or_ended, 180, "three training steps")
    assert len(metrics(run_dir)) >= 3, why()
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # as --signal=B:USR1@120
    info = slurm_cluster.wait_job(job, 300)
    assert info["JobState"] == "COMPLETED", why()
    assert info["Restarts"] == "1", why()
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status == {"reason": "finished", "step": STEPS, "exit_code": 0}, why()
    rows = metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), why()  # the requeued run began at the next step
    assert all(r["dp"] == 2 and r["world_size"] == 2 for r in rows)  # both nodes took part
    assert sum(r["loss"] for r in rows[-10:]) < sum(r["loss"] for r in rows[:10]) - 5.0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    saved = [p.name for p in ckpts.iterdir() if p.name.startswith("step_")]
    assert len(saved) >= 2, saved  # the preemption checkpoint and the final one
    assert "resumed from" in out.read_text(errors="replace"), why()


def test_plain_srun_without_torchrun(slurm_cluster, tmp_path, corpus):
    """``srun python -m fope_megatron.train``: ranks, world and rendezvous from SLURM_* alone."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML % (6, corpus))
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} -m fope_megatron.train --config {config} "
        f"run.dir={run_dir}\n"
    )
    out = tmp_path / "job.out"
    env = {"FOPE_CPU": "1", "FOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    job = slurm_cluster.sbatch(
        f"--output={out}", f"--chdir={REPO}", "--nodes=2", "--ntasks-per-node=1", "--wait",
        str(script), env=env, timeout=300,
    )  # fmt: skip
    info = slurm_cluster.wait_job(job, 60)
    log = out.read_text(errors="replace")[-4000:] if out.exists() else ""
    assert info["JobState"] == "COMPLETED", log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7)), log
    assert all(r["world_size"] == 2 and r["dp"] == 2 for r in rows)
