"""The trainer's DataLoader (data/loader.py) over real GPTDatasets of real .bin/.idx files: the
batch_iterator order with worker processes, exact resume from its position, workers that
survive a stop signal, and the bytes each rank reads (docs/training.md: why TP ranks read)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from fope_megatron.data.datasets import batch_iterator, build_datasets
from fope_megatron.data.loader import BatchLoader

SEQ = 64
N = 40  # micro-batches compared (the workers pass each batch's tensors as a file descriptor)


@pytest.fixture(scope="module")
def train_ds(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("loader-cache")
    train, _ = build_datasets(corpus, "98,2,0", SEQ, 1234, 200, 8, None, cache)
    return train


def equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("dp_rank, dp_size", [(0, 1), (1, 2)])
def test_workers_yield_the_batch_iterator_order(train_ds, dp_rank, dp_size):
    ref = list(batch_iterator(train_ds, 0, 2, dp_rank, dp_size))
    assert len(ref) == len(train_ds) // (2 * dp_size) > N
    assert equal(list(BatchLoader(train_ds, 0, 2, dp_rank, dp_size)), ref)  # 0 workers, all
    got = list(BatchLoader(train_ds, 0, 2, dp_rank, dp_size, num_workers=2, limit=N))
    assert equal(got, ref[:N])


def test_restored_loader_with_workers_continues_exactly(train_ds):
    """Interrupted after 7 micro-batches (its workers had read further ahead), restored from its
    state: the batches that follow are those of an uninterrupted loader, bitwise."""
    straight = list(BatchLoader(train_ds, 0, 2, 1, 2, num_workers=2, limit=N))
    first = BatchLoader(train_ds, 0, 2, 1, 2, num_workers=2, prefetch_factor=4)
    head = [next(first) for _ in range(7)]
    state = first.state_dict()
    assert state == {"consumed_samples": 7 * 2 * 2}
    first.close()
    consumed = state["consumed_samples"]
    rest = list(BatchLoader(train_ds, consumed, 2, 1, 2, num_workers=2, limit=N - 7))
    assert equal(head + rest, straight)
    assert torch.equal(rest[0]["tokens"][0], train_ds[28 + 2]["tokens"])  # sample 30: rank 1's


def test_workers_survive_the_stop_signals(train_ds):
    """SIGTERM / SIGUSR1 sent to the whole process group (Slurm, a terminal) reach the workers
    too: they ignore them, the trainer (here: this process) decides."""
    loader = BatchLoader(train_ds, 0, 2, 0, 1, num_workers=2, limit=N)
    batches = [next(loader)]  # the loader has forked its workers: signal them at once
    for w in loader._it._workers:
        os.kill(w.pid, signal.SIGUSR1)
        os.kill(w.pid, signal.SIGTERM)
    batches += list(loader)
    assert equal(batches, list(batch_iterator(train_ds, 0, 2, 0, 1))[:N])


def test_bytes_read_per_rank_against_a_broadcast(train_ds, monkeypatch, capsys):
    """What one rank reads of the .bin per micro-batch (each TP rank reads its data-parallel
    rank's samples) against what a broadcast of the collated batch from one TP rank would send
    to each other TP rank."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    read = []
    get = IndexedDataset.get

    def counting_get(self, idx, offset=0, length=None):
        out = get(self, idx, offset, length)
        read.append(np.asarray(out).nbytes)
        return out

    monkeypatch.setattr(IndexedDataset, "get", counting_get)
    mbs, n = 2, 10
    batches = list(BatchLoader(train_ds, 0, mbs, 0, 1, num_workers=0, limit=n))
    itemsize = 2  # uint16 tokens of the byte tokenizer
    assert sum(read) == n * mbs * (SEQ + 1) * itemsize  # a sample: SEQ + 1 tokens, nothing more
    sent = sum(t.nbytes for t in batches[0].values())  # tokens, labels, positions, loss mask
    assert sent == mbs * SEQ * (8 + 8 + 8 + 4)
    with capsys.disabled():
        print(f"\nper micro-batch: read {sum(read) // n} bytes, a broadcast would send {sent}")
    assert sum(read) // n * 10 < sent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_are_pinned_on_cuda_and_copy_without_waiting(train_ds):
    loader = BatchLoader(train_ds, 0, 2, 0, 1, num_workers=2, limit=N)
    ref = list(batch_iterator(train_ds, 0, 2, 0, 1))[:N]
    got = []
    for batch in loader:
        assert all(t.is_pinned() for t in batch.values())
        got.append({k: t.to("cuda", non_blocking=True) for k, t in batch.items()})
    torch.cuda.synchronize()
    assert equal([{k: t.cpu() for k, t in b.items()} for b in got], ref)


@pytest.mark.integration
def test_trainer_resumed_with_workers_equals_a_straight_run_without(corpus, tmp_path):
    """fope-train with data.num_workers=2, stopped after step 3 and resumed, against a straight
    run reading in the main thread (data.num_workers=0): the same losses, bitwise."""
    from fope_megatron.testing import launch

    common = [f"data.path=[{corpus}]", "train.steps=6", "deepspeed.zero_stage=1"]
    straight = tmp_path / "straight"
    launch.train(straight, [*common, "data.num_workers=0"])
    split = tmp_path / "split"
    launch.train(split, [*common, "data.num_workers=2", "train.exit_at_step=3"])
    assert sorted(launch.losses(split)) == [1, 2, 3]
    launch.train(split, [*common, "data.num_workers=2", "train.resume=auto"])
    assert [r["step"] for r in launch.metrics(split)] == [1, 2, 3, 4, 5, 6]
    assert launch.losses(split) == launch.losses(straight)
