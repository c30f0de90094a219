"""fope-plan's memory estimate per GPU (GiB = 2**30 bytes). ``N`` = parameters held by one
tensor-parallel rank, ZeRO partitions over ``dp_shard = dp * cp * ulysses`` ranks (every rank
holding the same TP shard; see ``ParallelDims.dp_shard``):

- bf16 (GPU default): weights 2N, gradients 2N, AdamW state 12N (fp32 master, exp_avg,
  exp_avg_sq). fp32: 4N, 4N, 8N (no master copy).
- ZeRO-1 divides the optimizer state by ``dp_shard``, ZeRO-2 also the gradients, ZeRO-3 also the
  weights, plus a gathered working set of two modules' full weights (the largest module: one
  layer or the embedding; current + prefetch). Offload (ZeRO-3) moves the optimizer state, the
  gradient partition and the weight partition to CPU memory (reported as ``cpu_offload``).
- Activations of one micro-batch (bf16, Korthikanti et al. 2022 generalised to GQA/SwiGLU, with
  ``train.recompute`` applied: selective drops the attention-score terms, full keeps each
  checkpointed chunk's input plus one chunk's activations) and the logits: the formulas are in
  ``fope_megatron/plan/activations.py``. Default ``--attention flash`` stores no score matrix.
- A fixed ``--overhead-gb`` (default 3) for the CUDA context, NCCL and DeepSpeed communication
  buckets and allocator fragmentation.

``estimate`` puts parameters and memory together into the ``Plan`` that fope-plan reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Config
from ..model.vocab import padded_vocab_size
from ..parallel.dims import ParallelDims
from .activations import activation_bytes
from .params import ParamCount, count_parameters

GIB = 1024**3
DEFAULT_OVERHEAD_GB = 3.0


@dataclass(frozen=True)
class Layout:
    """The cluster: nodes x GPUs per node, each with ``gpu_memory_gb`` GiB."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    overhead_gb: float = DEFAULT_OVERHEAD_GB
    flash_attention: bool = True

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def precision_of(cfg: Config) -> str:
    """The planned precision: ``auto`` means bf16 (the planner assumes GPUs)."""
    return "fp32" if cfg.train.precision == "fp32" else "bf16"


def state_bytes(cfg: Config, count: ParamCount, dims: ParallelDims) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer state (and CPU bytes with offload)."""
    bf16 = precision_of(cfg) == "bf16"
    w_b, g_b, o_b = (2, 2, 12) if bf16 else (4, 4, 8)
    stage, offload = cfg.deepspeed.zero_stage, cfg.deepspeed.offload
    shards = dims.dp_shard
    n = count.total - (count.fope_coefficients if count.fope_learnable else 0)
    weights = w_b * n / (shards if stage >= 3 else 1)
    gathered = 2 * w_b * count.largest_module if stage >= 3 else 0.0
    grads = g_b * n / (shards if stage >= 2 else 1)
    optim = o_b * n / (shards if stage >= 1 else 1)
    cpu = 0.0
    if offload:  # DeepSpeed offload_optimizer also keeps the gradient partition on the CPU
        cpu = optim + grads + (weights if stage >= 3 else 0.0)
        optim, grads, weights = 0.0, 0.0, (0.0 if stage >= 3 else weights)
    # FoPE coefficients stay float32 and are not partitioned (buffers; or tiny parameters).
    fope = 4.0 * count.fope_coefficients
    if count.fope_learnable:
        fope *= 1 + 1 + 2  # + fp32 grads + two Adam moments
    return dict(
        weights=weights + gathered,
        gradients=grads,
        optimizer=optim,
        fope_coefficients=fope,
        cpu_offload=cpu,
    )


@dataclass
class Plan:
    """Everything ``fope-plan`` reports (``to_dict`` is the ``--json`` output)."""

    config: str
    overrides: list[str]
    layout: dict[str, Any]
    params: dict[str, Any]
    memory_bytes: dict[str, float]
    tokens_per_step: int
    tokens_per_micro_batch: int
    fits: bool
    dominant: str
    reason: str | None
    suggestions: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def memory_gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.memory_bytes.items()}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_gib"] = {k: round(v, 3) for k, v in self.memory_gib.items()}
        return out


MEMORY_TERMS = ("weights", "gradients", "optimizer", "fope_coefficients", "activations", "logits")


def estimate(cfg: Config, layout: Layout, config_name: str = "", overrides=()) -> Plan:
    """Validate ``cfg`` for ``layout.world`` ranks and estimate; no suggestions (see ``plan``).

    Raises:
        ConfigError: the config or the layout is impossible.
    """
    dims = cfg.validate(layout.world)
    total = count_parameters(cfg, tp=1)
    local = count_parameters(cfg, tp=dims.tp)
    mem = state_bytes(cfg, local, dims)
    mem.update(activation_bytes(cfg, dims, local, layout.flash_attention))
    mem["overhead"] = layout.overhead_gb * GIB
    mem["total"] = sum(mem[k] for k in (*MEMORY_TERMS, "overhead"))
    mem["capacity"] = layout.gpu_memory_gb * GIB
    t = cfg.train
    fits = mem["total"] <= mem["capacity"]
    dominant = max(("weights", "gradients", "optimizer", "activations", "logits"), key=mem.get)
    reason = None
    if not fits:
        over = (mem["total"] - mem["capacity"]) / GIB
        reason = (
            f"needs {mem['total'] / GIB:.1f} GiB per GPU, {over:.1f} GiB more than the "
            f"{layout.gpu_memory_gb:g} GiB available; the largest term is {dominant} "
            f"({mem[dominant] / GIB:.1f} GiB)"
        )
    fope = total.fope
    return Plan(
        config=config_name,
        overrides=list(overrides),
        layout=dict(
            nodes=layout.nodes,
            gpus_per_node=layout.gpus_per_node,
            world=dims.world,
            tp=dims.tp,
            sp=bool(cfg.parallel.sp),
            cp=dims.cp,
            ulysses=dims.ulysses,
            pp=dims.pp,
            dp=dims.dp,
            zero_shards=dims.dp_shard,
            zero_stage=cfg.deepspeed.zero_stage,
            offload=cfg.deepspeed.offload,
            precision=precision_of(cfg),
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            grad_accum_steps=dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size),
            seq_length=t.seq_length,
            recompute=t.recompute,
            gpu_memory_gb=layout.gpu_memory_gb,
            flash_attention=layout.flash_attention,
        ),
        params=dict(
            total=total.total,
            embedding=total.embeddings,
            non_embedding=total.non_embedding,
            fope_coefficients=total.fope_coefficients,
            fope_learnable=total.fope_learnable,
            fope_d_in=fope.d_in if fope else None,
            fope_d_out=fope.d_out if fope else None,
            per_gpu=local.total,
            padded_vocab=padded_vocab_size(cfg),
        ),
        memory_bytes=mem,
        tokens_per_step=t.global_batch_size * t.seq_length,
        tokens_per_micro_batch=t.micro_batch_size * t.seq_length,
        fits=fits,
        dominant=dominant,
        reason=reason,
        assumptions=[
            f"{precision_of(cfg)} weights/grads, AdamW fp32 state; "
            + (
                f"ZeRO-{cfg.deepspeed.zero_stage} partitions over dp*cp*ulysses = "
                f"{dims.dp_shard} ranks"
                if cfg.deepspeed.zero_stage
                else "ZeRO-0: nothing partitioned"
            ),
            "activations: Korthikanti et al. 2022 per-layer formula (GQA/SwiGLU), "
            + (f"{t.recompute} recompute, " if t.recompute != "none" else "no recompute, ")
            + ("fused attention (no score matrix)" if layout.flash_attention else "s x s scores"),
            f"logits: 6 bytes x s x b x vocab/tp; overhead {layout.overhead_gb:g} GiB",
        ],
    )
