"""Config validation: every check that needs no process group (``Config.validate(world)``), and
the data / tokenizer checks (``check_data``, ``check_vocab``). Each failure raises a
``ConfigError`` naming the key, the value given and what is allowed.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from fope_megatron.errors import ConfigError
from fope_megatron.parallel.dims import ParallelDims

from .schema import Config


def validate_config(c: Config, world_size: int) -> ParallelDims:
    """``Config.validate``: every check that needs no process group; returns the run's
    ``ParallelDims``.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    dims = c.parallel_dims(world_size)
    _check_sections(c)
    _check_layout(c, dims)
    _check_fusion(c)
    return dims


def _check_fusion(cfg: Config) -> None:
    from fope_megatron.fope.fusion import FusionError, resolve_fusion

    try:
        resolve_fusion(cfg.position.fusion, cfg.model.position_embedding)
    except FusionError as err:
        raise ConfigError(str(err)) from None


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
    check_recompute(c)


def check_recompute(cfg: Config) -> None:
    """Raise ``ConfigError`` for recompute settings megatron would reject or ignore (what they
    mean: ``model/recompute.py``).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    t, layers = cfg.train, cfg.model.num_layers
    n = t.recompute_num_layers
    if t.recompute != "full":
        for key, value, default in (
            ("recompute_num_layers", n, None),
            ("recompute_method", t.recompute_method, "uniform"),
        ):
            if value != default:
                raise ConfigError(
                    f"train.{key}={value!r} has no effect with train.recompute={t.recompute!r}; "
                    f"set train.recompute=full or leave train.{key} unset"
                )
        return
    if n is not None and not 1 <= n <= layers:
        raise ConfigError(
            f"train.recompute_num_layers={n} is out of range: must be between 1 and "
            f"model.num_layers={layers} (or null for the default)"
        )
    if n is not None and t.recompute_method == "uniform" and layers % n:
        raise ConfigError(
            f"train.recompute_num_layers={n} must divide model.num_layers={layers} with "
            "train.recompute_method=uniform (layers are recomputed in chunks of that many); "
            "pick a divisor or use train.recompute_method=block"
        )


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
    heads, groups = m.num_attention_heads, m.kv_groups
    for key, value in (("pp", p.pp), ("vpp", p.vpp)):
        if value != 1:
            # build_gpt_chunks builds a stage's chunks; the trainer does not run them yet
            _fail(f"parallel.{key}", value, "only 1 is supported (the trainer has no pipeline)")
    if m.make_vocab_size_divisible_by % p.tp:
        _fail(
            "model.make_vocab_size_divisible_by",
            m.make_vocab_size_divisible_by,
            f"must be divisible by parallel.tp={p.tp} (the padded vocab is split over tp)",
        )
    if p.sp and p.tp == 1:
        _fail("parallel.sp", p.sp, "needs parallel.tp > 1 (sequence parallel splits over tp)")
    if c.deepspeed.offload and p.tp > 1:
        raise ConfigError(
            f"deepspeed.offload=true with parallel.tp={p.tp} is not supported (ZeRO-3's CPU "
            "offload is not tested with tensor parallelism); use deepspeed.offload=false "
            "(ZeRO-3 with parallel.tp > 1 works) or parallel.tp=1 with offload"
        )
    if m.hidden_size % heads:
        _fail("model.hidden_size", m.hidden_size, f"must be divisible by heads={heads}")
    head_dim, rotated = m.head_dim, m.rotary_dim
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
