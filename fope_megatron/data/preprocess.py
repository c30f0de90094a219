"""``fope-preprocess``: tokenize local text into megatron-core ``IndexedDataset`` ``.bin/.idx`` files.

Input is read through Hugging Face ``datasets``: JSON/JSONL, Parquet or plain-text files (paths or
globs), or a directory written by ``Dataset.save_to_disk``. Every document becomes one sequence,
its tokens followed by the tokenizer's end-of-document id; empty documents are skipped. Workers
tokenize contiguous shards, so the output does not depend on ``--workers``.

Beside ``PREFIX.bin`` and ``PREFIX.idx`` a sidecar ``PREFIX.meta.json`` records the tokenizer
(name, vocab_size, eod, pad), the token dtype and the document and token counts; the trainer
checks the model's vocabulary against it.

    fope-preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer byte --workers 2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fope_megatron.compat.warnings import add_verbose_flag, quiet_known_warnings
from fope_megatron.data import jsonl
from fope_megatron.data.tokenizer import Tokenizer, get_tokenizer

FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
META_SUFFIX = ".meta.json"


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype holding every id; matches megatron-core's GPTDatasetConfig choice."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def meta_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + META_SUFFIX)


def read_meta(prefix: str | Path) -> dict[str, Any] | None:
    """The ``PREFIX.meta.json`` sidecar written by preprocessing, or ``None`` if there is none."""
    path = meta_path(prefix)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _resolve_inputs(inputs: Sequence[str | Path]) -> tuple[str, list[str]]:
    """Expand globs and return ``(builder, files)``; builder is a datasets builder or ``disk``."""
    if not inputs:
        raise ValueError("no input given; pass --input FILE [FILE ...]")
    files: list[str] = []
    missing: list[str] = []
    for item in map(str, inputs):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            missing.append(item)
        files.extend(matches)
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    dirs = [f for f in files if os.path.isdir(f)]
    if dirs:
        if len(files) != 1:
            raise ValueError(
                f"a saved dataset directory must be the only input, got {len(files)} inputs"
            )
        return "disk", files
    # datasets' json loader fails obscurely on a zero-byte file; such a shard holds no documents
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    if not nonempty:
        raise ValueError(f"input is empty: {', '.join(files)}")
    files = nonempty
    builders = set()
    for f in files:
        ext = next((e for e in sorted(FORMATS, key=len, reverse=True) if f.endswith(e)), None)
        if ext is None:
            raise ValueError(
                f"cannot tell the format of {f!r}; supported endings are "
                f"{', '.join(sorted(FORMATS))} or a directory written by save_to_disk"
            )
        builders.add(FORMATS[ext])
    if len(builders) > 1:
        raise ValueError(f"inputs mix formats {sorted(builders)}; preprocess each format apart")
    return builders.pop(), files


def load_text_dataset(
    inputs: Sequence[str | Path],
    json_key: str = "text",
    split: str = "train",
    text_sample_by: str = "document",
    cache_dir: str | None = None,
):
    """Load the inputs as one ``datasets.Dataset``; returns ``(dataset, text_column)``.

    Args:
        inputs: files or globs of one format, or a single ``save_to_disk`` directory.
        json_key: the column holding the text (plain-text files always use ``text``).
        split: the split to take from a saved ``DatasetDict``.
        text_sample_by: for plain text, ``line``, ``paragraph`` or ``document`` (whole file).
        cache_dir: where ``datasets`` may write its Arrow cache.
    """
    import datasets

    builder, files = _resolve_inputs(inputs)
    if builder == "disk":
        ds = datasets.load_from_disk(files[0])
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{files[0]} has splits {list(ds)}, not {split!r}; use --split")
            ds = ds[split]
    elif builder == "text":
        ds = datasets.load_dataset(
            "text", data_files=files, split="train", sample_by=text_sample_by, cache_dir=cache_dir
        )
        json_key = "text"
    else:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    if json_key not in ds.column_names:
        raise ValueError(
            f"inputs {[str(i) for i in inputs]} have no column {json_key!r}; columns are "
            f"{ds.column_names}; choose one with --json-key"
        )
    return ds, json_key


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenize_batch(batch: dict[str, list], json_key: str, tokenizer_name: str) -> dict:
    # one tokenizer per worker process, loaded on first use
    tok = _WORKER_TOKENIZERS.get(tokenizer_name)
    if tok is None:
        tok = _WORKER_TOKENIZERS[tokenizer_name] = get_tokenizer(tokenizer_name)
    out = []
    for text in batch[json_key]:
        ids = tok.encode(text) if text else []
        out.append(ids + [tok.eod] if ids else [])
    return {"ids": out}


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: str = "byte",
    json_key: str = "text",
    workers: int = 1,
    split: str = "train",
    text_sample_by: str = "document",
    skip_bad_lines: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``PREFIX.bin/.idx`` and ``PREFIX.meta.json``; returns the meta.

    A malformed JSON line fails naming its file and line, unless ``skip_bad_lines`` drops such
    lines (counted in the meta as ``skipped_bad_lines``).

    Raises:
        FileNotFoundError: an input path or glob matches nothing.
        ValueError: unknown format, malformed line, missing text column, or no non-empty document.
    """
    # fail on missing or unknown inputs before creating anything
    builder, files = _resolve_inputs(inputs)
    tok = get_tokenizer(tokenizer)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    # the Arrow caches go to a scratch folder beside the output, never beside the inputs
    bad_skipped = 0
    with tempfile.TemporaryDirectory(prefix=".fope-preprocess-", dir=prefix.parent) as scratch:
        if builder == "json" and skip_bad_lines:
            inputs, bad_skipped = _skip_bad_lines(files, Path(scratch))
        try:
            ds, key = load_text_dataset(inputs, json_key, split, text_sample_by, cache_dir=scratch)
        except Exception as err:
            where = jsonl.first_bad_line(files) if builder == "json" else None
            if where is None:
                raise
            raise ValueError(
                f"malformed input {where}; fix it, or pass --skip-bad-lines to drop such lines"
            ) from err
        num_rows = len(ds)
        if num_rows == 0:
            raise ValueError(f"inputs {[str(i) for i in inputs]} hold no documents")
        num_proc = max(1, min(int(workers), num_rows))
        tokenized = ds.map(
            _tokenize_batch,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=ds.column_names,
            fn_kwargs={"json_key": key, "tokenizer_name": tokenizer or "byte"},
            cache_file_name=os.path.join(scratch, "tokenized.arrow"),
            desc="tokenize",
        )
        bin_tmp, idx_tmp = f"{prefix}.bin.tmp", f"{prefix}.idx.tmp"
        try:
            num_docs, num_tokens = _write_indexed(tokenized, bin_tmp, idx_tmp, dtype, tok)
            if num_docs == 0:
                raise ValueError(
                    f"inputs {[str(i) for i in inputs]} hold {num_rows} rows but every "
                    f"{key!r} is empty"
                )
        except BaseException:
            for tmp in (bin_tmp, idx_tmp):
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx_tmp, f"{prefix}.idx")
    meta = {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "pad": getattr(tok, "pad", None),
        "dtype": np.dtype(dtype).name,
        "num_docs": num_docs,
        "num_tokens": num_tokens,
        "skipped_empty_docs": num_rows - num_docs,
        "skipped_bad_lines": bad_skipped,
        "inputs": [str(i) for i in inputs],
        "json_key": key,
    }
    meta_path(prefix).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _skip_bad_lines(files: list[str], scratch: Path) -> tuple[list[str], int]:
    """Clean copies (in ``scratch``) of the JSON-lines files that hold malformed lines."""
    out, skipped = [], 0
    for i, path in enumerate(files):
        if jsonl.is_jsonl(path) and next(jsonl.bad_lines(path), None):
            clean = scratch / f"clean-{i}.jsonl"
            n = jsonl.without_bad_lines(path, clean)
            print(f"fope-preprocess: skipped {n} malformed lines of {path}", file=sys.stderr)
            out.append(str(clean))
            skipped += n
        else:
            out.append(path)
    return out, skipped


def _write_indexed(tokenized, bin_path: str, idx_path: str, dtype, tok: Tokenizer):
    """Write one sequence per non-empty document; returns ``(num_docs, num_tokens)``."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    num_docs = num_tokens = 0
    for batch in tokenized.iter(batch_size=1024):
        for ids in batch["ids"]:
            if not ids:
                continue
            arr = np.asarray(ids, dtype=np.int64)
            if arr.max() >= tok.vocab_size or arr.min() < 0:
                raise ValueError(f"token id outside [0, {tok.vocab_size}) from {tok.name}")
            builder.add_item(torch.from_numpy(arr))
            builder.end_document()
            num_docs += 1
            num_tokens += arr.size
    builder.finalize(idx_path)
    return num_docs, num_tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fope-preprocess",
        description="Tokenize local text into megatron-core IndexedDataset .bin/.idx files.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSON/JSONL/Parquet/text files or globs, or one save_to_disk directory",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, .idx, .meta.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer directory")
    p.add_argument("--json-key", default="text", help="column holding the text")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    p.add_argument(
        "--text-sample-by",
        choices=["line", "paragraph", "document"],
        default="document",
        help="for plain-text files: what one document is",
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="drop malformed JSON lines (counted in the output and .meta.json) instead of failing",
    )
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_known_warnings(args.verbose)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        meta = preprocess(
            args.input,
            args.output_prefix,
            tokenizer=args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            split=args.split,
            text_sample_by=args.text_sample_by,
            skip_bad_lines=args.skip_bad_lines,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"fope-preprocess: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output_prefix}.bin/.idx: {meta['num_docs']} documents, "
        f"{meta['num_tokens']} tokens ({meta['dtype']}, tokenizer {meta['tokenizer']}, "
        f"vocab {meta['vocab_size']}, eod {meta['eod']})"
        + (f"; skipped {meta['skipped_bad_lines']} malformed lines" if args.skip_bad_lines else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
