"""DeepSpeed 0.19.8's universal-checkpoint converter, run by many ranks at once, on megatron-core
models, into a checkpoint both stage families load.

``ds_to_universal.main`` converts on one host (a process pool). Its two passes are independent
work items: extracting each (pp, tp, dp) rank's ZeRO fragments, then merging each parameter's
fragments over dp and tp. Here every rank of the resuming job runs its share of each pass with
DeepSpeed's own pass functions (``extract_zero_shards``, ``merge_tp_slices``, and the ZeRO-3
twins), between two collectives; rank 0 then writes the small common files. What differs from
``main``, and why:

* megatron-core's linear layers put ``<layer>._extra_state = None`` into their state dict
  (Transformer Engine's slot, empty without TE); ``main`` writes every module entry ZeRO kept
  no fragment for with ``tensor.float()`` and dies on those. They are skipped here.
* ``main`` writes the output in the source stage's form only. A universal load reads the
  model-states files for metadata (the weights come from ``zero/``) but globs
  ``mp_rank_*_model_states.pt`` under ZeRO 0-2 and ``zero_pp_rank_0_mp_rank_*`` under ZeRO-3;
  the ZeRO 1-2 loader reads ``ds_version``, ``param_groups`` and each parameter's ``step.pt``
  and ``{"param": tensor of its shape}``; the ZeRO-3 loader reads the step and the groups from
  the torch optimizer's state dict (``optimizer_state_dict``). Both forms are written here.
* After a universal load under ZeRO-3, ``restore_zero3_groups`` undoes two slips of its loader.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
from pathlib import Path

import torch


def _sync_alone(obj):
    return [obj]


def ds_to_universal(input_folder: str, output_folder: str, rank: int = 0, world: int = 1,
                    sync=_sync_alone) -> None:  # fmt: skip
    """Convert one tag's ZeRO 1-3 files in ``input_folder`` to a universal checkpoint in
    ``output_folder`` (``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``, the model-states
    files, ``zero/optimizer_state.pt``). Called by every one of ``world`` ranks with its
    ``rank``; ``sync(obj)`` is a collective returning every rank's ``obj`` (an all-gather)."""
    from deepspeed.checkpoint import ds_to_universal as ds

    zero3 = ds._filter_zero3_optim_files(ds._get_optim_files(input_folder))
    convert = _zero3 if zero3 and ds._get_zero_stage(zero3) > 2 else _zero12
    convert(ds, input_folder, output_folder, rank, world, sync)
    if rank == 0:
        _alias_model_states(Path(output_folder))
    sync(None)


def _zero12(ds, inp: str, out: str, rank: int, world: int, sync) -> None:
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO as UC_INFO

    ckpt = ds.DeepSpeedCheckpoint(inp)
    ds._check_for_required_state(ckpt)
    by_tp, _, _ = ds._aggregate_autoep_zero12_metadata(ckpt.model_state_metadata)
    shapes = ds._group_per_tp_shapes(by_tp, ckpt.pp_degree, ckpt.tp_degree)
    temp, zero = os.path.join(out, "tmp"), os.path.join(out, "zero")
    grid = itertools.product(range(ckpt.pp_degree), range(ckpt.tp_degree), range(ckpt.dp_degree))
    for item in list(grid)[rank::world]:
        ds.extract_zero_shards(temp, ckpt, item)
    sync(None)
    info = ckpt.get_checkpoint_info(UC_INFO)
    mine = sorted(shapes.items())[rank::world]
    unused = [set(ds.merge_tp_slices(info, zero, temp, ckpt.tp_degree, item)) for item in mine]
    unused = [s for part in sync(unused) for s in part]
    if unused and set.intersection(*unused):  # a pattern no parameter matched
        raise RuntimeError(f"{inp}: universal_checkpoint_info patterns {set.intersection(*unused)}"
                           " match no parameter")  # fmt: skip
    if rank != 0:
        return
    for model_file in ckpt.mp_rank_files:  # parameters ZeRO kept no fragment of
        module = torch.load(model_file, map_location="cpu", weights_only=False).get("module")
        for name, tensor in (module or {}).items():
            fp32 = Path(zero) / name / "fp32.pt"
            if tensor is not None and not fp32.is_file():
                fp32.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"param": tensor.float()}, fp32)
    ds._save_optimizer_state(argparse.Namespace(output_folder=out), ckpt)
    shutil.rmtree(temp, ignore_errors=True)
    for f in ckpt.mp_rank_files:
        shutil.copy2(f, out)
    path = Path(zero) / "optimizer_state.pt"  # the ZeRO-3 loader's form beside ZeRO 1-2's
    sd = torch.load(path, map_location="cpu", weights_only=False)
    step = torch.load(next(p for p in Path(zero).glob("*/step.pt")), weights_only=False)
    sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: sd[PARAM_GROUPS]}
    torch.save(sd, path)


def _zero3(ds, inp: str, out: str, rank: int, world: int, sync) -> None:
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM
    from deepspeed.git_version_info import version

    model_files = ds._get_zero3_model_state_files(inp)
    optim_files = ds._filter_zero3_optim_files(ds._get_optim_files(inp))
    model_grid, tp, dp = ds._build_zero3_rank_grid(model_files)
    optim_grid, _, _ = ds._build_zero3_rank_grid(optim_files)
    if tp > 1:
        raise NotImplementedError(f"{inp}: ZeRO-3 with tensor parallelism is not converted")
    shapes_grid = [ds._parse_model_states_stage3([model_grid[0][0]])]
    temp, zero = os.path.join(out, "tmp"), os.path.join(out, "zero")
    for item in [(0, d) for d in range(dp)][rank::world]:
        ds.extract_zero_shards_stage3(optim_grid, shapes_grid, dp, temp, item)
    sync(None)
    shapes = {k: v for group in shapes_grid[0] for k, v in group.items()}
    for name in sorted(shapes)[rank::world]:
        ds.merge_zero3_slices(dp, zero, temp, name)
        for file in (Path(zero) / name).glob("*.pt"):  # the ZeRO 1-2 loader's form
            flat = torch.load(file, map_location="cpu", weights_only=False)
            torch.save({PARAM: flat.view(shapes[name])}, file)
    sync(None)
    if rank != 0:
        return
    ds._save_optimizer_state_stage3(argparse.Namespace(output_folder=out), optim_files)
    shutil.rmtree(temp, ignore_errors=True)
    for f in model_files:
        shutil.copy2(f, out)
    path = Path(zero) / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd.setdefault(DS_VERSION, version)
    torch.save(sd, path)
    step = sd[OPTIMIZER_STATE_DICT]["state"][0]["step"]
    for name in shapes:
        torch.save(step, Path(zero) / name / "step.pt")


def _alias_model_states(folder: Path) -> None:
    """Both stage families' names for the model-states files (hard links)."""
    for path in sorted(folder.glob("*mp_rank_*_model_states.pt")):
        prefix, mp = path.name.split("mp_rank_")
        if prefix not in ("", "zero_pp_rank_0_"):
            continue  # another ZeRO-3 data-parallel rank's copy of the same metadata
        for alias in (f"mp_rank_{mp}", f"zero_pp_rank_0_mp_rank_{mp}"):
            if not (folder / alias).exists():
                os.link(path, folder / alias)


def restore_zero3_groups(engine, folder: Path) -> None:
    """After a universal load under ZeRO-3, undo two slips of DeepSpeed 0.19.8's ZeRO-3 loader:
    it copies the first parameter group's hyperparameters into every group ("generally the
    same"), so the no-weight-decay group (norms, biases, FoPE coefficients) would resume with
    weight decay; and it gives every sub-group the same ``step`` tensor, which torch's Adam
    increments in place once per sub-group, so the later groups' bias correction would run
    ahead (measured: the losses after the resume 3.5e-5 off the straight run's)."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    sd = torch.load(Path(folder) / "zero" / "optimizer_state.pt", weights_only=False)
    groups = engine.optimizer.optimizer.param_groups
    for group, saved in zip(groups, sd[PARAM_GROUPS], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
