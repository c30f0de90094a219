"""Checks before any process group starts (``fope-train`` runs them first, ``--dry-run`` only
them): the config for the world size, the data files, the vocab, the checkpoint to resume."""

from __future__ import annotations

import os

from ..checkpoint import store as checkpoint
from ..config import Config, ConfigError, check_data, check_vocab
from . import resume


def tokenizer_vocab(cfg: Config, prefixes: list[str]) -> int:
    """The vocab the data was tokenized with (sidecar meta), or the configured tokenizer's."""
    from ..data.integrity import read_meta_checked
    from ..data.tokenizer import get_tokenizer

    # invalid JSON fails on every rank; a sidecar's other faults are local rank 0's to name
    metas = [read_meta_checked(p) or {} for p in prefixes]
    sizes = [m["vocab_size"] for m in metas if isinstance(m.get("vocab_size"), int)]
    if sizes:
        return max(sizes)
    return get_tokenizer(cfg.data.tokenizer).vocab_size


def preflight(cfg: Config, world_size: int):
    """Every check that needs no process group; raises ConfigError naming key and value. The
    config checks run on every rank, the data files' checks on local rank 0 only."""
    from ..data.integrity import check_data_files

    dims = cfg.validate(world_size)
    prefixes = check_data(cfg)
    if env_local_rank() == 0:  # the files are the same for a node's ranks: one reads them
        check_data_files(cfg, prefixes)
    check_vocab(cfg, tokenizer_vocab(cfg, prefixes))
    from ..checkpoint.manifest import CheckpointDamaged

    try:  # names and sizes against their manifests; the ranks share the checksums later
        found = checkpoint.resolve_resume(cfg.train.resume, cfg.run.dir, checksums=False)
        if cfg.train.init_from and found is None:
            checkpoint.resolve_resume(cfg.train.init_from, cfg.run.dir, checksums=False)
    except CheckpointDamaged as err:
        raise ConfigError(str(err)) from None
    if found is not None:
        from ..checkpoint import layout

        layout.check(cfg, world_size, found[0] / found[1])  # a layout it cannot reshard fails here
        resume.check(cfg, found[0] / found[1])  # train.resume_changes=refuse fails here
    return dims


def env_local_rank() -> int:
    """This process's rank on its node: torchrun's and the deepspeed launcher's ``LOCAL_RANK``
    (first: under ``srun`` + torchrun every rank inherits ``SLURM_LOCALID=0``), else Slurm's
    ``SLURM_LOCALID``, else 0."""
    env = os.environ
    return int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)


def env_world_size() -> int:
    """The world size the launcher announces (``WORLD_SIZE``, Slurm's ``SLURM_NTASKS``), else 1."""
    env = os.environ
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)
