"""PNG plots of evaluation results (matplotlib, Agg, no pyplot global state).

Figures are built with ``matplotlib.figure.Figure`` directly, so plotting never switches the
process-wide backend and works on machines without a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

Series = tuple[str, Mapping[int, float]]
"""A named curve: ``(label, {length: value})``."""

_DPI = 130


def _length_axis(ax: Axes, lengths: Sequence[int], train_lens: Sequence[int]) -> None:
    """Log-2 x axis ticked at the evaluated lengths, dashed lines at the training lengths."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, [str(t) for t in ticks], rotation=45 if len(ticks) > 6 else 0)
    ax.set_xlabel("evaluation length (tokens, log scale)")
    for i, t in enumerate(sorted(set(train_lens))):
        ax.axvline(t, color="grey", ls="--", lw=1, label="train length" if i == 0 else None)
    ax.grid(True, alpha=0.3)


def _finite(values: Mapping[int, float | None]) -> list[tuple[int, float]]:
    pts = [(int(k), float(v)) for k, v in values.items() if v is not None]
    return sorted((k, v) for k, v in pts if math.isfinite(v))


def draw_perplexity(ax: Axes, runs: Sequence[Series], train_lens: Sequence[int]) -> None:
    """Perplexity vs length, one curve per run; log y when the values span > 20x."""
    all_pts = [p for _, values in runs for p in _finite(values)]
    for label, values in runs:
        pts = _finite(values)
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=label)
    _length_axis(ax, [k for k, _ in all_pts] or list(train_lens), train_lens)
    ys = [v for _, v in all_pts]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs length")
    ax.legend(fontsize="small")


def draw_passkey(ax: Axes, runs: Sequence[Series], train_lens: Sequence[int]) -> None:
    """Passkey accuracy (0..1) vs length, one curve per run."""
    all_lengths = []
    for label, values in runs:
        pts = _finite(values)
        all_lengths += [k for k, _ in pts]
        ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=label)
    _length_axis(ax, all_lengths or list(train_lens), train_lens)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("passkey accuracy (exact greedy)")
    ax.set_title("Passkey retrieval vs length")
    ax.legend(fontsize="small")


def save_perplexity_plot(path: Path, runs: Sequence[Series], train_lens: Sequence[int]) -> Path:
    """Write a perplexity-vs-length PNG."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    draw_perplexity(fig.subplots(), runs, train_lens)
    fig.savefig(path, dpi=_DPI)
    return Path(path)


def save_passkey_plot(path: Path, runs: Sequence[Series], train_lens: Sequence[int]) -> Path:
    """Write a passkey-accuracy-vs-length PNG."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    draw_passkey(fig.subplots(), runs, train_lens)
    fig.savefig(path, dpi=_DPI)
    return Path(path)


def save_depth_heatmap(
    path: Path, by_depth: Mapping[int, Mapping[str, float | None]], title: str = ""
) -> Path:
    """Write a length x depth heat map of passkey accuracy (blank cells: no trial)."""
    lengths = sorted(int(k) for k in by_depth)
    buckets = list(next(iter(by_depth.values())).keys()) if by_depth else []
    grid = [
        [by_depth[L].get(b) if by_depth[L].get(b) is not None else math.nan for L in lengths]
        for b in buckets
    ]
    fig = Figure(
        figsize=(max(4.8, 0.8 * len(lengths) + 2.4), 0.5 * len(buckets) + 2.2), layout="constrained"
    )
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                color = "black" if v > 0.6 else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(buckets)), buckets)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("needle depth (fraction of filler before it)")
    ax.set_title(title or "Passkey accuracy by length and depth")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.savefig(path, dpi=_DPI)
    return Path(path)


def save_compare_figure(
    path: Path,
    ppl_runs: Sequence[Series],
    passkey_runs: Sequence[Series],
    train_lens: Sequence[int],
) -> Path:
    """Write one figure with every run: perplexity (left) and passkey accuracy (right)."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax_ppl, ax_pk = fig.subplots(1, 2)
    draw_perplexity(ax_ppl, ppl_runs, train_lens)
    draw_passkey(ax_pk, passkey_runs, train_lens)
    fig.savefig(path, dpi=_DPI)
    return Path(path)
