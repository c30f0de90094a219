"""Parallel degrees of a run and the checks on their product (pure: no process groups).

``world = dp * tp * cp * ulysses * pp``:

- ``tp``: tensor parallel (heads and KV groups split; with ``sp`` the sequence too, between
  attention blocks). ``pp``: pipeline stages (fope-train: only 1; the model level builds them).
- ``cp``: megatron-style context parallel; every rank holds two of ``2*cp`` sequence chunks.
- ``ulysses``: DeepSpeed-Ulysses sequence parallel; sequence shards outside attention, head
  shards inside it (all-to-all).
- ``dp``: plain data parallel. Only these ranks read *distinct samples*: a global batch is
  ``micro_batch_size * dp * grad_accum`` samples, and the ``cp`` / ``ulysses`` ranks of one
  data-parallel replica see different tokens of the *same* samples.

Gradient averaging and ZeRO partitioning use a larger group: every rank that holds the same
model shard (same tp rank and pp stage), i.e. ``dp * cp * ulysses`` ranks (``dp_shard``). This
is DeepSpeed's ``sequence_data_parallel`` group for Ulysses and megatron-core's
data-parallel-with-context-parallel group for CP: those ranks computed gradients of the same
weights on different tokens, so their gradients must be summed, and ZeRO may shard optimizer
state over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallel dimension; ``dp`` is derived from ``world``.

    Args:
        world: total number of ranks.
        tp: tensor-parallel degree.
        cp: context-parallel degree.
        ulysses: DeepSpeed-Ulysses sequence-parallel degree.
        pp: pipeline-parallel degree.

    Raises:
        ValueError: a degree is not a positive integer, or ``world`` is not a multiple of
            ``tp * cp * ulysses * pp`` (the message prints every factor).
    """

    world: int
    tp: int = 1
    cp: int = 1
    ulysses: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("world", "tp", "cp", "ulysses", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.world % self.non_data != 0:
            raise ValueError(
                f"world_size={self.world} is not divisible by tp*cp*ulysses*pp = "
                f"{self.tp}*{self.cp}*{self.ulysses}*{self.pp} = {self.non_data}; "
                f"choose degrees whose product divides {self.world}"
            )

    @property
    def non_data(self) -> int:
        """Product of every degree except dp: ranks that share one data-parallel replica."""
        return self.tp * self.cp * self.ulysses * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read distinct samples."""
        return self.world // self.non_data

    @property
    def dp_shard(self) -> int:
        """Ranks holding the same model shard: gradient averaging and ZeRO partitioning."""
        return self.dp * self.cp * self.ulysses

    @property
    def seq_shards(self) -> int:
        """Ranks one sample's sequence is split over (context parallel times Ulysses)."""
        return self.cp * self.ulysses

    @property
    def model_parallel(self) -> int:
        """Ranks one copy of the weights is split over (tensor times pipeline)."""
        return self.tp * self.pp

    def grad_accum_steps(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per rank and step: ``gbs / (mbs * dp)``.

        Raises:
            ValueError: ``global_batch_size`` is not a multiple of ``micro_batch_size * dp``.
        """
        per_step = micro_batch_size * self.dp
        if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"micro_batch_size * dp = {micro_batch_size} * {self.dp} = {per_step}"
            )
        return global_batch_size // per_step

    def __str__(self) -> str:
        return (
            f"world={self.world} = dp {self.dp} x tp {self.tp} x cp {self.cp} x "
            f"ulysses {self.ulysses} x pp {self.pp}"
        )
