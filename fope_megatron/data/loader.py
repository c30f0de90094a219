"""The trainer's batches: a ``torch.utils.data.DataLoader`` over this rank's micro-batches.

``MicroBatches`` is the sampler (Megatron-LM's ``MegatronPretrainingSampler``): the global sample
order is ``0, 1, 2, ...`` of the (already shuffled) dataset, every micro-step of
``micro_batch_size * dp_size`` consecutive samples is cut into one contiguous slice per
data-parallel rank, and starting at ``consumed_samples`` continues with the next sample.

``BatchLoader`` reads and collates those micro-batches in ``data.num_workers`` worker processes
(forked, so they share the parent's memory-mapped files), ``prefetch_factor`` batches ahead each,
into pinned memory when CUDA is available (so the trainer's ``non_blocking`` copies overlap). The
DataLoader returns batches in the sampler's order whatever the workers, so the batches depend only
on ``(consumed_samples, micro_batch_size, dp_rank, dp_size)``: a loader restored at a position
(``state_dict`` / ``BatchLoader(..., consumed_samples=...)``) yields what an uninterrupted one
yields from there; batches prefetched but not consumed before a save are read again on resume.
``num_workers=0`` reads in the calling thread, as ``batch_iterator`` does.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class MicroBatches(Sampler):
    """This data-parallel rank's sample indices, one list per micro-batch, from
    ``consumed_samples`` on; the last, incomplete micro-step is dropped.

    Samples ``[k * m * d, (k + 1) * m * d)`` (``m`` micro-batch size, ``d`` dp size) form the
    ``k``-th micro-step across ranks; rank ``r`` gets the contiguous slice starting at
    ``k * m * d + r * m``. A global batch of ``g`` samples is ``g / (m * d)`` consecutive
    micro-steps, so global batch ``i`` covers samples ``[i * g, (i + 1) * g)`` for every layout.
    ``limit``: at most that many micro-batches (evaluation).
    """

    def __init__(
        self,
        total: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        limit: int | None = None,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                f"{micro_batch_size=}, {dp_rank=}, {dp_size=}"
            )
        self.step = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % self.step:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * dp_size = {self.step}"
            )
        self.starts = range(consumed_samples, total - self.step + 1, self.step)
        if limit is not None:
            self.starts = self.starts[:limit]
        self.offset = dp_rank * micro_batch_size
        self.micro_batch_size = micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in self.starts:
            first = start + self.offset
            yield list(range(first, first + self.micro_batch_size))

    def __len__(self) -> int:
        return len(self.starts)


# a stop signal sent to the whole process group (Slurm, a terminal) is the trainer's to handle:
# it saves and exits, and the workers stop with it (each exits when its parent is gone); a worker
# killed by it would make the DataLoader fail the step instead
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def _worker_init(_worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # forked with them blocked (BatchLoader.__next__), so none arrived before this
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class BatchLoader:
    """This rank's micro-batches (``MicroBatches`` order) through a DataLoader; iterate it once.

    Args:
        dataset: map-style dataset of ``GPTDataset`` items.
        consumed_samples: global samples already trained on (a multiple of
            ``micro_batch_size * dp_size``); the first batch continues after them.
        micro_batch_size, dp_rank, dp_size: this rank's place in the global order.
        num_workers: worker processes (``data.num_workers``); 0 reads in this thread.
        pin_memory: pinned host batches; default: when CUDA is available.
        prefetch_factor: batches each worker reads ahead.
        limit: at most that many micro-batches (evaluation).
    """

    def __init__(
        self,
        dataset: Any,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        limit: int | None = None,
    ) -> None:
        from .datasets import collate

        self.sampler = MicroBatches(
            len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, limit
        )
        self.consumed_samples = consumed_samples
        workers = min(int(num_workers), len(self.sampler))
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if workers else None,
            worker_init_fn=_worker_init if workers else None,
        )
        self._it = None

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            if self.loader.num_workers:
                # the workers inherit this thread's mask; here they arrive after the fork
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    self._it = iter(self.loader)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            else:
                self._it = iter(self.loader)
        batch = next(self._it)
        self.consumed_samples += self.sampler.step  # the micro-step across all dp ranks
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position to restore: global samples consumed through the batches yielded (not
        those prefetched)."""
        return {"consumed_samples": self.consumed_samples}

    def close(self) -> None:
        """Stop the workers now (they also stop when the loader is garbage collected)."""
        self._it = None
