"""The layout a checkpoint was written with (``layout.json``) and what a resume may change.

Every checkpoint records its parallel layout (world, dp, DeepSpeed's data-parallel group, tp, cp,
ulysses, pp, ZeRO stage), the model's shape, the FoPE shapes and the dtype. Preflight compares
it with the run that resumes, before any process group starts:

* a change the checkpoint engine reshards is logged ``old -> new``: under ZeRO 1-3 the data
  parallel size (and with it cp / ulysses) and the stage (1, 2, 3 in any direction), and under
  ZeRO 1-2 the tensor parallel size, through DeepSpeed's universal checkpoint
  (``universal.py``); under ZeRO-0, whose optimizer state is replicated over data parallelism,
  the data parallel size;
* a change it cannot do is a ``ConfigError`` naming every key: a changed model (hidden size,
  heads, KV groups, layers, vocab, FoPE floor and shapes) can never resume; a changed pp or
  dtype, a tp change with ZeRO-0 or ZeRO-3 on either side (DeepSpeed's ZeRO-3 universal loader
  slices only AutoTP's layouts, not megatron-core's), a data-parallel or stage change where a
  side runs ZeRO-3 at tp > 1 (DeepSpeed 0.19.8 converts ZeRO-3 checkpoints to universal ones
  only at tp 1) or a move to or from ZeRO-0 is not resharded here: resume at the saved values
  or start from the weights instead
  (``train.init_from``, any layout, fresh optimizer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("fope")

LAYOUT_FILE = "layout.json"
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
              "position_embedding", "swiglu", "normalization", "add_bias_linear",
              "untie_embeddings", "rotary_percent", "rotary_base")  # fmt: skip
DATA_PARALLEL = ("world_size", "dp", "dp_group", "cp", "ulysses")
"""Changes of the data-parallel partitioning only (tp, pp and the model fixed)."""
UNIVERSAL = ("dp_group", "tp", "zero_stage")
"""Changes DeepSpeed loads only from a universal checkpoint (ZeRO 1-3)."""


def layout_of(cfg, world_size: int) -> dict:
    """The layout record of ``cfg`` run on ``world_size`` ranks."""
    from ..model.builder import compute_dtype

    dims = cfg.validate(world_size)
    return {
        "version": 1,
        "world_size": world_size,
        "dp": dims.dp,
        "dp_group": dims.dp_shard,
        "tp": cfg.parallel.tp,
        "cp": cfg.parallel.cp,
        "ulysses": cfg.parallel.ulysses,
        "pp": cfg.parallel.pp,
        "zero_stage": cfg.deepspeed.zero_stage,
        "dtype": str(compute_dtype(cfg)).removeprefix("torch."),
        "model": {
            **{k: getattr(cfg.model, k) for k in MODEL_KEYS},
            "num_query_groups": cfg.model.kv_groups,
            "ffn_hidden_size": cfg.model.ffn_size,
        },
        "fope": _fope_shapes(cfg) if cfg.model.position_embedding == "fope" else {},
    }


def _fope_shapes(cfg) -> dict:
    """The FoPE settings that decide the coefficients (their shapes, and their values where they
    are frozen buffers, which a universal checkpoint does not carry: the resuming run rebuilds
    them from these)."""
    from ..fope.math import base_frequencies, default_d_out, floor_frequencies

    f = cfg.to_fope_config()
    w = base_frequencies(f.rotary_dim, f.rotary_base)
    _, d_in = floor_frequencies(w, f.train_seq_len, f.floor_ratio)
    d_out = default_d_out(d_in, f.rotary_dim) if f.d_out is None else min(f.d_out, d_in)
    kept = ("train_seq_len", "floor_ratio", "sigma", "seed", "learnable", "zero_freq_sin",
            "interleaved", "shared_across_layers")  # fmt: skip
    return {**{k: getattr(f, k) for k in kept}, "d_in": d_in, "d_out": d_out}


def write(cfg, world_size: int, folder: Path, split: dict | None = None) -> None:
    """``layout.json``; ``split``: the model's TP split dims (``reshard.split_dims``), with
    which a reader joins the TP ranks' model files without a process group."""
    record = layout_of(cfg, world_size)
    if split is not None:
        record["tensor_parallel"] = {k: list(v) for k, v in sorted(split.items())}
    (Path(folder) / LAYOUT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read(folder: Path) -> dict | None:
    """The checkpoint's layout record, or None for checkpoints written before layouts existed."""
    path = Path(folder) / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _flat(layout: dict) -> dict:
    out = {}
    for key, value in layout.items():
        if key == "tensor_parallel":
            continue  # follows from the model and tp
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "version":
            out[key] = value
    return out


_CONFIG_KEY = {"tp": "parallel.tp", "pp": "parallel.pp", "cp": "parallel.cp",
               "ulysses": "parallel.ulysses", "zero_stage": "deepspeed.zero_stage",
               "dtype": "train.precision"}  # fmt: skip


def compare(saved: dict, now: dict) -> tuple[list, list]:
    """``(resharded, refused)`` changes, each a list of ``(key, saved, now)``."""
    old, new = _flat(saved), _flat(now)
    changed = [(k, old.get(k), new.get(k)) for k in new if k in old and old[k] != new[k]]
    stages = {old.get("zero_stage"), new.get("zero_stage")}
    # DeepSpeed converts and loads ZeRO-3 universal checkpoints only at tp 1
    zero3_tp = any(x.get("zero_stage") == 3 and x.get("tp", 1) > 1 for x in (old, new))
    reshard, refused = [], []
    for key, a, b in changed:
        zero = (
            stages <= {1, 2, 3} and not zero3_tp and (key in DATA_PARALLEL or key == "zero_stage")
        )
        tp = stages <= {1, 2} and key == "tp"
        if zero or tp or (stages == {0} and key in DATA_PARALLEL):
            reshard.append((key, a, b))
        else:
            refused.append((key, a, b))
    return reshard, refused


def needs_universal(reshard: list, zero_stage: int) -> bool:
    """Whether DeepSpeed must load these changes from a universal checkpoint (under ZeRO-0 the
    optimizer state is replicated: any data-parallel size loads it)."""
    return zero_stage in (1, 2, 3) and any(key in UNIVERSAL for key, _, _ in reshard)


def check(cfg, world_size: int, folder: Path) -> list:
    """Compare checkpoint ``folder``'s layout with this run's: log what is resharded, raise
    ``ConfigError`` naming every key that cannot change. Returns the resharded changes."""
    saved = read(folder)
    if saved is None:
        log.warning("%s has no %s (written before layouts were recorded): resume at the layout "
                    "it was saved with", folder, LAYOUT_FILE)  # fmt: skip
        return []
    reshard, refused = compare(saved, layout_of(cfg, world_size))
    if refused:
        model = [k for k, _, _ in refused if k.split(".")[0] in ("model", "fope")]
        listed = ", ".join(
            f"{_CONFIG_KEY.get(k, k)}: checkpoint {a!r}, now {b!r}" for k, a, b in refused
        )
        why = (
            "a checkpoint of another model cannot be resumed; start from its weights with "
            f"train.init_from={folder} (fope.expand_on_extension=true grows the FoPE "
            "coefficients for a longer fope.train_seq_len)"
            if model
            else "a resume reshards the data-parallel size and the ZeRO stage among 1, 2 and 3, "
            "tp under ZeRO 1-2, and the data-parallel size under ZeRO-0; not pp, the dtype, tp "
            "with ZeRO-0 or 3 on either side, the data-parallel size or the stage with ZeRO-3 "
            "and tp > 1 on either side, or moves to or from ZeRO-0; resume at the saved "
            "values, or start from the weights with "
            f"train.init_from={folder} (any layout, fresh optimizer and step)"
        )
        raise ConfigError(f"train.resume: {folder} cannot resume here ({listed}): {why}")
    for key, a, b in reshard:
        log.warning("resume: %s %r -> %r (resharded on load)", key, a, b)
    return reshard
