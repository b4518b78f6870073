"""Evaluate the newest good checkpoint of a workdir on the valid split; prints the metrics as JSON.

    python -m experiments.evaluate --workdir=runs/x [--batches=N] [--output=eval.json]

``--batches`` defaults to the config's ``train.eval_batches``; ``--output`` also writes the JSON to
that path.  The workdir is only read: nothing in it is created, moved or deleted (a checkpoint that
cannot be restored is skipped, not set aside), so an evaluation can run beside a live trainer.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app

from experiments.common.cli import adopt_key_flags, define, quiet_orbax
from experiments.common.config import ConfigError

__all__ = ["run"]


def run(workdir: str, batches: int | None = None, output: str | None = None) -> dict:
    """Metrics of the newest good checkpoint of ``workdir`` (read-only); also written to ``output``."""
    from experiments.train import restore_trainer
    trainer, step = restore_trainer(workdir)
    batches = batches or trainer.config.train.eval_batches
    t0 = time.perf_counter()
    result = {"step": step, "task": trainer.task.name, "batches": batches,
              "batch_size": trainer.config.train.batch_size,
              **trainer.evaluate(batches, trainer.config.train.batch_size), "eval_sec": time.perf_counter() - t0}
    if output:
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
    return result


def cli():
    workdir = define("string", "workdir", None, "A training workdir.")
    batches = define("integer", "batches", 0, "Valid batches (0 = the config's train.eval_batches).")
    output = define("string", "output", None, "Also write the metrics JSON to this path (the workdir is never "
                                              "written).")
    adopt_key_flags()

    def main(argv):
        del argv
        quiet_orbax()
        if not workdir():
            raise app.UsageError("--workdir is required")
        try:
            print(json.dumps(run(workdir(), batches() or None, output()), indent=1))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main)


if __name__ == "__main__":
    cli()
