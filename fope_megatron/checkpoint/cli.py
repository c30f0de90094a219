"""``fope-ckpt``: checkpoint tools that need no process group.

- ``fope-ckpt convert --run RUN_DIR [--checkpoint step_N]``: the universal checkpoint a resume
  on another layout loads (made automatically by such a resume; ahead of the job here, for a
  model whose conversion should not run inside the job; under ``torchrun --nproc-per-node=N
  -m fope_megatron.checkpoint.cli convert --run-dir RUN_DIR`` the N processes share the work
  over a gloo group).
- ``fope-ckpt consolidate --run RUN_DIR --out FILE``: the full (TP=1) model state as one file
  (``reshard.FULL_STATE_FORMAT``, what ``model_full.pt`` held), joined from the TP ranks' files.
- ``fope-ckpt verify --run RUN_DIR``: every file of a checkpoint against its manifest.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ..compat.warnings import add_verbose_flag, quiet_known_warnings

    parser = argparse.ArgumentParser(prog="fope-ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("convert", "make the universal checkpoint (resume on another layout)"),
                       ("consolidate", "write the full (TP=1) model state to one file"),
                       ("verify", "check every file against the manifest")):  # fmt: skip
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--run", "--run-dir", dest="run", required=True,
                         help="the training run dir (--run-dir under torchrun, which reads "
                         "--run as its own --run-path)")  # fmt: skip
        cmd.add_argument("--checkpoint", default="latest", help="latest, step_N or a folder")
        if name == "consolidate":
            cmd.add_argument("--out", required=True, help="the file to write")
    args = parser.parse_args(argv)
    quiet_known_warnings(args.verbose)
    import logging

    import torch

    from . import manifest, universal
    from .full_state import checkpoint_full_state
    from .reshard import FULL_STATE_FORMAT
    from .store import resolve_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = resolve_checkpoint(args.run, args.checkpoint)  # verified against its manifest
        if args.command == "convert":
            print(_convert(path, universal))
        elif args.command == "consolidate":
            state = {"format": FULL_STATE_FORMAT, "tensor_parallel_size": 1,
                     "state_dict": checkpoint_full_state(path)}  # fmt: skip
            torch.save(state, args.out)
            print(args.out)
        else:
            files = len(manifest.listed(path) or {})
            print(f"{path}: {files} files match the manifest")
    except (FileNotFoundError, manifest.CheckpointDamaged) as err:
        print(f"fope-ckpt: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def _convert(path, universal):
    """``universal.convert``, shared by the processes of a torchrun start (gloo, no GPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    out = universal.convert(path)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
