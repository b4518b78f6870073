"""Loss and metric sums per task kind.  ``metric_sums(kind, out, batch)`` returns weighted sums
(``loss``, ``accuracy`` for classification, ``weight``) so means over many batches are exact;
``loss_fn`` adds the optional z-loss (``z_loss * mean(log Z ** 2)``, PaLM, arXiv:2204.02311)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["metric_sums", "loss_fn", "means"]


def metric_sums(kind: str, out, batch) -> dict:
    w = batch["weights"].astype(jnp.float32)
    if kind in ("lm", "image"):
        logits = out.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]) & (w > 0)
        return {"loss": jnp.sum((lse - tgt) * w), "accuracy": jnp.sum(correct.astype(jnp.float32)),
                "z": jnp.sum(lse ** 2 * w), "weight": jnp.sum(w)}
    if kind == "regress":
        se = jnp.mean(jnp.square(out.astype(jnp.float32) - batch["targets"]), axis=-1)
        return {"loss": jnp.sum(se * w), "weight": jnp.sum(w)}
    raise ValueError(f"kind: expected 'lm', 'regress' or 'image', got {kind!r}")


def loss_fn(kind: str, out, batch, z_loss: float = 0.0):
    """Scalar training loss and the metric sums."""
    sums = metric_sums(kind, out, batch)
    denom = jnp.maximum(sums["weight"], 1.0)
    loss = sums["loss"] / denom
    if z_loss and "z" in sums:
        loss = loss + z_loss * sums["z"] / denom
    return loss, sums


def means(sums: dict) -> dict:
    """``{"loss": ..., "accuracy": ...}`` from summed metrics (python floats)."""
    w = max(float(sums["weight"]), 1.0)
    return {k: float(v) / w for k, v in sums.items() if k in ("loss", "accuracy")}
