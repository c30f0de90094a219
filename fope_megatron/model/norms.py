"""Torch LayerNorm / RMSNorm that work under megatron sequence parallelism (CPU and GPU).

megatron-core's ``WrappedTorchNorm`` refuses ``config.sequence_parallel``. A norm needs nothing
special to run on a sequence shard; what it needs is that its weight gradient, computed from this
rank's tokens only, is summed over the TP group before the optimizer step. megatron marks such
parameters with ``sequence_parallel = True`` and sums them in ``finalize_model_grads``; we set
the same attribute and sum them in :func:`fope_megatron.parallel.grads.finalize_sp_grads`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def _mark(module: torch.nn.Module, sequence_parallel: bool) -> None:
    for p in module.parameters(recurse=False):
        p.sequence_parallel = bool(sequence_parallel)


def _check(config: TransformerConfig) -> None:
    for field in ("layernorm_zero_centered_gamma", "persist_layer_norm"):
        if getattr(config, field, False):
            raise ValueError(f"{field}=True is not supported by the torch norms")


class _FromMegatronConfig:
    """Shared constructor: a torch norm built from a megatron config, params marked SP."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        sequence_parallel: bool | None = None,
        **_,
    ):
        _check(config)
        super().__init__(hidden_size, eps=eps)
        _mark(self, config.sequence_parallel if sequence_parallel is None else sequence_parallel)


class SPLayerNorm(_FromMegatronConfig, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built from a megatron config; params carry ``sequence_parallel``."""


class SPRMSNorm(_FromMegatronConfig, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a megatron config; params carry ``sequence_parallel``."""


class SequenceParallelNorm:
    """Spec entry (like megatron's ``WrappedTorchNorm``): builds :class:`SPLayerNorm` or
    :class:`SPRMSNorm` from ``config.normalization``. Same state-dict keys as torch's norms."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        sequence_parallel: bool | None = None,
        **_,
    ):
        """``sequence_parallel``: None follows ``config.sequence_parallel`` (False for q/k norms)."""
        kinds = {"LayerNorm": SPLayerNorm, "RMSNorm": SPRMSNorm}
        if config.normalization not in kinds:
            raise ValueError(
                f"normalization={config.normalization!r} unsupported; allowed: {sorted(kinds)}"
            )
        return kinds[config.normalization](config, hidden_size, eps, sequence_parallel)
