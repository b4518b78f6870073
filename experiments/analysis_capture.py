"""Capture the attention maps of a training workdir's newest good checkpoint and write the report.

    python -m experiments.analysis_capture --workdir=runs/x [--batch_size=2] [--seq_len=64] [--no_report]

Runs the model once on valid batch 0 (``batch_size`` sequences, inputs cut to ``seq_len`` tokens
when set) with :func:`attn_jax.analysis.capture.capture_all` (mixers without attention weights are
skipped), saves ``<workdir>/analysis/capture.npz``, appends one line per layer to
``<workdir>/analysis/history.jsonl`` (``step``, head entropy (None for weights that are not probabilities) and first-token sink score
per head;
a step already recorded is replaced), then writes ``<workdir>/analysis/report.html``
(:mod:`attn_jax.analysis.report`; re-render with ``python -m attn_jax.analysis.report
--workdir=runs/x``).  Only ``<workdir>/analysis/`` is written.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app

from attn_jax.analysis import metrics
from attn_jax.analysis.capture import capture_all
from attn_jax.analysis.report import read_history, save_capture, write_report
from experiments.common.cli import adopt_key_flags, define, quiet_orbax
from experiments.common.config import ConfigError

__all__ = ["capture_workdir", "record_history"]


def record_history(path: str, step: int, maps: dict) -> list[dict]:
    """Append (replacing ``step``'s lines) ``{"step", "layer", "entropy", "sink"}`` per layer."""
    lines = [h for h in read_history(path) if h["step"] != step]
    for layer, w in maps.items():
        entropy = metrics.head_entropy(w).tolist() if metrics.is_probability(w) else None
        lines.append({"step": int(step), "layer": layer, "entropy": entropy,
                      "sink": metrics.sink_scores(w).mean(0).tolist()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for h in sorted(lines, key=lambda h: (h["step"], h["layer"])):
            f.write(json.dumps(h) + "\n")
    return lines


def capture_workdir(workdir: str, *, batch_size: int = 2, seq_len: int | None = None, report: bool = True,
                    trainer=None, step: int | None = None) -> dict:
    """Capture (see the module docstring); ``trainer``/``step``: an already restored (or live)
    :class:`experiments.train.Trainer` and its step instead of the workdir's newest checkpoint."""
    if trainer is None:
        from experiments.train import restore_trainer
        trainer, step = restore_trainer(workdir)
    inputs = np.asarray(trainer.task.batch("valid", 0, batch_size)["inputs"])
    if seq_len:
        inputs = inputs[:, :seq_len]
    cap = capture_all(trainer.model(), inputs, hidden=True, others="skip")
    out = os.path.join(workdir, "analysis")
    maps = cap.weights()
    if not maps:
        raise ConfigError(f"workdir: the model of {workdir!r} has no layer whose attention weights can be captured")
    meta = {"workdir": workdir, "step": step, "task": trainer.task.name,
            "mixer": trainer.config.model.get("mixer_pattern") or trainer.config.model.mixer,
            "inputs": list(inputs.shape)}
    save_capture(os.path.join(out, "capture.npz"), maps, hidden=cap.hidden,
                 tokens=inputs if inputs.ndim == 2 else None, meta=meta)
    history = record_history(os.path.join(out, "history.jsonl"), step, maps)
    result = {"step": step, "layers": sorted(maps), "capture": os.path.join(out, "capture.npz")}
    if report:
        result["report"] = write_report(out, maps, hidden=cap.hidden, history=history,
                                        tokens=inputs if inputs.ndim == 2 else None, meta=meta,
                                        title=f"Attention analysis: {workdir} (step {step})")
    return result


def cli():
    workdir = define("string", "workdir", None, "A training workdir.")
    batch_size = define("integer", "batch_size", 2, "Valid sequences to capture.")
    seq_len = define("integer", "seq_len", 0, "Cut the inputs to this many tokens (0 = the task's length).")
    no_report = define("bool", "no_report", False, "Only save the capture and the history.")
    adopt_key_flags()

    def main(argv):
        del argv
        quiet_orbax()
        if not workdir():
            raise app.UsageError("--workdir is required")
        try:
            print(json.dumps(capture_workdir(workdir(), batch_size=batch_size(), seq_len=seq_len() or None,
                                             report=not no_report()), indent=1))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main)


if __name__ == "__main__":
    cli()
