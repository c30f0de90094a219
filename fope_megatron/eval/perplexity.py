"""Perplexity vs evaluation length on a held-out token stream.

The model is any causal-LM callable ``logits_fn(tokens[b, s]) -> logits[b, s, V]`` (a full
forward). Two protocols:

* **chunks** (default, the reference's protocol): the evaluation span (the first ``n_tokens``
  tokens of the stream) is cut into ``floor(n_tokens / L)`` non-overlapping chunks of exactly
  ``L`` tokens; tokens ``1..L-1`` of each chunk are predicted from their prefix inside the chunk.
* **sliding** (``stride`` given): windows of exactly ``L`` tokens start every ``stride`` tokens
  (``k * stride``, while the window fits in the span). The first window scores tokens ``1..L-1``;
  every later window scores only its last ``stride`` tokens, so each token after the first is
  scored exactly once, with at least ``L - stride`` tokens of context.

Rows stay comparable because every length reads the same leading span: by default ``n_tokens``
is the largest multiple of ``max(lengths)`` the stream holds, which is a multiple of every
power-of-two length, so each length scores the same tokens (minus the unpredicted first token
of each chunk). For a length that does not divide ``n_tokens`` the trailing remainder is dropped.

``ppl = exp(mean NLL)`` with the NLL summed in float64 over all scored tokens of that length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""A causal LM forward: ``LongTensor[b, s] -> FloatTensor[b, s, vocab]``."""

_IGNORE = -100


class LengthNotServedError(ValueError):
    """An evaluation length needs more held-out tokens than the data (or chosen span) has."""


def _as_stream(tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    stream = torch.as_tensor(tokens, dtype=torch.long)
    if stream.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    return stream


def resolve_span(n_available: int, lengths: Sequence[int], n_tokens: int | None = None) -> int:
    """The number of leading tokens every length is evaluated on.

    Args:
        n_available: tokens in the held-out stream.
        lengths: evaluation lengths.
        n_tokens: requested span; ``None`` picks the largest multiple of ``max(lengths)``
            that fits in ``n_available``.

    Raises:
        LengthNotServedError: a length is longer than the span or the data.
    """
    if not lengths:
        raise ValueError("no evaluation lengths given")
    bad = [L for L in lengths if L < 2]
    if bad:
        raise ValueError(f"evaluation lengths must be >= 2 tokens, got {bad}")
    longest = max(lengths)
    if n_tokens is None:
        span = (n_available // longest) * longest
    else:
        if n_tokens > n_available:
            raise LengthNotServedError(
                f"n_tokens={n_tokens} asked for, but the held-out data has only {n_available} "
                "tokens; lower n_tokens or give more held-out data"
            )
        span = n_tokens
    for L in sorted(lengths, reverse=True):
        if L > n_available:
            raise LengthNotServedError(
                f"length {L} cannot be served: it needs at least {L} held-out tokens but the "
                f"data has {n_available}; drop lengths above {n_available} or give more "
                "held-out data"
            )
        if L > span:
            raise LengthNotServedError(
                f"length {L} cannot be served: the evaluation span n_tokens={span} is shorter "
                f"({n_available} tokens available); raise n_tokens to at least {L}"
            )
    return span


def window_starts(span: int, length: int, stride: int | None) -> list[int]:
    """Start offsets of the evaluation windows of ``length`` tokens within ``span`` tokens."""
    if stride is None:
        return list(range(0, span - length + 1, length))
    return list(range(0, span - length + 1, stride))


def _resolve_stride(stride: int | float | None, length: int) -> int | None:
    if stride is None:
        return None
    s = int(stride) if isinstance(stride, int) else int(round(stride * length))
    if not 1 <= s <= length - 1:
        raise ValueError(
            f"sliding stride {stride!r} gives {s} tokens at length {length}; it must be in "
            f"[1, {length - 1}] (an int in tokens, or a float fraction of the length)"
        )
    return s


def _batch_nll(
    logits_fn: LogitsFn, windows: torch.Tensor, first: torch.Tensor, stride: int | None
) -> tuple[float, int]:
    """Summed NLL (float64) and number of scored tokens for a batch of windows.

    ``first[i]`` marks the window that starts the span: it scores every predicted token, the
    others (sliding mode only) score their last ``stride`` tokens.
    """
    targets = windows[:, 1:].clone()
    if stride is not None:
        unscored = targets.shape[1] - stride
        targets[~first.to(targets.device), :unscored] = _IGNORE
    logits = logits_fn(windows)
    if logits.shape[:2] != windows.shape:
        raise ValueError(
            f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(windows.shape)}; "
            "expected [batch, seq, vocab]"
        )
    logits = logits[:, :-1].float()
    targets = targets.to(logits.device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=_IGNORE,
        reduction="sum",
    )
    return float(nll.double()), int((targets != _IGNORE).sum())


def evaluate_perplexity(
    logits_fn: LogitsFn,
    tokens: torch.Tensor | Sequence[int],
    lengths: Sequence[int],
    *,
    n_tokens: int | None = None,
    stride: int | float | None = None,
    max_batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[int, dict[str, float | int | None]]:
    """Perplexity of ``logits_fn`` at each length on the same leading span of ``tokens``.

    Args:
        logits_fn: causal LM forward, ``LongTensor[b, s] -> FloatTensor[b, s, V]``.
        tokens: 1-D held-out token stream.
        lengths: evaluation lengths in tokens (may exceed the training length).
        n_tokens: leading span scored at every length; default the largest multiple of
            ``max(lengths)`` in ``tokens``.
        stride: ``None`` for non-overlapping chunks; otherwise sliding windows moved by
            ``stride`` tokens (an int) or by ``stride * L`` tokens (a float in (0, 1)).
        max_batch_size: windows per forward call (bounds memory: ``b * L * V`` logits).
        device: where the token batches are moved before calling ``logits_fn``.
        progress: show a tqdm bar over the forward calls.

    Returns:
        ``{L: {"ppl", "nll", "tokens", "chunks", "stride"}}``; ``nll`` is the mean per scored
        token, ``chunks`` the number of windows, ``stride`` ``None`` in chunk mode.

    Raises:
        LengthNotServedError: before any forward, if a length exceeds the data or span.
    """
    stream = _as_stream(tokens)
    lengths = list(dict.fromkeys(int(L) for L in lengths))
    span = resolve_span(stream.numel(), lengths, n_tokens)
    strides = {L: _resolve_stride(stride, L) for L in lengths}
    plan = {L: window_starts(span, L, strides[L]) for L in lengths}
    n_calls = sum(math.ceil(len(starts) / max_batch_size) for starts in plan.values())

    results: dict[int, dict[str, float | int | None]] = {}
    bar = tqdm(total=n_calls, desc="perplexity", unit="batch", disable=not progress)
    # no_grad, not inference_mode: in-training eval must not leave inference tensors in caches.
    with torch.no_grad():
        for L in lengths:
            starts = plan[L]
            total_nll, total_tok = 0.0, 0
            for i in range(0, len(starts), max_batch_size):
                batch = starts[i : i + max_batch_size]
                windows = torch.stack([stream[s : s + L] for s in batch])
                first = torch.tensor([s == 0 for s in batch])
                if device is not None:
                    windows = windows.to(device)
                nll, n = _batch_nll(logits_fn, windows, first, strides[L])
                total_nll += nll
                total_tok += n
                bar.set_postfix(length=L)
                bar.update(1)
            mean = total_nll / total_tok
            results[L] = {
                "ppl": math.exp(mean) if mean < 700 else math.inf,  # exp overflows past ~709
                "nll": mean,
                "tokens": total_tok,
                "chunks": len(starts),
                "stride": strides[L],
            }
    bar.close()
    return results
