"""Process groups: torch.distributed init (nccl on GPU, gloo on CPU) and megatron-core groups."""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess

import torch
import torch.distributed as dist


def ensure_accelerator() -> None:
    """DeepSpeed must be told to use its CPU accelerator when there is no GPU (set before import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    """A free TCP port on localhost (single-process runs, tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """nccl on GPU, gloo on CPU or when ``FOPE_CPU=1`` (CPU mode of the launch scripts)."""
    if os.environ.get("FOPE_CPU") == "1":
        return "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def comm_device() -> torch.device:
    """Where small tensors for collectives (flags, loss sums) must live: the current CUDA device
    under nccl (it has no CPU backend), the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def slurm_first_node_address() -> str:
    """The address of the allocation's first node: Slurm's NodeAddr for it, resolved."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    first = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    info = subprocess.run(
        ["scontrol", "show", "node", first, "-o"], capture_output=True, text=True
    ).stdout
    found = re.search(r"NodeAddr=(\S+)", info)
    return socket.gethostbyname(found.group(1) if found else first)


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
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = slurm_first_node_address()
        # the port rule of slurm/*.sbatch, below Linux's ephemeral range
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 15000))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


_ULYSSES_GROUP = None
_ULYSSES_RANKS: list[int] | None = None


def init_model_parallel(
    tp: int = 1, cp: int = 1, pp: int = 1, ulysses: int = 1, seed: int = 1234, vpp: int = 1
) -> None:
    """megatron-core's parallel_state groups plus the Ulysses group (idempotent per layout).

    ``pp`` pipeline stages, each holding ``vpp`` virtual stages (model chunks, interleaved 1F1B);
    megatron's order ``tp-cp-ep-dp-pp`` puts the stages of one pipeline ``world / pp`` ranks apart.

    Ulysses ranks are megatron *data-parallel* ranks that share one sample: megatron's own
    context parallelism must then be 1, megatron's data-parallel group (``dp * ulysses`` ranks
    with the same TP rank) is the gradient-averaging group (DeepSpeed's
    ``sequence_data_parallel`` group), and each run of ``ulysses`` consecutive members of it forms
    a Ulysses group (``get_ulysses_group``). Ranks that read distinct samples:
    :func:`sample_parallel_rank_and_size`.

    On a machine without CUDA this also applies :mod:`fope_megatron.compat.megatron_cpu` and
    installs a CPU RNG tracker seeded from ``seed`` (call :func:`seed_model_parallel_rng` to
    reseed), so megatron's sequence-parallel path runs on gloo.
    """
    from megatron.core import parallel_state as ps

    if ulysses > 1 and cp > 1:
        raise ValueError(
            f"parallel.ulysses={ulysses} with parallel.cp={cp}: combining DeepSpeed-Ulysses with "
            "megatron context parallelism is not supported; set one of them to 1"
        )
    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_context_parallel_world_size() == cp
            and ps.get_pipeline_model_parallel_world_size() == pp
            and (ps.get_virtual_pipeline_model_parallel_world_size() or 1) == vpp
            and get_ulysses_world_size() == ulysses
        ):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=cp,
        create_gloo_process_groups=not torch.cuda.is_available(),
    )
    _init_ulysses_group(ulysses)
    seed_model_parallel_rng(seed)


def _init_ulysses_group(ulysses: int) -> None:
    """Split every megatron data-parallel group into runs of ``ulysses`` consecutive ranks."""
    from megatron.core import parallel_state as ps

    global _ULYSSES_GROUP, _ULYSSES_RANKS
    _ULYSSES_GROUP, _ULYSSES_RANKS = None, None
    if ulysses == 1:
        return
    world = dist.get_world_size()
    dp = ps.get_data_parallel_world_size()
    if dp % ulysses:
        raise ValueError(
            f"megatron data-parallel size {dp} (world {world} / tp*pp) is not divisible by "
            f"parallel.ulysses={ulysses}"
        )
    # Every rank must create every group (torch.distributed.new_group is collective).
    me = dist.get_rank()
    dp_groups = ps.RankGenerator(
        tp=ps.get_tensor_model_parallel_world_size(),
        ep=1,
        dp=dp,
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=1,
        order="tp-cp-ep-dp-pp",
    ).get_ranks("dp")
    for dp_ranks in dp_groups:
        for i in range(0, dp, ulysses):
            ranks = list(dp_ranks[i : i + ulysses])
            group = dist.new_group(ranks)
            if me in ranks:
                _ULYSSES_GROUP, _ULYSSES_RANKS = group, ranks
    own = dist.get_process_group_ranks(ps.get_data_parallel_group())
    if _ULYSSES_RANKS is None or not set(_ULYSSES_RANKS) <= set(own):
        raise RuntimeError(f"rank {me}: Ulysses group {_ULYSSES_RANKS} not inside dp group {own}")


def get_ulysses_group():
    """The Ulysses (DeepSpeed sequence-parallel) group of this rank; None when ulysses == 1."""
    return _ULYSSES_GROUP


def get_ulysses_world_size() -> int:
    return 1 if _ULYSSES_GROUP is None else dist.get_world_size(_ULYSSES_GROUP)


def get_ulysses_rank() -> int:
    return 0 if _ULYSSES_GROUP is None else dist.get_rank(_ULYSSES_GROUP)


def sample_parallel_rank_and_size() -> tuple[int, int]:
    """(rank, size) among the ranks that read *distinct samples* (ParallelDims' ``dp``).

    megatron's data-parallel group already excludes CP ranks; Ulysses ranks are inside it and
    share samples, so they are divided out.
    """
    from megatron.core import parallel_state as ps

    u = get_ulysses_world_size()
    return ps.get_data_parallel_rank() // u, ps.get_data_parallel_world_size() // u


def get_gradient_reduction_group():
    """Ranks whose gradients are averaged (and ZeRO-partitioned): dp * cp * ulysses ranks with
    the same TP rank (megatron's data-parallel-with-context-parallel group)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def seed_model_parallel_rng(seed: int) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` on GPU; its CPU equivalent otherwise
    (same seeds: data-parallel ``seed``, tensor-parallel ``seed + 2718 + tp_rank``)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from ..compat.megatron_cpu import apply_megatron_cpu_compat, install_cpu_rng_tracker

    apply_megatron_cpu_compat()
    install_cpu_rng_tracker(seed, ps.get_tensor_model_parallel_rank())
