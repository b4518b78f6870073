"""Sample from a trained workdir with the KV cache (:func:`attn_jax.models.generate`).

    python -m experiments.generate --workdir=runs/bytes [--prompt="def "] [--max_new_tokens=200 \
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]

``bytes_lm``: the prompt's UTF-8 bytes are continued and the text printed.  Other "lm" tasks:
rows of valid batch 0 are cut before their first scored position; the model's continuation is
printed against the target tokens (``--rows``).  The workdir is only read (nothing in it is
created, moved or deleted).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app

from attn_jax.models import generate as sample
from experiments.common.cli import adopt_key_flags, define, quiet_orbax
from experiments.common.config import ConfigError

__all__ = ["run"]


def run(workdir: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, rows: int = 2) -> str:
    """The text ``experiments.generate`` prints."""
    from experiments.train import restore_trainer
    trainer, step = restore_trainer(workdir)
    task, model = trainer.task, trainer.model()
    if task.kind != "lm":
        raise ConfigError(f"workdir: task {task.name!r} is of kind {task.kind!r}; only 'lm' tasks generate "
                          f"(use experiments.evaluate)")
    kw = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, rng=jax.random.key(seed))
    if task.name == "bytes_lm":
        ids = np.frombuffer((prompt or "\n").encode("utf-8"), np.uint8).astype(np.int32)[None]
        out = sample(model, ids, max_new_tokens=max_new_tokens, **kw)
        text = bytes(np.asarray(out.tokens[0], np.uint8).tolist()).decode("utf-8", errors="replace")
        return f"[step {step}] {prompt}{text}"
    batch = task.batch("valid", 0, rows)
    lines = [f"[step {step}] task {task.name}: prompt = inputs up to the first scored position"]
    for r in range(rows):
        scored = np.nonzero(batch["weights"][r] > 0)[0]
        t0 = int(scored[0]) if len(scored) else batch["inputs"].shape[1] - 1
        n = max(1, min(max_new_tokens, batch["inputs"].shape[1] - t0))
        out = sample(model, batch["inputs"][r:r + 1, :t0 + 1], max_new_tokens=n, **kw)
        cont, target = np.asarray(out.tokens[0]), batch["targets"][r, t0:t0 + n]
        w = batch["weights"][r, t0:t0 + n] > 0
        lines += [f"row {r}: prompt       {batch['inputs'][r, :t0 + 1].tolist()}",
                  f"       continuation {cont.tolist()}",
                  f"       target       {target.tolist()}  "
                  f"(scored positions matched: {int(((cont == target) & w).sum())}/{int(w.sum())})"]
    return "\n".join(lines)


def cli():
    flag = {n: define(k, n, d, h) for k, n, d, h in [
        ("string", "workdir", None, "A training workdir."), ("string", "prompt", "", "Prompt (bytes_lm)."),
        ("integer", "max_new_tokens", 200, "Tokens to generate."), ("float", "temperature", 0.8, "0 = greedy."),
        ("integer", "top_k", 0, "0 = off."), ("float", "top_p", 1.0, "1 = off."), ("integer", "seed", 0, "RNG seed."),
        ("integer", "rows", 2, "Valid rows shown (non-bytes tasks).")]}
    adopt_key_flags()

    def main(argv):
        del argv
        quiet_orbax()
        if not flag["workdir"]():
            raise app.UsageError("--workdir is required")
        try:
            print(run(**{k: f() for k, f in flag.items()}))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main)


if __name__ == "__main__":
    cli()
