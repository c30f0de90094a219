"""Built-in deterministic synthetic corpus for the smoke run, tests and passkey evaluation.

No download: documents are generated from a seed. Each document is one of four kinds, all with
local structure a tiny byte-level model learns within a few hundred steps (a small vocabulary,
fixed sentence templates, counting and arithmetic) and some with long-range structure:

- ``story``: characters and facts introduced at the start and asked about later
  ("Where does Alice live? Alice lives in Oslo.").
- ``passkey``: a five-digit key hidden in filler text and asked for at the end.
- ``counting``: arithmetic progressions ("Counting by 3 from 14: 14, 17, 20, ...").
- ``arithmetic``: sums, differences and multiplication tables.

Document ``i`` depends only on ``(seed, i)``, so the first ``n`` documents of a larger corpus are
the corpus of ``n`` documents.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack"]
PET_NAMES = ["Max", "Luna", "Pip", "Rex", "Coco", "Milo", "Nala", "Otto"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Seoul", "Vienna", "Dublin"]
JOBS = ["baker", "doctor", "teacher", "farmer", "pilot", "painter"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
OBJECTS = ["book", "lamp", "cup", "key", "box", "ball", "coin", "map"]
VERBS = ["sees", "likes", "finds", "holds", "paints", "carries"]
ADJECTIVES = ["small", "big", "old", "new", "quiet", "happy"]
PLACES = ["garden", "kitchen", "park", "library", "market", "forest"]

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. "
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"

KINDS = ("story", "passkey", "counting", "arithmetic")
KIND_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
MIN_BYTES, MAX_BYTES = 300, 3000


def passkey_document(key: int, filler_before: int, filler_after: int, answer: bool = True) -> str:
    """A passkey-retrieval document: intro, filler, the key stated twice, filler, the question.

    Args:
        key: the pass key (five digits in the training corpus).
        filler_before: repetitions of the filler paragraph before the key.
        filler_after: repetitions of the filler paragraph after the key.
        answer: end with `` {key}.`` (training text); without it the text ends at the question
            prompt ``... The pass key is`` so an evaluator can score the continuation.
    """
    text = (
        PASSKEY_INTRO
        + PASSKEY_FILLER * filler_before
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + PASSKEY_FILLER * filler_after
        + PASSKEY_QUESTION
    )
    return text + f" {key}." if answer else text


def _target_bytes(rng: random.Random) -> int:
    # log-uniform so short and long documents are both common
    return int(math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES))))


def _story(rng: random.Random, target: int) -> str:
    name, friend = rng.sample(NAMES, 2)
    city, job, animal, color = (rng.choice(x) for x in (CITIES, JOBS, ANIMALS, COLORS))
    pet = rng.choice(PET_NAMES)
    facts = [
        f"Where does {name} live? {name} lives in {city}.",
        f"What does {name} do? {name} is a {job}.",
        f"What is the name of the {animal}? The {animal} is called {pet}.",
        f"What color is {pet}? {pet} is {color}.",
        f"Who is the friend of {name}? The friend of {name} is {friend}.",
    ]
    parts = [
        f"{name} is a {job} who lives in {city}. {name} has a {color} {animal} called {pet}. "
        f"The best friend of {name} is {friend}."
    ]
    size = len(parts[0])
    while size < target:
        roll = rng.random()
        if roll < 0.2:
            sentence = rng.choice(facts)
        elif roll < 0.4:
            sentence = f"Every day {name} walks to the {rng.choice(PLACES)} with {pet}."
        elif roll < 0.5:
            sentence = f"{pet} says hello. {pet} says hello again."
        else:
            a, v, o = rng.choice(ADJECTIVES), rng.choice(VERBS), rng.choice(OBJECTS)
            who = rng.choice([name, friend, pet, f"The {a} {rng.choice(ANIMALS)}"])
            sentence = f"{who} {v} the {rng.choice(COLORS)} {o} in the {rng.choice(PLACES)}."
        parts.append(sentence)
        size += len(sentence) + 1
    parts.append(facts[0])
    return " ".join(parts)


def _passkey(rng: random.Random, target: int) -> str:
    fixed = len(PASSKEY_INTRO) + len(PASSKEY_QUESTION) + 60
    reps = max(1, (target - fixed) // len(PASSKEY_FILLER))
    before = rng.randint(0, reps)
    return passkey_document(rng.randint(10000, 99999), before, reps - before)


def _counting(rng: random.Random, target: int) -> str:
    lines: list[str] = []
    size = 0
    while size < target:
        step, start, count = rng.randint(1, 9), rng.randint(0, 200), rng.randint(8, 24)
        if rng.random() < 0.25 and start > step * count:
            seq = [start - step * k for k in range(count)]
            line = f"Counting down by {step} from {start}: " + ", ".join(map(str, seq)) + "."
        else:
            seq = [start + step * k for k in range(count)]
            line = f"Counting by {step} from {start}: " + ", ".join(map(str, seq)) + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _arithmetic(rng: random.Random, target: int) -> str:
    lines: list[str] = []
    size = 0
    while size < target:
        roll = rng.random()
        if roll < 0.3:
            n = rng.randint(2, 12)
            line = f"Table of {n}: " + ", ".join(f"{n} x {k} = {n * k}" for k in range(1, 11)) + "."
        elif roll < 0.7:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            line = f"{a} + {b} = {a + b}."
        else:
            a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
            line = f"{a} - {b} = {a - b}."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


_MAKERS = {"story": _story, "passkey": _passkey, "counting": _counting, "arithmetic": _arithmetic}


def synthetic_document(index: int, seed: int) -> str:
    """Document ``index`` of the corpus for ``seed`` (independent of the corpus size)."""
    rng = random.Random(f"fope-synthetic/{seed}/{index}")
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    return _MAKERS[kind](rng, _target_bytes(rng))


def synthetic_documents(num_docs: int, seed: int = 1234) -> list[str]:
    """The first ``num_docs`` documents of the synthetic corpus for ``seed``."""
    if num_docs <= 0:
        raise ValueError(f"num_docs must be positive, got {num_docs}")
    return [synthetic_document(i, seed) for i in range(num_docs)]


def generate_corpus(out_path: str | Path, num_docs: int, seed: int = 1234) -> Path:
    """Write the corpus as JSONL, one ``{"text": ...}`` object per line; returns the path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in synthetic_documents(num_docs, seed):
            f.write(json.dumps({"text": doc}) + "\n")
    tmp.replace(out)
    return out


def build_synthetic_prefix(
    out_dir: str | Path, num_docs: int = 2000, seed: int = 1234, workers: int = 1
) -> str:
    """Generate the corpus and preprocess it with the byte tokenizer; returns the data prefix.

    The prefix ``OUT_DIR/synthetic-s{seed}-n{num_docs}`` is reused when its ``.meta.json``
    exists. In a multi-rank job call it on one rank and barrier before the others read it.
    """
    from fope_megatron.data.preprocess import preprocess, read_meta

    out = Path(out_dir)
    prefix = out / f"synthetic-s{seed}-n{num_docs}"
    if read_meta(prefix) is None:
        jsonl = generate_corpus(out / f"{prefix.name}.jsonl", num_docs, seed)
        preprocess([jsonl], prefix, tokenizer="byte", workers=workers)
    return str(prefix)


def unigram_entropy(token_ids: Iterable[int] | np.ndarray) -> float:
    """Entropy in nats/token of the unigram (token frequency) distribution of ``token_ids``.

    The loss a model reaches by predicting token frequencies only; a model that learned any
    context must go below it. For a preprocessed prefix (EODs included, as the model sees them):
    ``unigram_entropy(np.fromfile(prefix + ".bin", dtype=meta["dtype"]))``.
    """
    ids = np.asarray(token_ids if isinstance(token_ids, np.ndarray) else list(token_ids))
    if ids.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.bincount(ids.astype(np.int64).ravel())
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the built-in synthetic corpus as JSONL.")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--num-docs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.num_docs < 1:
        parser.error(f"--num-docs must be >= 1, got {args.num_docs}")
    path = generate_corpus(args.output, args.num_docs, args.seed)
    print(f"wrote {args.num_docs} documents to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
