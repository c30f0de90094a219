"""Summarise a ``scripts/gpu_check.sh`` run: trainings side by side + the kernel benchmark.

    python -m fope_megatron.bench.gpu_report --out docs/results/gpu

Reads ``OUT/train_<name>/metrics.jsonl`` (fope_fused, fope_torch, rope_fused), ``OUT/bench.json``
and ``OUT/versions.txt``; writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``. Step times are
medians over the steps after the first ``--skip`` (compilation, autotuning, allocator warm-up).
Every number comes from those files; nothing is filled in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

RUNS = ("fope_fused", "fope_torch", "rope_fused")


def read_run(folder: Path, skip: int) -> dict | None:
    """Per-run summary from its metrics.jsonl (None when the run left none)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
    if not steps:
        return None
    timed = [r for r in steps if r["step"] > skip] or steps
    fusion = None
    cfg = folder / "config.yaml"
    if cfg.is_file():
        head = [ln for ln in cfg.read_text().splitlines() if ln.startswith("# resolved")]
        fusion = head[0].removeprefix("# resolved at start: ") if head else None
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "steps": len(steps),
        "fusion": fusion,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tflops": statistics.median(r["tflops"] for r in timed),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(r["memory_gb"] for r in steps),
        "losses": [round(r["loss"], 4) for r in steps[:10]],
        "final_loss": steps[-1]["loss"],
    }


def build_report(out: Path, skip: int) -> dict:
    runs = {name: read_run(out / f"train_{name}", skip) for name in RUNS}
    doc: dict = {"runs": runs}
    versions = out / "versions.txt"
    doc["versions"] = versions.read_text().strip() if versions.is_file() else None
    smi = out / "nvidia_smi.txt"
    doc["gpu"] = smi.read_text().strip() if smi.is_file() else None
    base = runs.get("rope_fused")
    if base:
        doc["step_time_vs_rope_fused"] = {
            n: r["step_time_s"] / base["step_time_s"] for n, r in runs.items() if r
        }
    bench = out / "bench.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        doc["bench"] = {
            "device": b.get("meta", {}).get("device"),
            "copy_GBps": b["copy_GBps"],
            "rows": [
                {
                    "seq": r["seq"],
                    "best_fused_rope": r.get("best_fused_rope"),
                    "fope_fused_over_best_rope": r.get("fope_fused_over_best_rope"),
                    "fope_torch_over_fused": r.get("fope_torch_over_fused"),
                    "fope_fused_pct_of_copy": r.get("fope_fused", {}).get("fwd_bwd_pct_of_copy"),
                }
                for r in b["results"]
            ],
        }
    return doc


def format_report(doc: dict, skip: int) -> str:
    lines = ["# GPU check", ""]
    lines += [f"GPU: {doc['gpu'] or 'unknown'}", "", "```", doc["versions"] or "", "```", ""]
    lines += [
        f"## Trainings (bf16; medians over steps > {skip})",
        "",
        "| run | fusion | step s | tokens/s | TFLOP/s | MFU | peak GiB | vs rope_fused | "
        "first losses |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    rel = doc.get("step_time_vs_rope_fused", {})
    for name, r in doc["runs"].items():
        if r is None:
            lines.append(f"| {name} | (no metrics: see train_{name}.log) |||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{rel[name]:.3f}x" if name in rel else "n/a"
        lines.append(
            f"| {name} | {r['fusion'] or '?'} | {r['step_time_s']:.4f} | {r['tokens_per_s']:.0f} "
            f"| {r['tflops']:.1f} | {mfu} | {r['peak_memory_gib']:.2f} | {ratio} | "
            f"{' '.join(f'{x:.3f}' for x in r['losses'][:5])} |"
        )
    if "bench" in doc:
        b = doc["bench"]
        lines += ["", f"## Kernel benchmark ({b['device']}; bench.md has every method)", ""]
        lines.append(f"copy bandwidth {b['copy_GBps']:.0f} GB/s")
        for r in b["rows"]:
            if r["fope_fused_over_best_rope"] is None:
                continue
            lines.append(
                f"- s={r['seq']}: fope_fused fwd+bwd = {r['fope_fused_over_best_rope']:.2f}x "
                f"{r['best_fused_rope']}; {r['fope_fused_pct_of_copy']:.0f}% of copy bandwidth; "
                f"torch path / fused = {r['fope_torch_over_fused']:.2f}x"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fope_megatron.bench.gpu_report")
    p.add_argument("--out", type=Path, required=True, help="the gpu_check output folder")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    args = p.parse_args(argv)
    if not args.out.is_dir():
        p.error(f"--out {args.out} is not a folder")
    doc = build_report(args.out, args.skip)
    text = format_report(doc, args.skip)
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(doc["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
