"""Evaluation reports: ``eval.json``, ``eval.md`` and PNG plots for one run; ``compare`` for many.

``OUT_DIR/eval.json`` (lengths are string keys, as JSON requires)::

    {"label": str, "position_embedding": str | null, "params": int | null,
     "train_seq_len": int, "checkpoint": str,
     "perplexity": {"<len>": float}, "passkey": {"<len>": float},
     "passkey_by_depth": {"<len>": {"<bucket>": float | null}},
     "passkey_logprob": {"<len>": float},
     "details": {"perplexity": {"<len>": {"ppl", "nll", "tokens", "chunks", "stride"}}, ...}}

Plots: ``perplexity.png`` (log-2 x, dashed line at ``train_seq_len``), ``passkey.png`` and
``passkey_depth.png`` (length x depth heat map). ``compare`` writes ``compare.md`` (one table)
and ``compare.png`` (one figure), every run labelled ``"<position embedding> <size>"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fope_megatron.eval import plots

EVAL_JSON = "eval.json"


def _str_keys(d: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()}


def _int_keys(d: Mapping[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


def format_params(n: int | None) -> str:
    """``12_345_678 -> "12.3M"``; empty for ``None``."""
    if n is None:
        return ""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and (math.isinf(v) or abs(v) >= 1e4):
        return f"{v:.4g}"
    return f"{v:.{digits}f}"


def write_report(
    out_dir: str | Path,
    *,
    perplexity: Mapping[int, Mapping[str, Any]],
    passkey: Mapping[str, Mapping[int, Any]] | None,
    train_seq_len: int,
    checkpoint: str,
    label: str | None = None,
    position_embedding: str | None = None,
    params: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``eval.json``, ``eval.md`` and the PNG plots into ``out_dir``; return the JSON dict.

    Args:
        perplexity: the output of ``evaluate_perplexity``.
        passkey: the output of ``evaluate_passkey`` (or ``None`` when not run).
        train_seq_len: the length the checkpoint was trained at (FoPE's floor).
        checkpoint: the checkpoint path or tag evaluated.
        label: a run name; defaults to ``"<position_embedding> <size>"``.
        details: extra fields stored under ``details`` (e.g. protocol, seed, data path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    passkey = passkey or {}
    result: dict[str, Any] = {
        "label": label or run_label_from(position_embedding, params) or out.name,
        "position_embedding": position_embedding,
        "params": params,
        "train_seq_len": int(train_seq_len),
        "checkpoint": str(checkpoint),
        "perplexity": {str(L): float(r["ppl"]) for L, r in perplexity.items()},
        "passkey": _str_keys(passkey.get("passkey", {})),
        "passkey_by_depth": _str_keys(passkey.get("passkey_by_depth", {})),
        "passkey_logprob": _str_keys(passkey.get("passkey_logprob", {})),
        "details": {"perplexity": {str(L): dict(r) for L, r in perplexity.items()}},
    }
    result["details"].update(details or {})
    (out / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(_run_markdown(result))

    ppl = _int_keys(result["perplexity"])
    plots.save_perplexity_plot(out / "perplexity.png", [(result["label"], ppl)], [train_seq_len])
    if result["passkey"]:
        pk = [(result["label"], _int_keys(result["passkey"]))]
        plots.save_passkey_plot(out / "passkey.png", pk, [train_seq_len])
        plots.save_depth_heatmap(
            out / "passkey_depth.png",
            _int_keys(result["passkey_by_depth"]),
            f"Passkey accuracy by length and depth: {result['label']}",
        )
    return result


def run_label_from(position_embedding: str | None, params: int | None) -> str:
    """``"fope 12.3M"`` from the fields of ``eval.json`` (empty if both are missing)."""
    return " ".join(p for p in (position_embedding or "", format_params(params)) if p)


def load_eval(out_dir: str | Path) -> dict[str, Any]:
    """Read ``OUT_DIR/eval.json`` with a clear error when it is missing."""
    path = Path(out_dir) / EVAL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the evaluation with --out {out_dir} first")
    return json.loads(path.read_text())


def _run_markdown(r: Mapping[str, Any]) -> str:
    ppl = _int_keys(r["perplexity"])
    det = _int_keys(r["details"]["perplexity"])
    pk = _int_keys(r["passkey"])
    lp = _int_keys(r["passkey_logprob"])
    lengths = sorted(set(ppl) | set(pk))
    train = r["train_seq_len"]
    lines = [
        f"# Evaluation: {r['label']}",
        "",
        f"- checkpoint: `{r['checkpoint']}`",
        f"- position embedding: {r['position_embedding'] or '?'}; "
        f"parameters: {format_params(r['params']) or '?'}; train_seq_len: {train}",
        "",
        "| length | x train | perplexity | NLL | scored tokens | chunks | passkey acc "
        "| key log-prob |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for L in lengths:
        d = det.get(L, {})
        lines.append(
            f"| {L} | {L / train:g} | {_fmt(ppl.get(L))} | {_fmt(d.get('nll'))} "
            f"| {d.get('tokens', '–')} | {d.get('chunks', '–')} | {_fmt(pk.get(L), 2)} "
            f"| {_fmt(lp.get(L))} |"
        )
    by_depth = _int_keys(r["passkey_by_depth"])
    if by_depth:
        buckets = list(next(iter(by_depth.values())).keys())
        lines += ["", "Passkey accuracy by needle depth:", ""]
        lines.append("| length | " + " | ".join(buckets) + " |")
        lines.append("|---:|" + "---:|" * len(buckets))
        for L in sorted(by_depth):
            row = " | ".join(_fmt(by_depth[L].get(b), 2) for b in buckets)
            lines.append(f"| {L} | {row} |")
    lines += ["", "![perplexity](perplexity.png)"]
    if pk:
        lines += ["![passkey](passkey.png)", "![passkey by depth](passkey_depth.png)"]
    return "\n".join(lines) + "\n"


def _compare_names(runs: Sequence[tuple[Path, Mapping[str, Any]]]) -> list[str]:
    """``"<pe> <size>"`` per run; duplicates get the run label or folder name appended."""
    base = [run_label_from(r.get("position_embedding"), r.get("params")) for _, r in runs]
    names = []
    for (d, r), b in zip(runs, base, strict=True):
        extra = r.get("label") or d.name
        if not b:
            names.append(extra)
        elif base.count(b) > 1 and extra != b:
            names.append(f"{b} ({extra})")
        else:
            names.append(b)
    return names


def compare(out_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """One Markdown table and one figure with every run of ``out_dirs``.

    Returns:
        ``{"table": OUT_DIR/compare.md, "figure": OUT_DIR/compare.png}``.
    """
    if not out_dirs:
        raise ValueError("compare needs at least one evaluation output folder")
    runs = [(Path(d), load_eval(d)) for d in out_dirs]
    names = _compare_names(runs)
    ppl = [_int_keys(r["perplexity"]) for _, r in runs]
    pk = [_int_keys(r.get("passkey", {})) for _, r in runs]
    lengths = sorted({L for p in ppl + pk for L in p})

    lines = ["# Length generalization: comparison", ""]
    for name, (d, r) in zip(names, runs, strict=True):
        lines.append(
            f"- **{name}**: `{d}` (checkpoint `{r['checkpoint']}`, "
            f"train_seq_len {r['train_seq_len']})"
        )
    header = ["length"] + [f"ppl {n}" for n in names] + [f"passkey {n}" for n in names]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for L in lengths:
        cells = [str(L)] + [_fmt(p.get(L)) for p in ppl] + [_fmt(p.get(L), 2) for p in pk]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![comparison](compare.png)", ""]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "compare.md"
    table.write_text("\n".join(lines))
    train_lens = [int(r["train_seq_len"]) for _, r in runs]
    figure = plots.save_compare_figure(
        out / "compare.png",
        list(zip(names, ppl, strict=True)),
        list(zip(names, pk, strict=True)),
        train_lens,
    )
    return {"table": table, "figure": figure}
