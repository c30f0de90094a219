"""Where the trainer's data comes from: ``data.path``, or the built-in synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ..config import Config

SYNTHETIC_DOCS = 4000


def data_prefixes(cfg: Config, run_dir: Path, rank: int) -> list:
    """``data.path`` as given, or the built-in corpus generated into RUN_DIR/data (rank 0 builds
    it, the others wait at a barrier). Collective for ``data.synthetic``."""
    if not cfg.data.synthetic:
        return list(cfg.data.path)
    from ..data.synthetic import build_synthetic_prefix

    out = run_dir / "data"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        build_synthetic_prefix(out, num_docs=SYNTHETIC_DOCS, seed=cfg.run.seed)
    dist.barrier()
    return [build_synthetic_prefix(out, num_docs=SYNTHETIC_DOCS, seed=cfg.run.seed)]
