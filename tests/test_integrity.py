"""The data checks before any process group (data/integrity.py, train/preflight.py): bounded
memory whatever the document count, and one rank per node doing them."""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pytest
import torch

from fope_megatron.config import ConfigError, load_config
from fope_megatron.data import integrity
from fope_megatron.train.preflight import preflight


def write_index(prefix: str, num_docs: int) -> np.ndarray:
    """A ``.bin/.idx`` of ``num_docs`` one-sequence documents (lengths 1-7) written by
    megatron-core's ``IndexedDatasetBuilder``, fope-preprocess's writer; returns the lengths.
    (One ``add_document`` for all tokens, then one document per sequence: a million
    ``add_item`` calls would take a minute.)"""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    lengths = np.arange(num_docs) % 7 + 1
    tokens = torch.from_numpy(np.arange(int(lengths.sum()), dtype=np.int64) % 250)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(tokens, lengths.tolist())
    builder.document_indices[1:] = range(1, num_docs + 1)
    builder.finalize(prefix + ".idx")
    return lengths


def traced_peak(fn, *args):
    """``fn(*args)`` and the peak bytes Python and numpy allocated meanwhile."""
    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_index_check_memory_does_not_grow_with_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    peaks = {}
    for n in (10**5, 10**6):
        prefix = str(tmp_path / f"docs{n}")
        lengths = write_index(prefix, n)
        info, peaks[n] = traced_peak(integrity.check_prefix, prefix)
        ds = IndexedDataset(prefix, multimodal=False, mmap=True)
        assert (info.num_sequences, info.num_documents) == (n, len(ds.document_indices) - 1)
        assert info.num_tokens == int(lengths.sum()) == int(ds.sequence_lengths.sum())
        end = int(ds.index.sequence_pointers[-1]) + 2 * int(ds.sequence_lengths[-1])
        assert info.bin_bytes == end == (tmp_path / f"docs{n}.bin").stat().st_size
        del ds
    # a whole-array read holds 12 bytes per document: 1.2 MB and 12 MB here
    assert peaks[10**6] < 1_000_000, peaks
    assert peaks[10**6] < peaks[10**5] + 64 * 1024, peaks


def test_index_check_still_finds_a_truncated_bin_past_many_chunks(tmp_path):
    prefix = str(tmp_path / "big")
    write_index(prefix, 5 * integrity.CHUNK + 3)  # the last sequence in a partial chunk
    integrity.check_prefix(prefix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate((tmp_path / "big.bin").stat().st_size - 1)
    with pytest.raises(ConfigError, match="the .bin is truncated or belongs to another .idx"):
        integrity.check_prefix(prefix)


@pytest.mark.parametrize(
    "env, checks",
    [
        ({}, True),
        ({"LOCAL_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"SLURM_LOCALID": "1"}, False),
        ({"SLURM_LOCALID": "1", "LOCAL_RANK": "0"}, True),  # torchrun under srun: LOCAL_RANK wins
    ],
)
def test_only_local_rank_0_checks_the_data_files(corpus, tmp_path, monkeypatch, env, checks):
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trunc = str(tmp_path / "trunc")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus + suffix, trunc + suffix)
    with open(trunc + ".bin", "r+b") as f:
        f.truncate((tmp_path / "trunc.bin").stat().st_size - 100)
    common = [
        f"run.dir={tmp_path / 'run'}",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
    ]
    cfg = load_config(None, [f"data.path=[{trunc}]", *common])
    if checks:
        with pytest.raises(ConfigError, match="trunc.bin"):
            preflight(cfg, 2)
    else:
        assert preflight(cfg, 2) is not None
    # the config's checks run on every rank: a missing prefix fails everywhere
    gone = load_config(None, [f"data.path=[{tmp_path / 'gone'}]", *common])
    with pytest.raises(ConfigError, match="gone.bin"):
        preflight(gone, 2)


def test_a_sidecar_that_is_not_json_fails_named_on_every_rank(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # no file checks here, the vocab's still reads it
    bad = str(tmp_path / "badmeta")
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus + suffix, bad + suffix)
    (tmp_path / "badmeta.meta.json").write_text('{"vocab_size": ')
    cfg = load_config(
        None,
        [f"data.path=[{bad}]", f"run.dir={tmp_path / 'run'}", "train.micro_batch_size=2",
         "train.global_batch_size=4"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="badmeta.meta.json.*is not valid JSON"):
        preflight(cfg, 2)
