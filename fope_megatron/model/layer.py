"""A megatron-core ``TransformerLayer`` whose initial weights depend on its global layer only.

megatron draws every weight from torch's CPU generator in construction order
(``use_cpu_initialization``), so under pipeline parallelism a stage that builds only layers
``[k, n)`` would draw them from a different stream than one process does. Reseeding that
generator from ``(seed, global layer)`` before each layer is built makes layer ``l``'s weights the
same numbers under any TP / PP / virtual-stage layout (as FoPE's coefficients already are,
``fope.math.coefficient_generator``). The embedding is drawn first, from ``run.seed``, and the
untied output layer right after the last layer, so they need no reseed of their own.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)


def layer_init_seed(seed: int, layer: int) -> int:
    """The CPU seed of global layer ``layer`` (0-based); a stream apart from FoPE's."""
    return (int(seed) * 1_000_033 + int(layer) * 104_729 + 5) % (2**63 - 1)


class SeededTransformerLayer(TransformerLayer):
    """``TransformerLayer`` built right after ``torch.manual_seed(layer_init_seed(seed, l))``.

    Extra spec param ``init_seed``: ``run.seed``.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int, **kw):
        group = getattr(kw.get("pg_collection"), "pp", None)
        pp_rank = group.rank() if group is not None else None  # None: parallel_state's
        offset = get_transformer_layer_offset(config, kw.get("vp_stage"), pp_rank)
        torch.manual_seed(layer_init_seed(init_seed, layer_number - 1 + offset))
        super().__init__(config, submodules, layer_number, *args, **kw)
