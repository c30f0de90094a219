"""Self-attention that applies FoPE (or RoPE) to queries and keys, as a megatron-core subclass.

megatron-core's ``SelfAttention.forward`` is used unchanged: this subclass only extends
``get_query_key_value_tensors`` (the hook that returns ``q, k, v``) to apply the position
encoding of *its* layer and *its* TP slice of KV groups at the global positions the rank holds.
GPTModel is built with ``position_embedding_type='none'`` so megatron applies no rotary itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from ..fope import FoPEConfig, FourierPositionEmbedding, RotaryEmbeddingTables
from ..fope.fusion import RESOLVED
from ..parallel.positions import cp_chunk_positions, packed_positions, shard_positions

POSITION_KINDS = ("fope", "rope", "none")


@dataclass(frozen=True)
class PositionSettings:
    """What position encoding the attention layers apply (one switch: ``kind``)."""

    kind: str = "fope"
    """``fope`` | ``rope`` | ``none``."""
    rotary_dim: int = 0
    """Rotated dims ``d_r``."""
    rotary_base: float = 10000.0
    """RoPE base."""
    interleaved: bool = False
    """Pair layout."""
    fope: FoPEConfig | None = None
    """FoPE settings (kind == 'fope')."""
    frequencies: tuple[float, ...] | None = None
    """Pre-scaled base frequencies (YaRN / PI); None: plain ``theta**(-2i/d_r)``."""
    fusion: str = "torch"
    """Resolved implementation (``fope.fusion.resolve_fusion``): ``torch`` | ``triton`` | ``te``."""

    def __post_init__(self) -> None:
        if self.kind not in POSITION_KINDS:
            raise ValueError(f"position embedding {self.kind!r} unknown; allowed: {POSITION_KINDS}")
        if self.fusion not in RESOLVED:
            raise ValueError(f"position fusion {self.fusion!r} unknown; allowed: {RESOLVED}")
        if self.fusion == "te" and self.kind != "rope":
            raise ValueError("position fusion 'te' (transformer-engine fused RoPE) is RoPE only")
        if self.kind == "fope" and self.fope is None:
            raise ValueError("position embedding 'fope' needs a FoPEConfig")


def kv_groups_of_tp_rank(num_groups: int, tp_rank: int, tp_size: int) -> range:
    """The KV groups a TP rank holds; with fewer groups than ranks, groups are replicated
    (rank ``r`` holds group ``r // (tp / G)``, as megatron-core's attention selects it)."""
    if num_groups >= tp_size:
        n = num_groups // tp_size
        return range(tp_rank * n, (tp_rank + 1) * n)
    g = tp_rank // (tp_size // num_groups)
    return range(g, g + 1)


class PositionalSelfAttention(SelfAttention):
    """megatron-core ``SelfAttention`` + FoPE/RoPE on q and k (for this layer and TP slice).

    Extra spec param ``position``: a :class:`PositionSettings`.
    """

    def __init__(
        self,
        config,
        submodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection=None,
        position: PositionSettings | None = None,
    ) -> None:
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        position = position or PositionSettings(kind="none")
        self.position = position
        self.layer_index = layer_number - 1  # megatron's layer_number is global and 1-based
        tp = self.pg_collection.tp
        tp_rank = tp.rank() if tp is not None else 0
        self.kv_groups = kv_groups_of_tp_rank(config.num_query_groups, tp_rank, self.world_size)
        # (rank, size) of the contiguous sequence shard q/k hold before a Ulysses all-to-all
        # (the core attention says so); None: q/k hold the full (or CP-chunked) sequence.
        self.sequence_shard: tuple[int, int] | None = getattr(
            self.core_attention, "sequence_shard", None
        )
        self._packed_seq_params = None
        freqs = None if position.frequencies is None else torch.tensor(position.frequencies)
        if position.kind == "fope":
            self.fope = FourierPositionEmbedding(
                position.fope, layers=[self.layer_index], groups=self.kv_groups, frequencies=freqs
            )
            for name in ("coef_cos", "coef_sin"):
                # Sharded over KV groups (dim 1) like linear_qkv's rows.
                set_tensor_model_parallel_attributes(getattr(self.fope, name), True, 1, 1)
        elif position.kind == "rope":
            self.rope = RotaryEmbeddingTables(
                position.rotary_dim, position.rotary_base, position.interleaved, freqs
            )

    @property
    def encoder(self) -> FourierPositionEmbedding | RotaryEmbeddingTables | None:
        """The module that makes this layer's tables (None for ``kind='none'``)."""
        return getattr(self, self.position.kind, None)

    def kernel_path(self):
        """The fused kernel's path for this layer's q/k shapes (``fope.triton_apply.kernel_path``,
        chosen from the shapes at every launch); None unless the fusion is ``triton``."""
        if self.position.fusion != "triton" or self.encoder is None:
            return None
        from ..fope.triton_apply import kernel_path

        per_group = self.num_attention_heads_per_partition // len(self.kv_groups)
        if self.position.kind == "fope":
            return kernel_path(self.fope.d_out, self.position.fope.rotary_dim, per_group)
        return kernel_path(None, self.position.rotary_dim, per_group)

    def forward(self, *args, **kwargs):
        if (
            kwargs.get("inference_context") is not None
            or kwargs.get("inference_params") is not None
        ):
            raise NotImplementedError(
                "KV-cache inference is not supported with FoPE/RoPE applied in attention; "
                "evaluate with full recomputation (fope-eval does)"
            )
        self._packed_seq_params = kwargs.get("packed_seq_params")
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._packed_seq_params = None

    def positions(self, local_len: int, device) -> torch.Tensor:
        """Global positions of the ``local_len`` tokens that q/k hold on this rank."""
        cp = self.pg_collection.cp
        cp_size = cp.size() if cp is not None else 1
        cp_rank = cp.rank() if cp is not None else 0
        packed = self._packed_seq_params
        if packed is not None and packed.qkv_format == "thd":
            cu = packed.cu_seqlens_q_padded
            cu = packed.cu_seqlens_q if cu is None else cu
            return packed_positions(cu, cp_rank, cp_size, device)
        if self.sequence_shard is not None:
            rank, _ = self.sequence_shard
            return shard_positions(local_len, rank, device)
        return cp_chunk_positions(local_len * cp_size, cp_rank, cp_size, device)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        if self.encoder is None or not isinstance(out, tuple) or len(out) < 3:
            return out
        query, key = out[0], out[1]
        pos = self.positions(query.shape[0], query.device)
        if self._recompute_position():
            # Selective recompute: the torch path's float32 tables are rebuilt in backward
            # instead of being kept (the fused kernel keeps nothing to begin with).
            query, key = tensor_parallel.checkpoint(self._apply_position, False, query, key, pos)
        else:
            query, key = self._apply_position(query, key, pos)
        return (query, key, *out[2:])

    def _apply_position(self, query, key, pos):
        return self.encoder.apply_qk(
            query, key, pos, self.layer_index, None, fusion=self.position.fusion
        )

    def _recompute_position(self) -> bool:
        return (
            self.training
            and self.position.fusion == "torch"
            and self.config.recompute_granularity == "selective"
            and torch.is_grad_enabled()
        )
