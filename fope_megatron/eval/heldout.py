"""The held-out token stream ``fope-eval`` scores.

* no ``--data``: the run's own data. For the built-in corpus, fresh synthetic documents (a seed
  training never used); for ``data.path``, the documents of the run's first prefix after its
  training part (``data.split`` applies: the rest is what training never saw).
* ``--data PREFIX``: the *whole* prefix (a held-out dataset made with ``fope-preprocess``); the
  run's split does not apply to data the run did not train on.
* ``--data FILE`` (``.jsonl``, ``.json``, ``.txt``, optionally ``.gz``): tokenized here with the
  run's tokenizer, one document per JSON line (its ``text``) or per text file, each followed by the
  end-of-document id.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".text")


def is_text_file(data: str) -> bool:
    name = Path(data).name.removesuffix(".gz")
    return Path(data).is_file() and name.endswith(TEXT_SUFFIXES)


def heldout_tokens(cfg, tokenizer, n_tokens: int, data: str | None = None) -> torch.Tensor:
    """Up to ``n_tokens`` held-out token ids (see the module doc for which).

    Raises:
        FileNotFoundError: ``data`` is neither a text file nor a dataset prefix.
        ValueError: a damaged prefix, a tokenizer mismatch, a malformed line, or no tokens.
    """
    if data is None and cfg.data.synthetic:
        from ..data.synthetic import synthetic_document

        ids: list[int] = []
        i = 0
        while len(ids) < n_tokens:
            ids += tokenizer.encode(synthetic_document(i, seed=cfg.run.seed + 1_000_003))
            ids.append(tokenizer.eod)
            i += 1
        return torch.tensor(ids[:n_tokens])
    if data is not None and is_text_file(data):
        return _file_tokens(data, tokenizer, n_tokens)
    if data is not None:
        return _prefix_tokens(data, tokenizer, n_tokens, first_doc=0, why="")
    from ..data.datasets import parse_data_path
    from ..data.integrity import check_prefix, split_counts

    prefix = parse_data_path(cfg.data.path)[0][0]
    info = check_prefix(prefix)
    start = split_counts(cfg.data.split, info.num_documents)[0]
    why = (
        f" after the training part of data.split={cfg.data.split!r} (the run trained on all of "
        "it; give held-out data with --data PREFIX or --data FILE.jsonl)"
    )
    return _prefix_tokens(prefix, tokenizer, n_tokens, first_doc=start, why=why)


def _prefix_tokens(prefix: str, tokenizer, n_tokens: int, first_doc: int, why: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ..data.integrity import check_prefix
    from ..errors import ConfigError

    if not Path(f"{prefix}.idx").is_file() and not Path(f"{prefix}.bin").is_file():
        raise FileNotFoundError(
            f"--data {prefix!r}: neither a dataset prefix ({prefix}.bin/.idx) nor a text file "
            f"({', '.join(TEXT_SUFFIXES)})"
        )
    try:
        check_prefix(prefix)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    meta_path = Path(f"{prefix}.meta.json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("tokenizer") != tokenizer.name
            or meta.get("vocab_size") != tokenizer.vocab_size
        ):
            raise ValueError(
                f"{meta_path}: the data was tokenized with {meta.get('tokenizer')!r} (vocab "
                f"{meta.get('vocab_size')}) but the run uses {tokenizer.name!r} (vocab "
                f"{tokenizer.vocab_size}); preprocess it with the run's tokenizer"
            )
    ds = IndexedDataset(prefix, mmap=True)
    parts, have = [], 0
    for doc in range(first_doc, len(ds)):
        parts.append(np.asarray(ds[doc], dtype=np.int64))
        have += len(parts[-1])
        if have >= n_tokens:
            break
    if have == 0:
        raise ValueError(f"{prefix}: no held-out documents{why}")
    return torch.from_numpy(np.concatenate(parts)[:n_tokens])


def _file_tokens(path: str, tokenizer, n_tokens: int) -> torch.Tensor:
    from ..data import jsonl

    name = Path(path).name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        bad = jsonl.first_bad_line([path])
        if bad:
            raise ValueError(f"--data {bad}")
        with jsonl._open(path) as f:
            if jsonl.is_jsonl(path):
                records = (json.loads(line) for line in f if line.strip())
            else:  # one JSON array of records
                records = json.load(f)
            texts = (r.get("text") or "" if isinstance(r, dict) else "" for r in records)
            ids = _encode(texts, tokenizer, n_tokens)
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            ids = _encode([f.read()], tokenizer, n_tokens)
    if not ids:
        raise ValueError(f"--data {path}: holds no text to evaluate on")
    return torch.tensor(ids[:n_tokens])


def _encode(texts, tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if text:
            ids += tokenizer.encode(text) + [tokenizer.eod]
        if len(ids) >= n_tokens:
            break
    return ids
