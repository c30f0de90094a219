"""Resume on another layout: DeepSpeed's universal checkpoint, made from our ZeRO 1-3 checkpoints.

A checkpoint holds each tensor-parallel rank's model and each data-parallel rank's flat ZeRO
partition of the fp32 master weights and Adam moments. DeepSpeed's ``ds_to_universal`` turns
that into one file per parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``,
``exp_avg_sq.pt``), merged over TP by the patterns every save records
(``universal_checkpoint_info``: which parameters are row-parallel, which hold two sub-parameters,
which are replicated); a run started with ``checkpoint.load_universal`` then slices each
parameter for its own tp rank and re-partitions it over its own data-parallel group. So the data
parallel size (and with it cp / ulysses), the ZeRO stage (1, 2, 3) and, under ZeRO 1-2, the
tensor parallel size may change between a save and a resume, with the optimizer state, the step,
the schedule and the data position kept.

The converted checkpoint sits beside the original (``step_N_universal/``, with its own manifest
and ``COMPLETE``); it is made once, by all ranks of the resuming job (each its share of the
partitions and parameters) before its engine loads it, and pruned with its checkpoint.
``fope-ckpt convert --run RUN_DIR`` makes it ahead of the job, on one process or under torchrun
on many (for a large model, so the conversion does not run inside the job's collective timeout).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from . import manifest

log = logging.getLogger("fope")

SUFFIX = "_universal"
MARKER = "COMPLETE"


def universal_info(model: torch.nn.Module) -> dict:
    """``universal_checkpoint_info`` of a megatron-core GPT model built by this project: how
    ``ds_to_universal`` merges each parameter over tensor-parallel ranks (default: concatenate
    along dim 0, right for column-parallel weights and the fused QKV, whose rows are grouped by
    KV group)."""
    from deepspeed.checkpoint import constants as c

    from ..fope import FourierPositionEmbedding

    fope = {
        f"{name}.coef_{kind}" if name else f"coef_{kind}"
        for name, m in model.named_modules()
        if isinstance(m, FourierPositionEmbedding)
        for kind in ("cos", "sin")
    }
    replicated, rows, two = [], [], []
    for name, p in model.named_parameters():
        pattern = f"^{re.escape(name)}$"
        if name in fope:
            rows.append(pattern)  # [layers, KV groups, D_in, D_out]: split over groups (dim 1)
        elif not getattr(p, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif int(p.partition_dim) == 1:
            rows.append(pattern)
        elif int(getattr(p, "partition_stride", 1)) == 2:
            two.append(pattern)  # SwiGLU linear_fc1: [gate, up], each split over TP
        elif int(getattr(p, "partition_stride", 1)) != 1:
            raise NotImplementedError(f"{name}: partition stride {p.partition_stride}")
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: rows,
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: two,
    }


def folder_for(folder: Path) -> Path:
    """Where the universal checkpoint of checkpoint ``folder`` lives."""
    folder = Path(folder)
    return folder.with_name(folder.name + SUFFIX)


def is_ready(folder: Path) -> bool:
    out = folder_for(folder)
    return (out / MARKER).is_file() and not manifest.problems(out, checksums=False)


def convert(folder: Path) -> Path:
    """Make (once) the universal checkpoint of ZeRO 1-3 checkpoint ``folder``; returns its folder.

    Collective where a process group exists: every rank converts its share of the ZeRO
    partitions and of the parameters (``compat/deepspeed_universal``) and checksums its share of
    the output for the manifest; without one, this process does all. A killed conversion leaves
    no ``COMPLETE`` and is redone; the original is never touched.
    """
    import torch.distributed as dist

    from ..compat.deepspeed_universal import ds_to_universal

    grouped = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)

    def sync(obj):
        if not grouped:
            return [obj]
        everyone = [None] * world
        dist.all_gather_object(everyone, obj)
        return everyone

    folder = Path(folder)
    out = folder_for(folder)
    if sync(is_ready(folder) if rank == 0 else None)[0]:
        return out
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        log.warning("resume: converting %s to a universal checkpoint %s (once, on %d ranks)",
                    folder, out, world)  # fmt: skip
    sync(None)
    ds_to_universal(str(folder), str(out), rank, world, sync)
    if rank == 0:
        for name in ("train_settings.json", "layout.json"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
    sync(None)
    from .store import checksum_shared

    entries = checksum_shared(out) if grouped else None
    if rank == 0:
        manifest.write(out, entries)
        (out / MARKER).write_text((folder / MARKER).read_text())
    sync(None)
    return out
