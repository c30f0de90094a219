"""Fused FoPE against every RoPE available, forward and forward+backward, with bandwidth.

    python -m fope_megatron.bench.apply --suite --device cuda --json docs/results/gpu/bench.json

Shapes: bf16, q ``[s, b, 32, 128]``, k ``[s, b, 8, 128]``, s in {4096, 8192}. For each
method: median forward time, median forward+backward time (the methods take turns within each
repeat), saved-for-backward bytes, and achieved bandwidth = minimum bytes moved / time, where the
minimum is reading q and k and writing q' and k' (forward; twice that with backward, which reads
dq', dk' and writes dq, dk). On CUDA the times are device times from CUDA-graph replays with L2
flushed (eager latencies, Python and launches included, are reported beside them). The device's
copy bandwidth (``dst.copy_(src)`` of 1 GiB, read +
write) is measured in the same run, so the percentages are of what this device really does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from .methods import Step, available_methods, build_step

SUITE_SEQS = (4096, 8192)
SUITE_SHAPE = {"batch": 1, "heads": 32, "groups": 8, "head_dim": 128}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write counted), median of ``repeats``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def _forward(step: Step, q: Tensor, k: Tensor) -> None:
    step(q, k)


def _fwd_bwd(step: Step, q: Tensor, k: Tensor, gq: Tensor, gk: Tensor) -> None:
    q.grad = k.grad = None
    oq, ok = step(q, k)
    torch.autograd.backward((oq, ok), (gq, gk))


def time_methods(
    steps: dict[str, Step], q: Tensor, k: Tensor, repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per forward and per forward+backward, the methods taking turns each repeat."""
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd_bwd": []} for n in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            for kind in ("fwd", "fwd_bwd"):
                _sync(q.device)
                t0 = time.perf_counter()
                if kind == "fwd":
                    _forward(step, q, k)
                else:
                    _fwd_bwd(step, q, k, gq, gk)
                _sync(q.device)
                if i >= warmup:
                    times[name][kind].append(time.perf_counter() - t0)
    return times


def graph_times(step: Step, q: Tensor, k: Tensor, repeats: int) -> dict[str, float]:
    """GPU seconds of one forward and one forward+backward, from CUDA-graph replays.

    Eager timings include Python and launch overhead (which a real model overlaps with the GPU's
    work); replaying a captured graph leaves only device time. Before every step the graph
    overwrites a 256 MiB buffer so q and k do not sit in L2, and that flush's own time (a graph
    of the flush alone) is subtracted.
    """
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    flush = torch.empty(2**28, dtype=torch.uint8, device=q.device)

    def capture(fn) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def replay_seconds(graph: torch.cuda.CUDAGraph) -> float:
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    def fwd() -> None:
        flush.zero_()
        step(q, k)

    def both() -> None:
        flush.zero_()
        q.grad = k.grad = None
        oq, ok = step(q, k)
        torch.autograd.backward((oq, ok), (gq, gk))

    base = replay_seconds(capture(flush.zero_))
    out = {"fwd": replay_seconds(capture(fwd)) - base}
    out["fwd_bwd"] = replay_seconds(capture(both)) - base
    q.grad = k.grad = None
    return out


def saved_bytes(step: Step, q: Tensor, k: Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    q.grad = k.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        oq, ok = step(q, k)
    (oq.float().sum() + ok.float().sum()).backward()
    return sum(storages.values())


def run_suite(
    device: torch.device,
    seqs: Sequence[int] = SUITE_SEQS,
    methods: Sequence[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    train_seq_len: int = 4096,
    repeats: int = 20,
    warmup: int = 3,
    batch: int = SUITE_SHAPE["batch"],
    heads: int = SUITE_SHAPE["heads"],
    groups: int = SUITE_SHAPE["groups"],
    head_dim: int = SUITE_SHAPE["head_dim"],
    copy_bytes: int = 2**30,
) -> dict:
    """Time every method on every shape; returns the JSON-ready document."""
    names = list(methods) if methods else available_methods(device)
    bw = copy_bandwidth(device, copy_bytes)
    rows = []
    for seq in seqs:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(seq, batch, heads, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(seq, batch, groups, head_dim, generator=gen).to(device, dtype)
        q.requires_grad_()
        k.requires_grad_()
        steps, infos, errors = {}, {}, {}
        for name in names:
            try:  # a method that cannot build or run here is reported, not fatal
                steps[name], infos[name] = build_step(
                    name, seq, heads, groups, head_dim, train_seq_len, device
                )
                _fwd_bwd(steps[name], q, k, torch.ones_like(q), torch.ones_like(k))
            except Exception as err:  # noqa: BLE001
                steps.pop(name, None)
                errors[name] = f"{type(err).__name__}: {str(err)[:300]}"
                print(f"# {name} skipped at s={seq}: {errors[name]}")
        io_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read q,k + write q',k'
        row: dict = {
            "seq": seq, "batch": batch, "heads": heads, "groups": groups, "head_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."), "min_bytes_fwd": io_bytes,
            "min_bytes_fwd_bwd": 2 * io_bytes, "fope": infos.get("fope_fused", {}),
        }  # fmt: skip
        saved = {name: saved_bytes(step, q, k) for name, step in steps.items()}
        timing = time_methods(steps, q, k, repeats, warmup)
        for name, err in errors.items():
            row[name] = {"error": err}
        for name in steps:
            eager_fwd = statistics.median(timing[name]["fwd"])
            eager_both = statistics.median(timing[name]["fwd_bwd"])
            fwd, both, how = eager_fwd, eager_both, "eager"
            if device.type == "cuda":
                try:
                    g = graph_times(steps[name], q, k, repeats)
                    fwd, both, how = g["fwd"], g["fwd_bwd"], "cuda_graph"
                except Exception as err:  # noqa: BLE001  (reported; eager numbers stand)
                    print(f"# {name}: CUDA-graph timing failed ({type(err).__name__}: {err})")
            row[name] = {
                "timing": how,
                "fwd_ms": 1e3 * fwd,
                "fwd_bwd_ms": 1e3 * both,
                "eager_fwd_ms": 1e3 * eager_fwd,
                "eager_fwd_bwd_ms": 1e3 * eager_both,
                "fwd_GBps": io_bytes / fwd / 1e9,
                "fwd_bwd_GBps": 2 * io_bytes / both / 1e9,
                "fwd_pct_of_copy": 100 * (io_bytes / fwd) / bw,
                "fwd_bwd_pct_of_copy": 100 * (2 * io_bytes / both) / bw,
                "saved_bytes": saved[name],
            }
        fused = ("rope_te", "rope_liger", "rope_compile")
        rope_fused = [
            n
            for n in names
            if (n in fused or n.startswith("rope_fused")) and "fwd_bwd_ms" in row.get(n, {})
        ]
        if rope_fused and "fope_fused" in row:
            best = min(rope_fused, key=lambda n: row[n]["fwd_bwd_ms"])
            row["best_fused_rope"] = best
            row["fope_fused_over_best_rope"] = (
                row["fope_fused"]["fwd_bwd_ms"] / row[best]["fwd_bwd_ms"]
            )
            # every fused FoPE variant timed beside it, against the same RoPE
            row["over_best_rope"] = {
                n: row[n]["fwd_bwd_ms"] / row[best]["fwd_bwd_ms"]
                for n in names
                if n.startswith("fope_fused") and "fwd_bwd_ms" in row.get(n, {})
            }
        if "fope_torch" in steps and "fope_fused" in steps:
            row["fope_torch_over_fused"] = (
                row["fope_torch"]["fwd_bwd_ms"] / row["fope_fused"]["fwd_bwd_ms"]
            )
        rows.append(row)
        del q, k, steps
    return {"copy_GBps": bw / 1e9, "methods": names, "results": rows}


def format_suite(doc: dict) -> str:
    """A markdown table per shape."""
    out = [f"device copy bandwidth (read+write): {doc['copy_GBps']:.0f} GB/s", ""]
    for r in doc["results"]:
        out.append(
            f"### s={r['seq']} b={r['batch']} q heads={r['heads']} k heads={r['groups']} "
            f"d={r['head_dim']} {r['dtype']}"
        )
        out.append("")
        out.append(
            "| method | timing | fwd ms | fwd+bwd ms | fwd+bwd GB/s | % of copy | eager fwd+bwd ms "
            "| saved MiB |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for name in doc["methods"]:
            m = r[name]
            if "error" in m:
                out.append(f"| {name} | not run: {m['error'][:80]} |||||||")
                continue
            out.append(
                f"| {name} | {m['timing']} | {m['fwd_ms']:.3f} | {m['fwd_bwd_ms']:.3f} "
                f"| {m['fwd_bwd_GBps']:.0f} | {m['fwd_bwd_pct_of_copy']:.0f}% "
                f"| {m['eager_fwd_bwd_ms']:.3f} | {m['saved_bytes'] / 2**20:.2f} |"
            )
        if "best_fused_rope" in r:
            out.append("")
            out.append(
                f"fope_fused / best fused RoPE ({r['best_fused_rope']}): "
                f"{r['fope_fused_over_best_rope']:.2f}x (fwd+bwd)"
            )
            others = {n: v for n, v in r.get("over_best_rope", {}).items() if n != "fope_fused"}
            if others:
                ratios = ", ".join(f"{n} {v:.2f}x" for n, v in others.items())
                out.append(f"variants / {r['best_fused_rope']}: {ratios}")
        if "fope_torch_over_fused" in r:
            out.append(f"fope_torch / fope_fused: {r['fope_torch_over_fused']:.2f}x (fwd+bwd)")
        out.append("")
    return "\n".join(out)
