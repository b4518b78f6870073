"""Model-side analysis through the attention layers' hooks: head masks (importance, pruning) and
gradients of an output with respect to the attention maps.

* Head masks (:class:`attn_jax.nn.attention.HeadMask`, "Are Sixteen Heads Really Better than
  One?", Michel et al., 2019, arXiv:1905.10650): ``MHA(x) = Σ_h ξ_h Att_h(x) W^O_h``.
  :func:`head_masks` installs ``ξ = 1`` on every attention layer for a ``with`` block;
  :func:`head_importance` is ``I_h = E_x |∂L(x)/∂ξ_h|`` (the absolute gradient per batch,
  averaged over the batches), :func:`pruning_curve` evaluates a metric with the ``k`` least
  important heads masked (``ξ_h = 0``), for increasing ``k``, each evaluation the same compiled
  program (the masks are inputs).
* :func:`attention_gradients`: ``∂f/∂A_l`` for every plain softmax layer (``f`` a scalar of the
  model output), through the ``perturb("attention_weights")`` of the capture path, for the
  gradient-weighted rollout of :func:`attn_jax.analysis.metrics.gradient_weighted_rollout`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.analysis.capture import attention_layers, capturing, path_name
from attn_jax.core.array_types import ArrayLike
from attn_jax.nn.attention import HeadMask, MultiHeadAttention

__all__ = ["head_masks", "set_head_mask", "head_importance", "pruning_curve", "attention_gradients"]


@contextlib.contextmanager
def head_masks(model: nnx.Module) -> Iterator[dict[str, MultiHeadAttention]]:
    """Within the block every attention layer carries a :class:`HeadMask` of ones ``[H]`` (the
    previous masks are restored on exit).  Yields the layers by path."""
    layers = attention_layers(model)
    before = {p: m.head_mask for p, m in layers.items()}
    try:
        for m in layers.values():
            m.head_mask = HeadMask(jnp.ones((m.num_heads,), jnp.float32))
        yield layers
    finally:
        for p, m in layers.items():
            m.head_mask = before[p]


def set_head_mask(model: nnx.Module, values: dict[str, ArrayLike | Sequence[float]]) -> None:
    """Set the head masks ``{layer path: [H]}`` (inside :func:`head_masks`)."""
    layers = attention_layers(model)
    for path, v in values.items():
        if path not in layers:
            raise ValueError(f"values: no attention layer at {path!r}; layers: {sorted(layers)}")
        m = layers[path]
        v = jnp.asarray(v, jnp.float32)
        if v.shape != (m.num_heads,):
            raise ValueError(f"values: the mask of {path!r} must have shape ({m.num_heads},), got {v.shape}")
        if m.head_mask is None:
            raise ValueError("model: no head masks installed; call set_head_mask inside `with head_masks(model):`")
        m.head_mask[...] = v


def _mask_paths(state) -> dict[str, np.ndarray]:
    return {path_name(p[:-1]): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(state)}


def head_importance(model: nnx.Module, loss_fn: Callable, batches: Iterable, *,
                    compiler_options: dict | None = None) -> dict[str, np.ndarray]:
    """``{layer path: I [H]}``, ``I_h = mean_batches |∂ loss_fn(model, batch) / ∂ξ_h|`` at ``ξ = 1``
    (Michel et al., 2019; normalise per layer with
    :func:`attn_jax.analysis.metrics.normalize_importance`).  One compiled gradient program
    (``compiler_options``: its XLA options)."""
    with head_masks(model):
        graphdef, masks, rest = nnx.split(model, HeadMask, ...)
        grad = jax.jit(jax.grad(lambda m, r, batch: loss_fn(nnx.merge(graphdef, m, r), batch)),
                       compiler_options=compiler_options)
        total, n = None, 0
        for batch in batches:
            g = jax.tree.map(jnp.abs, grad(masks, rest, batch))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
            n += 1
    if n == 0:
        raise ValueError("batches: expected at least one batch")
    return {p: v / n for p, v in _mask_paths(total).items()}


def pruning_curve(model: nnx.Module, metric_fn: Callable, order: Sequence[tuple], *,
                  counts: Sequence[int] | None = None, compiler_options: dict | None = None) -> list[tuple[int, float]]:
    """``[(k, metric_fn(model with the first k heads of order masked)), ...]`` for ``k`` in
    ``counts`` (default ``0 .. len(order)``); ``order``: ``(layer path, head)`` pairs, e.g.
    :func:`attn_jax.analysis.metrics.prune_order` of the importances (Michel et al.'s greedy
    pruning).  ``metric_fn(model) -> scalar`` is compiled once (``compiler_options``: its XLA options)."""
    counts = range(len(order) + 1) if counts is None else counts
    out = []
    with head_masks(model) as layers:
        graphdef, masks, rest = nnx.split(model, HeadMask, ...)
        run = jax.jit(lambda m, r: metric_fn(nnx.merge(graphdef, m, r)), compiler_options=compiler_options)
        for k in counts:
            values = {p: np.ones(layer.num_heads, np.float32) for p, layer in layers.items()}
            for path, h in order[:k]:
                values[path][h] = 0.0
            flat = dict(nnx.to_flat_state(masks))
            new = nnx.from_flat_state({p: v.replace(jnp.asarray(values[path_name(p[:-1])]))
                                       for p, v in flat.items()})
            out.append((int(k), float(run(new, rest))))
    return out


def attention_gradients(model: nnx.Module, target_fn: Callable, *args, compiler_options: dict | None = None,
                        **kwargs) -> tuple[dict, dict]:
    """``(maps, grads)``: ``{layer path: A [B, H, T, S]}`` and ``{layer path: ∂f/∂A}`` with
    ``f = target_fn(model(*args, **kwargs))`` a scalar, for every plain softmax attention layer
    (the layers whose capture path computes the output from the materialised probabilities).
    Keyword arguments are static."""
    with capturing(model):
        graphdef, state = nnx.split(model)

        def run(state, args):
            m = nnx.merge(graphdef, state)
            _, perts = nnx.capture(m, nnx.Perturbation)(*args, **kwargs)

            def f(perts):
                mm = nnx.merge(graphdef, state)
                out, inter = nnx.capture(mm, nnx.Intermediate, init=perts)(*args, **kwargs)
                return target_fn(out), inter

            grads, inter = jax.grad(f, has_aux=True)(perts)
            return grads, inter

        grads, inter = jax.jit(run, compiler_options=compiler_options)(state, args)
    g = {path_name(p[:-1]): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    maps = {path_name(p[:-1]): np.asarray(v.get_value()[0]) for p, v in nnx.to_flat_state(inter)
            if p[-1] == "attention_weights"}
    return {p: maps[p] for p in g}, g
