"""The shell side of launching, without Slurm: every script parses and lints, and the one-node
launchers (launch/torchrun.sh, launch/deepspeed.sh) start the ranks, pass arguments through,
filter the console by rank and return the trainer's failure.

The ranks run ``fope_megatron.testing.slurm_probe`` (the trainer's launch interface, no model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fope_megatron.testing.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(
    [*REPO.glob("slurm/*.sbatch"), REPO / "slurm/lib.sh", *REPO.glob("launch/*.sh")]
    + [*REPO.glob("scripts/*.sh")]
    + [REPO / ".ci/run", REPO / ".ci/install_system_deps.sh"]
)
LAUNCHERS = ["launch/torchrun.sh", "launch/deepspeed.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(
        ["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SHELL_SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_launcher(script: str, tmp_path: Path, *train_args: str, **env: str):
    config = tmp_path / "tiny.yaml"
    config.write_text("# the probe reads no config\n")
    full_env = {
        **os.environ,
        "FOPE_CPU": "1",
        "NPROC": "2",
        "PYTHON": sys.executable,
        "TRAIN_MODULE": "fope_megatron.testing.slurm_probe",
        "LOG_DIR": str(tmp_path / "logs"),
        "MASTER_PORT": str(free_port()),  # not deepspeed's 29500: other runs may hold it
        **env,
    }
    return subprocess.run(
        [str(REPO / script), str(config), f"run.dir={tmp_path / 'run'}", *train_args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_runs_ranks_and_filters_console(script, tmp_path):
    proc = run_launcher(script, tmp_path, "probe.steps=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "run/probe").glob("*.json"))]
    assert [(r["rank"], r["world_size"], r["sum"]) for r in ranks] == [(0, 2, 1.0), (1, 2, 1.0)]
    assert "probe.steps=2" in ranks[0]["argv"]  # key=value arguments reach the trainer
    # LOG_RANK=0 (default): rank 0's output on the console, rank 1's only in LOG_DIR.
    assert "probe rank=0 step=2" in out
    assert "probe rank=1" not in out
    logged = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))
    assert "probe rank=1 step=2" in logged


@pytest.mark.integration
@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_returns_failure(script, tmp_path):
    proc = run_launcher(script, tmp_path, "probe.fail_rank=0", NPROC="1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "failing on purpose" in proc.stdout + proc.stderr + "".join(
        p.read_text() for p in (tmp_path / "logs").rglob("*.log")
    )
