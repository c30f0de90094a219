"""What megatron-core's sequence-parallel and pipeline paths need on a CPU (gloo). No-op on CUDA.

Written for megatron-core 0.16.1 (checked against 0.14-0.16, the range pyproject allows). In
those versions:

- ``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` /
  ``_gather_along_last_dim`` allocate their output with ``device=torch.cuda.current_device()``,
  which raises on a CPU-only torch. They back every sequence-parallel mapping
  (``scatter_to_sequence_parallel_region``'s backward, ``gather_from_sequence_parallel_region``,
  ``reduce_scatter_to_sequence_parallel_region`` in ``RowParallelLinear``).
- ``LinearWithGradAccumulationAndAsyncCommunication`` (``ColumnParallelLinear`` with
  ``sequence_parallel``) all-gathers into ``get_global_memory_buffer()`` (a CUDA buffer) and
  allocates its reduce-scatter output on CUDA.
- ``get_cuda_rng_tracker().fork()`` (``TransformerBlock`` and the embedding under
  ``sequence_parallel``) reads and writes CUDA generator states.
- ``tensor_parallel.random.CheckpointFunction`` (activation recompute, ``train.recompute``)
  saves and restores every RNG state through ``_get_all_rng_states`` / ``_set_all_rng_states``,
  which read the CUDA default generator (``torch.cuda.get_rng_state``) unconditionally.
- Pipeline parallelism: ``pipeline_parallel.p2p_communication`` allocates its receive buffers
  with ``device=torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()`` after
  batched sends; ``pipeline_parallel.schedules`` counts tokens in
  ``torch.zeros([], device="cuda")`` (every schedule, even without a pipeline); and
  ``LanguageModule.setup_embeddings_and_output_layer`` moves the last stage's copy of tied
  embeddings with ``weight.data.cuda()`` before all-reducing it from the first stage. No
  ``ModelParallelConfig`` switch changes any of these.

gloo itself supports every collective used (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
``all_to_all_single`` in torch >= 2.6), so only allocation and RNG need replacing. The three
mapping helpers are replaced by device-agnostic versions with the same signature; the linear
helper is wrapped so that with ``sequence_parallel`` it gathers through the (patched)
differentiable mapping and then runs megatron's own non-sequence-parallel matmul; and the RNG
tracker is replaced by :class:`CPURNGStatesTracker` (megatron's own tracker class, CPU states);
the two recompute RNG helpers are replaced by versions that save the CPU generator and the
tracker's states only (there is no CUDA generator). The two pipeline modules see, as their
module global ``torch``, :class:`_CPUTorch` (torch itself except that the current CUDA device is
the CPU, ``synchronize`` does nothing and ``zeros(device="cuda")`` allocates on the CPU); the
tied-embedding setup runs with ``Tensor.cuda`` returning the tensor itself.

Everything is applied by :func:`apply_megatron_cpu_compat`, once, only when CUDA is absent.
Delete this module when megatron-core allocates on the input's device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.distributed as dist

TESTED_MEGATRON_CORE = "0.16.1"
_APPLIED = False


# ----------------------------------------------------------------------------- collectives
def _ranks(input_, group):
    """The group size and ``input_`` (contiguous when there is more than one rank)."""
    assert group is not None, "group should not be None"
    world_size = group.size()
    return world_size, (input_ if world_size == 1 else input_.contiguous())


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """megatron's ``_gather_along_first_dim`` allocating on ``input_.device``."""
    world_size, input_ = _ranks(input_, group)
    if world_size == 1:
        return input_
    if output_split_sizes is None:
        output = input_.new_empty((input_.shape[0] * world_size, *input_.shape[1:]))
        dist.all_gather_into_tensor(output, input_, group=group)
        return output
    output = input_.new_empty((sum(output_split_sizes), *input_.shape[1:]))
    dist.all_gather(list(torch.split(output, output_split_sizes, dim=0)), input_, group=group)
    return output


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """megatron's ``_reduce_scatter_along_first_dim`` allocating on ``input_.device``."""
    world_size, input_ = _ranks(input_, group)
    if world_size == 1:
        return input_
    if input_split_sizes is not None:
        parts = list(torch.split(input_, input_split_sizes, dim=0))
        output = torch.empty_like(parts[group.rank()])
        dist.reduce_scatter(output, parts, group=group)
        return output
    assert input_.shape[0] % world_size == 0, (
        "First dimension of the tensor should be divisible by tensor parallel size"
    )
    output = input_.new_empty((input_.shape[0] // world_size, *input_.shape[1:]))
    dist.reduce_scatter_tensor(output, input_, group=group)
    return output


def _gather_along_last_dim(input_, group):
    """megatron's ``_gather_along_last_dim`` allocating on ``input_.device``."""
    world_size = group.size()
    if world_size == 1:
        return input_
    gathered = _gather_along_first_dim(input_, group)
    return torch.cat(gathered.chunk(world_size, dim=0), dim=-1).contiguous()


def _wrap_linear(original):
    """Sequence-parallel ``ColumnParallelLinear`` matmul without CUDA buffers.

    Gathers the sequence shards through megatron's differentiable
    ``gather_from_sequence_parallel_region`` (whose backward reduce-scatters the input gradient,
    exactly what the fused function does), then calls megatron's own function without
    ``sequence_parallel``.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    signature = inspect.signature(original)

    @functools.wraps(original)
    def linear(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments  # the arguments passed, by name
        if call["sequence_parallel"] and not call["input"].is_cuda:
            group = get_tensor_model_parallel_group_if_none(call.get("tp_group"))
            call["input"] = gather_from_sequence_parallel_region(
                call["input"], tensor_parallel_output_grad=True, group=group
            )
            call["sequence_parallel"] = False
        return original(**call)

    linear.fope_cpu_compat = True
    return linear


# ----------------------------------------------------------------------------- RNG tracker
def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CPURNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG tracker with CPU generator states (``fork`` swaps the CPU RNG)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def install_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """Seed megatron's model-parallel RNG states on CPU (``model_parallel_cuda_manual_seed``'s
    seeds: data-parallel ``seed``, tensor-parallel ``seed + 2718 + tp_rank``, expert
    ``seed + 1024``; no expert parallelism here)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _cpu_tracker_class()()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


# ----------------------------------------------------------------------------- recompute RNG
def _get_all_rng_states():
    """megatron's ``_get_all_rng_states`` without the CUDA generator: (cpu, None, tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return torch.get_rng_state(), None, get_cuda_rng_tracker().get_states()


def _set_all_rng_states(cpu_rng_state, cuda_rng_state, cuda_rng_state_tracker):
    """megatron's ``_set_all_rng_states`` without the CUDA generator."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(cpu_rng_state)
    get_cuda_rng_tracker().set_states(cuda_rng_state_tracker)


# ----------------------------------------------------------------------------- pipeline
def _cpu_device(device):
    """``device``, with CUDA (``"cuda"``, ``"cuda:0"``, an index) read as the CPU."""
    if device is None or isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _CPUCuda:
    """``torch.cuda`` as megatron's pipeline modules see it: the current device is the CPU and
    ``synchronize`` (after gloo's completed requests) has nothing to wait for."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        return None


class _CPUTorch:
    """The module global ``torch`` of megatron's ``p2p_communication`` and ``schedules``."""

    cuda = _CPUCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device=_cpu_device(device), **kwargs)


class _TensorCudaIsIdentity(torch.overrides.TorchFunctionMode):
    """``tensor.cuda()`` returns the tensor (it stays on the CPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def _wrap_setup_embeddings(original):
    """``setup_embeddings_and_output_layer`` without moving the tied copy to CUDA."""

    @functools.wraps(original)
    def setup(self):
        with _TensorCudaIsIdentity():
            return original(self)

    setup.fope_cpu_compat = True
    return setup


# ----------------------------------------------------------------------------- entry point
def apply_megatron_cpu_compat() -> bool:
    """Patch megatron-core's sequence-parallel, recompute-RNG and pipeline helpers for CPU;
    returns True when applied.

    Idempotent; does nothing (returns False) when CUDA is available.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import layers, mappings, random

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    mappings._gather_along_last_dim = _gather_along_last_dim
    fn = layers.linear_with_grad_accumulation_and_async_allreduce
    if not getattr(fn, "fope_cpu_compat", False):
        layers.linear_with_grad_accumulation_and_async_allreduce = _wrap_linear(fn)
    # CheckpointFunction, _fork_rng and CheckpointWithoutOutput look these up as module globals
    random._get_all_rng_states = _get_all_rng_states
    random._set_all_rng_states = _set_all_rng_states
    p2p_communication.torch = schedules.torch = _CPUTorch()
    setup = LanguageModule.setup_embeddings_and_output_layer
    if not getattr(setup, "fope_cpu_compat", False):
        LanguageModule.setup_embeddings_and_output_layer = _wrap_setup_embeddings(setup)
    _APPLIED = True
    return True
