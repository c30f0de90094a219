"""Aggregate the study's per-seed ``eval.json`` files: mean and min-max per row, corpus and length;
Markdown tables (``study.md``), ``study.json`` and plots with min-max bands."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

ROWS = {
    # row label: (trained position embedding, fope-eval --position-scaling)
    "RoPE": ("rope", "none"),
    "RoPE+PI": ("rope", "pi"),
    "RoPE+NTK": ("rope", "ntk"),
    "RoPE+dynamic-NTK": ("rope", "dynamic-ntk"),
    "RoPE+YaRN": ("rope", "yarn"),
    "FoPE": ("fope", "none"),
    "FoPE+YaRN": ("fope", "yarn"),
}
METRICS = ("perplexity", "passkey")


def _stats(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    finite = [v for v in vals if math.isfinite(v)]
    mean = sum(vals) / len(vals) if len(finite) == len(vals) else math.inf
    return {"mean": mean, "min": min(vals), "max": max(vals), "n": len(vals)}


def collect(out: Path, corpora, seeds, lengths) -> dict:
    """``{corpus: {row: {metric: {L: stats}, "passkey_by_depth": {L: {bucket: mean}}}}}``."""
    res: dict = {}
    for corpus in corpora:
        res[corpus] = {}
        for row in ROWS:
            by_seed = {}
            for s in seeds:
                f = out / "evals" / corpus / f"{row}_s{s}" / "eval.json"
                if f.is_file():
                    by_seed[s] = json.loads(f.read_text())
            if not by_seed:
                continue
            evals = list(by_seed.values())
            r: dict = {"seeds": len(evals)}
            r["passkey_per_seed"] = {
                s: {L: e.get("passkey", {}).get(str(L)) for L in lengths}
                for s, e in by_seed.items()
            }
            for metric in METRICS:
                r[metric] = {
                    L: _stats([e.get(metric, {}).get(str(L)) for e in evals]) for L in lengths
                }
            depth = {}
            for L in lengths:
                per = [e.get("passkey_by_depth", {}).get(str(L)) or {} for e in evals]
                buckets = list(per[0].keys()) if per and per[0] else []
                depth[L] = {b: (_stats([p.get(b) for p in per]) or {}).get("mean") for b in buckets}
            r["passkey_by_depth"] = depth
            res[corpus][row] = r
    return res


def _cell(st: dict | None, digits: int) -> str:
    if st is None:
        return "–"

    def f(v):
        return f"{v:.{digits}f}" if math.isfinite(v) and abs(v) < 1e4 else f"{v:.3g}"

    if st["n"] == 1 or st["min"] == st["max"]:
        return f(st["mean"])
    return f"{f(st['mean'])} ({f(st['min'])}–{f(st['max'])})"


def markdown(res: dict, lengths, train_len: int) -> str:
    lines = ["# Length-generalization study: mean (min–max) over seeds", ""]
    for corpus, rows in res.items():
        for metric, digits in (("perplexity", 3), ("passkey", 2)):
            lines += [f"## {corpus}: {metric}", ""]
            head = ["row", "seeds"] + [f"{L} ({L // train_len}x)" for L in lengths]
            lines += ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(lengths)]
            for row, r in rows.items():
                cells = [_cell(r[metric][L], digits) for L in lengths]
                lines.append(f"| {row} | {r['seeds']} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"## {corpus}: passkey accuracy per seed", ""]
        head = ["row", "seed"] + [f"{L} ({L // train_len}x)" for L in lengths]
        lines += ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(lengths)]
        for row, r in rows.items():
            for seed, accs in r["passkey_per_seed"].items():
                cells = ["–" if accs[L] is None else f"{accs[L]:.2f}" for L in lengths]
                lines.append(f"| {row} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"## {corpus}: passkey accuracy by needle depth (mean over seeds)", ""]
        for row, r in rows.items():
            depth = r["passkey_by_depth"]
            buckets = next((list(d) for d in depth.values() if d), [])
            if not buckets:
                continue
            lines += [f"{row}:", "", "| length | " + " | ".join(buckets) + " |"]
            lines.append("|---:|" + "---:|" * len(buckets))
            for L in lengths:
                vals = [depth[L].get(b) for b in buckets]
                cells = ["–" if v is None else f"{v:.2f}" for v in vals]
                lines.append(f"| {L} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [f"![{corpus}]({corpus}.png)", ""]
    return "\n".join(lines)


def plot(path: Path, rows: dict, lengths, train_len: int, title: str) -> None:
    """Perplexity (log y) and passkey accuracy vs length; lines are means, bands min-max."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, METRICS, strict=True):
        for row, r in rows.items():
            pts = [(L, r[metric][L]) for L in lengths if r[metric][L] is not None]
            pts = [(L, s) for L, s in pts if math.isfinite(s["max"])]
            if not pts:
                continue
            xs = [L for L, _ in pts]
            style = "-" if row.startswith("FoPE") else "--"
            (line,) = ax.plot(xs, [s["mean"] for _, s in pts], style, marker="o", label=row)
            ax.fill_between(
                xs, [s["min"] for _, s in pts], [s["max"] for _, s in pts],
                color=line.get_color(), alpha=0.15,
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.axvline(train_len, color="grey", ls=":", lw=1)
        ax.set_xlabel("evaluation length (tokens)")
        ax.grid(True, alpha=0.3)
        if metric == "perplexity":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (held-out)")
        else:
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("passkey accuracy (exact greedy)")
        ax.set_title(f"{title}: {metric}")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def aggregate(out: str | Path, corpora, seeds, lengths) -> dict:
    """Write ``study.json``, ``study.md`` and ``<corpus>.png`` under ``out``; return the data."""
    out = Path(out)
    res = collect(out, corpora, seeds, lengths)
    train_len = min(lengths)
    (out / "study.json").write_text(
        json.dumps({"lengths": lengths, "seeds": seeds, "results": res}, indent=1) + "\n"
    )
    (out / "study.md").write_text(markdown(res, lengths, train_len))
    for corpus, rows in res.items():
        if rows:
            plot(out / f"{corpus}.png", rows, lengths, train_len, corpus)
    return {"results": res}
