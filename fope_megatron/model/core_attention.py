"""Core attention on torch's scaled_dot_product_attention (CPU and GPU, causal, GQA, packed THD).

Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature),
which allocates CUDA buffers and so cannot run on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Boolean ``[t, t]`` mask, True where attention is allowed: causal within each sequence."""
    seq_id = torch.zeros(total, dtype=torch.long, device=device)
    bounds = cu_seqlens.to(device)
    seq_id[bounds[1:-1]] = 1
    seq_id = seq_id.cumsum(0)
    idx = torch.arange(total, device=device)
    return (seq_id[:, None] == seq_id[None, :]) & (idx[:, None] >= idx[None, :])


class SDPACoreAttention(MegatronModule):
    """``softmax(q k^T / sqrt(d)) v`` through ``F.scaled_dot_product_attention``.

    Inputs ``[s, b, heads, d]`` (keys/values with ``n_groups`` heads), output ``[s, b, heads*d]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        hn = config.kv_channels
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(hn)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, heads, d] -> [t, 1, heads, d]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        packed = packed_seq_params if thd else None
        key, value, mask, causal = self.keys_and_mask(
            query, key, value, attention_mask, mask_type, attention_bias, packed
        )
        out = self.attend(query, key, value, mask, causal)
        return out.squeeze(1) if thd else out

    def keys_and_mask(
        self, query, key, value, attention_mask, mask_type, attention_bias, packed
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """``(key, value, mask, is_causal)`` for :meth:`attend` (the context-parallel subclass
        gathers the keys and values and masks in global positions).

        ``query``/``key``/``value`` ``[s, b, heads, d]``; ``mask_type`` already resolved against
        the constructor's; ``packed``: the THD ``PackedSeqParams``, else None.
        """
        mask, causal = None, False
        if packed is not None:
            mask = packed_causal_mask(packed.cu_seqlens_q, query.shape[0], query.device)
        elif mask_type == AttnMaskType.causal:
            causal = True
        elif attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron: True means "masked out"
        if attention_bias is not None:
            bias = attention_bias.to(query.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return key, value, mask, causal

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """SDPA on ``[s, b, heads, d]`` queries and ``[sk, b, groups, d]`` keys/values.

        ``mask``: boolean (True = attend) or additive, broadcastable to ``[b, heads, s, sk]``.
        Returns ``[s, b, heads*d]``.
        """
        sq, b, np_, hn = query.shape
        ng = key.shape[2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if ng != np_:
            k = k.repeat_interleave(np_ // ng, dim=1)
            v = v.repeat_interleave(np_ // ng, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
