"""Tiny model configs and batches shared by the model-level tests."""

from __future__ import annotations

import torch

TINY_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "fope.sigma=0.5",
    "fope.train_seq_len=64",
]


def tiny_config(kind: str, seq: int, *overrides: str):
    """2 layers, hidden 64, 4 heads (head_dim 16), FoPE sigma 0.5 with the floor of L=64."""
    from fope_megatron.config import load_config

    return load_config(
        None,
        [*TINY_MODEL, f"train.seq_length={seq}", f"model.position_embedding={kind}", *overrides],
    )


def layout_config(
    kind: str,
    seq: int,
    *overrides: str,
    tp: int = 1,
    sp: bool = False,
    cp: int = 1,
    ulysses: int = 1,
):
    """:func:`tiny_config` on a parallel layout: ``parallel.tp/sp/cp/ulysses`` from the keywords,
    then ``overrides`` (which win)."""
    layout = {"tp": tp, "sp": str(sp).lower(), "cp": cp, "ulysses": ulysses}
    return tiny_config(kind, seq, *(f"parallel.{k}={v}" for k, v in layout.items()), *overrides)


def random_batch(seq: int, vocab: int, batch: int = 2, seed: int = 0):
    """``(tokens, labels, positions)`` ``[batch, seq]``; labels are the tokens shifted by one."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, tokens.roll(-1, 1), torch.arange(seq)[None].expand(batch, -1)
