"""Plots of attention maps and their statistics (matplotlib, headless ``Agg`` backend).

Every function takes plain arrays (as :mod:`attn_jax.analysis.capture` and
:mod:`attn_jax.analysis.metrics` return them), writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attn_jax.core.array_types import ArrayLike  # noqa: E402

__all__ = ["heatmap", "head_grid", "layer_head_bars", "series_over_training", "pruning_curve"]


def _colors(a) -> dict:
    """viridis from 0 for attention probabilities, a symmetric diverging map for signed weights."""
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < 0:
        m = max(abs(lo), abs(hi), 1e-12)
        return dict(cmap="RdBu_r", vmin=-m, vmax=m)
    return dict(cmap="viridis", vmin=0.0, vmax=max(hi, 1e-12))


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap(weights, path: str, *, title: str = "", labels: Sequence[str] | None = None) -> str:
    """One ``[T, S]`` map (rows: queries, columns: keys; signed weights get a diverging colour map);
    ``labels`` names the tokens."""
    a = np.asarray(weights, np.float64)
    if a.ndim != 2:
        raise ValueError(f"weights: expected one [T, S] map, got shape {a.shape}")
    size = min(8.0, 2.0 + 0.25 * max(a.shape))
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(a, interpolation="nearest", **_colors(a))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if labels is not None and len(labels) == a.shape[1] and a.shape[1] <= 48:
        ax.set_xticks(range(a.shape[1]), labels, rotation=90, fontsize=6)
        if a.shape[0] == a.shape[1]:
            ax.set_yticks(range(a.shape[0]), labels, fontsize=6)
    ax.set_title(title)
    return _save(fig, path)


def head_grid(maps: Mapping[str, np.ndarray], path: str, *, batch: int = 0, title: str = "") -> str:
    """A grid of heatmaps: one row per layer (``maps[layer] = [B, H, T, S]``), one column per head."""
    if not maps:
        raise ValueError("maps: expected at least one layer")
    layers = list(maps)
    H = max(np.asarray(maps[k]).shape[1] for k in layers)
    fig, axes = plt.subplots(len(layers), H, figsize=(1.9 * H + 0.6, 1.9 * len(layers) + 0.6), squeeze=False)
    for r, name in enumerate(layers):
        a = np.asarray(maps[name], np.float64)[batch]
        for h in range(H):
            ax = axes[r][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < a.shape[0]:
                ax.imshow(a[h], interpolation="nearest", **_colors(a[h]))
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layer_head_bars(values: Mapping[str, ArrayLike | Sequence[float]], path: str, *, ylabel: str, title: str = "",
                    threshold: float | None = None) -> str:
    """Grouped bars: one group per layer, one bar per head (entropy, sink score, importance, ...)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(values) + 2), 3.6))
    x0 = 0
    ticks, names = [], []
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        ax.bar(x0 + np.arange(len(v)), v, width=0.8)
        ticks.append(x0 + (len(v) - 1) / 2)
        names.append(name)
        x0 += len(v) + 1
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=0.8)
    ax.set_xticks(ticks, names, rotation=20, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def series_over_training(series: Mapping[str, Sequence[tuple[float, float]]], path: str, *, ylabel: str,
                         title: str = "", xlabel: str = "step") -> str:
    """One line per name: ``series[name] = [(step, value), ...]`` (entropy or sink ratio over training)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for name, pts in series.items():
        pts = sorted((s, v) for s, v in pts if v is not None and math.isfinite(v))
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7)
    return _save(fig, path)


def pruning_curve(curve: Sequence[tuple[int, float]], path: str, *, ylabel: str = "metric", title: str = "") -> str:
    """The metric against the number of heads pruned (Michel et al., 2019)."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    ks, vs = zip(*curve) if curve else ((), ())
    ax.plot(ks, vs, marker="o")
    ax.set_xlabel("heads pruned (least important first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)
