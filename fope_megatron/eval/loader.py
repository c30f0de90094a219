"""A loaded model as evaluation's ``logits_fn``; loading itself is ``checkpoint.full_state``."""

from __future__ import annotations

import torch


def logits_fn(model):
    """``tokens [b, s] -> float32 logits [b, s, padded vocab]``.

    The padding columns stay: the model's distribution is over the padded vocab, as in training
    (``val_loss``); dropping them would renormalise and flatter the perplexity.
    """
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        pos = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        return model(tokens, pos, None).float()

    return fn
