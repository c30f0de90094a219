"""``fope-eval``: perplexity and passkey retrieval vs length for a trained run, or a comparison.

fope-eval --run RUN_DIR [--checkpoint latest|PATH] --lengths 128,256,512 --out OUT_DIR
fope-eval --compare OUT_A OUT_B ... --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def heldout_tokens(cfg, tokenizer, n_tokens: int, data: str | None) -> torch.Tensor:
    """Held-out token stream: fresh synthetic documents (a seed training never used) for the
    built-in corpus, else the validation documents of ``data`` (default: the run's first prefix)."""
    if data is None and cfg.data.synthetic:
        from ..data.synthetic import synthetic_document

        ids: list[int] = []
        i = 0
        while len(ids) < n_tokens:
            ids += tokenizer.encode(synthetic_document(i, seed=cfg.run.seed + 1_000_003))
            ids.append(tokenizer.eod)
            i += 1
        return torch.tensor(ids[:n_tokens])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ..data.datasets import _split_doc_counts, parse_data_path

    prefix = data or parse_data_path(cfg.data.path)[0][0]
    ds = IndexedDataset(prefix, mmap=True)
    weights = [float(x) for x in cfg.data.split.split(",")]
    total = sum(weights)
    bounds = np.cumsum([0.0] + [w / total for w in weights])
    matrix = [(bounds[i], bounds[i + 1]) for i in range(len(weights))]
    counts = _split_doc_counts(len(ds), matrix)
    start = counts[0]
    ids_np = []
    have = 0
    for doc in range(start, len(ds)):
        seq = np.asarray(ds[doc], dtype=np.int64)
        ids_np.append(seq)
        have += len(seq)
        if have >= n_tokens:
            break
    if have == 0:
        raise ValueError(f"{prefix}: the split {cfg.data.split!r} leaves no held-out documents")
    return torch.from_numpy(np.concatenate(ids_np)[:n_tokens])


def evaluate_run(args) -> dict:
    from ..checkpoint.full_state import load_model
    from ..data.tokenizer import get_tokenizer
    from .loader import logits_fn
    from .passkey import evaluate_passkey
    from .perplexity import evaluate_perplexity
    from .report import write_report

    model, cfg, path = load_model(args.run, args.checkpoint)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    fn = logits_fn(model)
    lengths = sorted(args.lengths)
    n_tokens = max(lengths) * args.ppl_chunks
    tokens = heldout_tokens(cfg, tokenizer, n_tokens, args.data)
    ppl = evaluate_perplexity(
        fn, tokens, lengths, n_tokens=min(n_tokens, len(tokens)), stride=args.stride,
        max_batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    passkey = None
    if args.passkey_trials > 0:
        passkey = evaluate_passkey(
            fn, tokenizer, lengths, n_trials=args.passkey_trials, seed=args.seed,
            max_batch_size=args.batch_size, progress=not args.no_progress,
        )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    return write_report(
        args.out,
        perplexity=ppl,
        passkey=passkey,
        train_seq_len=cfg.fope.train_seq_len or cfg.train.seq_length,
        checkpoint=str(path),
        position_embedding=cfg.model.position_embedding,
        params=params,
        label=args.label,
        details={
            "run": str(args.run),
            "protocol": "sliding" if args.stride else "non-overlapping chunks",
            "stride": args.stride,
            "ppl_tokens": int(min(n_tokens, len(tokens))),
            "passkey_trials": args.passkey_trials,
            "seed": args.seed,
            "position_scaling": cfg.position.scaling,
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fope-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--run", help="training run dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest, or a step_N folder")
    p.add_argument("--lengths", default="128,256,512,1024",
                   type=lambda s: [int(x) for x in s.split(",") if x])  # fmt: skip
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--compare", nargs="+", metavar="OUT_DIR", help="compare eval output dirs")
    p.add_argument("--data", help="held-out data prefix (default: the run's valid split)")
    p.add_argument("--ppl-chunks", type=int, default=4,
                   help="chunks of the longest length; every length reads the same tokens")  # fmt: skip
    p.add_argument("--stride", type=int, default=None, help="sliding-window mode with this stride")
    p.add_argument("--passkey-trials", type=int, default=20, help="trials per length (0: skip)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from ..compat.warnings import quiet_known_warnings

    quiet_known_warnings()
    if args.compare:
        from .report import compare

        out = compare(args.compare, args.out)
        print(f"wrote {out['table']} and {out['figure']}")
        return 0
    if not args.run:
        p.error("--run is required (or --compare)")
    try:
        result = evaluate_run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"fope-eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "eval.md").read_text())
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
