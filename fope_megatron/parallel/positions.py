"""Which global positions a rank holds, for every sequence layout (spec section 4).

Pure functions of the layout; callers pass ranks and sizes in.
"""

from __future__ import annotations

import torch


def cp_chunk_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of CP rank ``r``: chunks ``r`` and ``2*cp-1-r`` of ``2*cp`` equal chunks.

    ``seq_len`` is the global (full) sequence length; returns ``seq_len // cp_size`` positions.
    """
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2*cp = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    j = 2 * cp_size - 1 - cp_rank
    second = torch.arange(j * chunk, (j + 1) * chunk, device=device)
    return torch.cat([first, second])


def packed_positions(
    cu_seqlens: torch.Tensor, cp_rank: int = 0, cp_size: int = 1, device=None
) -> torch.Tensor:
    """Positions for packed sequences (THD): restart at 0 for each sequence.

    ``cu_seqlens`` are the global cumulative lengths; with CP each sequence is split into
    ``2*cp`` chunks and this rank holds chunks ``r`` and ``2*cp-1-r`` of every sequence (megatron /
    transformer-engine THD layout), concatenated in sequence order.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = [cp_chunk_positions(int(n), cp_rank, cp_size, device) for n in lengths]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def shard_positions(seq_len_local: int, rank: int, device=None) -> torch.Tensor:
    """Contiguous sequence shard ``[rank*s, (rank+1)*s)`` (DeepSpeed-Ulysses before its all-to-all)."""
    return torch.arange(rank * seq_len_local, (rank + 1) * seq_len_local, device=device)


def packed_sequence_ids(
    cu_seqlens: torch.Tensor, cp_rank: int = 0, cp_size: int = 1, device=None
) -> torch.Tensor:
    """Index of the packed sequence each token of :func:`packed_positions` belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = torch.tensor([int(n) // cp_size for n in lengths], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), counts).to(device)


def packed_cp_indices(
    cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, device=None
) -> torch.Tensor:
    """Indices into the packed (THD) token dim of the tokens CP rank ``r`` holds, in its order.

    Every sequence is split into ``2*cp`` chunks and the rank keeps chunks ``r`` and
    ``2*cp-1-r`` of each (transformer-engine's ``thd_get_partitioned_indices`` layout).
    """
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = [
        int(s) + cp_chunk_positions(int(n), cp_rank, cp_size, device)
        for s, n in zip(starts, lengths, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
