"""Attention analysis: capture maps from any model, metrics on them, plots and an HTML report.

``attn_jax.analysis.capture`` (capture attention weights / logits / residual streams),
``attn_jax.analysis.metrics`` (pure functions on maps: entropy, sinks, massive activations,
retrieval score, lookback ratio, rollout, flow, gradient-weighted rollout, pruning curves),
``attn_jax.analysis.heads`` (head masks: importance and pruning), ``attn_jax.analysis.plots``,
``python -m attn_jax.analysis.report``.  Submodules load lazily (matplotlib only with plots).
"""

import importlib

__all__ = ["capture", "metrics", "heads", "plots", "report"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"attn_jax.analysis.{name}")
    raise AttributeError(f"module 'attn_jax.analysis' has no attribute {name!r}")
