"""The run configuration's schema (one for train/, eval/, checkpoint/ and fope-plan): nested
dataclasses, one attribute docstring per field (what ``fope-train --help-config`` prints).

Loading (YAML file, dotted command-line overrides, type checks) is ``config/load.py``; every
check that needs no process group is ``config/validate.py``. The derived values the package
uses (head dim, KV groups, rotary dim, FoPE training length) are properties here, so each has
one definition.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import yaml

from fope_megatron.errors import ConfigError
from fope_megatron.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from fope_megatron.fope import FoPEConfig

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class RunConfig:
    """Where the run writes and how it logs."""

    dir: str = "runs/default"
    """run folder: config.yaml, metrics.jsonl, checkpoints, tb/"""
    seed: int = 1234
    """seed for weights, data order and FoPE coefficients"""
    log_interval: int = 10
    """steps between metrics lines"""
    tensorboard: bool = True
    """write TensorBoard events to RUN_DIR/tb"""
    wandb: bool = False
    """log to Weights & Biases (only if installed)"""


@dataclass
class TrainConfig:
    """Optimization, batch, schedule, checkpoint and evaluation settings."""

    steps: int = 1000
    """total optimizer steps (the lr schedule spans these)"""
    micro_batch_size: int = 8
    """samples per rank per forward/backward"""
    global_batch_size: int = 8
    """samples per optimizer step (micro * dp * grad accumulation)"""
    seq_length: int = 512
    """tokens per sample during training"""
    lr: float = 6e-4
    """peak learning rate"""
    min_lr: float = 6e-5
    """cosine decay ends here"""
    warmup_steps: int = 100
    """linear warmup steps from 0 to lr"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.95
    """AdamW beta2"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    clip_grad: float = 1.0
    """global gradient-norm clip (0 = off)"""
    save_interval: int = 1000
    """steps between checkpoints (one is also saved at the end)"""
    keep_last: int = 3
    """number of checkpoints kept (0 = keep all)"""
    async_save: bool = False
    """interval saves written by DeepSpeed's decoupled writer processes while training goes on
    (completed after the next step); the last save is synchronous"""
    eval_interval: int = 1000
    """steps between validation passes (0 = off)"""
    eval_iters: int = 10
    """validation micro-batches per pass"""
    eval_lengths: list[int] = field(default_factory=list)
    """extra eval lengths (extrapolation)"""
    exit_at_step: Optional[int] = None
    """save and exit after this step (None or 0 = off)"""
    resume: str = "auto"
    """'auto' (latest in run.dir), 'none', or a checkpoint path"""
    init_from: Optional[str] = None
    """checkpoint to take weights from (fresh optimizer and step)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """bad step: stop unsaved, or drop the update"""
    max_consecutive_skips: int = 5
    """on_nonfinite=skip: stop after this many skips in a row"""
    loss_spike: float = 0.0
    """also bad: loss > this x median of recent losses (0 = off)"""
    loss_spike_window: int = 50
    """good steps in that running median"""
    resume_changes: Literal["apply", "refuse"] = "apply"
    """changed lr/schedule/optimizer on resume"""
    recompute: Literal["none", "selective", "full"] = "none"
    """activation recompute (megatron's)"""
    recompute_num_layers: Optional[int] = None
    """full: per chunk (uniform, 1) / first N (block, L)"""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """full: megatron's recompute_method"""


@dataclass
class ModelConfig:
    """GPT architecture (megatron-core TransformerConfig fields, renamed where noted)."""

    num_layers: int = 2
    """transformer layers"""
    hidden_size: int = 128
    """model width"""
    num_attention_heads: int = 4
    """query heads"""
    num_query_groups: Optional[int] = None
    """KV groups for GQA (None = MHA)"""
    ffn_hidden_size: Optional[int] = None
    """MLP width (None = 4 * hidden_size)"""
    vocab_size: int = 258
    """unpadded vocab (>= the tokenizer's); padded for TP when built"""
    make_vocab_size_divisible_by: int = 128
    """pad vocab to a multiple of this (divisible by tp)"""
    position_embedding: Literal["fope", "rope", "none"] = "fope"
    """positional scheme"""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """norm layer"""
    swiglu: bool = True
    """SwiGLU MLP instead of GeLU"""
    add_bias_linear: bool = False
    """biases in linear layers"""
    untie_embeddings: bool = False
    """separate output layer (megatron: share = not untie)"""
    rotary_base: float = 10000.0
    """theta of RoPE / FoPE frequencies"""
    rotary_percent: float = 1.0
    """fraction of the head dim that is rotated"""
    init_method_std: float = 0.02
    """std of the normal weight init"""
    attention_dropout: float = 0.0
    """dropout on attention probabilities"""
    hidden_dropout: float = 0.0
    """dropout on residual branches"""
    max_position_embeddings: Optional[int] = None
    """positions megatron's GPTModel is built for (None = train.seq_length)"""

    @property
    def head_dim(self) -> int:
        """Attention head dimension ``d`` (megatron's ``kv_channels``)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """KV groups ``G`` (``num_query_groups``; MHA when unset: ``G = H``)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """MLP hidden size (``ffn_hidden_size``; ``4 * hidden_size`` when unset)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def rotary_dim(self) -> int:
        """Rotated dims ``d_r = int(head_dim * rotary_percent)`` (megatron-core's rule)."""
        return int(self.head_dim * self.rotary_percent)


@dataclass
class FoPESection:
    """Fourier Position Embedding (FOPE_SPEC.md); used when model.position_embedding=fope."""

    sigma: float = 0.3
    """coefficient init gain (paper: 0.3 / 0.4 / 0.6 for 60M / 180M / 1.2B)"""
    floor_ratio: float = 1.0
    """rho: frequencies below rho*2*pi/L become zero (0 = no floor)"""
    train_seq_len: Optional[int] = None
    """L of the floor; None = train.seq_length (then saved)"""
    learnable: bool = False
    """train the coefficients (the reference keeps them frozen)"""
    zero_freq_sin: float = 1.0
    """sin table value of zero-frequency pairs (reference 1, ports 0)"""
    d_out: Optional[int] = None
    """output frequencies (None = min(D_in, d_r // 4))"""
    shared_across_layers: bool = False
    """one coefficient set shared by every layer"""
    interleaved: bool = False
    """rotate pairs (2j, 2j+1) instead of halves"""
    expand_on_extension: bool = False
    """grow coefficients when train_seq_len grows (x+FoPE)"""
    seed: Optional[int] = None
    """coefficient seed; None = run.seed"""


@dataclass
class PositionConfig:
    """How q/k are encoded (``fusion``) and frequency scaling for length extension (x+YaRN,
    x+PI), applied before the FoPE floor."""

    fusion: Literal["auto", "triton", "torch"] = "auto"
    """q/k apply: auto = triton on CUDA"""
    scaling: Literal["none", "yarn", "pi"] = "none"
    """frequency scaling applied before FoPE"""
    factor: float = 1.0
    """scaling factor (> 1 when scaling is on)"""
    original_max_position_embeddings: Optional[int] = None
    """context length the scaling extends from (None = fope.train_seq_len)"""
    beta_fast: float = 32.0
    """YaRN ramp: fast boundary (rotations)"""
    beta_slow: float = 1.0
    """YaRN ramp: slow boundary (rotations)"""
    mscale: float = 1.0
    """YaRN attention temperature scale"""
    mscale_all_dim: float = 0.0
    """YaRN mscale_all_dim (0 = off)"""


@dataclass
class ParallelConfig:
    """Parallel degrees; dp is derived: world / (tp * cp * ulysses * pp)."""

    tp: int = 1
    """tensor-parallel degree"""
    sp: bool = False
    """megatron sequence parallel (needs tp > 1)"""
    cp: int = 1
    """context-parallel degree (load-balanced chunks)"""
    ulysses: int = 1
    """DeepSpeed-Ulysses sequence-parallel degree"""
    pp: int = 1
    """pipeline-parallel degree (fope-train: only 1; the model level builds stages)"""
    vpp: int = 1
    """virtual pipeline stages per rank (interleaved 1F1B; fope-train: only 1)"""


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO engine settings."""

    zero_stage: int = 0
    """ZeRO stage 0, 1, 2 or 3"""
    config: Optional[str] = None
    """DeepSpeed JSON (None = configs/deepspeed/zero{stage}.json)"""
    offload: bool = False
    """ZeRO-3 CPU offload of params and optimizer (zero3_offload.json)"""


@dataclass
class DistConfig:
    """torch.distributed settings."""

    timeout_minutes: float = 30.0
    """collective timeout: a rank that died ends the job after this"""


@dataclass
class DataConfig:
    """Training data: megatron IndexedDataset prefixes or the built-in synthetic corpus."""

    path: list[Union[float, str]] = field(default_factory=list)
    """[prefix] or [w1, p1, w2, p2]"""
    split: str = "98,2,0"
    """train,valid,test weights"""
    synthetic: bool = False
    """generate the built-in corpus into the run dir and train on it"""
    tokenizer: str = "byte"
    """'byte' or a local Hugging Face tokenizer dir"""
    num_workers: int = 2
    """DataLoader workers per rank"""
    passkey_fraction: float = 0.0
    """share of train samples replaced by passkey documents"""


@dataclass
class Config:
    """The whole training configuration: one section per dataclass above."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fope: FoPESection = field(default_factory=FoPESection)
    position: PositionConfig = field(default_factory=PositionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Config:
        """Build a config from ``{section: {key: value}}``; missing keys keep their defaults.

        Raises:
            ConfigError: unknown section or key, or a value of the wrong type.
        """
        from .load import config_from_dict

        return config_from_dict(cls, raw)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML/JSON-safe); ``Config.from_dict`` inverts it."""
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path, header: str = "") -> None:
        """Write the config as YAML (the resolved config of a run goes to RUN_DIR/config.yaml).

        ``header``: comment lines put first (e.g. what ``auto`` settings resolved to).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"# {line}\n" for line in header.splitlines())
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        path.write_text(lines + body)

    @property
    def fope_train_seq_len(self) -> int:
        """FoPE's training length ``L`` (the floor's): ``fope.train_seq_len`` or
        ``train.seq_length``."""
        return self.fope.train_seq_len or self.train.seq_length

    @property
    def original_max_positions(self) -> int:
        """The length ``position.scaling`` extends from: ``position.original_max_position_embeddings``
        or FoPE's training length."""
        return self.position.original_max_position_embeddings or self.fope_train_seq_len

    def to_fope_config(self) -> FoPEConfig:
        """The ``fope.FoPEConfig`` of this run's model (``fope`` section plus model shape)."""
        from fope_megatron.fope import FoPEConfig

        m, f = self.model, self.fope
        return FoPEConfig(
            head_dim=m.head_dim,
            train_seq_len=self.fope_train_seq_len,
            num_attention_heads=m.num_attention_heads,
            num_layers=m.num_layers,
            num_query_groups=m.kv_groups,
            rotary_percent=m.rotary_percent,
            rotary_base=float(m.rotary_base),
            floor_ratio=f.floor_ratio,
            sigma=f.sigma,
            seed=self.run.seed if f.seed is None else f.seed,
            learnable=f.learnable,
            zero_freq_sin=float(f.zero_freq_sin),
            d_out=f.d_out,
            interleaved=f.interleaved,
            shared_across_layers=f.shared_across_layers,
        )

    def resolve(self) -> Config:
        """Fill the fields whose ``None`` means "derive from another field", in place.

        ``fope.train_seq_len`` (from ``train.seq_length``) and ``fope.seed`` (from ``run.seed``)
        are properties of the trained model, so they are fixed here and saved with the run.
        """
        if self.fope.train_seq_len is None:
            self.fope.train_seq_len = self.train.seq_length
        if self.fope.seed is None:
            self.fope.seed = self.run.seed
        if self.model.ffn_hidden_size is None:
            self.model.ffn_hidden_size = 4 * self.model.hidden_size
        if self.model.max_position_embeddings is None:
            self.model.max_position_embeddings = self.train.seq_length
        if self.position.original_max_position_embeddings is None:
            self.position.original_max_position_embeddings = self.fope.train_seq_len
        if self.train.exit_at_step == 0:
            self.train.exit_at_step = None
        return self

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The run's ``ParallelDims`` for ``world_size`` ranks (ConfigError if impossible)."""
        p = self.parallel
        try:
            return ParallelDims(world_size, tp=p.tp, cp=p.cp, ulysses=p.ulysses, pp=p.pp)
        except ValueError as err:
            raise ConfigError(
                f"{err} (parallel.tp={p.tp}, parallel.cp={p.cp}, parallel.ulysses={p.ulysses}, "
                f"parallel.pp={p.pp})"
            ) from err

    def deepspeed_json(self) -> Path:
        """The DeepSpeed JSON to use: ``deepspeed.config`` or the shipped file for the stage."""
        if self.deepspeed.config is not None:
            return Path(self.deepspeed.config)
        name = "zero3_offload" if self.deepspeed.offload else f"zero{self.deepspeed.zero_stage}"
        return DEEPSPEED_CONFIG_DIR / f"{name}.json"

    def validate(self, world_size: int) -> ParallelDims:
        """Every check that needs no process group; returns the run's ``ParallelDims``.

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
        from .validate import validate_config

        return validate_config(self, world_size)


def hints(cls: type) -> dict[str, Any]:
    """The resolved type of every field of dataclass ``cls``."""
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------- documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: one-line doc}`` of a section class: the docstring under each field (read from
    the source with ``ast``), whitespace folded to one line; a field without one is missing."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # the ClassDef's statements
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        doc = after.value.value if is_doc else None
        if isinstance(node, ast.AnnAssign) and isinstance(doc, str):
            docs[node.target.id] = " ".join(doc.split())
    return docs


def describe_fields(cfg: Config | None = None) -> list[tuple[str, str, Any, str]]:
    """``(section.key, type, default, doc)`` for every key, in schema order (defaults from
    ``cfg`` when given, else the dataclass defaults)."""
    cfg = cfg or Config()
    rows = []
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        docs = field_docs(type(part))
        for f in dataclasses.fields(part):
            key = f"{section.name}.{f.name}"
            rows.append((key, str(f.type), getattr(part, f.name), docs.get(f.name, "")))
    return rows


def help_text() -> str:
    """``fope-train --help-config``: every key with its type, default and documentation."""
    lines = [
        "Config keys (set in the YAML file as 'section: {key: value}' or on the command line as",
        "section.key=value; the command line beats the file, which beats these defaults):",
    ]
    current = ""
    for key, kind, default, doc in describe_fields():
        section = key.split(".")[0]
        if section != current:
            current = section
            cls = type(getattr(Config(), section))
            lines += ["", f"[{section}] {' '.join(inspect.getdoc(cls).split())}"]
        lines.append(f"  {key}  ({kind}, default {json.dumps(default)})")
        lines.append(f"      {doc}")
    return "\n".join(lines)
