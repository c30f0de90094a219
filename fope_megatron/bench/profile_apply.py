"""Kernel-level profile of one layer's q/k encoding, forward+backward (a GPU diagnosis).

    python -m fope_megatron.bench.profile_apply --device cuda --methods fope_fused,rope_fused

For each method: the device kernels of ``iters`` forward+backward passes (torch.profiler, mean
time per call), then the block size / warps the fused kernel's autotuner chose per launch kind
(``SIGN`` 1 is the forward, -1 the backward). Shapes as the benchmark suite: bf16 q
``[s, 1, 32, 128]``, k ``[s, 1, 8, 128]``. On the CPU it runs under ``TRITON_INTERPRET=1`` (tiny
shapes; a check that the script works, not a profile).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from .methods import build_step


def profile_method(
    name: str, seq: int, device: torch.device, iters: int, train_seq_len: int = 4096
) -> str:
    q = torch.randn(seq, 1, 32, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(seq, 1, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    step, _ = build_step(name, seq, 32, 8, 128, train_seq_len, device)

    def both() -> None:
        q.grad = k.grad = None
        oq, ok = step(q, k)
        torch.autograd.backward((oq, ok), (gq, gk))

    for _ in range(3):  # compile, autotune
        both()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            both()
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60)


def autotune_choices() -> list[str]:
    from ..fope import triton_kernel

    tuned = triton_kernel._fope_qk_tuned
    out = [
        f"{dict(zip(tuned.keys, key, strict=False))} -> {cfg}" for key, cfg in tuned.cache.items()
    ]
    return out or ["(nothing tuned: a single config, e.g. under the interpreter)"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fope_megatron.bench.profile_apply")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--train-seq-len", type=int, default=4096, help="FoPE floor length L")
    p.add_argument("--methods", default="fope_fused,rope_fused")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    for name in args.methods.split(","):
        print(f"## {name}, s={args.seq}, {args.iters} x forward+backward")
        print(profile_method(name, args.seq, device, args.iters, args.train_seq_len))
    print("## autotune choices (per launch kind)")
    print("\n".join(autotune_choices()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
