"""``metrics.jsonl`` (one JSON object per event: ``step``, ``split``, metrics) and TensorBoard
event files under ``<workdir>/tb``.  Wall-clock fields end in ``_sec`` (``elapsed_sec``,
``tokens_per_sec``, ...); every other field is a deterministic function of config and seed.

Resume: lines with ``step > resume_step`` are dropped (the file is rewritten) and TensorBoard
purges later events, so a resumed run's logs equal an uninterrupted run's."""

from __future__ import annotations

import json
import math
import os

__all__ = ["MetricWriter", "read_metrics", "deterministic"]


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def deterministic(line: dict) -> dict:
    """The fields of a metrics line that do not depend on the wall clock."""
    return {k: v for k, v in line.items() if not k.endswith("_sec")}


class MetricWriter:
    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [m for m in read_metrics(workdir) if m["step"] <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        line = {"step": int(step), "split": split, **metrics}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()
        return line

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
