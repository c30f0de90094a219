"""The passkey prompt format (shared by evaluation and training's passkey mixture).

A prompt is built from token pieces, so positions are exact for any tokenizer::

    [filler (tail of the repeated filler)] [needle head][ key][needle tail]
    [filler (tail of the repeated filler)] [question]

and ends right before the answer (`` 48213``). A trial *at length L* reads back its key within
``L`` positions: prompt plus answer minus its last token is ``L`` tokens (:func:`prompt_length`),
so at the training length every key token is predicted at a trained position.
``eval.passkey`` scores prompts of this format; :class:`PasskeyMixture` replaces a configurable
share of training samples (``data.passkey_fraction``) with prompts of the same format followed by
their answer, so small models can learn the task in distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fope_megatron.data.tokenizer import Tokenizer

FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE_HEAD = " The pass key is"
ANSWER = " {key}"
NEEDLE_TAIL = ". Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    """One passkey prompt and where its parts lie."""

    tokens: list[int]
    """Prompt token ids, exactly the requested length, ending right before the answer."""
    key: str
    """The 5-digit key."""
    answer: list[int]
    """Token ids of the expected continuation (the key with its leading space)."""
    needle_pos: int
    """Token index where the needle starts."""
    key_pos: int
    """Token index of the key's first token inside the needle."""
    depth: float
    """Fraction of the filler placed before the needle, in [0, 1]."""
    n_filler: int
    """Filler tokens in the prompt (before and after the needle)."""

    def bucket(self, n_buckets: int) -> int:
        """Depth bucket index, computed exactly from token counts."""
        if self.n_filler == 0:
            return 0
        return min(self.needle_pos * n_buckets // self.n_filler, n_buckets - 1)


def _cyclic_tail(unit: list[int], n: int) -> list[int]:
    """The last ``n`` tokens of ``unit`` repeated enough times (ends on a whole unit)."""
    if n == 0:
        return []
    reps = unit * (n // len(unit) + 1)
    return reps[len(reps) - n :]


def prompt_length(tokenizer: Tokenizer, length: int, key: str = "00000") -> int:
    """Prompt tokens of a trial that spans ``length`` positions.

    The model reads the prompt, then the answer's tokens but its last, so the answer's last token
    is predicted at position ``length - 1``: ``length + 1 - len(answer)``. A prompt of ``length``
    tokens would put the key at positions ``length .. length + len(answer) - 2``, beyond a model
    trained at ``length``. Training's mixture uses the same bound for its longest prompt.
    """
    return length + 1 - len(tokenizer.encode(ANSWER.format(key=key)))


def fixed_tokens(tokenizer: Tokenizer, key: str = "00000") -> int:
    """Tokens of a prompt that are not filler: the needle and the question."""
    pieces = (NEEDLE_HEAD, ANSWER.format(key=key), NEEDLE_TAIL.format(key=key), QUESTION)
    return sum(len(tokenizer.encode(p)) for p in pieces)


def shortest_trial(tokenizer: Tokenizer, key: str = "00000") -> int:
    """The shortest trial length: a prompt without filler (:func:`fixed_tokens`) plus the answer
    but its last token, the length whose :func:`prompt_length` is exactly the fixed tokens."""
    return fixed_tokens(tokenizer, key) + len(tokenizer.encode(ANSWER.format(key=key))) - 1


def filler_budget(tokenizer: Tokenizer, length: int, key: str = "00000") -> int:
    """Filler tokens left in a prompt of ``length`` tokens once needle and question are placed."""
    fixed = fixed_tokens(tokenizer, key)
    if length < fixed:
        raise ValueError(
            f"passkey prompt of {length} tokens is too short: needle and question alone take "
            f"{fixed} tokens with this tokenizer; use prompts >= {fixed}"
        )
    return length - fixed


def make_passkey_sample(tokenizer: Tokenizer, length: int, depth: float, key: str) -> PasskeySample:
    """Build one prompt of exactly ``length`` tokens with ``key`` at ``depth`` (0..1).

    The number of filler tokens before the needle is ``round(depth * n_filler)``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = tokenizer.encode(NEEDLE_HEAD)
    answer = tokenizer.encode(ANSWER.format(key=key))
    tail = tokenizer.encode(NEEDLE_TAIL.format(key=key))
    question = tokenizer.encode(QUESTION)
    n_filler = filler_budget(tokenizer, length, key)
    unit = tokenizer.encode(FILLER)
    n_before = int(round(depth * n_filler))
    before = _cyclic_tail(unit, n_before)
    after = _cyclic_tail(unit, n_filler - n_before)
    tokens = before + head + answer + tail + after + question
    assert len(tokens) == length, (len(tokens), length)
    return PasskeySample(
        tokens=tokens,
        key=key,
        answer=answer,
        needle_pos=n_before,
        key_pos=n_before + len(head),
        depth=n_before / n_filler if n_filler else 0.0,
        n_filler=n_filler,
    )


class PasskeyMixture(torch.utils.data.Dataset):
    """A train dataset with a share of its samples replaced by passkey documents.

    Sample ``i`` is a passkey document with probability ``fraction`` (decided by a generator
    seeded from ``(seed, i)`` alone, so resumption and every data-parallel layout see the same
    samples); otherwise it is ``base[i]``. A passkey sample holds ``seq_length + 1`` tokens: a
    prompt of ``P`` tokens (``P`` uniform between the shortest possible prompt and
    ``seq_length + 1 - len(answer)``, the needle at a uniform depth, a uniform 5-digit key), the
    answer, then ``"."``, the end-of-document id and filler up to the sample length. Every token
    is trained on (``loss_mask`` 1), as in the base dataset.
    """

    def __init__(self, base, fraction: float, tokenizer: Tokenizer, seq_length: int, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"passkey fraction must be in [0, 1], got {fraction}")
        self.base, self.fraction, self.tokenizer = base, float(fraction), tokenizer
        self.seq_length, self.seed = int(seq_length), int(seed)
        longest = prompt_length(tokenizer, self.seq_length)  # what the evaluation uses at 1x
        self.min_len = fixed_tokens(tokenizer)  # no filler at all
        if self.min_len > longest:
            need = shortest_trial(tokenizer)
            raise ValueError(
                f"seq_length {seq_length} is too short for a passkey prompt; use >= {need}"
            )
        self.max_len = longest
        self._dot = tokenizer.encode(".") + [tokenizer.eod]
        self._filler = tokenizer.encode(FILLER)

    def __len__(self) -> int:
        return len(self.base)

    def is_passkey(self, idx: int) -> bool:
        """Whether sample ``idx`` is a passkey document."""
        return bool(np.random.default_rng([self.seed, 0x9A55, idx]).random() < self.fraction)

    def passkey_tokens(self, idx: int) -> list[int]:
        """The ``seq_length + 1`` tokens of passkey sample ``idx``."""
        rng = np.random.default_rng([self.seed, 0x9A55, idx, 1])
        key = str(int(rng.integers(10000, 100000)))
        length = int(rng.integers(self.min_len, self.max_len + 1))
        sample = make_passkey_sample(self.tokenizer, length, float(rng.random()), key)
        ids = sample.tokens + sample.answer + self._dot
        need = self.seq_length + 1 - len(ids)
        ids += (self._filler * (need // len(self._filler) + 1))[:need] if need > 0 else []
        return ids[: self.seq_length + 1]

    def __getitem__(self, idx: int):
        if not self.is_passkey(idx):
            return self.base[idx]
        ids = torch.tensor(self.passkey_tokens(idx), dtype=torch.int64)
        return {
            "tokens": ids[:-1].clone(),
            "labels": ids[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
