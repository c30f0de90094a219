"""Context-parallel core attention for CPU (and any GPU without transformer-engine).

Each CP rank holds chunks ``r`` and ``2*cp-1-r`` of ``2*cp`` equal sequence chunks (megatron's
load-balanced causal layout). Queries stay local; keys and values are all-gathered over the CP
group (differentiable: the backward reduce-scatters their gradients back to the owning rank) and
the causal mask is applied in *global* positions. Memory is O(s * s / cp) per rank: this is the
correctness path that lets CP run end to end on a CPU, not a ring attention. On GPU with
transformer-engine the spec keeps TE's CP attention instead.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.enums import AttnMaskType

from ..parallel.comm import all_gather_first_dim
from ..parallel.positions import cp_chunk_positions, packed_positions, packed_sequence_ids
from .core_attention import SDPACoreAttention


def cp_causal_mask(
    cp_rank: int,
    cp_size: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean ``[local_len, cp*local_len]`` mask (True = attend) of this rank's queries against
    the keys of every CP rank concatenated in rank order.

    Without ``cu_seqlens``: causal in global positions. With (global) ``cu_seqlens``: causal
    within each packed sequence (positions restart at every sequence).
    """
    if cu_seqlens is None:
        total = local_len * cp_size
        q_pos = cp_chunk_positions(total, cp_rank, cp_size, device)
        k_pos = torch.cat([cp_chunk_positions(total, r, cp_size, device) for r in range(cp_size)])
        return q_pos[:, None] >= k_pos[None, :]
    q_pos = packed_positions(cu_seqlens, cp_rank, cp_size, device)
    q_seq = packed_sequence_ids(cu_seqlens, cp_rank, cp_size, device)
    k_pos = torch.cat([packed_positions(cu_seqlens, r, cp_size, device) for r in range(cp_size)])
    k_seq = torch.cat([packed_sequence_ids(cu_seqlens, r, cp_size, device) for r in range(cp_size)])
    return (q_seq[:, None] == k_seq[None, :]) & (q_pos[:, None] >= k_pos[None, :])


class ContextParallelCoreAttention(SDPACoreAttention):
    """:class:`SDPACoreAttention` over the CP group: all-gathered K/V, global causal mask.

    Supports the causal mask type and packed THD sequences (``cu_seqlens_q`` global, padded to a
    multiple of ``2*cp`` per sequence, as transformer-engine requires); with ``cp == 1`` it is
    exactly :class:`SDPACoreAttention`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pg = kwargs.get("pg_collection")
        group = getattr(pg, "cp", None)
        self.cp_group = ps.get_context_parallel_group() if group is None else group

    def keys_and_mask(
        self, query, key, value, attention_mask, mask_type, attention_bias, packed
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """All-gathered keys/values and the causal mask in global positions (``cp == 1``: the
        plain :class:`SDPACoreAttention` ones)."""
        cp_size = self.cp_group.size()
        if cp_size == 1:
            return super().keys_and_mask(
                query, key, value, attention_mask, mask_type, attention_bias, packed
            )
        thd = packed is not None
        if attention_bias is not None or not (thd or mask_type == AttnMaskType.causal):
            raise NotImplementedError(
                "context-parallel attention supports the causal mask (or packed THD) only, "
                f"got attn_mask_type={mask_type}, attention_bias={attention_bias is not None}"
            )
        cu = None
        if thd:
            cu = packed.cu_seqlens_q_padded
            cu = packed.cu_seqlens_q if cu is None else cu
        key = all_gather_first_dim(key, self.cp_group)
        value = all_gather_first_dim(value, self.cp_group)
        mask = cp_causal_mask(self.cp_group.rank(), cp_size, query.shape[0], cu, query.device)
        return key, value, mask, False
