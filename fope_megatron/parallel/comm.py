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


class _GatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0; backward reduce-scatters (sums every rank's use of each shard)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        t = t.contiguous()
        out = t.new_empty((t.shape[0] * world, *t.shape[1:]))
        dist.all_gather_into_tensor(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def all_gather_first_dim(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable concatenation of ``t`` from every rank of ``group`` along dim 0 (rank
    order). The gradient of each rank's input is the sum over ranks of the gradient of its slice.
    """
    if group is None or dist.get_world_size(group) == 1:
        return t
    return _GatherFirstDim.apply(t, group)
