"""AdamW with linear warmup then cosine decay to 0 (``schedule="cosine"``) or a constant learning
rate (``schedule="constant"``), and global-norm gradient clipping."""

from __future__ import annotations

import jax
from absl import logging
import optax

__all__ = ["make_schedule", "make_optimizer"]


def make_schedule(optim, steps: int):
    if optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"config.optim.schedule: expected 'cosine' or 'constant', got {optim.schedule!r}")
    warmup = min(int(optim.warmup_steps), max(steps - 1, 0))
    if warmup < optim.warmup_steps:
        logging.warning("config.optim.warmup_steps=%d >= train.steps=%d: warming up over %d steps (no decay)",
                        optim.warmup_steps, steps, warmup)
    if optim.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warmup, 1)),
                                     optax.constant_schedule(optim.lr)], [max(warmup, 1)])
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup_steps=max(warmup, 1),
                                              decay_steps=max(steps, warmup + 1), end_value=0.0)


def make_optimizer(optim, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim, steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),  # no decay on norms / biases
    )
    return tx, schedule
