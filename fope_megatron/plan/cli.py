"""fope-plan: parameter count, per-GPU memory and a fits / does-not-fit verdict, without a GPU.

    fope-plan --config configs/llama_7b_fope.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gb 80
    fope-plan --config configs/fope_1b2.yaml deepspeed.zero_stage=2 train.micro_batch_size=16 --json

The config and layout are validated first (``Config.validate(world)``), so an impossible layout
prints the config error. ``--nodes``/``--gpus-per-node``/``--gpu-memory-gb`` default to the
config's ``# fope-plan: nodes=N gpus_per_node=G gpu_memory_gb=M`` header line. Exit status: 0 fits,
1 does not fit, 2 configuration error. How parameters and memory are counted: ``params.py``,
``memory.py`` and ``activations.py`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..compat.warnings import add_verbose_flag, quiet_known_warnings
from ..config import ConfigError
from .memory import DEFAULT_OVERHEAD_GB, MEMORY_TERMS, Layout, Plan
from .suggest import plan

HEADER = re.compile(r"^#\s*fope-plan:\s*(.*)$", re.MULTILINE)
LAYOUT_KEYS = ("nodes", "gpus_per_node", "gpu_memory_gb")


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
