"""Plots of experiment results (matplotlib, headless ``Agg`` backend): accuracy against model
width per mixer, loss curves from ``metrics.jsonl``, and bar charts of one metric per mixer.

Every function takes plain Python data (no run directories), writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["accuracy_vs_dmodel", "loss_curves", "bar_chart"]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_dmodel(series: Mapping[str, Sequence[tuple[int, float, float]]], path: str, *,
                       title: str = "", ylabel: str = "valid accuracy (best over LR)") -> str:
    """One line per mixer: ``series[mixer] = [(d_model, mean, std), ...]``; x on a log2 axis.
    Points whose mean is NaN (every LR diverged) are left out."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in sorted(series.items()):
        pts = sorted((d, m, s) for d, m, s in points if m is not None and math.isfinite(m))
        if not pts:
            continue
        xs, ms, ss = zip(*pts)
        ax.errorbar(xs, ms, yerr=[0.0 if not math.isfinite(s) else s for s in ss], marker="o", capsize=3,
                    label=name)
    ax.set_xscale("log", base=2)
    ds = sorted({d for pts in series.values() for d, _, _ in pts})
    if ds:
        ax.set_xticks(ds)
        ax.set_xticklabels([str(d) for d in ds])
    ax.set_xlabel("d_model")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def loss_curves(curves: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]], path: str, *,
                title: str = "") -> str:
    """``curves[label][split] = (steps, losses)`` with ``split`` in ``{"train", "valid"}``: one
    panel per split present, one line per label (log-scaled loss when it spans more than 5x)."""
    splits = [s for s in ("train", "valid") if any(s in c and len(c[s][0]) for c in curves.values())]
    splits = splits or ["valid"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.0), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for j, split in enumerate(splits):
        ax = axes[0][j]
        ys = [y for c in curves.values() if split in c for y in c[split][1] if math.isfinite(y) and y > 0]
        for i, (label, c) in enumerate(sorted(curves.items())):
            if split in c and len(c[split][0]):
                steps, losses = c[split]
                ax.plot(steps, losses, marker="." if split == "valid" else None, color=cmap(i % cmap.N),
                        label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} loss")
        if ys and max(ys) / min(ys) > 5:                # log only when the losses span a wide range
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{split} loss" + (f" — {title}" if title else ""), fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def bar_chart(values: Mapping[str, float], path: str, *, ylabel: str = "valid accuracy", title: str = "",
              highlight: Sequence[str] = (), ylim: tuple[float, float] | None = (0.0, 1.0)) -> str:
    """One bar per key, in the mapping's order, value printed on top; ``highlight`` bars are
    drawn in a second colour (e.g. the attention baselines)."""
    names = list(values)
    vals = [float(values[n]) if values[n] is not None else float("nan") for n in names]
    fig, ax = plt.subplots(figsize=(max(4.8, 0.7 * len(names) + 1.5), 4.2))
    colors = ["tab:orange" if n in highlight else "tab:blue" for n in names]
    bars = ax.bar(range(len(names)), [0.0 if not math.isfinite(v) else v for v in vals], color=colors)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), "n/a" if not math.isfinite(v) else f"{v:.2f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
