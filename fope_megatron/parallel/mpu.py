"""megatron-core ``parallel_state`` shaped as DeepSpeed's ``mpu`` argument.

DeepSpeed asks the mpu for the model-parallel group (gradient-norm clipping sums tensor-parallel
shards over it and counts replicated parameters once) and for the data-parallel group (ZeRO
partitions and averages gradients over it). Context-parallel ranks hold different tokens of the
same samples, so they join the data-parallel group for gradient averaging, as in megatron-core
(``with_context_parallel=True``).
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    """Adapter passed to ``deepspeed.initialize(mpu=...)``."""

    # tensor / model parallel (pipeline parallelism is not used: model parallel == tensor parallel)
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # data parallel (with context-parallel ranks)
    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group (DeepSpeed's checkpoint writers pick
        which of them write)."""
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
