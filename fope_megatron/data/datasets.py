"""Train/valid datasets through megatron-core's ``GPTDataset`` and a resumable batch iterator.

``build_datasets`` wraps ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` (weighted blends,
a ``"98,2,0"`` split string, seed, an index cache inside the run dir). It works in one process and
in a ``torch.distributed`` job (gloo or nccl): megatron-core builds the index caches on rank 0,
barriers on the default group, and the other ranks load them, so every rank must call it and the
cache dir must be on a filesystem all ranks see. Its C++ helpers (``helpers_cpp``) ship prebuilt in
the megatron-core wheel; ``ensure_megatron_helpers`` compiles them when a source install lacks them.

``batch_iterator`` yields a rank's micro-batches in the global sample order of
``loader.MicroBatches`` (the analogue of Megatron-LM's ``MegatronPretrainingSampler``) in this
thread; the trainer reads the same batches through ``loader.BatchLoader`` (a DataLoader with
workers, prefetch and pinned memory).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from fope_megatron.data.preprocess import read_meta

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the datasets need to know about the tokenizer."""

    vocab_size: int
    """Number of token ids; the model's vocab_size must be at least this."""
    eod: int
    """End-of-document id appended after every document."""
    pad: int | None = None
    """Padding id, or None when the tokenizer has none distinct from the others."""
    name: str = "unknown"
    """Tokenizer name or path, for cache keys and messages."""

    @classmethod
    def from_any(cls, obj: Any) -> TokenizerInfo:
        """From a ``TokenizerInfo``, a ``PREFIX.meta.json`` dict or a tokenizer object."""
        if isinstance(obj, TokenizerInfo):
            return obj
        if isinstance(obj, Mapping):  # a .meta.json sidecar
            get, name = obj.get, obj.get("tokenizer", "unknown")
        else:  # a tokenizer from fope_megatron.data.tokenizer
            get, name = (lambda k, d=None: getattr(obj, k, d)), getattr(obj, "name", "unknown")
        pad = get("pad", None)
        return cls(int(get("vocab_size")), int(get("eod")), None if pad is None else int(pad), name)


class MegatronTokenizerAdapter:
    """The slice of a megatron tokenizer that ``GPTDataset`` touches (no text encoding needed).

    ``GPTDatasetConfig`` reads ``vocab_size``, ``GPTDataset`` reads ``eod`` and ``pad`` (a pad equal
    to another special id is reset to -1 there) and the cache key serialises
    ``unique_identifiers``.
    """

    def __init__(self, info: TokenizerInfo) -> None:
        self.vocab_size = info.vocab_size
        self.eod = info.eod
        self.pad = -1 if info.pad is None or info.pad == info.eod else info.pad
        self.unique_identifiers = OrderedDict(
            [("class", "TokenizerInfo"), ("name", info.name), ("vocab_size", info.vocab_size)]
        )


def ensure_megatron_helpers() -> None:
    """Make sure megatron-core's compiled dataset helpers (``helpers_cpp``) import.

    The PyPI wheel ships them prebuilt. A source install without them is compiled here with
    megatron's own ``make`` in a single process; in a distributed job that would race, so it
    raises with the command to run once beforehand.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401

        return
    except ImportError as err:
        import megatron.core.datasets as mcd

        folder = Path(mcd.__file__).parent
        if torch.distributed.is_initialized():
            raise RuntimeError(
                f"megatron-core's C++ dataset helpers are not compiled; run `make -C {folder}` "
                "once (needs a C++ compiler and pybind11) before launching"
            ) from err
    from megatron.core.datasets.utils import compile_helpers

    compile_helpers()
    from megatron.core.datasets import helpers_cpp  # noqa: F401,F811


def parse_data_path(data_path: str | Path | Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """``data.path`` as ``(prefixes, weights)``.

    Accepts one prefix, a list of prefixes (blended by size), or megatron's flat weighted list
    ``[0.7, prefixA, 0.3, prefixB]`` (numbers may also be numeric strings).
    """
    if isinstance(data_path, (str, Path)):
        items: list[Any] = [data_path]
    else:
        items = list(data_path)
    if not items:
        raise ValueError("data.path is empty; give a prefix or [weight, prefix, weight, prefix]")

    def number(x: Any) -> float | None:
        if isinstance(x, (bool, Path)):
            return None
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    weights = [number(x) for x in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        prefixes = [str(p) for p in items[1::2]]
        if any(number(p) is not None for p in prefixes) or any(w <= 0 for w in weights):
            raise ValueError(
                f"data.path {items!r}: a weighted blend is [w1, prefix1, w2, prefix2, ...] with "
                "positive weights"
            )
        return prefixes, weights
    if any(number(x) is not None for x in items):
        raise ValueError(
            f"data.path {items!r} mixes numbers and prefixes; use [w1, prefix1, w2, prefix2, ...]"
        )
    return [str(p) for p in items], None


def check_prefixes(prefixes: Sequence[str], info: TokenizerInfo | None) -> TokenizerInfo:
    """Fail early and clearly on missing files or a tokenizer mismatch; returns the tokenizer info.

    With ``info`` None it comes from the prefixes' ``.meta.json`` sidecars, which must agree.
    """
    metas = []
    for prefix in prefixes:
        missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"data prefix {prefix!r}: missing {', '.join(missing)}; create it with "
                f"fope-preprocess --input FILES --output-prefix {prefix}"
            )
        meta = read_meta(prefix)
        if meta is not None:
            metas.append((prefix, TokenizerInfo.from_any(meta)))
    if info is None:
        if not metas:
            raise ValueError(
                f"no tokenizer given and no {prefixes[0]}.meta.json to read it from; pass "
                "tokenizer_info"
            )
        info = metas[0][1]
    for prefix, m in metas:
        if m.vocab_size > info.vocab_size or m.eod != info.eod:
            raise ValueError(
                f"data prefix {prefix!r} was tokenized with {m.name} (vocab_size {m.vocab_size}, "
                f"eod {m.eod}) but the run uses {info.name} (vocab_size {info.vocab_size}, eod "
                f"{info.eod}); preprocess all prefixes with the same tokenizer"
            )
    return info


class _SingleProcessSafeBuilder(BlendedMegatronDatasetBuilder):
    """``BlendedMegatronDatasetBuilder`` that also builds cached blends without a process group.

    megatron-core 0.16.1 ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()``
    unguarded when a cache dir is set, which raises without a process group. In one process the
    (cheap) blending indices are built in memory instead; GPTDataset indices are still cached.
    """

    @staticmethod
    def build_generic_dataset(dataset_cls, is_built_on_rank, synchronize_ranks, *args):
        if dataset_cls is BlendedDataset and not torch.distributed.is_initialized():
            config = copy.copy(args[-1])
            config.path_to_cache = None
            args = (*args[:-1], config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            dataset_cls, is_built_on_rank, synchronize_ranks, *args
        )


def _sequence_lengths(prefix: str) -> np.ndarray:
    # copy while the dataset lives: its arrays view an mmap that its __del__ closes
    ds = IndexedDataset(prefix, multimodal=False, mmap=True)
    lengths = np.array(ds.sequence_lengths)
    del ds
    return lengths


def _split_doc_counts(num_docs: int, split_matrix) -> list[int]:
    # mirrors BlendedMegatronDatasetBuilder._build_megatron_dataset_splits
    return [
        0 if b is None else int(round(b[1] * num_docs)) - int(round(b[0] * num_docs))
        for b in split_matrix
    ]


def build_datasets(
    data_paths: str | Path | Sequence[Any],
    split: str,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int | None,
    tokenizer_info: TokenizerInfo | Mapping | Any | None,
    cache_dir: str | Path,
) -> tuple[Any, Any | None]:
    """Build megatron-core GPT train and valid datasets; call it on every rank.

    Args:
        data_paths: one prefix, a list of prefixes (weighted by their token counts), or
            ``[w1, prefix1, w2, prefix2, ...]``.
        split: train,valid,test weights such as ``"98,2,0"`` (the test part is held out, unused).
        seq_length: tokens per sample; items hold ``seq_length`` tokens and shifted labels.
        seed: seed for megatron's document and sample shuffles.
        num_train_samples: samples the train dataset must provide (steps * global batch);
            smaller corpora are repeated in reshuffled epochs.
        num_valid_samples: samples for validation; ``None`` gives one pass over the valid split
            of a single prefix (blends need a number).
        tokenizer_info: a ``TokenizerInfo``, a ``.meta.json`` dict, a tokenizer, or ``None`` to
            read the prefixes' sidecars.
        cache_dir: where megatron caches its indices (inside the run dir, shared by all ranks).

    Returns:
        ``(train, valid)``; ``valid`` is None when the split gives validation no weight. Items are
        dicts of ``tokens``, ``labels``, ``position_ids`` (int64 ``[seq_length]``) and
        ``loss_mask`` (float32).
    """
    if seq_length < 1 or num_train_samples < 1:
        raise ValueError(
            f"need seq_length >= 1 and num_train_samples >= 1, got {seq_length}, "
            f"{num_train_samples}"
        )
    prefixes, weights = parse_data_path(data_paths)
    info = check_prefixes(
        prefixes, None if tokenizer_info is None else TokenizerInfo.from_any(tokenizer_info)
    )
    seq_lengths = [_sequence_lengths(p) for p in prefixes]
    if weights is None and len(prefixes) > 1:
        # megatron would blend unweighted prefixes for one epoch only; weigh them by size instead
        # so the blend repeats like a single prefix does
        weights = [float(lengths.sum()) for lengths in seq_lengths]
    if weights is not None and num_valid_samples is None:
        raise ValueError(f"a blend of {len(prefixes)} prefixes needs num_valid_samples")
    ensure_megatron_helpers()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=MegatronTokenizerAdapter(info),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [num_train_samples, num_valid_samples, 0 if weights is not None else None]
    for prefix, lengths in zip(prefixes, seq_lengths, strict=True):
        counts = _split_doc_counts(len(lengths), config.split_matrix)
        for i, name in enumerate(("train", "valid")):
            if config.split_matrix[i] is not None and counts[i] == 0:
                raise ValueError(
                    f"data prefix {prefix!r}: split {split!r} leaves the {name} part none of its "
                    f"{len(lengths)} documents; use more documents or a different split"
                )
    builder = _SingleProcessSafeBuilder(GPTDataset, sizes, lambda: True, config)
    train, valid, _ = builder.build()
    return train, valid


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset items into ``[b, s]`` tensors: int64 ids, float32 ``loss_mask``."""
    out = {}
    for key in BATCH_KEYS:
        t = torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
        out[key] = t.float() if key == "loss_mask" else t.long()
    return out


def batch_iterator(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro-batches, resuming after ``consumed_samples``, in
    this thread (``loader.MicroBatches`` says which samples; ``loader.BatchLoader`` is the same
    through a DataLoader with workers)."""
    from .loader import MicroBatches

    for indices in MicroBatches(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size):
        yield collate([dataset[i] for i in indices])
