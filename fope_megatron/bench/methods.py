"""The q/k position-encoding implementations the benchmarks compare, as ``step(q, k) -> (q', k')``.

Every step takes megatron's ``[s, b, heads, head_dim]`` q and k and returns the encoded pair.
Per-model precomputation that a real model does once per forward (RoPE's frequency tensor, HF's
``cos``/``sin``) is done when the step is built, not timed; per-layer work (FoPE's tables from
the layer's coefficients, megatron's ``cos()``/``sin()`` of the frequencies) is timed.

Methods (``available_methods`` says which run here):
- ``fope_fused``: our Triton kernel, q and k in one launch (CUDA, or the CPU interpreter), along
  the path it picks from the shapes (``fope.triton_apply.kernel_path``: at these shapes the
  Fourier-column product as 3xTF32, a group's heads as one tile).
- The kernel along a named path (``KernelPath``), to compare its paths at the same shapes:
  ``fope_fused_dot`` (the IEEE fp32 product over all pairs, one head at a time),
  ``fope_fused_tile`` (that product, a group's heads as one tile), ``fope_fused_narrow_tf32x3``
  (the 3xTF32 product over the Fourier columns only, one head at a time) and
  ``fope_fused_narrow_tf32x3_tile`` (that, as one tile). Where the Fourier columns do not fill
  half the padded pairs, the narrow ones take the product over all pairs.
- ``fope_torch``: the torch reference path (float32 tables, then apply).
- ``rope_fused``: the same Triton kernel in its RoPE limit.
- ``rope_fused_tile`` / ``rope_fused_each``: the RoPE limit with a group's heads as one tile (its
  path at these shapes) / one head at a time.
- ``rope_te``: transformer-engine's fused RoPE through megatron-core (q and k calls summed).
- ``rope_liger``: Liger-Kernel's Triton RoPE (one launch for q and k, HF layout views).
- ``rope_compile``: megatron's unfused RoPE formula under ``torch.compile``.
- ``rope_megatron``: megatron-core's unfused ``_apply_rotary_pos_emb_bshd``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..fope import FoPEConfig, FourierPositionEmbedding, RotaryEmbeddingTables

Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
METHODS = (
    "fope_fused",
    "fope_fused_dot",
    "fope_fused_tile",
    "fope_fused_narrow_tf32x3",
    "fope_fused_narrow_tf32x3_tile",
    "fope_torch",
    "rope_fused",
    "rope_fused_tile",
    "rope_fused_each",
    "rope_te",
    "rope_liger",
    "rope_compile",
    "rope_megatron",
)


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


VARIANTS = {
    "fope_fused_dot": (False, False),
    "fope_fused_tile": (False, True),
    "fope_fused_narrow_tf32x3": (True, False),
    "fope_fused_narrow_tf32x3_tile": (True, True),
    "rope_fused_tile": (False, True),
    "rope_fused_each": (False, False),
}
"""The fused kernel along a named path, ``(narrow, tile)`` of ``KernelPath`` (narrow where the
shapes allow it), timed only when named."""


def available_methods(device: torch.device, variants: bool = False) -> list[str]:
    """The methods that can run on ``device`` with what is installed (the kernel along named
    paths, :data:`VARIANTS`, only with ``variants``)."""
    from ..fope.fusion import interpreted, transformer_engine_available, triton_available

    cuda = device.type == "cuda"
    triton_ok = triton_available() and (cuda or interpreted())
    out = []
    for name in METHODS:
        if name in VARIANTS and not variants:
            continue
        if name.startswith(("fope_fused", "rope_fused")) and not triton_ok:
            continue
        if name == "rope_te" and not (cuda and transformer_engine_available()):
            continue
        if name == "rope_liger" and not (
            triton_ok and importlib.util.find_spec("liger_kernel") is not None
        ):
            continue
        if name == "rope_compile" and not cuda:
            continue  # inductor on CPU compiles C++ for minutes; not a CPU comparison we need
        out.append(name)
    return out


def megatron_freqs(head_dim: int, seq: int, device: torch.device) -> Tensor:
    """megatron-core's non-interleaved RoPE frequency tensor ``[s, 1, 1, d]``, float32."""
    rpe = _quiet_import("megatron.core.models.common.embeddings.rotary_pos_embedding")
    rope = rpe.RotaryEmbedding(head_dim, 1.0, use_cpu_initialization=True)
    f = rope.get_freqs_non_repeated(seq)
    return torch.cat((f, f), dim=-1)[:, None, None, :].to(device)


def build_step(
    name: str,
    seq: int,
    heads: int,
    groups: int,
    head_dim: int,
    train_seq_len: int,
    device: torch.device,
) -> tuple[Step, dict]:
    """The step of method ``name`` for one layer at these shapes, and facts about it."""
    positions = torch.arange(seq, device=device)
    if name.startswith("fope"):
        cfg = FoPEConfig(
            head_dim=head_dim,
            train_seq_len=train_seq_len,
            num_attention_heads=heads,
            num_query_groups=groups,
            num_layers=1,
        )
        fope = FourierPositionEmbedding(cfg).to(device)
        fusion = "torch" if name == "fope_torch" else "triton"
        fope_info = {"d_in": fope.d_in, "d_out": fope.d_out, "rotary_dim": cfg.rotary_dim}
        if name in VARIANTS:
            from ..fope.triton_apply import KernelPath, fope_apply_qk, narrow_fits

            a_cos, a_sin = fope.coef_cos[0], fope.coef_sin[0]
            w_in = fope.frequencies[: fope.d_in]
            narrow, tile = VARIANTS[name]
            path = KernelPath(narrow and narrow_fits(fope.d_out, cfg.rotary_dim), tile)

            def variant_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
                return fope_apply_qk(
                    q, k, positions, w_in, a_cos, a_sin, cfg.rotary_dim, path=path
                )  # fmt: skip

            return variant_step, fope_info

        def fope_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return fope.apply_qk(q, k, positions, 0, fusion=fusion)

        return fope_step, fope_info
    info = {"rotary_dim": head_dim}
    if name in VARIANTS:  # the RoPE limit along a named path
        from ..fope.triton_apply import KernelPath, rope_apply_qk

        w = RotaryEmbeddingTables(head_dim).to(device).frequencies
        rope_path = KernelPath(narrow=False, tile=VARIANTS[name][1])

        def variant_rope(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return rope_apply_qk(q, k, positions, w, head_dim, path=rope_path)

        return variant_rope, info
    if name in ("rope_fused", "rope_te"):
        rope = RotaryEmbeddingTables(head_dim).to(device)
        fusion = "triton" if name == "rope_fused" else "te"

        def rope_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return rope.apply_qk(q, k, positions, fusion=fusion)

        return rope_step, info
    freqs = megatron_freqs(head_dim, seq, device)
    if name == "rope_liger":
        rope_mod = _quiet_import("liger_kernel.ops.rope")
        emb = freqs[:, 0, 0, :]
        cos, sin = emb.cos()[None], emb.sin()[None]  # HF's [1, s, d], built once per model

        def liger_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            # HF layout [b, h, s, d] as views of megatron's [s, b, h, d] (free for b = 1).
            oq, ok = rope_mod.LigerRopeFunction.apply(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), cos, sin
            )
            return oq.permute(2, 0, 1, 3), ok.permute(2, 0, 1, 3)

        return liger_step, info
    ru = _quiet_import("megatron.core.models.common.embeddings.rope_utils")
    apply_bshd = ru._apply_rotary_pos_emb_bshd
    if name == "rope_compile":
        compiled = torch.compile(
            lambda q, k, f: (apply_bshd(q, f), apply_bshd(k, f)), dynamic=False
        )

        def compiled_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
            return compiled(q, k, freqs)

        return compiled_step, info
    if name != "rope_megatron":
        raise ValueError(f"benchmark method {name!r} unknown; allowed: {METHODS}")

    def megatron_step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_bshd(q, freqs), apply_bshd(k, freqs)

    return megatron_step, info
