"""An HTML report (with PNG figures beside it) of captured attention maps.

    python -m attn_jax.analysis.report --workdir=runs/x [--out=runs/x/analysis]

reads ``<workdir>/analysis/capture.npz`` (saved by :func:`save_capture`, e.g. by
``python -m experiments.analysis_capture --workdir=runs/x``, which captures a checkpoint of the
experiments harness and calls this report itself) and, when present,
``<workdir>/analysis/history.jsonl`` (one JSON line per captured step: ``{"step", "layer",
"entropy": [H], "sink": [H]}``), and writes ``report.html`` and its PNGs into ``--out``
(default ``<workdir>/analysis``).  The page is well-formed XHTML with relative links to the
PNGs: the directory is self-contained (copy it anywhere).

Contents: per-layer head entropy and first-token sink score (bars, and a table with the sink ratio
of Gu et al. 2024 at ε = 0.3), a grid of every head's map for the first sequence, the attention
rollout (Abnar & Zuidema 2020), massive-activation statistics of the residual stream (Sun et al.
2024) and, with a history, entropy and sink ratio over training.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from typing import Mapping

import numpy as np

from attn_jax.analysis import metrics
from attn_jax.analysis import plots

__all__ = ["save_capture", "load_capture", "read_history", "write_report", "main"]


def save_capture(path: str, maps: Mapping[str, np.ndarray], *, hidden: Mapping[str, np.ndarray] | None = None,
                 tokens=None, meta: Mapping | None = None) -> str:
    """Write ``maps`` (layer -> weights ``[B, H, T, S]``), ``hidden`` (block -> ``[B, T, d]``),
    ``tokens`` and a JSON-serialisable ``meta`` dict to one ``.npz``."""
    arrays = {f"maps/{k}": np.asarray(v, np.float32) for k, v in maps.items()}
    arrays.update({f"hidden/{k}": np.asarray(v, np.float32) for k, v in (hidden or {}).items()})
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens)
    arrays["meta"] = np.asarray(json.dumps(dict(meta or {}), default=str))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_capture(path: str) -> dict:
    """``{"maps": {...}, "hidden": {...}, "tokens": array | None, "meta": dict}`` of :func:`save_capture`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"workdir: no captured maps at {path!r}; capture a checkpoint first with "
                                f"`python -m experiments.analysis_capture --workdir=...`")
    with np.load(path, allow_pickle=False) as z:
        out = {"maps": {}, "hidden": {}, "tokens": None, "meta": json.loads(str(z["meta"]))}
        for k in z.files:
            if k.startswith("maps/"):
                out["maps"][k[5:]] = z[k]
            elif k.startswith("hidden/"):
                out["hidden"][k[7:]] = z[k]
            elif k == "tokens":
                out["tokens"] = z[k]
    return out


def read_history(path: str) -> list[dict]:
    """The lines of a ``history.jsonl`` (missing file: ``[]``)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "model"


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: str, out: str, alt: str) -> str:
    return f'<img src="{html.escape(os.path.relpath(path, out))}" alt="{html.escape(alt)}"/>'


def write_report(out: str, maps: Mapping[str, np.ndarray], *, hidden: Mapping[str, np.ndarray] | None = None,
                 history: list[dict] | None = None, tokens=None, meta: Mapping | None = None,
                 title: str = "Attention analysis", sink_threshold: float = 0.3) -> str:
    """Write ``out/report.html`` and its PNGs; returns the HTML path (see the module docstring)."""
    if not maps:
        raise ValueError("maps: expected at least one layer's attention weights")
    os.makedirs(out, exist_ok=True)
    figs = []
    ent = {k: metrics.head_entropy(v) if metrics.is_probability(v) else np.full(v.shape[1], np.nan)
           for k, v in maps.items()}
    sink = {k: metrics.sink_scores(v).mean(0) for k, v in maps.items()}
    figs.append(("Head entropy (nats; layers whose weights are not probabilities are left out)",
                 plots.layer_head_bars({k: np.nan_to_num(v) for k, v in ent.items()},
                                       os.path.join(out, "entropy.png"), ylabel="mean entropy (nats)")))
    figs.append(("First-token sink score", plots.layer_head_bars(sink, os.path.join(out, "sink.png"),
                                                                  ylabel="mean attention on token 0",
                                                                  threshold=sink_threshold)))
    figs.append(("Every head's map (first sequence)", plots.head_grid(maps, os.path.join(out, "heads.png"))))
    labels = None
    if tokens is not None:
        t0 = np.asarray(tokens)[0]
        labels = [chr(int(t)) if 32 <= int(t) < 127 else f"<{int(t)}>" for t in t0] if t0.max() < 256 else \
            [str(int(t)) for t in t0]
    layers = list(maps.values())
    if (len({v.shape for v in layers}) == 1 and layers[0].shape[-1] == layers[0].shape[-2]
            and all(metrics.is_probability(v) for v in layers)):       # rollout: every layer a probability map
        roll = metrics.attention_rollout(layers)[0]
        figs.append(("Attention rollout (Abnar & Zuidema 2020)",
                     plots.heatmap(roll, os.path.join(out, "rollout.png"), title="rollout", labels=labels)))
    for k, v in maps.items():
        figs.append((f"{k}: head-averaged map", plots.heatmap(np.asarray(v)[0].mean(0),
                                                               os.path.join(out, f"map_{_slug(k)}.png"),
                                                               title=k, labels=labels)))
    rows = [(k, len(ent[k]), " ".join(f"{x:.2f}" for x in ent[k]), " ".join(f"{x:.2f}" for x in sink[k]),
             f"{metrics.sink_ratio(maps[k], threshold=sink_threshold):.2f}") for k in maps]
    sections = [_table(("layer", "heads", "entropy per head", "sink score per head",
                        f"sink ratio (eps={sink_threshold})"), rows)]
    if hidden:
        mrows = []
        for k, h in hidden.items():
            st = metrics.massive_activations(h)
            mrows.append((k, f"{st['top'][0]:.1f}", f"{st['median']:.3g}", f"{st['ratio']:.1f}", st["count"],
                          " ".join(map(str, st["channels"][:8]))))
        sections.append("<h2>Residual stream (massive activations, Sun et al. 2024)</h2>" +
                        _table(("block", "max |h|", "median |h|", "max/median", "massive (>100, >1000x median)",
                                "channels"), mrows))
    if history:
        by_layer_e, by_layer_s = {}, {}
        for line in history:
            if line.get("entropy") is not None:
                by_layer_e.setdefault(line["layer"], []).append((line["step"], float(np.mean(line["entropy"]))))
            by_layer_s.setdefault(line["layer"], []).append(
                (line["step"], float(np.mean(np.asarray(line["sink"]) > sink_threshold))))
        figs.append(("Entropy over training", plots.series_over_training(
            by_layer_e, os.path.join(out, "entropy_history.png"), ylabel="mean head entropy (nats)")))
        figs.append(("Sink ratio over training", plots.series_over_training(
            by_layer_s, os.path.join(out, "sink_history.png"), ylabel=f"share of heads with sink > {sink_threshold}")))
    meta_rows = [(k, json.dumps(v, default=str) if not isinstance(v, str) else v) for k, v in (meta or {}).items()]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if meta_rows:
        body.append(_table(("field", "value"), meta_rows))
    body.append("<h2>Heads</h2>")
    body.extend(sections)
    for caption, path in figs:
        body.append(f"<figure>{_img(path, out, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    page = ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n'
            '<html xmlns="http://www.w3.org/1999/xhtml"><head><meta charset="utf-8"/>'
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:70em;margin:auto}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
            "img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv=None) -> int:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m attn_jax.analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="run directory holding analysis/capture.npz")
    p.add_argument("--out", default=None, help="output directory (default <workdir>/analysis)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    src = os.path.join(a.workdir, "analysis")
    try:
        cap = load_capture(os.path.join(src, "capture.npz"))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = a.out or src
    path = write_report(out, cap["maps"], hidden=cap["hidden"], history=read_history(os.path.join(src, "history.jsonl")),
                        tokens=cap["tokens"], meta=cap["meta"], title=a.title or f"Attention analysis: {a.workdir}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
