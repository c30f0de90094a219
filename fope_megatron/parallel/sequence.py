"""Split a batch along the sequence for CP / Ulysses ranks, and put it back together (pure).

Every ``[b, s]`` tensor of a sample (tokens, labels, loss mask, position ids) is split the same
way as the model splits its activations:

- context parallel: chunks ``r`` and ``2*cp-1-r`` of ``2*cp`` equal chunks, concatenated (megatron
  ``get_batch_on_this_cp_rank``); packed THD batches: the same per packed sequence
  (``positions.packed_cp_indices``);
- Ulysses: the contiguous shard ``[u*s/U, (u+1)*s/U)``.

Labels are shifted *before* splitting (the data pipeline's labels are next tokens of the full
sample), so every rank's loss is a plain per-token loss on its shard.
"""

from __future__ import annotations

import torch

from .positions import cp_chunk_positions, packed_cp_indices


def cp_shard(t: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's two chunks of ``t`` along ``dim``."""
    if cp_size == 1:
        return t
    index = cp_chunk_positions(t.shape[dim], cp_rank, cp_size, t.device)
    return t.index_select(dim, index)


def cp_unshard(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`cp_shard`: the full tensor from every rank's shard (rank order)."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    total = sum(s.shape[dim] for s in shards)
    index = torch.cat([cp_chunk_positions(total, r, cp_size) for r in range(cp_size)])
    full = torch.cat(shards, dim=dim)
    return full.index_select(dim, torch.argsort(index).to(full.device))


def shard_batch_for_cp(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    loss_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(tokens, labels, loss_mask, position_ids)`` of this CP rank (``[b, s]`` -> ``[b, s/cp]``).

    ``s`` must be divisible by ``2*cp``; None entries stay None.
    """
    return tuple(  # type: ignore[return-value]
        None if t is None else cp_shard(t, cp_rank, cp_size, dim=1)
        for t in (tokens, labels, loss_mask, position_ids)
    )


def shard_packed_for_cp(
    t: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, dim: int = -1
) -> torch.Tensor:
    """This CP rank's tokens of a packed (THD) tensor whose ``dim`` is the token dim.

    ``cu_seqlens`` are global and every sequence length must be divisible by ``2*cp`` (pad each
    sequence, as transformer-engine requires). The model keeps the global ``cu_seqlens``.
    """
    if cp_size == 1:
        return t
    return t.index_select(dim, packed_cp_indices(cu_seqlens, cp_rank, cp_size, t.device))


def ulysses_shard(t: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """Contiguous shard ``rank`` of ``size`` along ``dim`` (DeepSpeed-Ulysses data layout)."""
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"sequence length {t.shape[dim]} not divisible by ulysses={size}")
    return t.chunk(size, dim=dim)[rank]


def shard_batch_for_ulysses(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    rank: int,
    size: int,
    loss_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(tokens, labels, loss_mask, position_ids)`` of this Ulysses rank (``[b, s/U]``)."""
    return tuple(  # type: ignore[return-value]
        None if t is None else ulysses_shard(t, rank, size, dim=1)
        for t in (tokens, labels, loss_mask, position_ids)
    )
