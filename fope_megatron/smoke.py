"""``make smoke``: train a tiny FoPE model on the built-in corpus, then evaluate it.

Generates the synthetic corpus, preprocesses it to ``.bin/.idx``, trains ``configs/smoke.yaml``
on the CPU (or one GPU), prints the final loss next to the corpus' unigram entropy, and writes
the length-generalization report to ``RUN_DIR/eval``. Extra ``key=value`` arguments override the
config (e.g. ``python -m fope_megatron.smoke train.steps=50``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from .compat.warnings import quiet_known_warnings

    quiet_known_warnings()
    from .config import load_config
    from .train.preflight import preflight
    from .train.trainer import train

    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    run_dir = Path(cfg.run.dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a smoke run always starts fresh
    preflight(cfg, 1)
    code = train(cfg)
    if code != 0:
        return code

    from .data.preprocess import read_meta
    from .data.synthetic import unigram_entropy

    prefix = next((run_dir / "data").glob("*.bin")).with_suffix("")
    meta = read_meta(prefix)
    entropy = unigram_entropy(np.fromfile(f"{prefix}.bin", dtype=meta["dtype"]))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r["loss"] for r in records if "loss" in r][-1]
    val = [r["val_loss"] for r in records if "val_loss" in r]

    from .eval.__main__ import main as eval_main

    lengths = [cfg.train.seq_length * k for k in (1, 2, 4, 8)]
    eval_code = eval_main(
        ["--run", str(run_dir), "--out", str(run_dir / "eval"), "--lengths",
         ",".join(map(str, lengths)), "--passkey-trials", "10", "--no-progress"]
    )  # fmt: skip
    if eval_code == 0:
        from .eval.report import load_eval

        print(passkey_note(load_eval(run_dir / "eval")["passkey"], cfg.data.passkey_fraction))
    print(f"\nsmoke run dir: {run_dir}")
    print(f"corpus unigram entropy : {entropy:.3f} nats/token")
    print(f"final training loss    : {final:.3f} nats/token ({final / entropy:.0%} of it)")
    if val:
        print(f"final validation loss  : {val[-1]:.3f}")
    print(f"length-generalization report: {run_dir / 'eval' / 'eval.md'}")
    if final > 0.6 * entropy:
        print("smoke FAILED: the loss did not fall far below the unigram entropy")
        return 1
    return eval_code or hand_off(run_dir)


def passkey_note(passkey: dict[str, float], passkey_fraction: float) -> str:
    """What the report's passkey column means for this run (``passkey``: accuracy per length)."""
    what = "passkey acc = share of trials whose 5-digit key is generated back exactly"
    if passkey and not any(passkey.values()) and passkey_fraction == 0:
        return (
            f"note: {what}. It is 0 at every length here: the smoke model is not trained for "
            "retrieval (data.passkey_fraction=0), so perplexity is its length measure. "
            "See docs/evaluation.md."
        )
    return f"note: {what}; see docs/evaluation.md."


def hand_off(run_dir: Path, prompt: str = "The grass is") -> int:
    """Export to ``RUN_DIR/hf`` and continue ``prompt`` greedily with transformers alone."""
    from .checkpoint.hf.export import main as export_main

    code = export_main(["--run", str(run_dir), "--out", str(run_dir / "hf"), "--force"])
    if code != 0:
        return code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "hf", trust_remote_code=True)  # no prompt
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf", trust_remote_code=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"transformers greedy from {run_dir / 'hf'}: {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
