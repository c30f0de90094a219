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


def build_data(cfg: Config, run_dir: Path, rank: int, dp: int) -> tuple:
    """``(train, validation, {length: validation at that length})`` datasets of a run: megatron's
    GPTDataset over ``data_prefixes`` (indices cached in RUN_DIR/data_cache), the passkey mixture
    over the training set when ``data.passkey_fraction > 0``, one validation set per
    ``train.eval_lengths`` entry other than ``train.seq_length``. Collective (``data_prefixes``)."""
    from ..data.datasets import build_datasets

    t = cfg.train
    prefixes = data_prefixes(cfg, run_dir, rank)
    n_valid = max(1, t.eval_iters) * t.micro_batch_size * dp
    cache = run_dir / "data_cache"
    train_ds, valid_ds = build_datasets(
        prefixes, cfg.data.split, t.seq_length, cfg.run.seed, t.steps * t.global_batch_size,
        n_valid, None, cache,
    )  # fmt: skip
    if cfg.data.passkey_fraction > 0:  # validation stays the plain corpus
        from ..data.passkey import PasskeyMixture
        from ..data.tokenizer import get_tokenizer

        train_ds = PasskeyMixture(
            train_ds, cfg.data.passkey_fraction, get_tokenizer(cfg.data.tokenizer),
            t.seq_length, cfg.run.seed,
        )  # fmt: skip
    valid_long = {}
    for length in t.eval_lengths:
        if length != t.seq_length:
            _, ds = build_datasets(
                prefixes, cfg.data.split, length, cfg.run.seed, 1, n_valid, None, cache
            )
            valid_long[length] = ds
    return train_ds, valid_ds, valid_long
