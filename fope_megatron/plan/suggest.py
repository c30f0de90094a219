"""fope-plan's suggestions: when a plan does not fit, the usual fixes (ZeRO stage, tensor
parallelism, micro batch, activation recompute, more nodes), each estimated again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..parallel.dims import ParallelDims
from .memory import GIB, Layout, Plan, estimate


def _recompute_candidates(cfg: Config, layout: Layout) -> tuple[list, list]:
    """Selective and full activation recompute (each empty when already on, or when it would
    change nothing: selective with flash attention has no score matrix to drop)."""
    kind = cfg.train.recompute
    selective, full = [], []
    if kind == "none" and not layout.flash_attention:
        text = "selective activation recompute (of the core attention)"
        selective.append((text, ["train.recompute=selective"]))
    if kind != "full":
        text = "full activation recompute (about one more forward per step)"
        full.append((text, ["train.recompute=full"]))
    return selective, full


def _candidates(cfg: Config, dims: ParallelDims, layout: Layout, dominant: str):
    """``(text, overrides)`` worth trying on the same GPUs, the most relevant first.

    Recompute is among them only where it fits (see ``plan``): selective, the cheap one, first
    for activation-bound plans; full, which costs about a third more compute, after tp.
    """
    p, stage = cfg.parallel, cfg.deepspeed.zero_stage
    zero: list[tuple[str, list[str]]] = []
    if dims.dp_shard > 1 and stage < 3:
        zero.append((f"raise the ZeRO stage to {stage + 1}", [f"deepspeed.zero_stage={stage + 1}"]))
    if p.tp == 1 and not cfg.deepspeed.offload:
        offload = ["deepspeed.zero_stage=3", "deepspeed.offload=true"]
        zero.append(("ZeRO-3 with CPU offload of optimizer and weights", offload))
    tp: list[tuple[str, list[str]]] = []
    if p.tp * 2 <= layout.gpus_per_node:
        extra = [f"parallel.tp={p.tp * 2}", "parallel.sp=true"]
        extra += ["deepspeed.offload=false"] if cfg.deepspeed.offload else []
        tp.append((f"raise tensor parallelism to tp={p.tp * 2} with sp", extra))
    mb: list[tuple[str, list[str]]] = []
    if cfg.train.micro_batch_size > 1:
        half = cfg.train.micro_batch_size // 2
        mb.append((f"lower the micro batch to {half}", [f"train.micro_batch_size={half}"]))
    selective, full = _recompute_candidates(cfg, layout)
    if dominant in ("activations", "logits"):
        return selective + mb + tp + full + zero
    return zero + tp + mb + selective + full


def _more_nodes(path, overrides: list[str], cfg: Config, layout: Layout) -> str | None:
    """The fewest nodes (2x, 4x, ... up to 64 nodes) on which the config fits, at its ZeRO
    stage or with ZeRO-3."""
    tries = [("", [])]
    if cfg.deepspeed.zero_stage < 3:
        tries.append((" with ZeRO-3", ["deepspeed.zero_stage=3"]))
    for nodes in (layout.nodes * 2**k for k in range(1, 7)):
        if nodes > 64:
            break
        bigger = dataclasses.replace(layout, nodes=nodes)
        for text, extra in tries:
            try:
                alt = estimate(load_config(path, overrides + extra), bigger)
            except ConfigError:
                continue
            if alt.fits:
                gib = alt.memory_bytes["total"] / GIB
                return f"use {nodes} nodes ({alt.layout['world']} GPUs){text}: {gib:.1f} GiB, fits"
    return None


def plan(path: str | Path, layout: Layout, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Load, validate and estimate ``path`` with ``overrides``; when it does not fit, try the
    usual fixes (ZeRO stage, tensor parallelism, micro batch, activation recompute, more nodes)
    and list the possible ones with their resulting memory (recompute only where it fits).

    Raises:
        ConfigError: the config or the layout is impossible.
    """
    overrides = list(overrides)
    cfg = load_config(path, overrides)
    result = estimate(cfg, layout, str(path), overrides)
    if result.fits:
        return result
    fitting = []
    for text, extra in _candidates(cfg, cfg.validate(layout.world), layout, result.dominant):
        try:
            alt = estimate(load_config(path, overrides + extra), layout)
        except ConfigError:
            continue  # not possible with this model / layout
        if not alt.fits and "train.recompute" in extra[0]:
            continue  # suggested only where it makes the run fit
        verdict = "fits" if alt.fits else "still does not fit"
        gib = alt.memory_bytes["total"] / GIB
        result.suggestions.append(f"{text} ({' '.join(extra)}): {gib:.1f} GiB, {verdict}")
        if alt.fits:
            fitting.append(result.suggestions[-1])
    if not fitting:
        nodes = _more_nodes(path, overrides, cfg, layout)
        if nodes:
            result.suggestions.append(nodes)
            fitting.append(nodes)
    best = (fitting or result.suggestions or [None])[0]
    if result.reason and best:
        result.reason += "; suggestion: " + best
    return result
