"""DeepSpeed-Ulysses around a core attention: sequence shards outside, head shards inside.

The layer holds positions ``[u*s, (u+1)*s)`` of the sequence (``u`` = its Ulysses rank, ``s`` =
local length) for all of its TP heads. :class:`PositionalSelfAttention` applies FoPE/RoPE there,
*before* the all-to-all, at exactly those global positions (its ``sequence_shard`` hook, set when
its core attention is a :class:`UlyssesCoreAttention`). DeepSpeed's ``DistributedAttention`` then
all-to-alls q/k/v to the full sequence and ``1/ulysses`` of the heads (and KV groups), runs the
inner core attention with an ordinary causal mask, and all-to-alls the output back.

megatron layout is ``[s, b, heads, d]``: sequence dim 0, batch dim 1, heads dim 2, hence
DeepSpeed's ``scatter_idx=2`` (heads are split), ``gather_idx=0`` (sequence is gathered),
``batch_dim_idx=1`` (deepspeed 0.19 signature ``forward(q, k, v, batch_dim_idx, rotary_pos_emb,
*args, **kwargs)``; extra args go to the inner attention).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..parallel.setup import default_backend, get_ulysses_group
from .core_attention import SDPACoreAttention


def ensure_deepspeed_comm() -> None:
    """DeepSpeed's collectives need ``deepspeed.comm`` initialised (reuses torch.distributed)."""
    import deepspeed
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=default_backend(), auto_mpi_discovery=False)


class _PerHeadOutput(torch.nn.Module):
    """Inner attention returning ``[s, b, heads, d]`` (DeepSpeed's output all-to-all needs heads)."""

    def __init__(self, inner: torch.nn.Module, head_dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.head_dim = head_dim

    def forward(self, query, key, value, *args, **kwargs):
        out = self.inner(query, key, value, *args, **kwargs)
        return out.view(*out.shape[:-1], -1, self.head_dim)


class UlyssesCoreAttention(MegatronModule):
    """DeepSpeed ``DistributedAttention`` around ``local_attention`` (default
    :class:`SDPACoreAttention`; a transformer-engine core attention works too).

    Takes megatron's core-attention constructor keywords and call; the Ulysses group comes from
    :func:`fope_megatron.parallel.setup.get_ulysses_group`. Needs the TP-local heads and KV groups
    divisible by the Ulysses degree and the causal mask (no packed THD).
    """

    def __init__(
        self, config: TransformerConfig, local_attention: type = SDPACoreAttention, **core_args
    ) -> None:
        """``core_args``: megatron's core-attention keywords (``layer_number``, ``attn_mask_type``,
        ..., ``pg_collection``), passed on to ``local_attention`` unchanged."""
        super().__init__(config=config)
        from deepspeed.sequence.layer import DistributedAttention

        group = get_ulysses_group()
        if group is None:
            raise RuntimeError("no Ulysses group: call init_model_parallel(..., ulysses=N>1)")
        ensure_deepspeed_comm()
        self.ulysses_group = group
        self.ulysses_rank = group.rank()
        self.ulysses_size = group.size()
        pg_collection = core_args.get("pg_collection")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        heads = config.num_attention_heads // tp
        groups = max(config.num_query_groups // tp, 1)
        for name, n in (("attention heads", heads), ("KV groups", groups)):
            if n % self.ulysses_size:
                raise ValueError(
                    f"{name} per TP rank = {n} (tp={tp}) must be divisible by "
                    f"parallel.ulysses={self.ulysses_size}"
                )
        # The inner attention sees 1/ulysses of the heads and groups.
        inner_config = copy.copy(config)
        inner_config.num_attention_heads = config.num_attention_heads // self.ulysses_size
        inner_config.num_query_groups = config.num_query_groups // self.ulysses_size
        inner = local_attention(config=inner_config, **core_args)
        self.dist_attn = DistributedAttention(
            _PerHeadOutput(inner, config.kv_channels), group, scatter_idx=2, gather_idx=0
        )

    @property
    def sequence_shard(self) -> tuple[int, int]:
        """(rank, size) of the contiguous sequence shard q/k hold before the all-to-all."""
        return self.ulysses_rank, self.ulysses_size

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
    ) -> torch.Tensor:
        """megatron's core-attention call (q, k, v, mask positional, the rest keywords, as in its
        ``CoreAttention`` protocol); the keywords reach the inner attention unchanged."""
        if kwargs.get("packed_seq_params") is not None or kwargs.get("attention_bias") is not None:
            raise NotImplementedError("Ulysses attention: packed sequences / bias not supported")
        out = self.dist_attn(query, key, value, 1, None, attention_mask, **kwargs)
        return out.reshape(out.shape[0], out.shape[1], -1)  # [s/u, b, heads*d]
