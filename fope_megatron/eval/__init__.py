"""Length-generalization evaluation: perplexity and passkey retrieval vs length, reports, plots.

- ``perplexity``: ``evaluate_perplexity(logits_fn, tokens, lengths, ...)`` on a held-out stream.
- ``passkey``: prompt generator and ``evaluate_passkey(logits_fn, tokenizer, lengths, ...)``.
- ``report``: ``write_report(out_dir, ...)`` (eval.json, eval.md, PNGs) and ``compare(...)``.
- ``plots``: the matplotlib figures used by ``report``.

The model is a plain causal-LM callable ``logits_fn(LongTensor[b, s]) -> FloatTensor[b, s, V]``.
"""
