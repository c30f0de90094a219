"""fope-plan's parameter count: analytic, exactly as megatron-core's GPTModel with our local
layer spec allocates them (tests/test_plan.py checks this against built models): padded vocab,
tied or untied output layer, two norms per layer plus the final norm, biases only with
``model.add_bias_linear``. FoPE coefficients are listed apart: frozen they are float32 buffers,
not parameters; with ``fope.learnable`` they are parameters and count in the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..fope import base_frequencies, default_d_out, floor_frequencies
from ..model.vocab import padded_vocab_size


@dataclass(frozen=True)
class FoPEShape:
    """Shape of the FoPE coefficients: per layer ``coef_cos`` and ``coef_sin``, each
    ``[G_held, D_in, D_out]``."""

    layers: int  # layers holding coefficients (every layer holds its own tensors)
    groups: int  # KV groups held (all G for the full model, G / tp per TP rank)
    d_in: int  # non-zero frequencies after the floor
    d_out: int  # output frequencies

    @property
    def count(self) -> int:
        return 2 * self.layers * self.groups * self.d_in * self.d_out


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the model (or of one TP rank), by part."""

    embedding: int  # input word embedding (padded vocab x hidden)
    output_layer: int  # untied output projection (0 when tied to the embedding)
    attention: int  # QKV and output projections of all layers (with biases)
    mlp: int  # fc1 and fc2 of all layers (with biases)
    norms: int  # two norms per layer and the final norm
    layers: int  # transformer layers
    fope: FoPEShape | None  # FoPE coefficients (None without FoPE)
    fope_learnable: bool  # coefficients are parameters (else float32 buffers)

    @property
    def fope_coefficients(self) -> int:
        return self.fope.count if self.fope else 0

    @property
    def embeddings(self) -> int:
        """Input embedding plus untied output layer (Kaplan et al.'s "embedding" parameters)."""
        return self.embedding + self.output_layer

    @property
    def total(self) -> int:
        """Every ``nn.Parameter``: what ``sum(p.numel() for p in model.parameters())`` gives."""
        core = self.embeddings + self.attention + self.mlp + self.norms
        return core + (self.fope_coefficients if self.fope_learnable else 0)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embeddings

    @property
    def largest_module(self) -> int:
        """Largest single module ZeRO-3 gathers at once: one layer or the embedding."""
        per_layer = (self.attention + self.mlp + self.norms) // self.layers
        return max(self.embedding, self.output_layer, per_layer)


def local_groups(groups: int, tp: int) -> int:
    """KV groups one TP rank holds (replicated when there are fewer groups than ranks)."""
    return groups // tp if groups >= tp else 1


def fope_shape(cfg: Config, tp: int = 1) -> FoPEShape | None:
    """D_in / D_out from the FoPE floor (``fope_megatron.fope``) and the coefficient shape.

    Frequencies are scaled by ``position.scaling`` (YaRN / PI) first, as the model builds them.
    """
    m, f = cfg.model, cfg.fope
    if m.position_embedding != "fope":
        return None
    d_r = m.rotary_dim
    from ..model.builder import position_frequencies

    scaled = position_frequencies(cfg)
    w = base_frequencies(d_r, float(m.rotary_base)) if scaled is None else torch.tensor(scaled)
    _, d_in = floor_frequencies(w, cfg.fope_train_seq_len, f.floor_ratio)
    d_out = default_d_out(d_in, d_r) if f.d_out is None else min(f.d_out, d_in)
    return FoPEShape(m.num_layers, local_groups(m.kv_groups, tp), d_in, d_out)


def count_parameters(cfg: Config, tp: int = 1) -> ParamCount:
    """Parameters of one tensor-parallel rank (``tp=1``: the whole model).

    Column-parallel weights (QKV, fc1, embedding, output layer) and row-parallel weights
    (projection, fc2) are split over ``tp``; norms and row-parallel biases are replicated.
    """
    m = cfg.model
    h, heads, d, groups = m.hidden_size, m.num_attention_heads, m.head_dim, m.kv_groups
    f = m.ffn_size
    vocab = padded_vocab_size(cfg) // tp
    bias = m.add_bias_linear
    qkv_rows = (heads // tp + 2 * local_groups(groups, tp)) * d
    attention = qkv_rows * h + h * (heads // tp) * d + (qkv_rows + h if bias else 0)
    fc1_rows = (2 if m.swiglu else 1) * f // tp
    mlp = fc1_rows * h + h * (f // tp) + (fc1_rows + h if bias else 0)
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    return ParamCount(
        embedding=vocab * h,
        output_layer=vocab * h if m.untie_embeddings else 0,
        attention=m.num_layers * attention,
        mlp=m.num_layers * mlp,
        norms=(2 * m.num_layers + 1) * norm,
        layers=m.num_layers,
        fope=fope_shape(cfg, tp),
        fope_learnable=cfg.fope.learnable and m.position_embedding == "fope",
    )
