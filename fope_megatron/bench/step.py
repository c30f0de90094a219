"""Training-step benchmark, an older commit beside this tree, in one run on one machine:
``python -m fope_megatron.bench.step --baseline REV [--current HEAD] [--steps 16]``.

Trains ``configs/smoke.yaml`` (4 layers, 128 wide) and a 4-layer, 256-wide variant, each with
gradient accumulation 1 (micro batch 8) and 8 (micro batch 1), on one CPU rank, with the code of
``REV`` and of ``--current`` (git worktrees made for the run), in turn (A B A B ...), and
compares the median ``tokens_per_s`` of the steps after the first two (``metrics.jsonl``). A
ratio of one run on one machine; absolute tokens/s say only what this machine did. Writes
``OUT/step_bench.json`` and ``OUT/step_bench.md`` (``--out``, default ``docs/results/step``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = {  # name: overrides of configs/smoke.yaml
    "smoke, accumulation 1": ["train.micro_batch_size=8"],
    "smoke, accumulation 8": ["train.micro_batch_size=1"],
    "4x256, accumulation 1": ["model.hidden_size=256", "model.ffn_hidden_size=768",
                              "train.micro_batch_size=8"],
    "4x256, accumulation 8": ["model.hidden_size=256", "model.ffn_hidden_size=768",
                              "train.micro_batch_size=1"],
}  # fmt: skip


def tokens_per_s(root: Path, run: Path, overrides: list[str], steps: int) -> float:
    """Median tokens/s of steps 3.. of one ``fope-train`` run of the code under ``root``."""
    shutil.rmtree(run, ignore_errors=True)
    args = [f"run.dir={run}", f"train.steps={steps}", "train.global_batch_size=8",
            "train.eval_interval=0", f"train.save_interval={steps + 1}", "run.tensorboard=false",
            "train.warmup_steps=2",
            *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "FOPE_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "fope_megatron.train", "--config",
           str(root / "configs" / "smoke.yaml"), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{root}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 2]
    return statistics.median(speeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fope_megatron.bench.step",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--baseline", required=True, help="the older commit (any git revision)")
    parser.add_argument("--current", default="HEAD", help="the newer commit")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/results/step")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="fope-step-bench-"))
    old, new = scratch / "baseline", scratch / "current"
    for tree, revision in ((old, args.baseline), (new, args.current)):
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                        revision], check=True, capture_output=True)  # fmt: skip
    rev = subprocess.run(["git", "-C", str(new), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    rows = []
    try:
        for name, overrides in CASES.items():
            got = {"baseline": [], "current": []}
            for _ in range(args.repeats):
                for side, root in (("baseline", old), ("current", new)):
                    got[side].append(tokens_per_s(root, scratch / "run", overrides, args.steps))
            row = {"case": name, **{f"{s}_tokens_per_s": statistics.median(v)
                                    for s, v in got.items()}, "runs": got}  # fmt: skip
            row["ratio"] = row["current_tokens_per_s"] / row["baseline_tokens_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for tree in (old, new):
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
            "baseline": args.baseline, "current": rev, "steps": args.steps,
            "repeats": args.repeats}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Step benchmark ({meta['date']}, {meta['machine']})", "",
             f"`python -m fope_megatron.bench.step --baseline {args.baseline}`: one CPU rank, "
             f"global batch 8, seq 128, median tokens/s of steps 3-{args.steps}, "
             f"{args.repeats} runs each, baseline and current ({rev}) in turn.", "",
             "| case | baseline tokens/s | current tokens/s | current / baseline |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['case']} | {r['baseline_tokens_per_s']:.0f} | "
              f"{r['current_tokens_per_s']:.0f} | {r['ratio']:.3f} |" for r in rows]  # fmt: skip
    (out / "step_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
