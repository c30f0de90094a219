"""``fope-train --config PATH [key=value ...]`` (also ``python -m fope_megatron.train``).

Works unchanged under torchrun, the deepspeed launcher and srun. Config errors are reported
before any process group starts.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fope-train", description=__doc__)
    parser.add_argument("--config", help="YAML config (defaults apply to missing keys)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and layout for WORLD_SIZE ranks, print them, and exit",
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config key with its type, default and documentation, and exit",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    from ..compat.warnings import add_verbose_flag, quiet_known_warnings

    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    quiet_known_warnings(args.verbose)
    if args.help_config:  # the schema only: no config file, no process group
        from ..config import help_text

        print(help_text())
        return 0

    from ..config import ConfigError, load_config
    from .preflight import env_world_size, preflight

    try:
        cfg = load_config(args.config, args.overrides)
        dims = preflight(cfg, env_world_size())
    except (ConfigError, FileNotFoundError) as e:
        print(f"fope-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"config OK for world_size={env_world_size()}: {dims}")
        return 0
    from ..checkpoint.manifest import CheckpointDamaged
    from .trainer import train

    try:
        return train(cfg)
    except CheckpointDamaged as e:  # found by the ranks' shared checksums: every rank stops
        print(f"fope-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
