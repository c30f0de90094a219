"""FoPE Llama for transformers (written by fope-megatron's ``fope-export``).

transformers' own Llama modules with only the position encoding replaced, as fope-megatron's
megatron-core model does it: every attention layer applies FoPE (or RoPE) to its queries and keys
with *its* coefficients, ``x' = x*C + rotate_half(x)*S`` on the first ``rotary_dim`` dims, C and S
built in float32 at the token positions (so transformers' KV cache and ``generate()`` work
unchanged: cached keys are stored already encoded, new tokens get their own positions).
Needs only torch and transformers.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)

from .configuration_fope_llama import FoPELlamaConfig


def base_frequencies(rotary_dim: int, theta: float) -> torch.Tensor:
    """RoPE frequencies ``theta**(-2i/d_r)``, float32, descending."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return 1.0 / (theta**exponent)


def scaled_frequencies(f: dict) -> torch.Tensor:
    """Frequencies after ``f['scaling']`` (none | pi | yarn, megatron-core's YaRN ramp)."""
    d_r, theta = f["rotary_dim"], float(f["rope_theta"])
    w = base_frequencies(d_r, theta)
    scaling, factor = f.get("scaling", "none"), float(f.get("factor", 1.0))
    if scaling == "none":
        return w
    if scaling == "pi":
        return w / factor
    original = f["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (d_r * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(f["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(f["beta_slow"])), d_r - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d_r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    inter = 1.0 / (factor * theta ** (torch.arange(0, d_r, 2).float() / d_r))
    return inter * (1 - extrapolate) + w * extrapolate


def expand_pairs(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.repeat_interleave(t, 2, dim=-1)
    return torch.cat([t, t], dim=-1)


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FoPELlamaAttention(LlamaAttention):
    """``LlamaAttention`` whose q/k position encoding is this layer's FoPE (or RoPE, or none)."""

    def __init__(self, config: FoPELlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        f = config.fope
        self.kind = f["kind"]
        self.rotary_dim = int(f["rotary_dim"])
        self.interleaved = bool(f["interleaved"])
        if f.get("softmax_scale") is not None:
            self.scaling = float(f["softmax_scale"])
        if self.kind == "fope":
            shape = (config.num_key_value_heads, int(f["d_in"]), int(f["d_out"]))
            self.register_buffer("coef_cos", torch.zeros(shape, dtype=torch.float32))
            self.register_buffer("coef_sin", torch.zeros(shape, dtype=torch.float32))
        self._freqs: torch.Tensor | None = None

    def frequencies(self, device) -> torch.Tensor:
        """The frequencies the tables use: FoPE's ``d_in`` kept ones, or all of RoPE's."""
        if self._freqs is None or self._freqs.device != torch.device(device):
            f = self.config.fope
            w = scaled_frequencies(f)
            if self.kind == "fope":
                floor = f["floor_ratio"] * 2 * math.pi / f["train_seq_len"]
                d_in = int((w >= floor).sum())
                if d_in != f["d_in"]:
                    raise ValueError(f"config says d_in={f['d_in']} but the floor keeps {d_in}")
                w = w[:d_in]
            self._freqs = w.to(device)
        return self._freqs

    def tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(C, S)`` shaped ``[b, groups (1 for RoPE), s, rotary_dim]``."""
        w = self.frequencies(position_ids.device)
        angles = position_ids.to(torch.float32)[..., None] * w  # [b, s, n]
        if self.kind == "rope":
            c, s = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
        else:
            c = torch.einsum("bsk,gkj->bgsj", torch.cos(angles), self.coef_cos.float())
            s = torch.einsum("bsk,gkj->bgsj", torch.sin(angles), self.coef_sin.float())
            rest = self.rotary_dim // 2 - c.shape[-1]
            if rest:
                zero_freq_sin = float(self.config.fope["zero_freq_sin"])
                c = torch.cat([c, c.new_ones((*c.shape[:-1], rest))], dim=-1)
                s = torch.cat([s, s.new_full((*s.shape[:-1], rest), zero_freq_sin)], dim=-1)
        return expand_pairs(c, self.interleaved), expand_pairs(s, self.interleaved)

    def encode(self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b, heads, s, head_dim]``; head ``h`` uses group ``h // (heads / groups)``."""
        b, heads, seq, d = x.shape
        groups, d_r = c.shape[1], self.rotary_dim
        xr = x[..., :d_r].float().view(b, groups, heads // groups, seq, d_r)
        out = xr * c[:, :, None] + rotate_half(xr, self.interleaved) * s[:, :, None]
        out = out.view(b, heads, seq, d_r).to(x.dtype)
        return torch.cat([out, x[..., d_r:]], dim=-1) if d_r < d else out

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.kind != "none":  # the one change: this layer's tables instead of shared cos/sin
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise ValueError("FoPELlamaAttention needs position_ids")
            position_ids = position_ids.expand(input_shape[0], -1)
            c, s = self.tables(position_ids)
            query_states = self.encode(query_states, c, s)
            key_states = self.encode(key_states, c, s)

        if cache is not None:
            key_states, value_states = cache.update(
                key_states, value_states, self.layer_idx, kwargs=kwargs
            )
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class _NoSharedTables(nn.Module):
    """Stands in for ``LlamaRotaryEmbedding``: every layer makes its own tables."""

    def forward(self, hidden_states, position_ids=None):
        return None


class FoPELlamaModel(LlamaModel):
    config_class = FoPELlamaConfig

    def __init__(self, config: FoPELlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = FoPELlamaAttention(config, i)
        self.rotary_emb = _NoSharedTables()
        self.post_init()


class FoPELlamaForCausalLM(LlamaForCausalLM):
    config_class = FoPELlamaConfig

    def __init__(self, config: FoPELlamaConfig):
        super().__init__(config)
        self.model = FoPELlamaModel(config)
        self.post_init()


__all__ = ["FoPELlamaForCausalLM", "FoPELlamaModel"]
