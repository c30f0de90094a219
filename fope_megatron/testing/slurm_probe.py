"""Stand-in trainer for launch tests: speaks the trainer's launch interface, trains nothing.

    python -m fope_megatron.testing.slurm_probe --config CONFIG run.dir=DIR train.resume=auto \
        [probe.steps=N] [probe.step_seconds=S] [probe.fail_rank=R]

Like ``fope_megatron.train`` it takes its rank from torchrun/deepspeed (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) or from ``SLURM_PROCID``/``SLURM_NTASKS``; on SIGUSR1 or SIGTERM it
finishes the current step, "checkpoints" the step number and exits ``REQUEUE_EXIT_CODE`` (99);
``train.resume=auto`` continues after the latest such checkpoint in ``run.dir``. Each step is a gloo
all-reduce; rank 0 appends one line per step to ``run.dir/metrics.jsonl``; every rank writes
``run.dir/probe/rank{R}.attempt{N}.json`` with the all-reduced sum of ranks, so a test can check
that every rank of every node joined the same process group. ``probe.fail_rank=R`` makes rank R
exit 3 right after that, like a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 99


def _parse(argv: list[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="slurm_probe")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted key=value")
    args = parser.parse_args(argv)
    opts = {"config": args.config}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"override {item!r} is not key=value")
        opts[key] = value
    if "run.dir" not in opts:
        parser.error("run.dir=DIR is required")
    return opts


def _dist_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))


def main(argv: list[str] | None = None) -> int:
    opts = _parse(sys.argv[1:] if argv is None else argv)
    run_dir = Path(opts["run.dir"])
    steps = int(opts.get("probe.steps", 3))
    step_seconds = float(opts.get("probe.step_seconds", 0.0))

    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch
    import torch.distributed as dist

    rank, world, local_rank = _dist_env()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))

    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    ckpt = run_dir / "checkpoints" / "latest"
    start = 1
    if opts.get("train.resume") == "auto" and ckpt.exists():
        start = int(ckpt.read_text()) + 1
    report = {
        "rank": rank,
        "world_size": world,
        "local_rank": local_rank,
        "sum": total.item(),
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "attempt": attempt,
        "start_step": start,
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        "fope_cpu": os.environ.get("FOPE_CPU"),
        "config": opts["config"],
        "argv": sys.argv[1:],
    }
    (run_dir / "probe").mkdir(parents=True, exist_ok=True)
    (run_dir / "probe" / f"rank{rank}.attempt{attempt}.json").write_text(json.dumps(report))
    if int(opts.get("probe.fail_rank", -1)) == rank:  # a crash, for failure-path tests
        print(f"probe rank={rank}: failing on purpose", file=sys.stderr, flush=True)
        os._exit(3)

    exit_code = 0
    for step in range(start, steps + 1):
        time.sleep(step_seconds)
        # [loss-like value, any rank signalled]: every rank agrees on when to stop.
        t = torch.tensor([float(rank + 1) / step, float(stop["signal"] != 0)])
        dist.all_reduce(t)
        print(f"probe rank={rank} step={step}", flush=True)  # for console rank-filter checks
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                line = {"step": step, "loss": t[0].item() / world, "dp": world, "attempt": attempt}
                f.write(json.dumps(line) + "\n")
        if t[1].item() > 0:
            if rank == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(str(step))
                tmp.replace(ckpt)
            dist.barrier()  # the checkpoint is complete before any rank exits
            exit_code = REQUEUE_EXIT_CODE
            break
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
