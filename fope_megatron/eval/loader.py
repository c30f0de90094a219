"""A loaded model as evaluation's ``logits_fn`` / cached greedy generation; loading itself is
``checkpoint.full_state`` (megatron-core) and ``checkpoint.hf`` (the transformers export)."""

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


def cached_greedy_fn(hf_model):
    """``(prompts [b, L], steps) -> [b, steps]`` greedy tokens from a transformers causal LM
    through its KV cache (``generate``): no end-of-sequence stop, exactly ``steps`` tokens."""
    import copy

    device = next(hf_model.parameters()).device
    gen = copy.deepcopy(hf_model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.min_new_tokens = None, False, None
    gen.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else 0

    @torch.no_grad()
    def fn(prompts: torch.Tensor, steps: int) -> torch.Tensor:
        prompts = prompts.to(device)
        gen.max_new_tokens = steps
        out = hf_model.generate(
            prompts, attention_mask=torch.ones_like(prompts), generation_config=gen, use_cache=True
        )
        return out[:, prompts.shape[1] :]

    return fn
