"""Sink emergence over training in a tiny byte-level LM: softmax vs sigmoid vs gated vs learned sinks.

    python -m experiments.analysis_sinks [--out=runs/analysis_sinks] [--steps=300] [--every=50]
        [--variants=softmax,sigmoid,gated,sinks] [--write_results]

Each variant trains the ``bytes_lm`` config (experiments/configs/bytes_lm.py) shrunk to a CPU
budget (``--d_model`` 64, ``--num_layers`` 2, 4 heads, ``--seq_len`` 64, ``--batch_size`` 16, constant
learning rate 3e-3 after 20 warm-up steps, seed 0) with the harness's :class:`experiments.train.Trainer`
(the same jitted step as ``python -m experiments.train``), and every ``--every`` steps captures the
attention of valid batch 0 (:func:`experiments.analysis_capture.capture_workdir`, 4 sequences):

* ``softmax``: ``mixer=softmax`` (RoPE);
* ``sigmoid``: ``mixer=sigmoid`` (no normalisation, ``b = -log(seq_len)``; Ramapuram et al. 2024);
* ``gated``: ``mixer=gated_attention`` (elementwise sigmoid output gate, Qiu et al. 2025);
* ``sinks``: softmax with a learned sink logit per head (``sinks=True``).

Recorded per step and layer (means over heads; maps row-normalised first so that sigmoid weights
and the rows that give mass to a learned sink compare with softmax): the share of attention on the
first token ``α_0`` (Gu et al. 2024), the sink ratio ``mean_h 1[α_0 > 0.3]``, the head entropy of the
row-normalised maps, the raw row mass (1 for softmax; < 1 with learned sinks, the rest going to the
sink slot; unbounded for sigmoid) and the valid loss.  Writes ``<out>/result.json``, ``<out>/sinks.png``
and, per variant, the harness's ``<out>/<variant>/analysis/`` (capture, history, HTML report);
``--write_results`` also copies result.json and the plot to ``results/analysis_sinks/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import app

from attn_jax.analysis import metrics, plots
from experiments.analysis_capture import capture_workdir
from experiments.common.cli import adopt_key_flags, define, quiet_orbax

__all__ = ["VARIANTS", "run_variant", "run"]

VARIANTS = {
    "softmax": ("softmax", {}),
    "sigmoid": ("sigmoid", {}),                      # b = -log(seq_len), set in _config
    "gated": ("gated_attention", {}),
    "sinks": ("softmax", {"softmax": {"sinks": True}}),
}


def _config(variant: str, *, steps: int, seq_len: int, batch_size: int, d_model: int, num_layers: int = 2):
    from experiments.configs.bytes_lm import get_config
    mixer, kwargs = VARIANTS[variant]
    c = get_config()
    c.task.seq_len = seq_len
    c.model.update(mixer=mixer, d_model=d_model, num_layers=num_layers, num_heads=4)
    c.model.mixer_kwargs = {"sigmoid": {"train_length": seq_len}} if variant == "sigmoid" else kwargs
    c.optim.update(lr=3e-3, warmup_steps=20, schedule="constant")
    c.train.update(steps=steps, batch_size=batch_size, eval_batches=2, progress=False, seed=0)
    return c


def _row_stats(w: np.ndarray) -> dict:
    mass = w.sum(-1)                                               # [B, H, T]
    norm = w / np.where(mass > 0, mass, 1.0)[..., None]
    alpha = metrics.sink_scores(norm)                              # [B, H]
    return {"alpha0": float(alpha.mean()), "sink_ratio": float(np.mean(alpha.mean(0) > 0.3)),
            "entropy": float(metrics.head_entropy(norm).mean()), "row_mass": float(mass.mean())}


def run_variant(variant: str, out: str, *, steps: int, every: int, seq_len: int, batch_size: int,
                d_model: int, num_layers: int = 2) -> list[dict]:
    """Train one variant, capturing every ``every`` steps (and at step 0); returns the records."""
    from experiments.train import Trainer
    config = _config(variant, steps=steps, seq_len=seq_len, batch_size=batch_size, d_model=d_model,
                     num_layers=num_layers)
    trainer = Trainer(config)
    workdir = os.path.join(out, variant)
    records = []
    t0 = time.perf_counter()
    for s in range(0, steps + 1):
        if s > 0:
            trainer.state = trainer.train_step(trainer.state, trainer.task.batch("train", s - 1, batch_size))
        if s % every == 0 or s == steps:
            trainer.check_finite(None)
            train = trainer.pop_train_metrics() if s > 0 else {}
            valid = trainer.evaluate(2, batch_size)
            cap = capture_workdir(workdir, batch_size=4, trainer=trainer, step=s, report=s == steps)
            from attn_jax.analysis.report import load_capture
            maps = load_capture(cap["capture"])["maps"]
            for layer, w in maps.items():
                records.append({"variant": variant, "step": s, "layer": layer, "valid_loss": valid["loss"],
                                "train_loss": train.get("loss"), **_row_stats(w)})
            print(f"{variant} step {s}: valid loss {valid['loss']:.3f}, "
                  + ", ".join(f"{r['layer']} alpha0 {r['alpha0']:.3f}" for r in records[-len(maps):])
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return records


def run(out: str, *, variants=tuple(VARIANTS), steps: int = 300, every: int = 50, seq_len: int = 64,
        batch_size: int = 16, d_model: int = 64, num_layers: int = 2, write_results: bool = False) -> dict:
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants: expected names among {sorted(VARIANTS)}, got {v!r}")
    records = []
    t0 = time.perf_counter()
    for v in variants:
        records += run_variant(v, out, steps=steps, every=every, seq_len=seq_len, batch_size=batch_size,
                               d_model=d_model, num_layers=num_layers)
    result = {"settings": {"variants": list(variants), "steps": steps, "every": every, "seq_len": seq_len,
                           "batch_size": batch_size, "d_model": d_model, "num_layers": num_layers, "num_heads": 4,
                           "lr": 3e-3, "schedule": "constant", "seed": 0, "task": "bytes_lm"},
              "records": records, "wall_sec": time.perf_counter() - t0}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    series = {}
    for r in records:
        series.setdefault(f"{r['variant']} layer {r['layer'].split('/')[1]}", []).append((r["step"], r["alpha0"]))
    png = plots.series_over_training(series, os.path.join(out, "sinks.png"),
                                     ylabel="share of attention on token 0", title="sink emergence (bytes LM)")
    if write_results:
        dest = os.path.join("results", "analysis_sinks")
        os.makedirs(dest, exist_ok=True)
        shutil.copy(os.path.join(out, "result.json"), dest)
        shutil.copy(png, dest)
    return result


def cli():
    out = define("string", "out", "runs/analysis_sinks", "Output directory.")
    steps = define("integer", "steps", 300, "Training steps per variant.")
    every = define("integer", "every", 50, "Capture every this many steps.")
    variants = define("string", "variants", ",".join(VARIANTS), "Comma-separated variants.")
    seq_len = define("integer", "seq_len", 64, "Sequence length.")
    batch_size = define("integer", "batch_size", 16, "Batch size.")
    d_model = define("integer", "d_model", 64, "Model width.")
    num_layers = define("integer", "num_layers", 2, "Layers.")
    write_results = define("bool", "write_results", False, "Copy result.json and the plot to results/analysis_sinks/.")
    adopt_key_flags()

    def main(argv):
        del argv
        quiet_orbax()
        run(out(), variants=tuple(v.strip() for v in variants().split(",")), steps=steps(), every=every(),
            seq_len=seq_len(), batch_size=batch_size(), d_model=d_model(), num_layers=num_layers(),
            write_results=write_results())

    app.run(main)


if __name__ == "__main__":
    cli()
