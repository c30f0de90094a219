"""Checkpoint resharding across TP layouts: a *full* (unsharded) state dict, gathered on save and
sliced on load.

Format (``FULL_STATE_FORMAT``): ``{"format", "tensor_parallel_size", "state_dict"}`` where
``state_dict`` maps megatron's own parameter names to full tensors, exactly the TP=1 model's
``state_dict()``. Why our own conversion rather than DeepSpeed's universal checkpoint or megatron
dist-checkpointing: the full state is what TP=1 holds, so it loads in any layout, needs no
metadata beyond megatron's per-parameter attributes, and is readable by evaluation code that
never initialises process groups. Its cost (the whole model gathered on the TP group) is the
size of one unsharded model, fine for the model sizes of this project; optimizer state is the
trainer's concern.

How each tensor is gathered / sliced:

- megatron TP parameters carry ``tensor_model_parallel``, ``partition_dim`` and
  ``partition_stride``. With stride ``k`` the full tensor is ``k*tp`` equal blocks along
  ``partition_dim`` and rank ``r`` holds blocks ``r, r+tp, ...`` (megatron's
  ``_initialize_affine_weight_cpu``). Stride 2 is the SwiGLU ``linear_fc1`` ([gate, up]); the
  fused QKV rows are grouped per KV group ``[q_g, k_g, v_g]``, so contiguous TP blocks are whole
  KV groups and stride 1 is right for it.
- FoPE coefficients ``[layers, groups, D_in, D_out]`` are placed by the KV-group range each rank's
  ``FourierPositionEmbedding`` holds (dim 1), which also covers replicated groups.
- Everything else (norms, row-parallel biases) is replicated: rank 0's copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..fope import FourierPositionEmbedding

FULL_STATE_FORMAT = "fope-megatron/full-state/v1"


def _tp(tp_group):
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    size = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    return tp_group, rank, size


def _fope_entries(model: torch.nn.Module) -> dict[str, FourierPositionEmbedding]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FourierPositionEmbedding):
            for t in ("coef_cos", "coef_sin"):
                out[f"{name}.{t}" if name else t] = module
    return out


def _layout(model: torch.nn.Module) -> dict[str, tuple[int, int] | None]:
    """name -> (partition_dim, stride) for megatron TP tensors, None for replicated ones."""
    layout = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and getattr(t, "tensor_model_parallel", False):
            layout[name] = (int(t.partition_dim), int(getattr(t, "partition_stride", 1)))
        else:
            layout[name] = None
    return layout


def split_dims(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{state key: (dim, stride)}`` of every tensor split over TP: what joins the TP ranks'
    saved states into the full one (:func:`join_states`, no process group). FoPE coefficients
    are split over KV groups (dim 1), contiguous ranges in rank order (``num_query_groups >= tp``)."""
    out = {k: v for k, v in _layout(model).items() if v is not None}
    out.update({name: (1, 1) for name in _fope_entries(model)})
    return out


def join_states(states: list[dict], split: dict) -> dict:
    """The full (TP=1) state from each TP rank's ``state_dict()`` (rank order) and ``split``."""
    return {
        k: _join([s[k] for s in states], *split[k])
        if k in split and isinstance(v, torch.Tensor) and len(states) > 1 else v
        for k, v in states[0].items()
    }  # fmt: skip


def _check_groups(model: torch.nn.Module, tp_size: int) -> None:
    config = getattr(model, "config", None)
    groups = getattr(config, "num_query_groups", None)
    if groups is not None and groups < tp_size:
        raise NotImplementedError(
            f"resharding with num_query_groups={groups} < tp={tp_size} (replicated KV heads) is "
            "not supported"
        )


def _gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _join(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    blocks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([blocks[r][k] for k in range(stride) for r in range(len(parts))], dim=dim)


def _split(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    if full.shape[dim] % (stride * size):
        raise ValueError(
            f"dim {dim} of shape {tuple(full.shape)} not divisible by stride*tp = {stride}*{size}"
        )
    return torch.cat(full.chunk(stride * size, dim=dim)[rank::size], dim=dim)


def _map_split(model: torch.nn.Module, tensors: dict, tp_size: int, fope_fn, split_fn) -> dict:
    """``tensors`` (keyed like ``model.state_dict()``) with every TP-split entry replaced:
    FoPE coefficients by ``fope_fn(t, module)``, megatron TP tensors by ``split_fn(t, dim,
    stride)``; the rest (and everything at ``tp_size == 1``) as given. What gathering and slicing
    share."""
    if tp_size > 1:
        _check_groups(model, tp_size)
    layout = _layout(model)
    fope = _fope_entries(model)
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or tp_size == 1:
            out[name] = t
        elif name in fope:
            out[name] = fope_fn(t, fope[name])
        elif layout.get(name) is not None:
            out[name] = split_fn(t, *layout[name])
        else:
            out[name] = t
    return out


def gather_full_tensors(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], tp_group=None
) -> dict[str, torch.Tensor]:
    """Full (TP=1) shapes of per-rank ``tensors`` keyed like ``model.state_dict()`` (e.g. its
    state, or its parameters' gradients). Collective over the TP group."""
    group, _, size = _tp(tp_group)

    def full_coefficients(t: torch.Tensor, module: FourierPositionEmbedding) -> torch.Tensor:
        spans = _gather(
            torch.tensor([module.groups.start, module.groups.stop], device=t.device), group, size
        )
        parts = _gather(t, group, size)
        shape = list(t.shape)
        shape[1] = module.config.groups
        out = t.new_zeros(shape)
        for (g0, g1), part in zip(spans, parts, strict=True):
            out[:, int(g0) : int(g1)] = part
        return out

    def full_tensor(t: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
        return _join(_gather(t, group, size), dim, stride)

    return _map_split(model, tensors, size, full_coefficients, full_tensor)


def full_state_dict(model: torch.nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """The model's state as the TP=1 model would hold it (collective over TP; every rank gets it)."""
    state = {
        k: (v.detach() if isinstance(v, torch.Tensor) else v)
        for k, v in model.state_dict(keep_vars=True).items()
    }
    return gather_full_tensors(model, state, tp_group)


def full_grads(model: torch.nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """Parameter gradients in full (TP=1) shapes, keyed by parameter name (collective over TP)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return gather_full_tensors(model, grads, tp_group)


def shard_full_state_dict(
    model: torch.nn.Module, full: dict[str, torch.Tensor], tp_group=None
) -> dict[str, torch.Tensor]:
    """This TP rank's slice of a full state dict (no communication)."""
    _, rank, size = _tp(tp_group)
    return _map_split(
        model,
        full,
        size,
        lambda t, module: t[:, module.groups.start : module.groups.stop],
        lambda t, dim, stride: _split(t, dim, stride, rank, size),
    )


def load_full_state_dict(
    model: torch.nn.Module, full: dict[str, torch.Tensor], tp_group=None, strict: bool = True
):
    """Load a full (TP=1) state dict into a model of any TP layout."""
    return model.load_state_dict(shard_full_state_dict(model, full, tp_group), strict=strict)


def save_full_checkpoint(model: torch.nn.Module, path: str | Path, tp_group=None) -> None:
    """Gather the full state over TP; the first TP rank writes it to ``path`` (``torch.save``).

    Collective over the TP group; with data parallelism the caller picks which replica writes.
    """
    group, rank, size = _tp(tp_group)
    state = full_state_dict(model, group)
    if rank == 0:
        payload = {
            "format": FULL_STATE_FORMAT,
            "tensor_parallel_size": size,
            "state_dict": {
                k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()
            },
        }
        torch.save(payload, path)


def load_full_checkpoint(model: torch.nn.Module, path: str | Path, tp_group=None, strict=True):
    """Load a :func:`save_full_checkpoint` file into a model of any TP layout."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FULL_STATE_FORMAT:
        raise ValueError(f"{path}: not a {FULL_STATE_FORMAT} checkpoint")
    device = next(model.parameters()).device
    state = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in payload["state_dict"].items()
    }
    return load_full_state_dict(model, state, tp_group, strict=strict)
