"""The length-generalization study (issue 11) in one command: train FoPE and RoPE twins with a
passkey mixture on each corpus and seed, evaluate every row (RoPE, RoPE+PI, RoPE+NTK,
RoPE+dynamic-NTK, RoPE+YaRN, FoPE, FoPE+YaRN) at 1x..16x, aggregate mean and min-max.

    python -m fope_megatron.study --out docs/results/study            # CPU, tiny twins
    python -m fope_megatron.study --scale paper --out DIR             # GPU, 60M twins

Training and evaluation run as subprocesses (``fope_megatron.train``, ``fope_megatron.eval``),
exactly the commands a user would type (printed to the log). A run whose ``eval.json`` exists is
not redone, so a stopped study resumes. Results are aggregated after every evaluation, so the
tables always show what has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .aggregate import ROWS, aggregate

ROOT = Path(__file__).resolve().parents[2]
SCALES = {
    # config per kind, and per-scale defaults (steps, passkey fraction, lengths)
    "tiny": {
        "config": "configs/repro/{kind}_tiny_128.yaml",
        "train_len": 128,
        "overrides": ["train.save_interval=100000", "train.eval_interval=100000"],
    },
    # the 60M twins with the byte tokenizer (both corpora are byte-level; no tokenizer download)
    "paper": {
        "config": "configs/{kind}_60m.yaml",
        "train_len": 512,
        "overrides": ["data.tokenizer=byte", "model.vocab_size=258", "train.save_interval=100000"],
    },
}


def _run(cmd: list[str], log) -> None:
    log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    log.write(f"# exit {proc.returncode} after {time.time() - t0:.0f}s\n")
    log.flush()
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["FOPE_NO_PROGRESS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _prose(args, log) -> tuple[str, str]:
    prefix = Path(args.runs_dir) / "prose"
    if not (prefix / "prose_manifest.json").is_file():
        cmd = [sys.executable, "-m", "fope_megatron.data.prose", "--out", str(prefix)]
        if args.prose_docs:
            cmd += ["--max-docs", str(args.prose_docs)]
        _run(cmd, log)
    return str(prefix / "prose_train"), str(prefix / "prose_heldout")


def train_cmd(args, kind: str, seed: int, corpus: str, train_prefix: str | None) -> list[str]:
    scale = SCALES[args.scale]
    run_dir = Path(args.runs_dir) / corpus / f"{kind}_s{seed}"
    config = ROOT / scale["config"].format(kind=kind)
    launcher = [sys.executable, "-m"]
    if args.nproc > 1:
        launcher += [
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
        ]
    cmd = [
        *launcher, "fope_megatron.train", "--config", str(config), f"run.dir={run_dir}", f"run.seed={seed}", "train.resume=auto",
        f"data.passkey_fraction={args.passkey_fraction}", *scale["overrides"],
    ]  # fmt: skip
    if args.steps:
        cmd.append(f"train.steps={args.steps}")
    if corpus == "prose":
        cmd += ["data.synthetic=false", f"data.path=[{train_prefix}]"]
    return cmd + list(args.train_override)


def eval_cmd(args, run_dir: Path, row: str, out: Path, heldout: str | None) -> list[str]:
    mode = ROWS[row][1]
    cmd = [
        sys.executable, "-m", "fope_megatron.eval", "--run", str(run_dir),
        "--lengths", ",".join(map(str, args.lengths)), "--passkey-trials", str(args.passkey_trials),
        "--ppl-chunks", str(args.ppl_chunks), "--out", str(out), "--no-progress", "--label", row,
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if mode != "none":
        cmd += ["--position-scaling", mode]
    if heldout:
        cmd += ["--data", heldout]
    return cmd


def run_study(args) -> dict:
    if args.aggregate_only:
        return {**aggregate(args.out, args.corpora, args.seeds, args.lengths), "elapsed_s": 0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with open(Path(args.runs_dir) / "study.log", "a") as log:
        log.write(f"# study {time.strftime('%Y-%m-%d %H:%M:%S')}: {vars(args)}\n")
        prose = _prose(args, log) if "prose" in args.corpora else (None, None)
        for corpus in args.corpora:
            train_prefix, heldout = prose if corpus == "prose" else (None, None)
            for seed in args.seeds:
                for kind in ("rope", "fope"):
                    run_dir = Path(args.runs_dir) / corpus / f"{kind}_s{seed}"
                    rows = [r for r, (k, _) in ROWS.items() if k == kind and r in args.rows]
                    if not rows:
                        continue
                    evals = {r: out / "evals" / corpus / f"{r}_s{seed}" for r in rows}
                    if all((e / "eval.json").is_file() for e in evals.values()):
                        continue
                    _run(train_cmd(args, kind, seed, corpus, train_prefix), log)
                    for row, e in evals.items():
                        if not (e / "eval.json").is_file():
                            _run(eval_cmd(args, run_dir, row, e, heldout), log)
                            aggregate(out, args.corpora, args.seeds, args.lengths)
                    log.write(f"# elapsed {time.time() - t_start:.0f}s\n")
    result = aggregate(out, args.corpora, args.seeds, args.lengths)
    result["elapsed_s"] = round(time.time() - t_start)
    (out / "timing.json").write_text(json.dumps({"elapsed_s": result["elapsed_s"]}) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="fope-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="docs/results/study", help="tables, plots, per-row evals")
    p.add_argument("--runs-dir", default="runs/study", help="training runs, corpus, log")
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--corpora", default="synthetic,prose", type=lambda s: s.split(","))
    p.add_argument("--seeds", default="1,2,3", type=ints)
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the config's)")
    p.add_argument("--passkey-fraction", type=float, default=0.5)
    p.add_argument("--lengths", default=None, type=ints, help="default: 1x,2x,4x,8x,16x")
    p.add_argument("--passkey-trials", type=int, default=20)
    p.add_argument("--ppl-chunks", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows", default=",".join(ROWS), type=lambda s: s.split(","),
                   help="evaluation rows (default: all seven)")  # fmt: skip
    p.add_argument("--aggregate-only", action="store_true",
                   help="only rebuild the tables and plots from the eval.json files present")  # fmt: skip
    p.add_argument("--nproc", type=int, default=1, help="ranks per training (torchrun on GPUs)")
    p.add_argument("--prose-docs", type=int, default=None, help="first N stdlib modules (tests)")
    p.add_argument("--train-override", nargs="*", default=[], help="extra dotted train keys")
    args = p.parse_args(argv)
    bad = set(args.corpora) - {"synthetic", "prose"}
    if bad:
        p.error(f"--corpora: unknown {sorted(bad)}; allowed: synthetic, prose")
    if set(args.rows) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(args.rows) - set(ROWS))}; allowed: {', '.join(ROWS)}")
    if args.lengths is None:
        args.lengths = [SCALES[args.scale]["train_len"] * f for f in (1, 2, 4, 8, 16)]
    result = run_study(args)
    print((Path(args.out) / "study.md").read_text())
    print(f"elapsed {result['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
