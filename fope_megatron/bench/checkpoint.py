"""Checkpoint benchmark: ``python -m fope_megatron.bench.checkpoint [--sizes 25M,100M] [--ranks 1,2]``.

For each model size (a megatron-core GPT with FoPE, built by the project's builder) and gloo
world size (torchrun on this machine, ZeRO-2, fp32 on CPU), after one training step (so Adam's
moments exist) every rank measures, through the trainer's own save path (``checkpoint.store``
with ``async_save.AsyncCheckpointEngine`` behind DeepSpeed):

- ``sync``: a synchronous save: the time the loop is blocked (= total);
- ``async``: an asynchronous save: the time the loop is blocked (the host snapshot) and the time
  until the checkpoint is complete (written, checksummed, ``COMPLETE``); the second one of the
  run (``first_async_blocked_s``: the first, which allocates the host buffers the later ones
  reuse);
- ``load``: ``engine.load_checkpoint`` of that checkpoint;
- the peak host memory a save adds to the rank (``VmHWM`` after ``clear_refs``) next to the
  rank's own bytes in the checkpoint (its shard);
- ``torch_save``: a plain ``torch.save`` of the same state (the rank's module and optimizer
  state dicts) and ``copy``: a raw copy of the rank's checkpoint bytes (this disk's limit).

Ratios are of one run on one machine; absolute seconds say only what this machine did. Writes
``OUT/checkpoint_bench.json`` and ``OUT/checkpoint_bench.md`` (``--out``, default
``docs/results/checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # ~parameters: (layers, hidden, heads, vocab)
    "25M": (6, 512, 8, 12288),
    "100M": (12, 768, 12, 12288),
    "400M": (20, 1280, 20, 12288),
}


def _rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def _worker(size: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from ..checkpoint import store
    from ..config import load_config
    from ..model.builder import build_gpt
    from ..parallel.mpu import MegatronMPU
    from ..parallel.setup import init_distributed, init_model_parallel
    from ..train.engine import deepspeed_json, initialize

    layers, hidden, heads, vocab = SIZES[size]
    rank, world = init_distributed()
    init_model_parallel(tp=1)
    seq, mbs = 128, 1
    cfg = load_config(None, [
        f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.num_attention_heads={heads}", f"model.vocab_size={vocab}",
        f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
        f"train.global_batch_size={mbs * world}", "deepspeed.zero_stage=2",
        f"run.dir={out_dir}",
    ])  # fmt: skip
    model = build_gpt(cfg)
    params = sum(p.numel() for p in model.parameters())
    engine, _, _ = initialize(cfg, model, deepspeed_json(cfg, world, False, world), MegatronMPU())
    tokens = torch.randint(0, vocab, (mbs, seq))
    pos = torch.arange(seq)[None]
    loss = engine(tokens, pos, None, labels=tokens).float().mean()
    engine.backward(loss)
    engine.step()
    client = {"step": 1}

    def timed_save(step: int, asynchronous: bool) -> dict:
        dist.barrier()
        base = _status("VmRSS")
        _rss_peak_reset()
        start = time.perf_counter()
        pending = store.save(engine, out_dir, step, client, keep_last=0, asynchronous=asynchronous)
        blocked = time.perf_counter() - start
        pending.finish(engine)  # an asynchronous save: waits here, as the loop would later
        total = time.perf_counter() - start
        return {"blocked_s": blocked, "total_s": total, "peak_extra_bytes": _status("VmHWM") - base}

    sync = timed_save(1, False)
    first = timed_save(2, True)  # allocates the host buffers
    asyn = timed_save(3, True)  # reuses them: every later save of a run
    asyn["first_blocked_s"] = first["blocked_s"]
    asyn["peak_extra_bytes"] = first["peak_extra_bytes"]  # the buffers' cost, paid once
    folder = store.checkpoint_root(out_dir) / store.tag_for(3)
    mine = [p for p in folder.iterdir() if f"pp_rank_{rank}_" in p.name
            or (rank == 0 and p.name.startswith("mp_rank_"))]  # fmt: skip
    own_bytes = sum(p.stat().st_size for p in mine)
    dist.barrier()
    start = time.perf_counter()
    store.load(engine, store.checkpoint_root(out_dir), store.tag_for(3))
    load_s = time.perf_counter() - start
    dist.barrier()
    state = {"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}
    plain = Path(out_dir) / f"plain_{rank}.pt"
    start = time.perf_counter()
    with open(plain, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    torch_save_s = time.perf_counter() - start
    copy_dir = Path(out_dir) / f"copy_{rank}"
    copy_dir.mkdir()
    start = time.perf_counter()
    for p in mine:
        shutil.copyfile(p, copy_dir / p.name)
    _fsync_dir_files(copy_dir)
    copy_s = time.perf_counter() - start
    result = {
        "rank": rank, "world": world, "size": size, "params": params, "own_bytes": own_bytes,
        "sync": sync, "async": asyn, "load_s": load_s, "torch_save_s": torch_save_s,
        "torch_save_bytes": plain.stat().st_size, "copy_s": copy_s,
    }  # fmt: skip
    parts = [None] * world
    dist.all_gather_object(parts, result)
    if rank == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(parts))
    dist.barrier()


def run_one(size: str, ranks: int, scratch: Path, timeout: float) -> list[dict]:
    from ..testing.distributed import free_port

    out = scratch / f"{size}_{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", "-m", "fope_megatron.bench.checkpoint",
           "--worker", size, str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOPE_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{size} x {ranks}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    parts = json.loads((out / "result.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return parts


def summarize(parts: list[dict]) -> dict:
    """The slowest rank's times (the job waits for it) and the largest memory ratio."""
    worst = lambda f: max(f(p) for p in parts)  # noqa: E731
    own = worst(lambda p: p["own_bytes"])
    row = {
        "size": parts[0]["size"], "params": parts[0]["params"], "ranks": len(parts),
        "own_MB": own / 1e6,
        "sync_s": worst(lambda p: p["sync"]["total_s"]),
        "async_blocked_s": worst(lambda p: p["async"]["blocked_s"]),
        "first_async_blocked_s": worst(lambda p: p["async"]["first_blocked_s"]),
        "async_total_s": worst(lambda p: p["async"]["total_s"]),
        "load_s": worst(lambda p: p["load_s"]),
        "torch_save_s": worst(lambda p: p["torch_save_s"]),
        "copy_s": worst(lambda p: p["copy_s"]),
        "peak_extra_over_own": worst(lambda p: p["async"]["peak_extra_bytes"] / p["own_bytes"]),
        "sync_peak_extra_over_own": worst(
            lambda p: p["sync"]["peak_extra_bytes"] / p["own_bytes"]
        ),
    }  # fmt: skip
    row["blocked_over_sync"] = row["async_blocked_s"] / row["sync_s"]
    row["async_write_MBps"] = own / 1e6 / row["async_total_s"]
    row["copy_MBps"] = own / 1e6 / row["copy_s"]
    row["write_over_copy"] = row["async_write_MBps"] / row["copy_MBps"]
    row["sync_over_torch_save"] = row["sync_s"] / row["torch_save_s"]
    return row


def render(rows: list[dict], meta: dict) -> str:
    cols = [("size", "{}"), ("ranks", "{}"), ("own_MB", "{:.0f}"), ("sync_s", "{:.2f}"),
            ("first_async_blocked_s", "{:.2f}"), ("async_blocked_s", "{:.2f}"),
            ("blocked_over_sync", "{:.2f}"),
            ("async_total_s", "{:.2f}"), ("async_write_MBps", "{:.0f}"), ("copy_MBps", "{:.0f}"),
            ("write_over_copy", "{:.2f}"), ("torch_save_s", "{:.2f}"),
            ("sync_over_torch_save", "{:.2f}"), ("load_s", "{:.2f}"),
            ("peak_extra_over_own", "{:.2f}"), ("sync_peak_extra_over_own", "{:.2f}")]  # fmt: skip
    lines = [
        f"# Checkpoint benchmark ({meta['date']}, {meta['machine']})",
        "",
        "`python -m fope_megatron.bench.checkpoint` (ZeRO-2, fp32, gloo ranks on one machine; the",
        "slowest rank's times; `own_MB`: a rank's own bytes in the checkpoint; `async_*`: the",
        "second asynchronous save, `first_async_blocked_s`: the first, which allocates the host",
        "buffers; `peak_extra`: peak host memory a save adds to a rank, over its own bytes, for",
        "the first asynchronous save and for a synchronous one).",
        "",
        "| " + " | ".join(c for c, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(f.format(r[c]) for c, f in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fope_megatron.bench.checkpoint",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--sizes", default="25M,100M,400M")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--out", default="docs/results/checkpoint")
    parser.add_argument("--scratch", default=None, help="where checkpoints are written")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--skip", default="", help="SIZExRANKS pairs left out, e.g. 400Mx4 "
                        "(a machine without the host memory for them)")  # fmt: skip
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from ..compat.warnings import quiet_known_warnings

        quiet_known_warnings()
        _worker(*args.worker)
        return 0
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fope-ckpt-bench-"))
    rows = []
    for size in args.sizes.split(","):
        for ranks in map(int, args.ranks.split(",")):
            if f"{size}x{ranks}" in args.skip.split(","):
                continue
            try:
                rows.append(summarize(run_one(size, ranks, scratch, args.timeout)))
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{size} x {ranks} ranks: failed: {str(err)[-500:]}", file=sys.stderr)
                continue
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "checkpoint_bench.md").write_text(render(rows, meta))
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
