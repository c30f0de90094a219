"""Helpers for the Hugging Face export tests: megatron-core vs transformers logits and greedy."""

from __future__ import annotations

import torch


def load_hf(path):
    """The exported model through transformers' own loader (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.float32
    ).eval()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """megatron-core logits over the real vocab (the padded rows are not exported)."""
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    return model(tokens, pos, None).float()[..., :vocab]


@torch.no_grad()
def megatron_greedy(model, prompt: torch.Tensor, steps: int, vocab: int) -> torch.Tensor:
    """Greedy continuation with a full forward per token (no cache)."""
    seq = prompt
    for _ in range(steps):
        nxt = megatron_logits(model, seq, vocab)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompt.shape[1] :]


@torch.no_grad()
def hf_greedy(hf, prompt: torch.Tensor, steps: int, use_cache: bool) -> torch.Tensor:
    out = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, use_cache=use_cache,
    )  # fmt: skip
    return out[:, prompt.shape[1] :]


def parity(model, hf, vocab: int, lengths, seed: int = 0) -> dict[int, float]:
    """Max |logit difference| megatron-core vs transformers on random tokens at each length."""
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for length in lengths:
        tokens = torch.randint(0, vocab, (2, length), generator=g)
        with torch.no_grad():
            ours = megatron_logits(model, tokens, vocab)
            theirs = hf(tokens).logits.float()
        diffs[length] = float((ours - theirs).abs().max())
    return diffs
