"""Passkey retrieval vs length: a 5-digit key hidden in filler text, asked for at the end.

A prompt is built from token pieces, so positions are exact for any tokenizer::

    [filler (tail of the repeated filler)] [needle head][ key][needle tail]
    [filler (tail of the repeated filler)] [question]

and ends right before the answer (`` 48213``). A trial at length ``L`` spans ``L`` positions
with its answer: the prompt has ``prompt_length(L) = L + 1 - len(answer)`` tokens, so the key's
last token is predicted at position ``L - 1`` and a trial at the training length stays inside the
trained positions (a prompt of ``L`` tokens would make the model read the key back at positions
``L .. L + 4``, beyond them: 0.85-0.90 instead of 1.00 for two RoPE twins of the study, all misses
at needle depth 0-0.2, docs/results/study/passkey_probes.md). The needle text
is ``" The pass key is 48213. Remember it. 48213 is the pass key."``; the question is
``" What is the pass key? The pass key is"``. The filler is repeated and trimmed at the token
level (the cut falls at the start of each filler piece) to hit the length exactly.

*Depth* is the fraction of the filler placed before the needle (0: needle first, 1: needle
right before the question). Trials are spread round-robin over ``n_buckets`` equal depth
buckets and get a uniformly random depth inside their bucket, so buckets stay balanced.

Scoring per trial: exact greedy generation of the key's tokens (``len(key tokens)`` steps, all
must match) and the mean log-prob of the key's tokens under teacher forcing. Generation goes
through ``greedy_fn`` when given (``fope-eval`` passes the transformers export's KV-cache
generation: one prompt forward, then one token per step) or else recomputes the whole sequence
with ``logits_fn`` for every generated token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fope_megatron.data.passkey import (  # the prompt format training's mixture shares
    ANSWER,
    FILLER,
    NEEDLE_HEAD,
    NEEDLE_TAIL,
    QUESTION,
    PasskeySample,
    filler_budget,
    fixed_tokens,
    make_passkey_sample,
    prompt_length,
    shortest_trial,
)
from fope_megatron.data.tokenizer import Tokenizer
from fope_megatron.eval.perplexity import LogitsFn

__all__ = [
    "ANSWER", "FILLER", "NEEDLE_HEAD", "NEEDLE_TAIL", "QUESTION", "PasskeySample",
    "bucket_labels", "evaluate_passkey", "filler_budget", "fixed_tokens", "make_passkey_sample",
    "prompt_length", "sample_trials", "score_samples", "shortest_trial",
]  # fmt: skip

GreedyFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``(prompts LongTensor[b, L], steps) -> LongTensor[b, steps]``: greedy continuation."""


def bucket_labels(n_buckets: int) -> list[str]:
    """Human-readable bucket names, e.g. ``"0-0.2"``, ``"0.2-0.4"``, ..."""
    return [
        f"{round(b / n_buckets, 2):g}-{round((b + 1) / n_buckets, 2):g}" for b in range(n_buckets)
    ]


def sample_trials(
    tokenizer: Tokenizer, length: int, n_trials: int, n_buckets: int, seed: int
) -> list[PasskeySample]:
    """``n_trials`` seeded trials at ``length`` (prompts of :func:`prompt_length` tokens), spread
    round-robin over the depth buckets.

    Trial ``i`` draws its filler-before-needle count uniformly among the integers whose depth
    falls in bucket ``i % n_buckets`` (any depth if the filler is too short for that bucket).
    The same ``(seed, length)`` always gives the same prompts.
    """
    rng = np.random.default_rng([seed, length])
    samples = []
    for i in range(n_trials):
        key = str(int(rng.integers(10000, 100000)))
        n_prompt = prompt_length(tokenizer, length, key)  # keys may tokenize to varying lengths
        n_filler = filler_budget(tokenizer, n_prompt, key)
        b = i % n_buckets
        lo = math.ceil(b * n_filler / n_buckets)
        hi = math.ceil((b + 1) * n_filler / n_buckets) - 1 if b < n_buckets - 1 else n_filler
        if n_filler == 0 or lo > hi:
            lo, hi = 0, n_filler
        n_before = int(rng.integers(lo, hi + 1))
        depth = n_before / n_filler if n_filler else 0.0
        samples.append(make_passkey_sample(tokenizer, n_prompt, depth, key))
    return samples


def _greedy(logits_fn: LogitsFn, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens after each prompt, full recompute each step."""
    seq = prompts
    for _ in range(steps):
        nxt = logits_fn(seq)[:, -1].argmax(-1).to(seq.device)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompts.shape[1] :]


def _key_logprob(
    logits_fn: LogitsFn, prompts: torch.Tensor, answers: list[list[int]]
) -> list[float]:
    """Mean log-prob of each answer's tokens given its prompt (teacher forcing)."""
    a_max = max(len(a) for a in answers)
    padded = torch.tensor([a + [a[-1]] * (a_max - len(a)) for a in answers], device=prompts.device)
    seq = torch.cat([prompts, padded[:, :-1]], dim=1)
    L = prompts.shape[1]
    logp = torch.log_softmax(logits_fn(seq)[:, L - 1 :].float(), dim=-1)
    picked = logp.gather(-1, padded.to(logp.device)[..., None])[..., 0]
    return [float(picked[i, : len(a)].mean()) for i, a in enumerate(answers)]


def score_samples(
    logits_fn: LogitsFn,
    samples: Sequence[PasskeySample],
    device: torch.device | str | None = None,
    greedy_fn: GreedyFn | None = None,
) -> tuple[list[bool], list[float]]:
    """Exact-greedy correctness and mean key log-prob for same-length samples (one batch)."""
    prompts = torch.tensor([s.tokens for s in samples], dtype=torch.long, device=device)
    answers = [s.answer for s in samples]
    steps = max(len(a) for a in answers)
    if greedy_fn is None:
        gen = _greedy(logits_fn, prompts, steps).cpu()
    else:
        gen = greedy_fn(prompts, steps).cpu()
    correct = [gen[i, : len(a)].tolist() == a for i, a in enumerate(answers)]
    return correct, _key_logprob(logits_fn, prompts, answers)


def evaluate_passkey(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    *,
    n_trials: int = 20,
    n_buckets: int = 5,
    seed: int = 0,
    max_batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
    greedy_fn: GreedyFn | None = None,
) -> dict[str, dict]:
    """Passkey accuracy, accuracy per depth bucket and mean key log-prob at each length.

    Args:
        logits_fn: causal LM forward, ``LongTensor[b, s] -> FloatTensor[b, s, V]``.
        tokenizer: builds the prompts (``encode``).
        lengths: trial lengths in tokens: prompt plus answer but its last token
            (:func:`prompt_length`).
        n_trials: seeded trials per length.
        n_buckets: equal-width depth buckets.
        seed: base seed; trials at a length depend only on ``(seed, length)``.
        max_batch_size: prompts per forward call.
        device: where prompts are moved before calling ``logits_fn``.
        progress: show a tqdm bar over the batches.
        greedy_fn: cached greedy generation (e.g. :func:`fope_megatron.eval.loader.
            cached_greedy_fn`); None recomputes the whole sequence per generated token.

    Returns:
        ``{"passkey": {L: acc}, "passkey_by_depth": {L: {bucket_label: acc or None}},
        "passkey_logprob": {L: mean}}``; a bucket with no trial has ``None``.
    """
    if n_trials < 1 or n_buckets < 1:
        raise ValueError(f"n_trials and n_buckets must be >= 1, got {n_trials}, {n_buckets}")
    lengths = list(dict.fromkeys(int(L) for L in lengths))
    shortest = shortest_trial(tokenizer)
    for L in lengths:  # fail fast on a too-short length
        if L < shortest:
            raise ValueError(
                f"passkey length {L} is too short: needle, question and answer take {shortest} "
                f"tokens with this tokenizer; use lengths >= {shortest}"
            )
    labels = bucket_labels(n_buckets)
    n_calls = len(lengths) * math.ceil(n_trials / max_batch_size)
    out: dict[str, dict] = {"passkey": {}, "passkey_by_depth": {}, "passkey_logprob": {}}
    bar = tqdm(total=n_calls, desc="passkey", unit="batch", disable=not progress)
    with torch.no_grad():
        for L in lengths:
            samples = sample_trials(tokenizer, L, n_trials, n_buckets, seed)
            correct: list[bool] = []
            logprob: list[float] = []
            for i in range(0, len(samples), max_batch_size):
                batch = samples[i : i + max_batch_size]
                c, lp = score_samples(logits_fn, batch, device, greedy_fn)
                correct += c
                logprob += lp
                bar.set_postfix(length=L)
                bar.update(1)
            by_bucket: dict[str, list[bool]] = {label: [] for label in labels}
            for s, ok in zip(samples, correct, strict=True):
                by_bucket[labels[s.bucket(n_buckets)]].append(ok)
            out["passkey"][L] = sum(correct) / len(correct)
            out["passkey_by_depth"][L] = {
                k: (sum(v) / len(v) if v else None) for k, v in by_bucket.items()
            }
            out["passkey_logprob"][L] = sum(logprob) / len(logprob)
    bar.close()
    return out
