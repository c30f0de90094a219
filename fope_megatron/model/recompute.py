"""Activation recompute: ``train.recompute`` turned into megatron-core's own settings (the
settings are checked with the config: ``config/validate.py``'s ``check_recompute``).

No heavy imports, so fope-plan can use it.

``train.recompute`` maps onto ``TransformerConfig.recompute_granularity``:

- ``selective``: megatron checkpoints the core attention (``recompute_modules=["core_attn"]``);
  its inputs q, k, v are kept, the score/softmax activations are recomputed.
- ``full``: megatron checkpoints whole transformer layers (``TransformerBlock``'s
  ``_checkpointed_forward``), so FoPE/RoPE, applied inside attention's
  ``get_query_key_value_tensors``, is recomputed with the layer. ``train.recompute_method`` and
  ``train.recompute_num_layers`` are megatron's ``recompute_method`` / ``recompute_num_layers``:
  ``uniform`` recomputes every layer, in chunks of ``recompute_num_layers`` layers (default 1:
  each layer its own chunk); ``block`` recomputes the first ``recompute_num_layers`` layers one
  at a time and keeps the others' activations (default: all layers).
"""

from __future__ import annotations

from typing import Any


def resolved_num_layers(cfg) -> int | None:
    """megatron's ``recompute_num_layers`` for ``cfg`` (None unless ``train.recompute=full``)."""
    t = cfg.train
    if t.recompute != "full":
        return None
    if t.recompute_num_layers is not None:
        return t.recompute_num_layers
    return 1 if t.recompute_method == "uniform" else cfg.model.num_layers


def megatron_recompute_kwargs(cfg) -> dict[str, Any]:
    """The ``TransformerConfig`` recompute fields for ``cfg`` (megatron-core 0.14-0.16 names)."""
    kind = cfg.train.recompute
    if kind == "none":
        return dict(recompute_granularity=None)
    if kind == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return dict(
        recompute_granularity="full",
        recompute_method=cfg.train.recompute_method,
        recompute_num_layers=resolved_num_layers(cfg),
    )
