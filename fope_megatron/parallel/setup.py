"""Process groups: torch.distributed init (nccl on GPU, gloo on CPU) and megatron-core groups."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun / deepspeed / Slurm env; return (rank, world).

    Reads torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; when those are absent
    but ``SLURM_PROCID`` is present (``srun`` without torchrun), derives them from ``SLURM_*``.
    A single process without any of these gets a 1-rank group on a free local port.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:
        from ..testing.distributed import free_port

        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(tp: int = 1, cp: int = 1, pp: int = 1) -> None:
    """megatron-core's parallel_state groups for the given layout (idempotent per layout)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_context_parallel_world_size() == cp
            and ps.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        create_gloo_process_groups=not torch.cuda.is_available(),
    )
