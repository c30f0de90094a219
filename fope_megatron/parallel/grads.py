"""Gradient reductions that megatron's ``finalize_model_grads`` does and DeepSpeed does not.

Megatron sequence parallelism: parameters used on sequence shards (norm weights and biases, the
bias of ``RowParallelLinear``) are replicated over TP, yet each TP rank's gradient comes from its
own tokens only. megatron marks them ``sequence_parallel = True`` and sums their gradients over
the TP group before the optimizer step; DeepSpeed knows nothing of TP, so the trainer calls
:func:`finalize_sp_grads` after backward, or installs :func:`register_sp_grad_hooks` once
(required with DeepSpeed ZeRO 1/2, which take the gradients during backward).

Sequence sharding across ranks (CP, Ulysses) needs nothing here: those ranks hold the same
weights and see different tokens of the same samples, so their gradients are averaged together
with the data-parallel ones (``parallel.setup.get_gradient_reduction_group``: dp*cp*ulysses ranks),
which DeepSpeed does over its data-parallel group.

Loss convention (what the CP / Ulysses equality tests check): with a per-rank loss of
``sum(local per-token losses) / global tokens``, the SUM of gradients over the CP (or Ulysses)
group equals the one-rank gradient of the global mean (megatron's convention: CP gradients are
summed). Equivalently, and what a DeepSpeed trainer gets for free, a per-rank *local mean* loss
with gradients AVERAGED over dp*cp*ulysses ranks gives the global mean, since every rank holds
the same number of tokens (``s / (cp*ulysses)``). With a loss mask the counts differ per rank:
divide by the global count of unmasked tokens (all-reduced over the group) instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_parallel_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters marked ``sequence_parallel`` (replicated over TP, gradient from local tokens)."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]


def _tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def finalize_sp_grads(model: torch.nn.Module, tp_group=None) -> int:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group, in place.

    Call after the backward of the last micro-batch and before gradient clipping / the optimizer
    step, while the gradients are still in ``p.grad``: plain torch, or DeepSpeed ZeRO stage 0
    (between ``engine.backward`` and ``engine.step``). DeepSpeed ZeRO 1/2 move gradients into
    their own buckets during ``engine.backward``; there use :func:`register_sp_grad_hooks`.
    A single coalesced all-reduce; returns the number of tensors reduced (0 without TP or
    without sequence parallelism).
    """
    group = _tp_group(tp_group)
    if group is None or dist.get_world_size(group) == 1:
        return 0
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    if not grads:
        return 0
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(reduced)
    return len(grads)


def register_sp_grad_hooks(model: torch.nn.Module, tp_group=None) -> list:
    """Sum each ``sequence_parallel`` gradient over TP as autograd produces it (before it is
    accumulated into ``.grad`` and before any DeepSpeed ZeRO hook sees it). Call once after
    building the model; use it *instead of* :func:`finalize_sp_grads` (one all-reduce per
    parameter and micro-batch: correct under gradient accumulation, as the sum is linear).
    Returns the hook handles."""
    group = _tp_group(tp_group)
    if group is None or dist.get_world_size(group) == 1:
        return []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return [p.register_hook(hook) for p in sequence_parallel_params(model) if p.requires_grad]


def all_reduce_grads(model: torch.nn.Module, group, op=dist.ReduceOp.SUM) -> None:
    """All-reduce every gradient over ``group`` (tests; a plain DDP-style reduction)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=op, group=group)


def all_reduce_embedding_grads(chunks: list[torch.nn.Module]) -> bool:
    """Sum the gradient of tied embeddings over megatron's embedding group (first and last
    pipeline stage), in place; returns True when reduced.

    With ``share_embeddings_and_output_weights`` and ``pp > 1`` the first stage's word
    embedding and the last stage's output layer are two copies of one weight (megatron starts
    them equal); each copy's gradient holds only its own use, so both must get the sum, as
    megatron's ``finalize_model_grads`` does for its own DDP buffers (``main_grad``).
    ``chunks``: this rank's model chunks (the first holds the embedding, the last the output).
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return False
    model = chunks[0] if ps.is_pipeline_first_stage(ignore_virtual=True) else chunks[-1]
    if not model.share_embeddings_and_output_weights:
        return False
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())
    return True
