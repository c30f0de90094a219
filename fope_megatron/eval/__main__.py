"""``fope-eval``: perplexity and passkey retrieval vs length for a trained run, or a comparison.

fope-eval --run RUN_DIR [--checkpoint latest|PATH] --lengths 128,256,512 --out OUT_DIR
          [--position-scaling pi|ntk|dynamic-ntk|yarn [--scaling-factor F]]
fope-eval --compare OUT_A OUT_B ... --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..compat.warnings import add_verbose_flag, quiet_known_warnings
from .heldout import heldout_tokens

__all__ = ["heldout_tokens", "main"]


def evaluate_run(args) -> dict:
    from ..checkpoint.full_state import load_model, load_run_config
    from ..data.tokenizer import get_tokenizer
    from .loader import logits_fn
    from .passkey import evaluate_passkey
    from .perplexity import evaluate_perplexity

    # the data first: a bad --data fails before the model is built
    cfg = load_run_config(args.run)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    lengths = sorted(args.lengths)
    n_tokens = max(lengths) * args.ppl_chunks
    tokens = heldout_tokens(cfg, tokenizer, n_tokens, args.data)
    model, cfg, path = load_model(args.run, args.checkpoint)
    if args.position_scaling != "none":
        return _evaluate_scaled(args, cfg, model, path, tokenizer, tokens, lengths, n_tokens)
    fn = logits_fn(model)
    greedy = None
    if args.passkey_trials > 0 and not args.passkey_full_recompute:
        # passkey generation through the transformers export's KV cache (same greedy tokens)
        from ..checkpoint.hf.export import transformers_model
        from .loader import cached_greedy_fn

        device = next(model.parameters()).device
        greedy = cached_greedy_fn(transformers_model(cfg, model.state_dict()).to(device))
    ppl = evaluate_perplexity(
        fn, tokens, lengths, n_tokens=min(n_tokens, len(tokens)), stride=args.stride,
        max_batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    passkey = None
    if args.passkey_trials > 0:
        passkey = evaluate_passkey(
            fn, tokenizer, lengths, n_trials=args.passkey_trials, seed=args.seed,
            max_batch_size=args.batch_size, progress=not args.no_progress, greedy_fn=greedy,
        )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    span = min(n_tokens, len(tokens))
    return _report(
        args, cfg, path, params, ppl, passkey, span, position_scaling=cfg.position.scaling
    )


def _report(args, cfg, path, params, ppl, passkey, span, **details) -> dict:
    """``write_report`` with what every fope-eval run records, plus ``details``."""
    from .report import write_report

    return write_report(
        args.out,
        perplexity=ppl,
        passkey=passkey,
        train_seq_len=cfg.fope_train_seq_len,
        checkpoint=str(path),
        position_embedding=cfg.model.position_embedding,
        params=params,
        label=args.label,
        details={
            "run": str(args.run),
            "protocol": "sliding" if args.stride else "non-overlapping chunks",
            "stride": args.stride,
            "ppl_tokens": int(span),
            "passkey_trials": args.passkey_trials,
            "seed": args.seed,
            **details,
        },
    )


def _evaluate_scaled(args, cfg, model, path, tokenizer, tokens, lengths, n_tokens) -> dict:
    """One model per length with scaled frequencies (``eval.scaled``); passkey by full recompute
    (the transformers export knows no NTK scaling, and the recompute path is the reference)."""
    from ..checkpoint.full_state import checkpoint_full_state
    from .loader import logits_fn
    from .passkey import evaluate_passkey
    from .perplexity import evaluate_perplexity
    from .scaled import build_scaled_model, scaling_factor

    train_len = cfg.fope_train_seq_len
    state = checkpoint_full_state(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    span = min(n_tokens, len(tokens))
    ppl, passkey, factors = {}, {"passkey": {}, "passkey_by_depth": {}, "passkey_logprob": {}}, {}
    for L in lengths:
        f = scaling_factor(args.position_scaling, args.scaling_factor, L, train_len)
        factors[L] = f
        fn = logits_fn(build_scaled_model(cfg, state, path, args.position_scaling, f, L))
        ppl.update(evaluate_perplexity(
            fn, tokens, [L], n_tokens=span, stride=args.stride, max_batch_size=args.batch_size,
            progress=not args.no_progress,
        ))  # fmt: skip
        if args.passkey_trials > 0:
            one = evaluate_passkey(
                fn, tokenizer, [L], n_trials=args.passkey_trials, seed=args.seed,
                max_batch_size=args.batch_size, progress=not args.no_progress,
            )  # fmt: skip
            for k, v in one.items():
                passkey[k].update(v)
    return _report(
        args, cfg, path, params, ppl, passkey if args.passkey_trials > 0 else None, span,
        position_scaling=args.position_scaling,
        scaling_factor={str(L): f for L, f in factors.items()},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fope-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--run", help="training run dir (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest, or a step_N folder")
    p.add_argument("--lengths", default="128,256,512,1024",
                   type=lambda s: [int(x) for x in s.split(",") if x])  # fmt: skip
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--compare", nargs="+", metavar="OUT_DIR", help="compare eval output dirs")
    p.add_argument("--data", help="held-out data: a dataset PREFIX (all of it is used) or a "
                   ".jsonl/.json/.txt file tokenized here (default: the run's own data after its "
                   "training split)")  # fmt: skip
    p.add_argument("--ppl-chunks", type=int, default=4,
                   help="chunks of the longest length; every length reads the same tokens")  # fmt: skip
    p.add_argument("--stride", type=int, default=None, help="sliding-window mode with this stride")
    p.add_argument("--passkey-trials", type=int, default=20, help="trials per length (0: skip)")
    p.add_argument("--passkey-full-recompute", action="store_true",
                   help="generate the passkey with one full forward per token (default: KV cache)")  # fmt: skip
    p.add_argument("--position-scaling", default="none",
                   choices=["none", "pi", "ntk", "dynamic-ntk", "yarn"],
                   help="training-free frequency scaling at evaluation time (no fine-tuning)")  # fmt: skip
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="scaling factor (default: eval length / training length per length; "
                   "1 for dynamic-ntk, which scales by the sequence length itself)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    quiet_known_warnings(args.verbose)
    if args.compare:
        from .report import compare

        out = compare(args.compare, args.out)
        print(f"wrote {out['table']} and {out['figure']}")
        return 0
    if not args.run:
        p.error("--run is required (or --compare)")
    if args.scaling_factor is not None and args.position_scaling == "none":
        p.error("--scaling-factor needs --position-scaling pi|ntk|dynamic-ntk|yarn")
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
