"""build_gpt: a megatron-core GPTModel with FoPE / RoPE / no position encoding from our Config.

Expects megatron-core's parallel_state (and, for ``parallel.ulysses > 1``, the Ulysses group) to be
initialised: ``parallel.setup.init_model_parallel(tp, cp, pp, ulysses, vpp=vpp)``. Under pipeline
parallelism (``parallel.pp`` / ``parallel.vpp``) :func:`build_gpt_chunks` builds this rank's
stage: its model chunks, each with only its layers (global layer numbers: megatron's offset).
"""

from __future__ import annotations

import logging

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..fope.fusion import resolve_fusion
from .attention import PositionalSelfAttention, PositionSettings
from .recompute import megatron_recompute_kwargs
from .spec import get_fope_block_spec, transformer_engine_usable
from .vocab import padded_vocab_size

log = logging.getLogger("fope")


def compute_dtype(cfg) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def megatron_fusions(cuda: bool | None = None) -> dict:
    """The megatron-core fusions (``TransformerConfig`` keys) on for this device: the jit-fused
    (``torch.compile``) bias + SwiGLU / GeLU and bias-dropout-add wherever CUDA is; the others
    stay off because they do not apply to this stack:

    - ``masked_softmax_fusion``: megatron's ``FusedScaleMaskSoftmax`` in its own core attention,
      which the project's attentions (SDPA, TE, CP / Ulysses) replace;
    - ``apply_rope_fusion``: megatron's rotary, which the FoPE / RoPE attention replaces with its
      own fused kernel (``position.fusion``);
    - ``gradient_accumulation_fusion``: writes ``main_grad`` (megatron's DDP), which DeepSpeed's
      ZeRO never reads;
    - ``persist_layer_norm``: Apex only.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {
        "bias_activation_fusion": cuda,
        "bias_dropout_fusion": cuda,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
    }


def transformer_config(cfg) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    dtype = compute_dtype(cfg)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        add_bias_linear=m.add_bias_linear,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        tensor_model_parallel_size=p.tp,
        context_parallel_size=p.cp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        sequence_parallel=bool(p.sp),
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
        **megatron_fusions(),
        softmax_scale=softmax_scale(cfg),  # YaRN concentration (None: 1/sqrt(d))
        **megatron_recompute_kwargs(cfg),  # train.recompute: megatron's own activation recompute
    )


def position_fusion(cfg) -> str:
    """``position.fusion`` resolved for this machine and kind (``torch`` | ``triton`` | ``te``)."""
    return resolve_fusion(cfg.position.fusion, cfg.model.position_embedding)


def position_settings(cfg, frequencies: tuple[float, ...] | None = None) -> PositionSettings:
    m = cfg.model
    kind = m.position_embedding
    return PositionSettings(
        fusion=position_fusion(cfg),
        kind=kind,
        rotary_dim=m.rotary_dim,
        rotary_base=float(m.rotary_base),
        interleaved=cfg.fope.interleaved,
        fope=cfg.to_fope_config() if kind == "fope" else None,
        frequencies=frequencies,
    )


def position_frequencies(cfg) -> tuple[float, ...] | None:
    """Base frequencies after ``position.scaling`` (YaRN / PI), or None for plain RoPE ones."""
    pos = cfg.position
    if pos.scaling == "none":
        return None
    from ..fope.scaling import scaled_frequencies

    w = scaled_frequencies(
        cfg.model.rotary_dim,
        float(cfg.model.rotary_base),
        pos.scaling,
        pos.factor,
        cfg.original_max_positions,
        pos.beta_fast,
        pos.beta_slow,
    )
    return tuple(float(x) for x in w)


def softmax_scale(cfg) -> float | None:
    """YaRN multiplies cos and sin by its concentration factor ``m``; q.k then grows by ``m^2``,
    which we apply as the attention softmax scale (same logits, no change to the tables)."""
    pos = cfg.position
    if pos.scaling != "yarn":
        return None
    from ..fope.scaling import yarn_concentration

    m = yarn_concentration(pos.factor, pos.mscale, pos.mscale_all_dim)
    return m * m / cfg.model.head_dim**0.5


def pipeline_ends(cfg, vp_stage: int | None = None) -> tuple[bool, bool]:
    """``(pre_process, post_process)`` of this rank's chunk ``vp_stage``: whether it holds the
    embedding (first stage, first chunk) and the output layer and loss (last stage, last chunk).
    Both True without pipeline parallelism (``parallel.pp = 1``)."""
    if cfg.parallel.pp == 1:
        return True, True
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )


def build_gpt(
    cfg,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    frequencies: tuple[float, ...] | None = None,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """Build the GPT of ``cfg`` (model / fope / parallel / train sections).

    ``use_transformer_engine``: None picks transformer-engine's spec when usable (CUDA + TE);
    False forces the local spec (SDPA attention, torch norms). ``pre_process`` /
    ``post_process``: None takes them from the pipeline stage (:func:`pipeline_ends`);
    ``vp_stage``: the model chunk under ``parallel.vpp > 1`` (:func:`build_gpt_chunks`).

    Weights are drawn on the CPU (full tensors, then TP slices): the embedding from
    ``run.seed``, each layer from ``(run.seed, global layer)`` (``model/layer.py``), so every
    layout, pipeline stages included, starts from the same numbers.
    """
    ends = pipeline_ends(cfg, vp_stage)
    pre_process = ends[0] if pre_process is None else pre_process
    post_process = ends[1] if post_process is None else post_process
    tconf = transformer_config(cfg)
    if not torch.cuda.is_available():
        from ..compat.megatron_cpu import apply_megatron_cpu_compat

        apply_megatron_cpu_compat()  # megatron's SP path and recompute RNG on CPU (no-op on GPU)
    spec = get_fope_block_spec(
        tconf,
        # position.scaling (YaRN / PI) scales the base frequencies before the FoPE floor
        position_settings(cfg, position_frequencies(cfg) if frequencies is None else frequencies),
        normalization=cfg.model.normalization,
        use_transformer_engine=use_transformer_engine,
        vp_stage=vp_stage,
        cp=cfg.parallel.cp,
        ulysses=cfg.parallel.ulysses,
        init_seed=cfg.run.seed,
    )
    torch.manual_seed(cfg.run.seed)
    model = GPTModel(
        config=tconf,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.max_position_embeddings or cfg.train.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    layers = [m for m in model.modules() if isinstance(m, PositionalSelfAttention)]
    path = layers[0].kernel_path() if layers else None
    if path is not None:  # the same for every layer: their shapes are alike
        log.info("position kernel (triton, from the shapes): %s", path)
    return model


def build_gpt_chunks(cfg, **options) -> list[GPTModel]:
    """This pipeline rank's model chunks: one per virtual stage (``parallel.vpp``), each with
    its layers only, as megatron's schedules (``get_forward_backward_func``) take them; one model
    without virtual stages. ``options``: :func:`build_gpt`'s keywords."""
    if cfg.parallel.vpp == 1:
        return [build_gpt(cfg, **options)]
    return [build_gpt(cfg, vp_stage=v, **options) for v in range(cfg.parallel.vpp)]


__all__ = [
    "build_gpt",
    "build_gpt_chunks",
    "pipeline_ends",
    "compute_dtype",
    "megatron_fusions",
    "position_settings",
    "transformer_config",
    "transformer_engine_usable",
]
