"""Layer specs: megatron-core's own GPT layer spec with FoPE/RoPE self-attention plugged in.

We take megatron's spec (local or transformer-engine) and swap, through ``ModuleSpec``:

- the self-attention class (:class:`PositionalSelfAttention`);
- without transformer-engine, the core attention (:class:`SDPACoreAttention`, since megatron's
  ``DotProductAttention`` needs CUDA; :class:`ContextParallelCoreAttention` when ``cp > 1``) and
  the norms (:class:`SequenceParallelNorm`, since megatron's torch norm refuses sequence
  parallelism). With transformer-engine, TE's attention (which does CP itself) and norms stay;
- with ``ulysses > 1``, the core attention is wrapped in :class:`UlyssesCoreAttention`.

:func:`get_fope_block_spec` also sets the final norm of the decoder block (megatron's default
for a layer spec is ``WrappedTorchNorm`` without TE/apex).
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from .attention import PositionalSelfAttention, PositionSettings
from .core_attention import SDPACoreAttention
from .cp_attention import ContextParallelCoreAttention
from .layer import SeededTransformerLayer
from .norms import SequenceParallelNorm


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
    cp: int = 1,
    ulysses: int = 1,
    init_seed: int | None = None,
) -> ModuleSpec:
    """A GPT transformer-layer spec whose self-attention applies ``position`` to q and k.

    Args:
        position: FoPE / RoPE / none settings (see :class:`PositionSettings`).
        normalization: ``RMSNorm`` or ``LayerNorm``.
        use_transformer_engine: None picks transformer-engine when usable (CUDA + importable).
        cp: context-parallel degree (without TE, > 1 selects the all-gather CP attention).
        ulysses: DeepSpeed-Ulysses degree (> 1 wraps the core attention).
        init_seed: draw each layer's weights from ``(init_seed, global layer)``
            (:class:`SeededTransformerLayer`: the same numbers under any pipeline layout).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = _use_transformer_engine(use_transformer_engine)
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(
            normalization=normalization, qk_layernorm=qk_layernorm
        )
    spec = copy.deepcopy(spec)
    if init_seed is not None:
        spec.module = SeededTransformerLayer
        spec.params = {**spec.params, "init_seed": init_seed}
    attn = spec.submodules.self_attention
    attn.module = PositionalSelfAttention
    attn.params = {**attn.params, "position": position}
    if not use_te:
        attn.submodules.core_attention = (
            ContextParallelCoreAttention if cp > 1 else SDPACoreAttention
        )
        spec.submodules.input_layernorm = SequenceParallelNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
        if qk_layernorm:
            # q/k norms act on heads of the full sequence: not sequence-parallel parameters.
            qk = ModuleSpec(module=SequenceParallelNorm, params={"sequence_parallel": False})
            attn.submodules.q_layernorm = qk
            attn.submodules.k_layernorm = qk
    if ulysses > 1:
        from .ulysses_attention import UlyssesCoreAttention

        inner = attn.submodules.core_attention
        attn.submodules.core_attention = ModuleSpec(
            module=UlyssesCoreAttention, params={"local_attention": inner}
        )
    return spec


def _use_transformer_engine(use_transformer_engine: bool | None) -> bool:
    if use_transformer_engine is None:
        return transformer_engine_usable()
    return use_transformer_engine


def get_fope_block_spec(
    config, position: PositionSettings, vp_stage: int | None = None, **layer_options
) -> TransformerBlockSubmodules | ModuleSpec:
    """Decoder-block spec: :func:`get_fope_layer_spec` for this stage's layers plus the final norm.

    ``vp_stage``: the virtual stage (model chunk) of this pipeline rank whose layers to build.
    ``layer_options``: :func:`get_fope_layer_spec`'s keywords after ``position``. Without
    transformer-engine the final norm is :class:`SequenceParallelNorm`; with it, the layer spec
    is returned and megatron picks TE's norm.
    """
    layer = get_fope_layer_spec(position, **layer_options)
    if _use_transformer_engine(layer_options.get("use_transformer_engine")):
        return layer
    n = get_num_layers_to_build(config, vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SequenceParallelNorm)
