"""Multi-scale window attention (MSWA): sliding-window attention with a window size per head.

Paper: Xu, Nag, Li, Tian & Barsoum, "MSWA: Refining Local Attention with Multi-Scale Window
Attention", 2025, arXiv:2501.01039.  Sliding-window attention (SWA) gives every head the same
window; MSWA gives head ``h`` its own window ``w_h`` (MSWA-h: groups of heads with windows from
``w/4`` to ``2w``; MSWA-l: larger windows in deeper layers -- per layer, that is a different
``windows`` argument per layer).  With ``w_h`` counting the keys a query sees, itself included::

    o_{i,h} = Σ_{j : i - w_h < j <= i} softmax_j(scale q_{i,h} · k_{j,h'}) v_{j,h'}     (causal)
    non-causal: |i - j| < w_h                                      (h' = h // (H / K): GQA)

``"reference"``: dense attention with the per-head mask (:func:`mswa_mask`).  ``"xla"`` (auto):
the heads are grouped by window size and each group runs :func:`attn_jax.attention` (tiled
``impl="xla"``) with ``masks.sliding_window`` (and ``causal()``), so every group skips the tiles
outside its window; the outputs are put back in head order.  A group's query heads take their
own key/value heads (repeated when several of a group share one: GQA is kept in the math, not in
the memory layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.softmax import attention

__all__ = ["multi_scale_window_attention", "mswa_mask", "MSWA"]

MSWA = Registry("local.multi_scale_window_attention")


def _check(q, k, v, windows, causal):
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.check_float_array(name, x)
        V.check_rank(name, x, 4, "[B, T, H, D]")
    (B, T, H, Dk), (Bk, S, K, Dk2), (Bv, Sv, Kv, _) = jnp.shape(q), jnp.shape(k), jnp.shape(v)
    if (Bk, Bv) != (B, B) or (S, Sv) != (T, T) or Kv != K or Dk2 != Dk or K < 1 or H % K:
        raise ValueError(f"k, v: expected [B={B}, T={T}, K, Dk={Dk}] with H={H} divisible by K (self-attention), "
                         f"got k {V.shape_str(k)}, v {V.shape_str(v)}")
    if not isinstance(windows, (tuple, list)) or len(windows) != H or not all(
            M.is_concrete_int(w) and w >= 1 for w in windows):
        raise ValueError(f"windows: expected a tuple of {H} positive ints (one window per query head), got {windows!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    return tuple(int(w) for w in windows)


def mswa_mask(T: int, windows, causal: bool = True) -> Bool[np.ndarray, "H T T"]:
    """``bool[H, T, T]`` (NumPy): head ``h``'s query ``i`` sees key ``j`` iff ``0 <= i - j < w_h``
    (causal) or ``|i - j| < w_h``.  Quadratic: references and tests."""
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    w = np.asarray(windows)[:, None, None]
    return (d >= 0) & (d < w) if causal else np.abs(d) < w


@dataclass(frozen=True)
class _Problem:
    windows: tuple[int, ...]
    causal: bool
    scale: float | None


def _reference(p: _Problem, q, k, v):
    m = jnp.asarray(mswa_mask(q.shape[1], p.windows, p.causal))[None]
    return attention(q, k, v, mask=M.dense(m), scale=p.scale, impl="reference")


def _xla(p: _Problem, q, k, v):
    H, K = q.shape[2], k.shape[2]
    G = H // K
    out = [None] * H
    for w in sorted(set(p.windows)):
        heads = np.array([h for h in range(H) if p.windows[h] == w])
        mask = M.sliding_window(w - 1) if p.causal else M.sliding_window(w - 1, w - 1)
        o = attention(q[:, :, heads], k[:, :, heads // G], v[:, :, heads // G], mask=mask, scale=p.scale, impl="xla")
        for i, h in enumerate(heads):
            out[h] = o[:, :, i]
    return jnp.stack(out, axis=2)


def multi_scale_window_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"],
                                 v: Float[ArrayLike, "B T K Dv"], windows, *, causal: bool = True,
                                 scale: float | None = None, impl="auto") -> Float[Array, "B T H Dv"]:
    """MSWA (module docstring): sliding-window self-attention with window ``windows[h]`` for head ``h``.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, T, K, Dk]``, ``[B, T, K, Dv]`` (self-attention; GQA).
      windows: ``H`` positive ints: the keys head ``h``'s query sees (itself included).
      causal: keys ``i - w < j <= i`` (default) or, when False, ``|i - j| < w``.
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, T, H, Dv]`` in q's dtype.
    """
    windows = _check(q, k, v, windows, causal)
    p = _Problem(windows, causal, None if scale is None else float(scale))
    return MSWA.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, windows, *, causal=True, scale=None, impl="auto", platform=None):
    return MSWA.explain(impl, _Problem(_check(q, k, v, windows, causal), causal, scale), platform)


MSWA.register("xla", _xla, _no_reasons)
MSWA.register("reference", _reference, _no_reasons, auto=False)
register_explainer(multi_scale_window_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="mswa", family="local", title="Multi-scale window attention (a sliding window per head)",
    papers=(Paper("MSWA: Refining Local Attention with Multi-Scale Window Attention", 2025, "2501.01039",
                  "Xu et al."),),
    summary="o_{i,h} = softmax over keys i - w_h < j <= i (|i - j| < w_h non-causal)",
    op=multi_scale_window_attention, forms=("xla",), directions=("causal", "bidirectional"),
    notes="per-layer windows (MSWA-l) are a per-layer windows argument; no mixer yet"))
