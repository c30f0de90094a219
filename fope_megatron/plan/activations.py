"""fope-plan's activation memory: one micro-batch per GPU, with ``train.recompute`` applied.

Bytes per layer for a micro-batch of ``b`` sequences of local length ``s = seq / (cp * ulysses)``,
bf16 activations, following Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4) generalised to GQA and SwiGLU::

    s*b * [ R / (tp if sp else 1) + (Q + KV + P + MLP) / tp ] (+ s*b * A / tp without flash)
    R   = 4h (two norm inputs) + 2h (QKV input) + 2h (fc1 input) + 2h (two dropout masks,
          only when hidden_dropout > 0)
    Q + KV + P = 2h (queries) + 4*G*d (keys, values) + 2h (attention output)
    MLP = 8f for SwiGLU as megatron computes it unfused (fc1 out 4f, silu 2f, product 2f),
          4f for GeLU (fc1 out 2f, fc2 in 2f)
    A   = a*s*(2 + 3 with attention dropout): the score matrix, only without flash attention

For MHA, a GeLU MLP with f = 4h and dropout on this is exactly ``s*b*h*(34 + 5*a*s/h)`` (and
``10 + 24/tp`` without sequence parallelism). Flash attention (SDPA/flash/TE fused attention,
fope-plan's default) stores no score matrix, so it drops ``A``. With ``position.fusion=torch`` each
layer also keeps its FoPE/RoPE tables for backward (two float32 ``[s/cp, G_local, d_r]``); the
fused kernel (``auto`` or ``triton`` on GPUs) keeps none.

Activation recompute (``train.recompute``, megatron-core's own, see ``model/recompute.py``):

- ``selective`` recomputes the core attention: the ``A`` term goes, as in the paper's
  ``s*b*h*34``; q, k and v are the checkpoint's inputs and stay. With flash attention there is
  no ``A`` to drop. On the torch path the FoPE/RoPE apply is checkpointed too: its tables go and
  its bf16 q, k inputs (``2*(h + G*d)`` per token) stay.
- ``full`` keeps only the bf16 input ``[s, b, h]`` (``/ tp`` with sp) of each checkpointed
  chunk, plus one chunk's full activations while it is recomputed in backward (FoPE/RoPE tables
  included: they are made inside the layer). ``uniform`` with ``n`` layers per chunk:
  ``L/n`` inputs + ``n`` layers; ``block`` with ``n`` recomputed layers: ``n`` inputs + the
  ``L - n`` layers that keep everything (at least one layer: the one being recomputed).

The head adds the final-norm and output-layer inputs (``4*s*b*h``) and the logits,
``6 * s*b*V/tp`` bytes (bf16 logits + the float32 softmax megatron's vocab-parallel cross entropy
saves); recompute does not touch them.
"""

from __future__ import annotations

from ..model.recompute import resolved_num_layers
from ..model.vocab import padded_vocab_size


def layer_bytes(cfg, dims, count, flash: bool = True, selective: bool = False) -> float:
    """Bytes one transformer layer keeps for backward without full recompute.

    Args:
        cfg: the run's ``Config``.
        dims: its ``ParallelDims``.
        count: ``ParamCount`` of one TP rank (FoPE groups held, learnable coefficients).
        flash: fused attention (no score matrix).
        selective: selective recompute (the score matrix is recomputed, not kept).
    """
    m, t = cfg.model, dims.tp
    h, a = m.hidden_size, m.num_attention_heads
    kv = m.kv_groups * m.head_dim
    f = m.ffn_size
    b = cfg.train.micro_batch_size
    s = cfg.train.seq_length // (dims.cp * dims.ulysses)
    sp = cfg.parallel.sp and t > 1
    replicated = 8 * h + (2 * h if m.hidden_dropout > 0 else 0)
    sharded = 4 * h + 4 * kv + (8 * f if m.swiglu else 4 * f)
    if count.fope_learnable:
        sharded += 8 * (h + kv)  # float32 q/k and rotate_half(q/k) kept for the table grads
    per_token = replicated / (t if sp else 1) + sharded / t
    if not flash and not selective:
        per_token += a * s * (2 + (3 if m.attention_dropout > 0 else 0)) / t
    per_layer = s * b * per_token
    if m.position_embedding != "none" and position_fusion_on_gpu(cfg) == "torch":
        if selective:  # the apply is checkpointed: its bf16 q and k inputs stay, tables go
            per_layer += s * b * 2 * (h + kv) / t
        else:
            d_r = m.rotary_dim
            groups = count.fope.groups if count.fope else 1
            per_layer += 2 * (cfg.train.seq_length // dims.cp) * groups * d_r * 4
    return per_layer


def position_fusion_on_gpu(cfg) -> str:
    """What ``position.fusion`` runs as on the GPU cluster being planned: ``auto`` and ``triton``
    are the fused kernel (it keeps nothing for backward), ``torch`` keeps its tables."""
    return "torch" if cfg.position.fusion == "torch" else "triton"


def activation_bytes(cfg, dims, count, flash: bool = True) -> dict[str, float]:
    """Activation bytes of one micro-batch per GPU: ``activations`` (the transformer layers, with
    ``train.recompute``) and ``logits`` (final-norm and output-layer inputs, bf16 logits and the
    float32 softmax)."""
    m, tr, t = cfg.model, cfg.train, dims.tp
    b, s = tr.micro_batch_size, tr.seq_length // (dims.cp * dims.ulysses)
    sp = cfg.parallel.sp and t > 1
    per_layer = layer_bytes(cfg, dims, count, flash, selective=tr.recompute == "selective")
    layers = m.num_layers
    if tr.recompute == "full":
        kept_input = 2 * s * b * m.hidden_size / (t if sp else 1)
        n = resolved_num_layers(cfg)
        if tr.recompute_method == "uniform":
            total = layers // n * kept_input + n * per_layer
        else:
            total = n * kept_input + max(layers - n, 1) * per_layer
    else:
        total = layers * per_layer
    head = s * b * 4 * m.hidden_size / (t if sp else 1)
    logits = 6 * s * b * padded_vocab_size(cfg) / t
    return dict(activations=total, logits=head + logits)
