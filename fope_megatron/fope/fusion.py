"""Which implementation applies FoPE / RoPE to q and k: the one dispatch point.

``position.fusion``:
- ``torch``: the reference path (float32 tables ``[s, groups, d_r]``, then ``apply_tables``).
- ``triton``: :mod:`.triton_apply`, one launch for q and k, nothing activation-sized saved.
  FoPE and RoPE both (RoPE as FoPE's identity-coefficient limit).
- ``auto``: ``triton`` on CUDA when triton imports, else ``torch``; for the RoPE twin on CUDA,
  transformer-engine's fused RoPE (through megatron-core) first when it imports.

Resolved once, before the model is built (:func:`resolve_fusion`), and recorded by the trainer.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch
from torch import Tensor

FUSIONS = ("auto", "triton", "torch")
"""What a user may ask for."""
RESOLVED = ("triton", "torch", "te")
"""What runs: ``te`` is transformer-engine's fused RoPE (RoPE only)."""


class FusionError(ValueError):
    """The requested fusion cannot run here."""


@cache
def triton_available() -> bool:
    """triton imports (its kernels then run on CUDA, or on CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@cache
def transformer_engine_available() -> bool:
    """transformer-engine's PyTorch extension imports (megatron-core's fused RoPE uses it)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_fusion(requested: str, kind: str, cuda: bool | None = None) -> str:
    """The implementation that runs for ``position.fusion=requested`` and ``kind``.

    Args:
        requested: ``auto`` | ``triton`` | ``torch``.
        kind: ``fope`` | ``rope`` | ``none``.
        cuda: whether the model runs on CUDA (default: ``torch.cuda.is_available()``).

    Raises:
        FusionError: ``triton`` asked for where it cannot run.
    """
    if requested not in FUSIONS:
        raise FusionError(f"position.fusion={requested!r} unknown; allowed: {FUSIONS}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if kind == "none" or requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise FusionError(
                "position.fusion=triton but triton does not import; install triton "
                "(pip install triton) or set position.fusion=torch"
            )
        if not cuda and not interpreted():
            raise FusionError(
                "position.fusion=triton needs CUDA (or TRITON_INTERPRET=1 to run the kernel on "
                "the CPU, slowly); use position.fusion=auto or torch here"
            )
        return "triton"
    if not cuda:
        return "torch"
    if kind == "rope" and transformer_engine_available():
        return "te"
    return "triton" if triton_available() else "torch"


def te_rope_apply_qk(
    q: Tensor, k: Tensor, positions: Tensor, w: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor]:
    """megatron-core's transformer-engine fused RoPE on q and on k (two calls), ``sbhd``.

    The frequency tensor is built for exactly the given positions, so CP chunks and shards need
    nothing special.
    """
    from megatron.core.extensions.transformer_engine import fused_apply_rotary_pos_emb

    angles = positions.to(torch.float32)[:, None] * w.to(torch.float32)[None, :]
    if interleaved:
        emb = torch.repeat_interleave(angles, 2, dim=-1)
    else:
        emb = torch.cat([angles, angles], dim=-1)
    freqs = emb[:, None, None, :]
    return (
        fused_apply_rotary_pos_emb(q, freqs, interleaved=interleaved),
        fused_apply_rotary_pos_emb(k, freqs, interleaved=interleaved),
    )
