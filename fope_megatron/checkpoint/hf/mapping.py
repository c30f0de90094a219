"""Weight mapping: a megatron-core GPTModel's full (TP=1) state -> transformers Llama names.

=========================================================  ======================================
megatron-core (``N`` = layer)                              transformers (``FoPELlamaForCausalLM``)
=========================================================  ======================================
``embedding.word_embeddings.weight`` ``[V_pad, h]``        ``model.embed_tokens.weight`` ``[V, h]``
``decoder.layers.N.input_layernorm.weight`` (TE:           ``model.layers.N.input_layernorm.weight``
``self_attention.linear_qkv.layer_norm_weight``)
``decoder.layers.N.self_attention.linear_qkv.weight``      ``...self_attn.q_proj`` / ``k_proj`` /
``[G * (H/G + 2) * d, h]``, rows per KV group g:           ``v_proj`` ``.weight`` (``.bias`` the
``[q heads of g (H/G * d), k_g (d), v_g (d)]``             same way when ``add_bias_linear``)
``decoder.layers.N.self_attention.linear_proj.weight``     ``...self_attn.o_proj.weight``
``decoder.layers.N.self_attention.fope.coef_cos|sin``      ``...self_attn.coef_cos|sin``
``[1, G, D_in, D_out]`` float32                            ``[G, D_in, D_out]`` float32, always
``decoder.layers.N.pre_mlp_layernorm.weight`` (TE:         ``...post_attention_layernorm.weight``
``mlp.linear_fc1.layer_norm_weight``)
``decoder.layers.N.mlp.linear_fc1.weight`` ``[2f, h]``     ``...mlp.gate_proj`` = rows ``[:f]``,
(SwiGLU: ``silu(x @ W[:f].T) * (x @ W[f:].T)``)            ``...mlp.up_proj`` = rows ``[f:]``
``decoder.layers.N.mlp.linear_fc2.weight``                 ``...mlp.down_proj.weight``
``decoder.final_layernorm.weight``                         ``model.norm.weight``
``output_layer.weight`` ``[V_pad, h]`` (untied only)       ``lm_head.weight`` ``[V, h]``; tied:
                                                           none (``tie_word_embeddings``)
``*._extra_state``                                         dropped
=========================================================  ======================================

The padded vocab rows ``V .. V_pad`` (megatron pads to ``make_vocab_size_divisible_by``) are
dropped: no tokenizer id reaches them, so the exported model's distribution is the trained one
renormalised over the real vocab (``log_softmax(logits[..., :V])`` on the megatron side).
Supported: RMSNorm + SwiGLU (the Llama architecture); ``fope``, ``rope`` and ``none`` positions.
"""

from __future__ import annotations

import re

import torch

LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}


def split_qkv(t: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's fused QKV rows (per KV group ``[q_g, k_g, v_g]``) -> ``(q, k, v)`` rows."""
    per = heads // groups
    blocks = t.reshape(groups, (per + 2) * head_dim, *t.shape[1:])
    q = blocks[:, : per * head_dim].reshape(heads * head_dim, *t.shape[1:])
    k = blocks[:, per * head_dim : (per + 1) * head_dim].reshape(groups * head_dim, *t.shape[1:])
    v = blocks[:, (per + 1) * head_dim :].reshape(groups * head_dim, *t.shape[1:])
    return q, k, v


def megatron_to_hf(
    state: dict, *, heads: int, groups: int, head_dim: int, vocab_size: int, tied: bool
) -> dict[str, torch.Tensor]:
    """The transformers state dict of a full megatron-core state (see the module table)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or name.endswith("_extra_state"):
            continue
        t = t.detach().cpu()
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t[:vocab_size]
        elif name == "output_layer.weight":
            if not tied:
                out["lm_head.weight"] = t[:vocab_size]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif found := LAYER.match(name):
            n, rest = found.groups()
            pre = f"model.layers.{n}."
            if rest in _NORMS:
                out[pre + _NORMS[rest]] = t
            elif rest.startswith("self_attention.linear_qkv."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = split_qkv(t, heads, groups, head_dim)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{pre}self_attn.{proj}.{kind}"] = part.contiguous()
            elif rest.startswith("self_attention.linear_proj."):
                out[pre + "self_attn.o_proj." + rest.rsplit(".", 1)[1]] = t
            elif rest in ("self_attention.fope.coef_cos", "self_attention.fope.coef_sin"):
                out[pre + "self_attn." + rest.rsplit(".", 1)[1]] = t[0].float().contiguous()
            elif rest.startswith("mlp.linear_fc1."):
                gate, up = t.chunk(2, dim=0)
                kind = rest.rsplit(".", 1)[1]
                out[f"{pre}mlp.gate_proj.{kind}"] = gate.contiguous()
                out[f"{pre}mlp.up_proj.{kind}"] = up.contiguous()
            elif rest.startswith("mlp.linear_fc2."):
                out[pre + "mlp.down_proj." + rest.rsplit(".", 1)[1]] = t
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"no Hugging Face name for megatron state entries {unknown}")
    return out
