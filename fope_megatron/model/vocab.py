"""The model's (padded) vocabulary size; no heavy imports, so configs and plans can use it."""

from __future__ import annotations


def padded_vocab_size(config) -> int:
    """Vocab padded up to a multiple of ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM (multiple of divisor * tp) the padding does not depend on tp, so a model
    has the same embedding shape, initial weights and checkpoint under every TP layout;
    validate() checks that the divisor is divisible by tp.
    """
    multiple = config.model.make_vocab_size_divisible_by
    return -(-config.model.vocab_size // multiple) * multiple
