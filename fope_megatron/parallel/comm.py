"""Collectives that work on CPU (gloo) and GPU alike.

megatron-core's own gather helpers allocate their output with ``torch.cuda.current_device()``;
these allocate on the input's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_last_dim(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``t`` from every rank of ``group`` along the last dim (no autograd)."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def gather_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits from vocab-parallel ones (megatron's TP output layer)."""
    from megatron.core import parallel_state as ps

    return all_gather_last_dim(logits, ps.get_tensor_model_parallel_group())
