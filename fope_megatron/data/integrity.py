"""Data checks that need no process group: ``.idx`` header and size, ``.bin`` size, sidecar meta,
and a split that leaves documents for training.

Everything here reads only the ``.idx`` header and arrays and the file sizes (never the token
stream), and the lengths array in chunks of ``CHUNK`` entries into one reused buffer (never a
whole array: 12 bytes per document would be 12 GB for 1B documents), so the memory it holds does
not grow with the corpus. Each failure is a ``ConfigError`` naming the file and what is wrong,
raised before any process group starts (``fope-train`` exits 2). On a multi-rank start one rank
per node runs these checks (``train/preflight.py``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset._INDEX_HEADER
# megatron-core indexed_dataset.DType codes
DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
               7: "float32", 8: "uint16"}  # fmt: skip
_FIXED = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, 2 counts
CHUNK = 1 << 16  # lengths entries read at a time (256 KiB)


@dataclass(frozen=True)
class IndexInfo:
    """What an ``.idx`` says about its ``.bin``."""

    dtype: str
    num_sequences: int
    num_documents: int
    num_tokens: int
    bin_bytes: int  # the bytes the .bin must hold at least


def _bad(path: str | Path, what: str, fix: str = "re-run fope-preprocess for this prefix") -> None:
    raise ConfigError(f"data file {str(path)!r}: {what}; {fix}")


def read_index(prefix: str) -> IndexInfo:
    """Parse ``PREFIX.idx`` (megatron-core's format) and check it against its own size."""
    idx = f"{prefix}.idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
        if len(head) < _FIXED or not head.startswith(INDEX_HEADER):
            _bad(idx, "is not a megatron-core index (bad or short header)")
        version, code = struct.unpack("<QB", head[9:18])
        n_seq, n_doc_idx = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in DTYPE_CODES:
            _bad(idx, f"unknown index version {version} or dtype code {code}")
        expected = _FIXED + 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        if size < expected:
            _bad(idx, f"holds {size} bytes but its header announces {n_seq} sequences "
                 f"({expected} bytes): the file is truncated")  # fmt: skip
        tokens, last_length = _sum_lengths(f, n_seq)
        last_pointer = 0
        if n_seq:  # the .bin must reach the end of the last sequence
            f.seek(_FIXED + 4 * n_seq + 8 * (n_seq - 1))
            last_pointer = int(np.frombuffer(f.read(8), dtype=np.int64)[0])
    itemsize = np.dtype(DTYPE_CODES[code]).itemsize
    need = last_pointer + last_length * itemsize if n_seq else 0
    return IndexInfo(DTYPE_CODES[code], int(n_seq), max(int(n_doc_idx) - 1, 0), tokens, need)


def _sum_lengths(f, n_seq: int) -> tuple[int, int]:
    """Total and last of the ``n_seq`` int32 lengths at ``f``'s position, read ``CHUNK`` at a time
    into one buffer."""
    buf = np.empty(min(n_seq, CHUNK), dtype=np.int32)
    total = last = 0
    left = n_seq
    while left:
        part = buf[: min(left, CHUNK)]
        f.readinto(memoryview(part).cast("B"))
        total += int(part.sum(dtype=np.int64))
        last = int(part[-1])
        left -= len(part)
    return total, last


def check_prefix(prefix: str) -> IndexInfo:
    """``.bin``/``.idx`` present and consistent, and the ``.meta.json`` sidecar (if any) agreeing."""
    for path in (f"{prefix}.bin", f"{prefix}.idx"):
        if not Path(path).is_file():
            _bad(path, "does not exist", "give the prefix fope-preprocess wrote (PREFIX.bin/.idx)")
    info = read_index(prefix)
    if info.num_sequences == 0:
        _bad(f"{prefix}.idx", "indexes no documents")
    bin_size = os.path.getsize(f"{prefix}.bin")
    if bin_size < info.bin_bytes:
        _bad(f"{prefix}.bin", f"holds {bin_size} bytes but {prefix}.idx indexes {info.num_tokens} "
             f"{info.dtype} tokens ({info.bin_bytes} bytes): the .bin is truncated or belongs to "
             "another .idx")  # fmt: skip
    meta = read_meta_checked(prefix)
    if meta is not None:
        path = f"{prefix}.meta.json"
        if meta.get("dtype") not in (None, info.dtype):
            _bad(path, f"says dtype {meta['dtype']!r} but {prefix}.idx holds {info.dtype!r} tokens")
        for key, value in (("num_docs", info.num_sequences), ("num_tokens", info.num_tokens)):
            if key in meta and meta[key] != value:
                _bad(path, f"says {key}={meta[key]} but {prefix}.idx holds {value}: the sidecar "
                     "belongs to another dataset")  # fmt: skip
        vocab = meta.get("vocab_size")
        if not isinstance(vocab, int) or vocab < 1:
            _bad(path, f"has no valid vocab_size (got {vocab!r})")
        if vocab > np.iinfo(info.dtype).max + 1:
            _bad(path, f"vocab_size {vocab} does not fit the {info.dtype} tokens of {prefix}.bin")
    return info


def read_meta_checked(prefix: str) -> dict | None:
    """``PREFIX.meta.json`` as a dict, None if absent, ConfigError if it is not a JSON object."""
    path = Path(f"{prefix}.meta.json")
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _bad(path, f"is not valid JSON ({err})")
    if not isinstance(meta, dict):
        _bad(path, "must hold a JSON object")
    return meta


def split_counts(split: str, num_docs: int) -> list[int]:
    """Documents per train/valid/test part, exactly as megatron-core's dataset builder cuts them."""
    weights = [float(x) for x in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = np.cumsum([0.0] + [w / total for w in weights])
    return [
        int(round(bounds[i + 1] * num_docs)) - int(round(bounds[i] * num_docs)) for i in range(3)
    ]


def check_split(split: str, prefix: str, num_docs: int, need_valid: bool) -> None:
    """The split must leave this prefix training documents (and validation ones if weighted)."""
    train, valid, _ = split_counts(split, num_docs)
    weights = [float(x) for x in split.split(",")] + [0.0, 0.0]
    if train == 0:
        raise ConfigError(
            f"data.split={split!r} leaves no training documents of {prefix!r} ({num_docs} "
            "documents); give the first (train) weight more, e.g. data.split=98,2,0"
        )
    if need_valid and weights[1] > 0 and valid == 0:
        raise ConfigError(
            f"data.split={split!r} gives validation weight but none of the {num_docs} documents of "
            f"{prefix!r}; raise the second weight, use more documents or set it to 0"
        )


def check_data_files(cfg, prefixes: list[str]) -> list[str]:
    """Every check of the ``data.path`` prefixes that reads files: sizes, sidecars and the split
    (``prefixes``: the configured ones, whose presence the config check has established)."""
    if cfg.data.synthetic:
        return []
    for prefix in prefixes:
        info = check_prefix(prefix)
        check_split(cfg.data.split, prefix, info.num_documents, need_valid=True)
        vocab = (read_meta_checked(prefix) or {}).get("vocab_size", 0)
        if vocab > cfg.model.vocab_size:
            _bad(f"{prefix}.meta.json", f"was tokenized with vocab_size {vocab} but "
                 f"model.vocab_size={cfg.model.vocab_size}", f"set model.vocab_size >= {vocab}")  # fmt: skip
    return prefixes
