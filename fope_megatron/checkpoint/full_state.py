"""The unsharded (TP=1) model state of a checkpoint of any layout, and the run it belongs to.

Nothing is gathered at save: the full state is joined here, on the one process that needs it
(evaluation, export, ``train.init_from``), from DeepSpeed's own files. The model is
rebuilt from ``RUN_DIR/config.yaml`` with the *trained* FoPE floor (``fope.train_seq_len`` is
resolved and saved at training time, never recomputed from an evaluation length).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from . import store

FULL_MODEL_FILE = "model_full.pt"


def load_run_config(run_dir: str | Path):
    """The resolved ``Config`` a run was trained with (``RUN_DIR/config.yaml``)."""
    from ..config import Config  # the config schema; nothing of the training loop

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run must be a training run dir")
    return Config.from_dict(yaml.safe_load(path.read_text()))


def single_rank(cfg):
    """The same model laid out for one process."""
    parallel = dataclasses.replace(cfg.parallel, tp=1, sp=False, cp=1, ulysses=1)
    return dataclasses.replace(cfg, parallel=parallel)


def checkpoint_full_state(path: Path) -> dict:
    """The unsharded (TP=1) model state of a checkpoint folder of any layout, read on this
    process (nothing was gathered at save):

    - ZeRO 0-2: DeepSpeed's per-TP-rank model files (``mp_rank_XX_model_states.pt``), joined by
      the split dims ``layout.json`` records (``reshard.split_dims`` of the trained model);
    - ZeRO-3: DeepSpeed's zero_to_fp32 consolidation of the partitions (parameters, buffers),
      per TP rank, joined the same way;
    - ``model_full.pt`` of checkpoints written before: as it is.
    """
    from . import layout
    from .reshard import join_states

    path = Path(path)
    full = path / FULL_MODEL_FILE
    if full.is_file():
        return torch.load(full, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    split = (layout.read(path) or {}).get("tensor_parallel")
    split = {k: tuple(v) for k, v in (split or {}).items()}
    if any(path.glob("zero_pp_rank_*_model_states.pt")):
        return _zero3_full_state(path, split)
    files = sorted(path.glob("mp_rank_*_model_states.pt"), key=lambda p: int(p.name[8:10]))
    if not files:
        raise FileNotFoundError(
            f"{path} holds neither DeepSpeed's mp_rank_*_model_states.pt, ZeRO-3 partitions "
            f"nor {FULL_MODEL_FILE}"
        )
    if len(files) > 1 and not split:
        raise FileNotFoundError(f"{path}: {len(files)} TP ranks but no split dims in layout.json")
    # memory-mapped: each tensor is read from its file as it is joined (the host holds the
    # joined state, not the TP ranks' files besides it)
    states = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["module"]
              for f in files]  # fmt: skip
    state = join_states(states, split)
    return {k: v for k, v in state.items() if v is not None}  # megatron's empty _extra_state


def _zero3_full_state(path: Path, split: dict) -> dict:
    """ZeRO-3: DeepSpeed's zero_to_fp32 consolidation of each TP rank's partitions (the files
    ``*_mp_rank_<tp>_*``, seen through a folder of links, since zero_to_fp32 reads every file of
    a folder), joined over TP by ``split``."""
    import re
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .reshard import join_states

    def tp_rank(p: Path) -> int:
        return int(re.search(r"mp_rank_(\d+)", p.name).group(1))

    files = [p for p in path.glob("*zero_pp_rank_*_mp_rank_*_states.pt")]
    ranks = sorted({tp_rank(p) for p in files})
    if len(ranks) == 1:
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    if not split:
        raise FileNotFoundError(f"{path}: {len(ranks)} TP ranks but no split dims in layout.json")
    states = []
    for rank in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / path.name).mkdir()
            for p in files:
                if tp_rank(p) == rank:
                    (Path(tmp) / path.name / p.name).symlink_to(p.resolve())
            states.append(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name))
    return join_states(states, split)


def load_full_state(model: torch.nn.Module, state: dict, source: Path) -> None:
    """Load a full state into ``model`` (any TP layout); only ``_extra_state`` may be absent."""
    from .reshard import load_full_state_dict

    device = next(model.parameters()).device
    state = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    result = load_full_state_dict(model, state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source}: checkpoint does not match the model (missing {missing}, "
            f"unexpected {result.unexpected_keys})"
        )


def load_model(run_dir: str | Path, checkpoint: str = "latest"):
    """Returns ``(model, cfg, checkpoint_path)``; the TP=1 model is in eval mode on this process."""
    from ..model.builder import build_gpt
    from ..parallel.setup import ensure_accelerator, init_distributed, init_model_parallel

    ensure_accelerator()
    cfg = load_run_config(run_dir)
    path = store.resolve_checkpoint(run_dir, checkpoint)
    init_distributed()
    init_model_parallel(tp=1)
    model = build_gpt(single_rank(cfg)).eval()
    load_full_state(model, checkpoint_full_state(path), path)
    return model, cfg, path
