"""The run configuration (one schema for train/, eval/, checkpoint/ and fope-plan): nested
dataclasses loaded from YAML with dotted command-line overrides.

Precedence: ``key=value`` on the command line beats the YAML file, which beats the defaults
below. Every value is type-checked against its field (int, float, bool, str, list, Optional,
Literal) and unknown keys fail with the list of allowed ones. ``Config.validate(world_size)``
runs every check that needs no process group; ``check_data`` and ``check_vocab`` check the
data files and the tokenizer. All failures raise ``ConfigError`` naming key, value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fope_megatron.coerce import coerce, unknown_message
from fope_megatron.errors import ConfigError
from fope_megatron.parallel.dims import ParallelDims

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class RunConfig:
    """Where the run writes and how it logs."""

    dir: str = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints, tb/
    seed: int = 1234  # seed for weights, data order and FoPE coefficients
    log_interval: int = 10  # steps between metrics lines
    tensorboard: bool = True  # write TensorBoard events to RUN_DIR/tb
    wandb: bool = False  # log to Weights & Biases (only if installed)


@dataclass
class TrainConfig:
    """Optimization, batch, schedule, checkpoint and evaluation settings."""

    steps: int = 1000  # total optimizer steps (the lr schedule spans these)
    micro_batch_size: int = 8  # samples per rank per forward/backward
    global_batch_size: int = 8  # samples per optimizer step (micro * dp * grad accumulation)
    seq_length: int = 512  # tokens per sample during training
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # cosine decay ends here
    warmup_steps: int = 100  # linear warmup steps from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 = off)
    save_interval: int = 1000  # steps between checkpoints (one is also saved at the end)
    keep_last: int = 3  # number of checkpoints kept (0 = keep all)
    async_save: bool = False  # interval saves written by DeepSpeed's decoupled writer processes
    # while training goes on (completed after the next step); the last save is synchronous
    eval_interval: int = 1000  # steps between validation passes (0 = off)
    eval_iters: int = 10  # validation micro-batches per pass
    eval_lengths: list[int] = field(default_factory=list)  # extra eval lengths (extrapolation)
    exit_at_step: Optional[int] = None  # save and exit after this step (None or 0 = off)
    resume: str = "auto"  # 'auto' (latest in run.dir), 'none', or a checkpoint path
    init_from: Optional[str] = None  # checkpoint to take weights from (fresh optimizer and step)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    on_nonfinite: Literal["stop", "skip"] = "stop"  # bad step: stop unsaved, or drop the update
    max_consecutive_skips: int = 5  # on_nonfinite=skip: stop after this many skips in a row
    loss_spike: float = 0.0  # also bad: loss > this x median of recent losses (0 = off)
    loss_spike_window: int = 50  # good steps in that running median
    resume_changes: Literal["apply", "refuse"] = "apply"  # changed lr/schedule/optimizer on resume
    recompute: Literal["none", "selective", "full"] = "none"  # activation recompute (megatron's)
    recompute_num_layers: Optional[int] = None  # full: per chunk (uniform, 1) / first N (block, L)
    recompute_method: Literal["uniform", "block"] = "uniform"  # full: megatron's recompute_method


@dataclass
class ModelConfig:
    """GPT architecture (megatron-core TransformerConfig fields, renamed where noted)."""

    num_layers: int = 2  # transformer layers
    hidden_size: int = 128  # model width
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # KV groups for GQA (None = MHA)
    ffn_hidden_size: Optional[int] = None  # MLP width (None = 4 * hidden_size)
    vocab_size: int = 258  # unpadded vocab (>= the tokenizer's); padded for TP when built
    make_vocab_size_divisible_by: int = 128  # pad vocab to a multiple of this (divisible by tp)
    position_embedding: Literal["fope", "rope", "none"] = "fope"  # positional scheme
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"  # norm layer
    swiglu: bool = True  # SwiGLU MLP instead of GeLU
    add_bias_linear: bool = False  # biases in linear layers
    untie_embeddings: bool = False  # separate output layer (megatron: share = not untie)
    rotary_base: float = 10000.0  # theta of RoPE / FoPE frequencies
    rotary_percent: float = 1.0  # fraction of the head dim that is rotated
    init_method_std: float = 0.02  # std of the normal weight init
    attention_dropout: float = 0.0  # dropout on attention probabilities
    hidden_dropout: float = 0.0  # dropout on residual branches
    max_position_embeddings: Optional[int] = None  # None = train.seq_length


@dataclass
class FoPESection:
    """Fourier Position Embedding (FOPE_SPEC.md); used when model.position_embedding=fope."""

    sigma: float = 0.3  # coefficient init gain (paper: 0.3 / 0.4 / 0.6 for 60M / 180M / 1.2B)
    floor_ratio: float = 1.0  # rho: frequencies below rho*2*pi/L become zero (0 = no floor)
    train_seq_len: Optional[int] = None  # L of the floor; None = train.seq_length (then saved)
    learnable: bool = False  # train the coefficients (the reference keeps them frozen)
    zero_freq_sin: float = 1.0  # sin table value of zero-frequency pairs (reference 1, ports 0)
    d_out: Optional[int] = None  # output frequencies (None = min(D_in, d_r // 4))
    shared_across_layers: bool = False  # one coefficient set shared by every layer
    interleaved: bool = False  # rotate pairs (2j, 2j+1) instead of halves
    expand_on_extension: bool = False  # grow coefficients when train_seq_len grows (x+FoPE)
    seed: Optional[int] = None  # coefficient seed; None = run.seed


@dataclass
class PositionConfig:
    """How q/k are encoded (``fusion``) and frequency scaling for length extension (x+YaRN,
    x+PI), applied before the FoPE floor."""

    fusion: Literal["auto", "triton", "torch"] = "auto"  # q/k apply: auto = triton on CUDA
    scaling: Literal["none", "yarn", "pi"] = "none"  # frequency scaling applied before FoPE
    factor: float = 1.0  # scaling factor (> 1 when scaling is on)
    original_max_position_embeddings: Optional[int] = None  # None = fope.train_seq_len
    beta_fast: float = 32.0  # YaRN ramp: fast boundary (rotations)
    beta_slow: float = 1.0  # YaRN ramp: slow boundary (rotations)
    mscale: float = 1.0  # YaRN attention temperature scale
    mscale_all_dim: float = 0.0  # YaRN mscale_all_dim (0 = off)


@dataclass
class ParallelConfig:
    """Parallel degrees; dp is derived: world / (tp * cp * ulysses * pp)."""

    tp: int = 1  # tensor-parallel degree
    sp: bool = False  # megatron sequence parallel (needs tp > 1)
    cp: int = 1  # context-parallel degree (load-balanced chunks)
    ulysses: int = 1  # DeepSpeed-Ulysses sequence-parallel degree
    pp: int = 1  # pipeline-parallel degree (only 1 is supported)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO engine settings."""

    zero_stage: int = 0  # ZeRO stage 0, 1, 2 or 3
    config: Optional[str] = None  # DeepSpeed JSON (None = configs/deepspeed/zero{stage}.json)
    offload: bool = False  # ZeRO-3 CPU offload of params and optimizer (zero3_offload.json)


@dataclass
class DistConfig:
    """torch.distributed settings."""

    timeout_minutes: float = 30.0  # collective timeout: a rank that died ends the job after this


@dataclass
class DataConfig:
    """Training data: megatron IndexedDataset prefixes or the built-in synthetic corpus."""

    path: list[Union[float, str]] = field(default_factory=list)  # [prefix] or [w1, p1, w2, p2]
    split: str = "98,2,0"  # train,valid,test weights
    synthetic: bool = False  # generate the built-in corpus into the run dir and train on it
    tokenizer: str = "byte"  # 'byte' or a local Hugging Face tokenizer dir
    num_workers: int = 2  # DataLoader workers per rank
    passkey_fraction: float = 0.0  # share of train samples replaced by passkey documents


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
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
        sections = [f.name for f in dataclasses.fields(cls)]
        for name in raw:
            if name not in sections:
                raise ConfigError(unknown_message(f"section {name!r}", str(name), sections))
        values = {}
        for name, section_cls in _hints(cls).items():
            section_raw = raw.get(name) or {}
            if not isinstance(section_raw, dict):
                raise ConfigError(
                    f"section {name!r} must be a mapping of keys, got {section_raw!r}"
                )
            hints = _hints(section_cls)
            kwargs = {}
            for key, value in section_raw.items():
                if key not in hints:
                    where = f"key '{name}.{key}'"
                    raise ConfigError(
                        unknown_message(where, str(key), list(hints), f" in {name!r}")
                    )
                kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
            values[name] = section_cls(**kwargs)
        return cls(**values)

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
        dims = self.parallel_dims(world_size)
        _check_sections(self)
        _check_layout(self, dims)
        _check_fusion(self)
        return dims


def _check_fusion(cfg: Config) -> None:
    from fope_megatron.fope.fusion import FusionError, resolve_fusion

    try:
        resolve_fusion(cfg.position.fusion, cfg.model.position_embedding)
    except FusionError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``section.key=value`` overrides.

    Override values are parsed with ``yaml.safe_load`` (``true``, ``1e-3``, ``[128,256]``,
    ``null``). The result is resolved (see ``Config.resolve``) but not validated.

    Raises:
        ConfigError: missing file, malformed override, unknown key or wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"override {item!r} must look like section.key=value (e.g. train.steps=100)"
            )
        section, name = parts
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(
                f"section {section!r} must be a mapping of keys, got {raw[section]!r}"
            )
        raw[section][name] = value
    return Config.from_dict(raw).resolve()


def check_data(config: Config) -> list[str]:
    """Check that every ``data.path`` prefix has its ``.bin`` and ``.idx``; returns the prefixes.

    With ``data.synthetic`` the corpus is generated into the run dir later, so nothing is
    checked and the list is empty.

    Raises:
        ConfigError: no data given, or a missing file (naming the path).
    """
    if config.data.synthetic:
        return []
    if not config.data.path:
        _fail("data.path", [], "give [prefix] or [w1, prefix1, ...], or set data.synthetic=true")
    prefixes = _blend_prefixes(config.data.path)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(
                    f"data.path: {prefix + suffix!r} does not exist; give the prefix of a "
                    "preprocessed dataset (fope-preprocess writes PREFIX.bin and PREFIX.idx) "
                    "or set data.synthetic=true"
                )
    return prefixes


def check_vocab(config: Config, tokenizer_vocab_size: int) -> None:
    """``model.vocab_size`` must hold every token id of the tokenizer."""
    if config.model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the vocab of tokenizer "
            f"{config.data.tokenizer!r} ({tokenizer_vocab_size}); set model.vocab_size >= "
            f"{tokenizer_vocab_size}"
        )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ----------------------------------------------------------------------------- validation


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _bounds(c: Config, keys: str, lo: float, hi: float | None = None, strict: bool = False) -> None:
    """Each of the space-separated ``keys`` must be >= lo (> lo if strict) and < hi; None skips."""
    for key in keys.split():
        section, name = key.split(".")
        v = getattr(getattr(c, section), name)
        if v is not None and (v < lo or (strict and v == lo) or (hi is not None and v >= hi)):
            span = f"> {lo}" if strict else f">= {lo}"
            _fail(key, v, span + (f" and < {hi}" if hi is not None else ""))


def _check_sections(c: Config) -> None:
    """Per-section ranges that do not depend on the parallel layout."""
    _bounds(c, "run.log_interval train.steps train.micro_batch_size train.global_batch_size", 1)
    _bounds(c, "train.seq_length train.save_interval train.eval_iters fope.train_seq_len", 1)
    _bounds(c, "model.num_layers model.hidden_size model.num_attention_heads", 1)
    _bounds(c, "model.num_query_groups model.ffn_hidden_size model.vocab_size fope.d_out", 1)
    _bounds(c, "model.make_vocab_size_divisible_by model.max_position_embeddings", 1)
    _bounds(c, "position.original_max_position_embeddings", 1)
    _bounds(c, "train.keep_last train.eval_interval train.warmup_steps train.exit_at_step", 0)
    _bounds(c, "train.weight_decay train.clip_grad train.min_lr data.num_workers", 0)
    _bounds(c, "fope.sigma fope.floor_ratio", 0)
    _bounds(c, "train.max_consecutive_skips train.loss_spike_window", 1)
    _bounds(c, "dist.timeout_minutes", 0, strict=True)
    if not (c.train.loss_spike == 0 or c.train.loss_spike > 1):
        _fail("train.loss_spike", c.train.loss_spike, "must be 0 (off) or > 1 (k x median)")
    _bounds(c, "train.lr train.adam_eps model.init_method_std", 0, strict=True)
    _bounds(c, "model.rotary_base", 1, strict=True)
    _bounds(c, "train.adam_beta1 train.adam_beta2 model.attention_dropout", 0, 1)
    _bounds(c, "model.hidden_dropout", 0, 1)
    if not 0 < c.model.rotary_percent <= 1:
        _fail("model.rotary_percent", c.model.rotary_percent, "must be in (0, 1]")
    t = c.train
    if t.min_lr > t.lr:
        _fail("train.min_lr", t.min_lr, f"must be <= train.lr={t.lr}")
    if t.warmup_steps > t.steps:
        _fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
    if t.exit_at_step and t.exit_at_step > t.steps:
        _fail("train.exit_at_step", t.exit_at_step, f"must be <= train.steps={t.steps} or 0/null")
    if any(n < 1 for n in t.eval_lengths):
        _fail("train.eval_lengths", t.eval_lengths, "every length must be >= 1")
    for key in ("resume", "init_from"):
        value = getattr(t, key)
        if value not in (None, "auto", "none") and not Path(value).exists():
            _fail(f"train.{key}", value, "give 'auto', 'none' or an existing checkpoint path")
    if t.init_from is not None and t.resume not in ("auto", "none"):
        _fail("train.init_from", t.init_from, f"cannot be combined with train.resume={t.resume!r}")
    if c.fope.zero_freq_sin not in (0.0, 1.0):
        _fail("fope.zero_freq_sin", c.fope.zero_freq_sin, "must be 1 (reference) or 0")
    p = c.position
    if p.scaling == "none" and p.factor != 1.0:
        _fail("position.factor", p.factor, "has no effect with position.scaling='none'; use 1")
    if p.scaling != "none" and c.model.position_embedding == "none":
        _fail("position.scaling", p.scaling, "needs model.position_embedding 'fope' or 'rope'")
    if p.scaling != "none" and p.factor <= 1.0:
        _fail("position.factor", p.factor, f"must be > 1 with position.scaling={p.scaling!r}")
    if p.scaling == "yarn" and p.beta_fast <= p.beta_slow:
        _fail("position.beta_fast", p.beta_fast, f"must be > position.beta_slow={p.beta_slow}")
    _check_deepspeed(c)
    _check_data_section(c)
    from ..model.recompute import check_recompute

    check_recompute(c)


def _check_deepspeed(c: Config) -> None:
    d = c.deepspeed
    if d.zero_stage not in (0, 1, 2, 3):
        _fail("deepspeed.zero_stage", d.zero_stage, "allowed: 0, 1, 2, 3")
    if d.offload and d.zero_stage != 3 and d.config is None:
        msg = "the shipped offload JSON is ZeRO-3: set deepspeed.zero_stage=3 or deepspeed.config"
        _fail("deepspeed.offload", d.offload, f"{msg} (zero_stage={d.zero_stage})")
    path = c.deepspeed_json()
    if not path.is_file():
        _fail("deepspeed.config", str(path), "must be an existing DeepSpeed JSON file")
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as err:
        _fail("deepspeed.config", str(path), f"is not valid JSON ({err})")


def _check_data_section(c: Config) -> None:
    d = c.data
    try:
        weights = [float(x) for x in d.split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        _fail("data.split", d.split, "give up to 3 non-negative weights 'train,valid,test'")
    if d.synthetic and d.path:
        _fail("data.path", d.path, "must be empty with data.synthetic=true (or set it false)")
    if not 0.0 <= d.passkey_fraction <= 1.0:
        _fail("data.passkey_fraction", d.passkey_fraction, "must be in [0, 1] (0: no passkey)")
    if d.path:
        _blend_prefixes(d.path)


def _blend_prefixes(path: list[float | str]) -> list[str]:
    """Prefixes of ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` (ConfigError otherwise)."""
    if len(path) == 1 and isinstance(path[0], str):
        return [path[0]]
    weights, prefixes = path[0::2], path[1::2]
    ok_weights = all(isinstance(w, (int, float)) and w > 0 for w in weights)
    if len(path) % 2 or not ok_weights or not all(isinstance(p, str) for p in prefixes):
        _fail("data.path", path, "give [prefix] or [w1, prefix1, w2, prefix2, ...], weights > 0")
    return list(prefixes)


def _check_layout(c: Config, dims: ParallelDims) -> None:
    """Head, group, batch and sequence divisibility for the parallel layout."""
    m, t, p = c.model, c.train, c.parallel
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if p.pp != 1:
        _fail("parallel.pp", p.pp, "only 1 is supported (pipeline parallelism is not built)")
    if m.make_vocab_size_divisible_by % p.tp:
        _fail(
            "model.make_vocab_size_divisible_by",
            m.make_vocab_size_divisible_by,
            f"must be divisible by parallel.tp={p.tp} (the padded vocab is split over tp)",
        )
    if p.sp and p.tp == 1:
        _fail("parallel.sp", p.sp, "needs parallel.tp > 1 (sequence parallel splits over tp)")
    if c.deepspeed.zero_stage == 3 and p.tp > 1:
        raise ConfigError(
            f"deepspeed.zero_stage=3 with parallel.tp={p.tp} is not supported (not tested: ZeRO-3 "
            "partitions parameters without knowing megatron's tensor-parallel shards); use "
            "deepspeed.zero_stage 0, 1 or 2 with parallel.tp > 1, or parallel.tp=1 with ZeRO-3"
        )
    if m.hidden_size % heads:
        _fail("model.hidden_size", m.hidden_size, f"must be divisible by heads={heads}")
    head_dim = m.hidden_size // heads
    rotated = int(head_dim * m.rotary_percent)  # megatron-core's rotary dim rule
    if m.position_embedding != "none" and (rotated < 2 or rotated % 2):
        msg = f"int(head_dim * rotary_percent) = int({head_dim} * {m.rotary_percent}) = {rotated}"
        _fail("model.rotary_percent", m.rotary_percent, f"{msg} must be even and >= 2")
    if m.position_embedding == "fope" and c.fope.d_out and c.fope.d_out > rotated // 2:
        _fail("fope.d_out", c.fope.d_out, f"must be <= rotated dims / 2 = {rotated // 2}")
    if heads % groups:
        _fail("model.num_query_groups", groups, f"must divide num_attention_heads={heads}")
    if heads % p.tp:
        _fail("model.num_attention_heads", heads, f"must be divisible by parallel.tp={p.tp}")
    if groups % p.tp and p.tp % groups:
        msg = f"must be divisible by parallel.tp={p.tp} or divide it (groups are replicated)"
        _fail("model.num_query_groups", groups, msg)
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be divisible by "
            f"train.micro_batch_size * dp = {t.micro_batch_size} * {dims.dp} = {per_step}"
        )
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        _fail("train.seq_length", t.seq_length, f"must be divisible by 2*parallel.cp = {2 * p.cp}")
    if t.seq_length % p.ulysses:
        _fail(
            "train.seq_length", t.seq_length, f"must be divisible by parallel.ulysses={p.ulysses}"
        )
    if (heads // p.tp) % p.ulysses:
        msg = f"heads per tp rank {heads}/{p.tp} must be divisible by parallel.ulysses={p.ulysses}"
        _fail("model.num_attention_heads", heads, msg)
    if p.ulysses > 1 and (max(groups // p.tp, 1)) % p.ulysses:
        msg = (
            f"KV groups per tp rank max({groups}/{p.tp}, 1) must be divisible by "
            f"parallel.ulysses={p.ulysses} (Ulysses' all-to-all splits key/value heads too)"
        )
        _fail("model.num_query_groups", m.num_query_groups, msg)
    local = t.seq_length // (p.cp * p.ulysses)
    if p.sp and local % p.tp:
        msg = f"seq_length/(cp*ulysses) = {local} must be divisible by parallel.tp={p.tp} with sp"
        _fail("train.seq_length", t.seq_length, msg)
