"""Forward+backward cost of FoPE vs megatron-core's unfused RoPE on q and k of one layer.

    python -m fope_megatron.bench.apply                 # s=2048, b=1, 16 heads, d=128
    python -m fope_megatron.bench.apply --sweep --json bench.json

What is timed, per layer, as the attention layer does it:
- FoPE: build the layer's tables ``(C, S)`` once from its coefficients, apply them to q and k.
- RoPE: megatron-core's ``_apply_rotary_pos_emb_bshd`` on q and on k; each call computes
  ``cos``/``sin`` of the frequency tensor, as megatron does. The frequency tensor itself
  (``RotaryEmbedding``'s outer product) is built once per model forward, so it is built outside.
q and k are leaf tensors that require grad; backward is of ``q'.sum() + k'.sum()``.

Memory kept alive for backward is measured with ``torch.autograd.graph.saved_tensors_hooks``:
the bytes of the distinct storages the graph saves (views of one storage count once). On CUDA
the ``torch.cuda.max_memory_allocated`` delta over the step is reported as well. The script
checks that FoPE saves at most RoPE's bytes plus its two float32 tables ``[s, groups, d_r]``
and exits with status 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..fope import FoPEConfig, FourierPositionEmbedding, apply_tables
from .methods import METHODS, VARIANTS, available_methods, build_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP_SEQS = (512, 2048, 8192)
MIB = 2**20

Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class MemoryCheckError(AssertionError):
    """FoPE keeps more alive for backward than RoPE plus its per-layer tables."""


@dataclass(frozen=True)
class Shape:
    """One benchmark shape (megatron's ``[s, b, heads, head_dim]`` layout)."""

    seq: int
    """Sequence length ``s``."""
    batch: int
    """Micro-batch size ``b``."""
    heads: int
    """Query heads ``H``."""
    groups: int
    """KV groups ``G`` (keys have ``G`` heads; ``G = H`` is MHA)."""
    head_dim: int
    """Head dim ``d`` (all of it is rotated)."""


def megatron_rope_freqs(head_dim: int, seq: int, device: torch.device) -> Tensor:
    """megatron-core's non-interleaved RoPE frequency tensor ``[s, 1, 1, d]``, float32.

    ``RotaryEmbedding.forward`` moves to CUDA, so the ``emb`` is assembled here as it does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, 1.0, use_cpu_initialization=True)
    f = rope.get_freqs_non_repeated(seq)
    return torch.cat((f, f), dim=-1)[:, None, None, :].to(device)


def fope_step(shape: Shape, train_seq_len: int, device: torch.device) -> tuple[Step, dict]:
    """FoPE for layer 0: tables built once, applied to q and k. Returns the step and its info."""
    cfg = FoPEConfig(
        head_dim=shape.head_dim,
        train_seq_len=train_seq_len,
        num_attention_heads=shape.heads,
        num_query_groups=shape.groups,
        num_layers=1,
    )
    fope = FourierPositionEmbedding(cfg).to(device)
    positions = torch.arange(shape.seq, device=device)

    def step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        c, s = fope.tables(positions, 0)
        return apply_tables(q, c, s), apply_tables(k, c, s)

    return step, {"d_in": fope.d_in, "d_out": fope.d_out, "rotary_dim": cfg.rotary_dim}


def rope_step(shape: Shape, device: torch.device) -> Step:
    """megatron-core's unfused RoPE apply on q and on k (cos/sin computed in each call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    freqs = megatron_rope_freqs(shape.head_dim, shape.seq, device)

    def step(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return _apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)

    return step


def make_qk(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    s, b, d = shape.seq, shape.batch, shape.head_dim
    q = torch.randn(s, b, shape.heads, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(s, b, shape.groups, d, generator=gen).to(device, dtype).requires_grad_()
    return q, k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(step: Step, q: Tensor, k: Tensor) -> None:
    q.grad = k.grad = None
    oq, ok = step(q, k)
    (oq.sum() + ok.sum()).backward()


def time_steps(
    steps: dict[str, Step], q: Tensor, k: Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall seconds of ``repeats`` forward+backward passes of each step after ``warmup`` ones.

    The steps take turns within every repeat so that a change in the machine's load (shared
    machines) hits all of them alike instead of biasing whichever ran last.
    """
    for _ in range(warmup):
        for step in steps.values():
            fwd_bwd(step, q, k)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(q.device)
            t0 = time.perf_counter()
            fwd_bwd(step, q, k)
            _sync(q.device)
            times[name].append(time.perf_counter() - t0)
    return times


def saved_for_backward(step: Step, q: Tensor, k: Tensor) -> dict:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        storages[(str(t.device), st.data_ptr())] = st.nbytes()
        return t

    q.grad = k.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        oq, ok = step(q, k)
    (oq.sum() + ok.sum()).backward()
    return {"saved_bytes": sum(storages.values()), "saved_tensors": len(storages)}


def cuda_memory(step: Step, q: Tensor, k: Tensor) -> dict:
    """Allocated-bytes deltas: alive after forward (saved + outputs) and peak over fwd+bwd."""
    q.grad = k.grad = None
    _sync(q.device)
    base = torch.cuda.memory_allocated(q.device)
    torch.cuda.reset_peak_memory_stats(q.device)
    oq, ok = step(q, k)
    after_fwd = torch.cuda.memory_allocated(q.device)
    (oq.sum() + ok.sum()).backward()
    _sync(q.device)
    peak = torch.cuda.max_memory_allocated(q.device)
    return {"cuda_after_forward_bytes": after_fwd - base, "cuda_peak_bytes": peak - base}


def run_shape(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    train_seq_len: int,
    repeats: int,
    warmup: int,
) -> dict:
    """Time and measure FoPE and RoPE on one shape; returns one result row."""
    q, k = make_qk(shape, dtype, device)
    fope, info = fope_step(shape, train_seq_len, device)
    steps = {"fope": fope, "rope": rope_step(shape, device)}
    if "fope_fused" in available_methods(device):
        steps["fope_fused"], _ = build_step(
            "fope_fused",
            shape.seq,
            shape.heads,
            shape.groups,
            shape.head_dim,
            train_seq_len,
            device,
        )
    row: dict = {**asdict(shape), **info, "dtype": str(dtype).removeprefix("torch.")}
    for name, step in steps.items():
        row[name] = saved_for_backward(step, q, k)
        if device.type == "cuda":
            row[name].update(cuda_memory(step, q, k))
    for name, times in time_steps(steps, q, k, repeats, warmup).items():
        row[name]["median_ms"] = 1e3 * statistics.median(times)
        row[name]["times_ms"] = [1e3 * t for t in times]
    row["ratio"] = row["fope"]["median_ms"] / row["rope"]["median_ms"]
    if "fope_fused" in row:
        row["fused_ratio"] = row["fope_fused"]["median_ms"] / row["rope"]["median_ms"]
    # One float32 table [s, groups, d_r]; FoPE keeps two (C and S) shared by q and k.
    row["table_bytes"] = shape.seq * shape.groups * info["rotary_dim"] * 4
    row["saved_limit_bytes"] = row["rope"]["saved_bytes"] + 2 * row["table_bytes"]
    row["memory_check_ok"] = row["fope"]["saved_bytes"] <= row["saved_limit_bytes"]
    if "fope_fused" in row:  # positions (int64) + frequencies + coefficients, nothing [s, heads]
        coef = 2 * shape.groups * info["d_in"] * info["d_out"] * 4
        row["fused_saved_limit_bytes"] = shape.seq * 8 + info["rotary_dim"] * 2 + coef
        row["memory_check_ok"] &= row["fope_fused"]["saved_bytes"] <= row["fused_saved_limit_bytes"]
    return row


def format_table(rows: Sequence[dict]) -> str:
    """One human-readable line per shape."""
    cuda = any("cuda_peak_bytes" in r["fope"] for r in rows)
    head = ["s", "b", "H", "G", "d", "dtype", "FoPE ms", "RoPE ms", "FoPE/RoPE"]
    head += ["FoPE saved MiB", "RoPE saved MiB", "table MiB", "saved check"]
    if cuda:
        head += ["FoPE peak MiB", "RoPE peak MiB"]
    lines = [head]
    for r in rows:
        f, p = r["fope"], r["rope"]
        line = [str(r[k]) for k in ("seq", "batch", "heads", "groups", "head_dim", "dtype")]
        line += [f"{f['median_ms']:.2f}", f"{p['median_ms']:.2f}", f"{r['ratio']:.2f}x"]
        line += [f"{f['saved_bytes'] / MIB:.2f}", f"{p['saved_bytes'] / MIB:.2f}"]
        line += [f"{r['table_bytes'] / MIB:.2f}", "ok" if r["memory_check_ok"] else "FAIL"]
        if cuda:
            line += [f"{f['cuda_peak_bytes'] / MIB:.2f}", f"{p['cuda_peak_bytes'] / MIB:.2f}"]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fope_megatron.bench.apply",
        description="Forward+backward time and saved memory of FoPE vs megatron-core RoPE.",
    )
    p.add_argument("--seq", type=int, default=2048, help="sequence length s")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size b")
    p.add_argument("--heads", type=int, default=16, help="query heads H")
    p.add_argument("--groups", type=int, default=16, help="KV groups G (= heads: MHA)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim d")
    p.add_argument(
        "--train-seq-len",
        type=int,
        help="FoPE floor length L (default 512; --suite: 4096, the 1B/7B configs' length)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sweep", action="store_true", help=f"s in {SWEEP_SEQS} x (MHA, G=4)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--suite",
        action="store_true",
        help="fused FoPE vs every RoPE available (issue-9 shapes: q [s,1,32,128], k [s,1,8,128],"
        " s in 4096, 8192; forward and forward+backward; bandwidth vs copy)",
    )
    p.add_argument(
        "--methods",
        help=f"--suite: comma list of {','.join(METHODS)} (default: every one available here "
        f"but the kernel's variants {', '.join(VARIANTS)})",
    )
    p.add_argument("--seqs", help="--suite: comma list of sequence lengths (default 4096,8192)")
    args = p.parse_args(argv)
    if args.train_seq_len is None:
        args.train_seq_len = 4096 if args.suite else 512
    if args.methods:
        bad = [m for m in args.methods.split(",") if m not in METHODS]
        if bad:
            p.error(f"--methods {','.join(bad)} unknown; allowed: {','.join(METHODS)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats {args.repeats} must be >= 1 and --warmup {args.warmup} >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False; use --device cpu")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads} must be >= 1")
    if args.heads % args.groups:
        p.error(f"--groups {args.groups} must divide --heads {args.heads}")
    return args


def shapes_of(args: argparse.Namespace) -> list[Shape]:
    if not args.sweep:
        return [Shape(args.seq, args.batch, args.heads, args.groups, args.head_dim)]
    return [
        Shape(s, args.batch, args.heads, g, args.head_dim)
        for s in SWEEP_SEQS
        for g in (args.heads, 4)
    ]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the table; write JSON if asked. Returns the JSON document.

    Raises:
        MemoryCheckError: FoPE saved more than RoPE + 2 tables for some shape (after printing).
    """
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.suite:
        return run_suite_cli(args, device, dtype)
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "train_seq_len": args.train_seq_len,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    rows = [
        run_shape(sh, dtype, device, args.train_seq_len, args.repeats, args.warmup)
        for sh in shapes_of(args)
    ]
    doc = {
        "meta": meta,
        "results": rows,
        "memory_check_ok": all(r["memory_check_ok"] for r in rows),
    }
    print(
        f"# FoPE (tables + apply to q, k) vs megatron-core unfused RoPE, forward+backward; "
        f"median of {args.repeats} after {args.warmup} warmup, the two taking turns"
    )
    print(
        f"# torch {meta['torch']} on {meta['device']} ({meta['cpu_threads']} CPU threads), "
        f"FoPE train_seq_len={args.train_seq_len}"
    )
    print(format_table(rows))
    verdict = "holds" if doc["memory_check_ok"] else "FAILS"
    print(f"# saved-for-backward check FoPE <= RoPE + 2 x table (float32 [s, G, d_r]): {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"# wrote {args.json}")
    if not doc["memory_check_ok"]:
        bad = [r for r in rows if not r["memory_check_ok"]]
        raise MemoryCheckError(
            "FoPE keeps more alive for backward than RoPE + its two tables: "
            + "; ".join(
                f"s={r['seq']} G={r['groups']}: {r['fope']['saved_bytes']} B > "
                f"{r['saved_limit_bytes']} B"
                for r in bad
            )
        )
    return doc


def run_suite_cli(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """``--suite``: run, print the markdown tables, write JSON (+ a .md beside it)."""
    from .suite import SUITE_SEQS, format_suite, run_suite

    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else list(SUITE_SEQS)
    kw = {} if args.heads == 16 and args.groups == 16 else {"heads": args.heads}
    if kw:
        kw.update(groups=args.groups, head_dim=args.head_dim, batch=args.batch)
    doc = run_suite(
        device,
        seqs,
        args.methods.split(",") if args.methods else None,
        dtype,
        args.train_seq_len,
        args.repeats,
        args.warmup,
        copy_bytes=2**30 if device.type == "cuda" else 2**24,
        **kw,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc["meta"] = {"torch": torch.__version__, "device": name, "argv": sys.argv[1:]}
    text = f"# fused FoPE vs RoPE implementations on {name} (torch {torch.__version__})\n\n"
    text += format_suite(doc)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(text + "\n")
        print(f"# wrote {args.json}")
    return doc


if __name__ == "__main__":
    try:
        main()
    except MemoryCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
