"""The Slurm scripts on a real two-node Slurm cluster on localhost (fixture in conftest.py).

The jobs run ``fope_megatron.testing.slurm_probe``, a stand-in with the trainer's launch interface
(``--config``, ``run.dir=``, ``train.resume=auto``, exit 99 after saving on SIGUSR1), in CPU mode:
one gloo rank per node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.timeout(170)]

REPO = Path(__file__).resolve().parents[1]
PROBE = "fope_megatron.testing.slurm_probe"
SCRIPTS = ["slurm/pretrain.sbatch", "slurm/pretrain_deepspeed.sbatch"]


def job_env(tmp_path: Path, run_dir: Path) -> dict[str, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text("# the probe reads no config\n")
    return {
        "CONFIG": str(config),
        "RUN_DIR": str(run_dir),
        "FOPE_CPU": "1",
        "TRAIN_MODULE": PROBE,
        "PYTHON": sys.executable,
    }


def submit(cluster, script: str, tmp_path: Path, env: dict, *train_args: str) -> tuple[int, Path]:
    out = tmp_path / "job.out"
    job_id = cluster.sbatch(
        f"--output={out}",
        f"--chdir={tmp_path}",
        "--gpus-per-node=0",  # CPU mode: override the script's GPU request
        str(REPO / script),
        *train_args,
        env=env,
    )
    return job_id, out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reports(run_dir: Path, attempt: int) -> list[dict]:
    files = sorted((run_dir / "probe").glob(f"rank*.attempt{attempt}.json"))
    return [json.loads(f.read_text()) for f in files]


def explain(cluster, out: Path) -> str:
    log = out.read_text(errors="replace")[-6000:] if out.exists() else "(no job output)"
    return f"----- job output (tail) -----\n{log}\n{cluster.diagnostics()}"


def test_cluster_has_two_idle_nodes_on_distinct_ports(slurm_cluster):
    slurm_cluster.wait_idle(30)  # a job of an earlier test may still be completing
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle"}
    ports = set()
    for node in ("node1", "node2"):
        info = slurm_cluster.run("scontrol", "show", "node", "-o", node).stdout
        assert "NodeAddr=127.0.0.1" in info
        ports.add(next(f for f in info.split() if f.startswith("Port=")))
    assert len(ports) == 2
    # Both slurmd launch tasks: one per node, each told its own node name.
    out = slurm_cluster.run(
        "srun", "--nodes=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"
    )
    assert sorted(out.stdout.split()) == ["node1", "node2"]


def test_two_node_torchrun_rendezvous(slurm_cluster, tmp_path):
    """sbatch --wait: 2 nodes x 1 task, srun around torchrun (c10d), MASTER_ADDR via scontrol."""
    run_dir = tmp_path / "run"
    script = tmp_path / "allreduce.sbatch"
    script.write_text(
        f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
set -euo pipefail
source {REPO}/slurm/lib.sh
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
addr=$(fope_resolve_node "$first")
echo "rendezvous: $first -> $addr"
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run --nnodes=2 --nproc-per-node=1 \\
    --rdzv-backend=c10d --rdzv-endpoint="$addr:$((15000 + SLURM_JOB_ID % 15000))" \\
    --rdzv-id="$SLURM_JOB_ID" -m {PROBE} --config /dev/null run.dir={run_dir} probe.steps=1
"""
    )
    out = tmp_path / "job.out"
    proc = slurm_cluster.run(
        "sbatch", "--wait", f"--output={out}", f"--chdir={tmp_path}", str(script),
        env={"PYTHON": sys.executable}, check=False, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stderr}\n{explain(slurm_cluster, out)}"
    assert "rendezvous: node1 -> 127.0.0.1" in out.read_text()
    ranks = reports(run_dir, 0)
    assert sorted(r["rank"] for r in ranks) == [0, 1], explain(slurm_cluster, out)
    assert {r["node"] for r in ranks} == {"node1", "node2"}
    assert all(r["world_size"] == 2 and r["sum"] == 0 + 1 for r in ranks)


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_checkpoints_requeues_and_resumes_on_usr1(slurm_cluster, tmp_path, script):
    """The real script in CPU mode: USR1 to the batch shell -> save, exit 99, requeue, resume."""
    run_dir = tmp_path / "run"
    steps = 16
    env = job_env(tmp_path, run_dir)
    job_id, out = submit(
        slurm_cluster, script, tmp_path, env, f"probe.steps={steps}", "probe.step_seconds=0.5"
    )

    def stepping_or_ended() -> bool:
        return bool(metrics(run_dir)) or slurm_cluster.job(job_id).get("JobState") not in (
            "PENDING", "CONFIGURING", "RUNNING",
        )  # fmt: skip

    slurm_cluster.poll(stepping_or_ended, 75, "the first training step")
    assert metrics(run_dir), f"job ended before its first step\n{explain(slurm_cluster, out)}"
    # What Slurm does ahead of the time limit (--signal=B:USR1@120), here by hand.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    info = slurm_cluster.wait_job(job_id, 90)

    why = explain(slurm_cluster, out)
    assert info["JobState"] == "COMPLETED", why
    assert info["Restarts"] == "1", f"expected exactly one requeue\n{why}"
    assert info["ExitCode"] == "0:0", why
    saved = int((run_dir / "checkpoints" / "latest").read_text())
    assert 1 <= saved < steps, why
    rows = metrics(run_dir)
    # The requeued run starts at the step after the checkpoint; no step is lost or repeated.
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), why
    assert [r["attempt"] for r in rows] == [0] * saved + [1] * (steps - saved), why
    assert all(r["dp"] == 2 for r in rows)
    for attempt, start in ((0, 1), (1, saved + 1)):
        ranks = reports(run_dir, attempt)
        assert sorted(r["rank"] for r in ranks) == [0, 1], why
        assert {r["node"] for r in ranks} == {"node1", "node2"}
        for r in ranks:
            assert (r["world_size"], r["sum"], r["start_step"]) == (2, 1.0, start), r
            assert r["fope_cpu"] == "1" and r["config"] == env["CONFIG"]
            assert f"run.dir={run_dir}" in r["argv"] and "train.resume=auto" in r["argv"]
    log = out.read_text()
    assert "got SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert f"rendezvous: 127.0.0.1:{15000 + job_id % 15000}  (first node node1)" in log
    for restart in (0, 1):  # versions and environment logged at every start
        env_log = (run_dir / "slurm" / f"job{job_id}-restart{restart}.txt").read_text()
        assert "torch: " in env_log and f"SLURM_JOB_ID={job_id}" in env_log


def test_crash_fails_the_job_without_requeue(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id, out = submit(
        slurm_cluster, SCRIPTS[0], tmp_path, job_env(tmp_path, run_dir),
        "probe.fail_rank=1", "probe.steps=1000", "probe.step_seconds=0.5",
    )  # fmt: skip
    info = slurm_cluster.wait_job(job_id, 90)
    why = explain(slurm_cluster, out)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", why
    assert "requeueing" not in out.read_text(), why


def test_missing_config_fails_before_launch(slurm_cluster, tmp_path):
    env = job_env(tmp_path, tmp_path / "run")
    env["CONFIG"] = str(tmp_path / "nope.yaml")
    job_id, out = submit(slurm_cluster, SCRIPTS[0], tmp_path, env)
    info = slurm_cluster.wait_job(job_id, 60)
    assert info["JobState"] == "FAILED", explain(slurm_cluster, out)
    assert f"CONFIG={env['CONFIG']} does not exist" in out.read_text()
