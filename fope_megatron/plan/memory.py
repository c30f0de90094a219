"""fope-plan: parameter count, per-GPU memory and a fits / does-not-fit verdict, without a GPU.

    fope-plan --config configs/llama_7b_fope.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80
    fope-plan --config configs/fope_1b2.yaml deepspeed.zero_stage=2 train.micro_batch_size=16 --json

The config and layout are validated first (``Config.validate(world)``), so an impossible layout
prints the config error. ``--nodes``/``--gpus-per-node``/``--gpu-memory-gb`` default to the
config's ``# fope-plan: nodes=N gpus_per_node=G gpu_memory_gb=M`` header line. Exit status: 0 fits,
1 does not fit, 2 configuration error.

Parameters are counted analytically from the config, exactly as megatron-core's GPTModel with our
local layer spec allocates them (tests/test_plan.py checks this against built models): padded
vocab, tied or untied output layer, two norms per layer plus the final norm, biases only with
``model.add_bias_linear``. FoPE coefficients are listed apart: frozen they are float32 buffers,
not parameters; with ``fope.learnable`` they are parameters and count in the total.

Memory per GPU (GiB = 2**30 bytes). ``N`` = parameters held by one tensor-parallel rank, ZeRO
partitions over ``dp_shard = dp * cp * ulysses`` ranks (every rank holding the same TP shard;
see ``ParallelDims.dp_shard``):

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compat.warnings import add_verbose_flag, quiet_known_warnings
from ..config import Config, ConfigError, load_config
from ..fope import base_frequencies, default_d_out, floor_frequencies
from ..model.vocab import padded_vocab_size
from ..parallel.dims import ParallelDims
from .activations import activation_bytes

GIB = 1024**3
HEADER = re.compile(r"^#\s*fope-plan:\s*(.*)$", re.MULTILINE)
LAYOUT_KEYS = ("nodes", "gpus_per_node", "gpu_memory_gb")
DEFAULT_OVERHEAD_GB = 3.0


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class FoPEShape:
    """Shape of the FoPE coefficients: per layer ``coef_cos`` and ``coef_sin``, each
    ``[G_held, D_in, D_out]``."""

    layers: int  # layers holding coefficients (every layer holds its own tensors)
    groups: int  # KV groups held (all G for the full model, G / tp per TP rank)
    d_in: int  # non-zero frequencies after the floor
    d_out: int  # output frequencies

    @property
    def count(self) -> int:
        return 2 * self.layers * self.groups * self.d_in * self.d_out


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the model (or of one TP rank), by part."""

    embedding: int  # input word embedding (padded vocab x hidden)
    output_layer: int  # untied output projection (0 when tied to the embedding)
    attention: int  # QKV and output projections of all layers (with biases)
    mlp: int  # fc1 and fc2 of all layers (with biases)
    norms: int  # two norms per layer and the final norm
    layers: int  # transformer layers
    fope: FoPEShape | None  # FoPE coefficients (None without FoPE)
    fope_learnable: bool  # coefficients are parameters (else float32 buffers)

    @property
    def fope_coefficients(self) -> int:
        return self.fope.count if self.fope else 0

    @property
    def embeddings(self) -> int:
        """Input embedding plus untied output layer (Kaplan et al.'s "embedding" parameters)."""
        return self.embedding + self.output_layer

    @property
    def total(self) -> int:
        """Every ``nn.Parameter``: what ``sum(p.numel() for p in model.parameters())`` gives."""
        core = self.embeddings + self.attention + self.mlp + self.norms
        return core + (self.fope_coefficients if self.fope_learnable else 0)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embeddings

    @property
    def largest_module(self) -> int:
        """Largest single module ZeRO-3 gathers at once: one layer or the embedding."""
        per_layer = (self.attention + self.mlp + self.norms) // self.layers
        return max(self.embedding, self.output_layer, per_layer)


def local_groups(groups: int, tp: int) -> int:
    """KV groups one TP rank holds (replicated when there are fewer groups than ranks)."""
    return groups // tp if groups >= tp else 1


def fope_shape(cfg: Config, tp: int = 1) -> FoPEShape | None:
    """D_in / D_out from the FoPE floor (``fope_megatron.fope``) and the coefficient shape.

    Frequencies are scaled by ``position.scaling`` (YaRN / PI) first, as the model builds them.
    """
    m, f = cfg.model, cfg.fope
    if m.position_embedding != "fope":
        return None
    head_dim = m.hidden_size // m.num_attention_heads
    d_r = int(head_dim * m.rotary_percent)
    seq = f.train_seq_len or cfg.train.seq_length
    from ..model.builder import position_frequencies

    scaled = position_frequencies(cfg)
    w = base_frequencies(d_r, float(m.rotary_base)) if scaled is None else torch.tensor(scaled)
    _, d_in = floor_frequencies(w, seq, f.floor_ratio)
    d_out = default_d_out(d_in, d_r) if f.d_out is None else min(f.d_out, d_in)
    groups = m.num_query_groups or m.num_attention_heads
    return FoPEShape(m.num_layers, local_groups(groups, tp), d_in, d_out)


def count_parameters(cfg: Config, tp: int = 1) -> ParamCount:
    """Parameters of one tensor-parallel rank (``tp=1``: the whole model).

    Column-parallel weights (QKV, fc1, embedding, output layer) and row-parallel weights
    (projection, fc2) are split over ``tp``; norms and row-parallel biases are replicated.
    """
    m = cfg.model
    h, heads = m.hidden_size, m.num_attention_heads
    d = h // heads
    groups = m.num_query_groups or heads
    f = m.ffn_hidden_size or 4 * h
    vocab = padded_vocab_size(cfg) // tp
    bias = m.add_bias_linear
    qkv_rows = (heads // tp + 2 * local_groups(groups, tp)) * d
    attention = qkv_rows * h + h * (heads // tp) * d + (qkv_rows + h if bias else 0)
    fc1_rows = (2 if m.swiglu else 1) * f // tp
    mlp = fc1_rows * h + h * (f // tp) + (fc1_rows + h if bias else 0)
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    return ParamCount(
        embedding=vocab * h,
        output_layer=vocab * h if m.untie_embeddings else 0,
        attention=m.num_layers * attention,
        mlp=m.num_layers * mlp,
        norms=(2 * m.num_layers + 1) * norm,
        layers=m.num_layers,
        fope=fope_shape(cfg, tp),
        fope_learnable=cfg.fope.learnable and m.position_embedding == "fope",
    )


# ----------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------- the plan


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


def _recompute_candidates(cfg: Config, layout: Layout) -> tuple[list, list]:
    """Selective and full activation recompute (each empty when already on, or when it would
    change nothing: selective with flash attention has no score matrix to drop)."""
    kind = cfg.train.recompute
    selective, full = [], []
    if kind == "none" and not layout.flash_attention:
        text = "selective activation recompute (of the core attention)"
        selective.append((text, ["train.recompute=selective"]))
    if kind != "full":
        text = "full activation recompute (about one more forward per step)"
        full.append((text, ["train.recompute=full"]))
    return selective, full


def _candidates(cfg: Config, dims: ParallelDims, layout: Layout, dominant: str):
    """``(text, overrides)`` worth trying on the same GPUs, the most relevant first.

    Recompute is among them only where it fits (see ``plan``): selective, the cheap one, first
    for activation-bound plans; full, which costs about a third more compute, after tp.
    """
    p, stage = cfg.parallel, cfg.deepspeed.zero_stage
    zero: list[tuple[str, list[str]]] = []
    if dims.dp_shard > 1 and stage < 3 and (stage < 2 or p.tp == 1):
        zero.append((f"raise the ZeRO stage to {stage + 1}", [f"deepspeed.zero_stage={stage + 1}"]))
    if p.tp == 1 and not cfg.deepspeed.offload:
        offload = ["deepspeed.zero_stage=3", "deepspeed.offload=true"]
        zero.append(("ZeRO-3 with CPU offload of optimizer and weights", offload))
    tp: list[tuple[str, list[str]]] = []
    if p.tp * 2 <= layout.gpus_per_node:
        extra = [f"parallel.tp={p.tp * 2}", "parallel.sp=true"]
        extra += ["deepspeed.zero_stage=2"] if stage == 3 else []
        tp.append((f"raise tensor parallelism to tp={p.tp * 2} with sp", extra))
    mb: list[tuple[str, list[str]]] = []
    if cfg.train.micro_batch_size > 1:
        half = cfg.train.micro_batch_size // 2
        mb.append((f"lower the micro batch to {half}", [f"train.micro_batch_size={half}"]))
    selective, full = _recompute_candidates(cfg, layout)
    if dominant in ("activations", "logits"):
        return selective + mb + tp + full + zero
    return zero + tp + mb + selective + full


def _more_nodes(path, overrides: list[str], cfg: Config, layout: Layout) -> str | None:
    """The fewest nodes (2x, 4x, ... up to 64 nodes) on which the config fits, at its ZeRO
    stage or with ZeRO-3."""
    tries = [("", [])]
    if cfg.parallel.tp == 1 and cfg.deepspeed.zero_stage < 3:
        tries.append((" with ZeRO-3", ["deepspeed.zero_stage=3"]))
    for nodes in (layout.nodes * 2**k for k in range(1, 7)):
        if nodes > 64:
            break
        bigger = dataclasses.replace(layout, nodes=nodes)
        for text, extra in tries:
            try:
                alt = estimate(load_config(path, overrides + extra), bigger)
            except ConfigError:
                continue
            if alt.fits:
                gib = alt.memory_bytes["total"] / GIB
                return f"use {nodes} nodes ({alt.layout['world']} GPUs){text}: {gib:.1f} GiB, fits"
    return None


def plan(path: str | Path, layout: Layout, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Load, validate and estimate ``path`` with ``overrides``; when it does not fit, try the
    usual fixes (ZeRO stage, tensor parallelism, micro batch, activation recompute, more nodes)
    and list the possible ones with their resulting memory (recompute only where it fits).

    Raises:
        ConfigError: the config or the layout is impossible.
    """
    overrides = list(overrides)
    cfg = load_config(path, overrides)
    result = estimate(cfg, layout, str(path), overrides)
    if result.fits:
        return result
    fitting = []
    for text, extra in _candidates(cfg, cfg.validate(layout.world), layout, result.dominant):
        try:
            alt = estimate(load_config(path, overrides + extra), layout)
        except ConfigError:
            continue  # not possible with this model / layout
        if not alt.fits and "train.recompute" in extra[0]:
            continue  # suggested only where it makes the run fit
        verdict = "fits" if alt.fits else "still does not fit"
        gib = alt.memory_bytes["total"] / GIB
        result.suggestions.append(f"{text} ({' '.join(extra)}): {gib:.1f} GiB, {verdict}")
        if alt.fits:
            fitting.append(result.suggestions[-1])
    if not fitting:
        nodes = _more_nodes(path, overrides, cfg, layout)
        if nodes:
            result.suggestions.append(nodes)
            fitting.append(nodes)
    best = (fitting or result.suggestions or [None])[0]
    if result.reason and best:
        result.reason += "; suggestion: " + best
    return result


# ----------------------------------------------------------------------------- CLI


def header_layout(path: str | Path) -> dict[str, float]:
    """The ``# fope-plan: nodes=1 gpus_per_node=8 gpu_memory_gb=80`` line of a config ({} if
    none): the layout the config is meant for."""
    match = HEADER.search(Path(path).read_text()) if Path(path).is_file() else None
    if not match:
        return {}
    out: dict[str, float] = {}
    for item in match.group(1).split():
        key, _, value = item.partition("=")
        if key in LAYOUT_KEYS:
            out[key] = float(value) if key == "gpu_memory_gb" else int(value)
    return out


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render(result: Plan) -> str:
    """The human-readable table."""
    lay, par, gib = result.layout, result.params, result.memory_gib
    lines = [
        f"config   {result.config} {' '.join(result.overrides)}".rstrip(),
        f"layout   {lay['nodes']} node(s) x {lay['gpus_per_node']} GPU(s) = {lay['world']}: "
        f"dp {lay['dp']} x tp {lay['tp']}{' (sp)' if lay['sp'] else ''} x cp {lay['cp']} x "
        f"ulysses {lay['ulysses']}; ZeRO-{lay['zero_stage']}{' + offload' if lay['offload'] else ''}"
        f" over {lay['zero_shards']} ranks; {lay['precision']}"
        + (f"; {lay['recompute']} recompute" if lay["recompute"] != "none" else ""),
        f"batch    micro {lay['micro_batch_size']} x dp {lay['dp']} x accum "
        f"{lay['grad_accum_steps']} = {lay['global_batch_size']} sequences x {lay['seq_length']}"
        f" = {result.tokens_per_step:,} tokens/step",
        "",
        "parameters",
        f"  total           {par['total']:>15,}  ({_human(par['total'])})",
        f"  embedding       {par['embedding']:>15,}  (input + untied output; vocab "
        f"{par['padded_vocab']} padded)",
        f"  non-embedding   {par['non_embedding']:>15,}  ({_human(par['non_embedding'])})",
        f"  per GPU (tp)    {par['per_gpu']:>15,}",
    ]
    if par["fope_d_in"] is not None:
        kind = "parameters, in total" if par["fope_learnable"] else "fp32 buffers, not in total"
        lines.append(
            f"  FoPE coeffs     {par['fope_coefficients']:>15,}  ({kind}; D_in {par['fope_d_in']},"
            f" D_out {par['fope_d_out']})"
        )
    lines += ["", f"memory per GPU (GiB)                  capacity {lay['gpu_memory_gb']:g}"]
    for key in (*MEMORY_TERMS, "overhead"):
        mark = "  <- largest" if key == result.dominant else ""
        lines.append(f"  {key:<18} {gib[key]:>10.2f}{mark}")
    lines.append(f"  {'total':<18} {gib['total']:>10.2f}")
    if gib["cpu_offload"]:
        lines.append(f"  {'cpu (offloaded)':<18} {gib['cpu_offload']:>10.2f}")
    lines.append("")
    if result.fits:
        lines.append(f"verdict  FITS ({gib['total']:.1f} of {lay['gpu_memory_gb']:g} GiB)")
    else:
        lines.append(f"verdict  DOES NOT FIT: {result.reason}")
        lines += [f"  - {s}" for s in result.suggestions]
    lines += ["", "assumptions", *(f"  - {a}" for a in result.assumptions)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fope-plan",
        description="Parameter count, per-GPU memory and a fits verdict for a config and layout.",
    )
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--nodes", type=int, help="nodes (default: the config's header)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: header)")
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="memory per GPU in GiB, e.g. 80 for an 80 GB A100/H100 (default: header)",
    )
    parser.add_argument(
        "--overhead-gb",
        type=float,
        default=DEFAULT_OVERHEAD_GB,
        help="fixed per-GPU overhead: CUDA context, NCCL/DeepSpeed buffers (default 3)",
    )
    parser.add_argument(
        "--attention",
        choices=("flash", "math"),
        default="flash",
        help="flash: fused attention, no score matrix stored (default); math: s x s scores",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_known_warnings(args.verbose)
    given = dict(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb
    )
    header = header_layout(args.config)
    values = {k: header.get(k) if v is None else v for k, v in given.items()}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        print(f"fope-plan: give {flags} (the config has no '# fope-plan:' line)", file=sys.stderr)
        return 2
    layout = Layout(
        nodes=int(values["nodes"]),
        gpus_per_node=int(values["gpus_per_node"]),
        gpu_memory_gb=float(values["gpu_memory_gb"]),
        overhead_gb=args.overhead_gb,
        flash_attention=args.attention == "flash",
    )
    if layout.nodes < 1 or layout.gpus_per_node < 1 or layout.gpu_memory_gb <= 0:
        print(
            "fope-plan: --nodes, --gpus-per-node and --gpu-memory-gb must be > 0", file=sys.stderr
        )
        return 2
    try:
        result = plan(args.config, layout, args.overrides)
    except ConfigError as err:
        print(f"fope-plan: configuration error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
