"""Launch the real trainer in subprocesses (torchrun, the deepspeed launcher, plain python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .distributed import free_port

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "train.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup_steps=1",
    "train.eval_interval=0",
    "train.save_interval=1000",
    "run.log_interval=1",
    "run.tensorboard=false",
    "fope.sigma=0.5",
]


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e.update(FOPE_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    e.update(extra or {})
    return e


def run_script(
    script: str, args: list[str], extra_env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``bash scripts/<script> args`` from the repository root, output captured; the environment
    is this process's plus ``extra_env``."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["bash", str(root / "scripts" / script), *args], capture_output=True, text=True,
        env={**os.environ, **(extra_env or {})}, timeout=timeout, cwd=root,
    )  # fmt: skip


def command(
    launcher: str, nproc: int, args: list[str], module: str = "fope_megatron.train"
) -> list[str]:
    """The command line starting ``module`` (the trainer, or a test wrapper around it)."""
    py = sys.executable
    if launcher == "python":
        return [py, "-m", module, *args]
    if launcher == "torchrun":
        return [
            py, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", module, *args,
        ]  # fmt: skip
    if launcher == "deepspeed":
        ds = str(Path(py).with_name("deepspeed"))
        return [
            ds, f"--num_gpus={nproc}", f"--master_port={free_port()}",
            "--module", module, *args,
        ]  # fmt: skip
    raise ValueError(launcher)


def train(
    run_dir: Path,
    overrides: list[str],
    launcher: str = "python",
    nproc: int = 1,
    config: str | None = None,
    timeout: float = 300,
    extra_env: dict | None = None,
    check: bool = True,
    module: str = "fope_megatron.train",
) -> subprocess.CompletedProcess:
    args = (["--config", config] if config else []) + [*TINY, f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(
        command(launcher, nproc, args, module),
        env=env(extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{launcher} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def records(run_dir: Path) -> list[dict]:
    """Every record of ``RUN_DIR/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(run_dir: Path) -> list[dict]:
    """The step and validation records (not the saves' timing records, see ``saves``)."""
    return [r for r in records(run_dir) if "save_total_s" not in r]


def saves(run_dir: Path) -> list[dict]:
    """The saves' records: ``save`` (the tag), ``save_blocked_s``, ``save_total_s``."""
    return [r for r in records(run_dir) if "save_total_s" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
