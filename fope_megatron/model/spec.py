"""Layer specs: megatron-core's own GPT layer spec with FoPE/RoPE self-attention plugged in.

We take megatron's spec (local or transformer-engine) and swap two things through ``ModuleSpec``:
the self-attention class (:class:`PositionalSelfAttention`) and, without transformer-engine, the
core attention (:class:`SDPACoreAttention`, since megatron's ``DotProductAttention`` needs CUDA).
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import PositionalSelfAttention, PositionSettings
from .core_attention import SDPACoreAttention


@functools.cache
def transformer_engine_usable() -> bool:
    """transformer-engine importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def get_fope_layer_spec(
    position: PositionSettings,
    normalization: str = "RMSNorm",
    use_transformer_engine: bool | None = None,
    qk_layernorm: bool = False,
) -> ModuleSpec:
    """A GPT transformer-layer spec whose self-attention applies ``position`` to q and k.

    Args:
        position: FoPE / RoPE / none settings (see :class:`PositionSettings`).
        normalization: ``RMSNorm`` or ``LayerNorm``.
        use_transformer_engine: None picks transformer-engine when usable (CUDA + importable).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = (
        transformer_engine_usable() if use_transformer_engine is None else use_transformer_engine
    )
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(
            normalization=normalization, qk_layernorm=qk_layernorm
        )
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.module = PositionalSelfAttention
    attn.params = {**attn.params, "position": position}
    if not use_te:
        attn.submodules.core_attention = SDPACoreAttention
    return spec
