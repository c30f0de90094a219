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
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    from ..compat.warnings import quiet_known_warnings

    quiet_known_warnings()

    from ..config import ConfigError, load_config
    from .trainer import env_world_size, preflight

    try:
        cfg = load_config(args.config, args.overrides)
        dims = preflight(cfg, env_world_size())
    except (ConfigError, FileNotFoundError) as e:
        print(f"fope-train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"config OK for world_size={env_world_size()}: {dims}")
        return 0
    from .trainer import train

    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
