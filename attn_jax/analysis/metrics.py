"""Metrics on attention maps: pure NumPy functions of captured maps (no model, no JAX tracing).

Maps are ``weights [..., H, T, S]`` (``[B, H, T, S]`` per layer, as
:func:`attn_jax.analysis.capture.capture` returns them; rows of query ``i`` over keys ``j``) or
a list of them over layers.  Every function names its paper and writes the equation it computes.

* :func:`attention_entropy`, :func:`head_entropy` -- per-head attention entropy, tracked during
  training in "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", Zhai
  et al., 2023, arXiv:2303.06296: ``Ent(A_i) = -Σ_j A_ij log A_ij``.
* :func:`sink_scores`, :func:`sink_ratio` -- attention sinks ("Efficient Streaming Language Models
  with Attention Sinks", Xiao et al., 2023, arXiv:2309.17453); the thresholded metric of "When
  Attention Sink Emerges in Language Models: An Empirical View", Gu et al., 2024,
  arXiv:2410.10781: ``α^{l,h}_k = 1/(T-k) Σ_{i>=k} A^{l,h}_{ik}``,
  ``Sink^ε_k = 1/(L H) Σ_{l,h} 1[α^{l,h}_k > ε]`` (ε = 0.3).
* :func:`massive_activations` -- "Massive Activations in Large Language Models", Sun et al.,
  2024, arXiv:2402.17762: hidden-state entries with ``|h| > 100`` and ``|h| >= 1000 ×
  median |h|`` (both thresholds arguments).
* :func:`retrieval_score` -- "Retrieval Head Mechanistically Explains Long-Context Factuality",
  Wu et al., 2024, arXiv:2404.15574: a head copies at step ``t`` when the generated token ``w_t``
  is in the needle and the head's most-attended key ``j* = argmax_j A_tj`` lies in the needle
  with ``x_{j*} = w_t``; ``score_h = |g_h| / |k|``, ``g_h`` the copied needle tokens, ``k`` the
  needle tokens.
* :func:`lookback_ratio` -- "Lookback Lens", Chuang et al., 2024, arXiv:2407.07071:
  ``LR_t = A_t(context) / (A_t(context) + A_t(new))`` with ``A_t(context)`` the mean attention
  on the ``N`` context tokens and ``A_t(new)`` the mean on the previously generated ones.
* :func:`attention_rollout`, :func:`attention_flow` -- "Quantifying Attention Flow in
  Transformers", Abnar & Zuidema, 2020, arXiv:2005.00928: residual-augmented, head-averaged maps
  ``Ã_l = 0.5 A_l + 0.5 I`` (rows renormalised); rollout ``Ã_L ··· Ã_1``; flow: the maximum flow
  from output node ``(L, i)`` to input node ``(0, j)`` of the layered graph with capacities
  ``Ã_l[i, j]`` on the edge ``(l, i) -> (l-1, j)``.
* :func:`gradient_weighted_rollout` -- "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers", Chefer et al., 2021, arXiv:2103.15679, eqs. 5-6
  (self-attention): ``Ā_l = E_h[(∇A_l ⊙ A_l)^+]``, ``R_0 = I``, ``R_l = R_{l-1} + Ā_l R_{l-1}``.
* :func:`normalize_importance`, :func:`prune_order` -- head importance of "Are Sixteen Heads
  Really Better than One?", Michel et al., 2019, arXiv:1905.10650: ``I_h = E_x |∂L(x)/∂ξ_h|``
  at head mask ``ξ = 1``, ℓ2-normalised per layer; heads are pruned in increasing importance.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from attn_jax.core.array_types import ArrayLike, Bool, Float, Int

__all__ = ["is_probability", "attention_entropy", "head_entropy", "sink_scores", "sink_ratio", "massive_activations",
           "retrieval_score", "lookback_ratio", "residual_maps", "attention_rollout", "attention_flow",
           "max_flow", "gradient_weighted_rollout", "normalize_importance", "prune_order"]


def _check_maps(name: str, a, min_ndim: int = 2) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim < min_ndim:
        raise ValueError(f"{name}: expected attention weights [..., T, S] with at least {min_ndim} axes, got shape "
                         f"{a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite attention weights, got {int(np.sum(~np.isfinite(a)))} non-finite")
    return a


def _stack(name: str, maps) -> np.ndarray:
    """A list of per-layer maps ``[..., T, T]`` as ``[L, ..., T, T]``."""
    if isinstance(maps, dict):
        maps = list(maps.values())
    arrs = [np.asarray(m, np.float64) for m in maps]
    if not arrs:
        raise ValueError(f"{name}: expected at least one layer's map, got none")
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"{name}: every layer's map must have one shape, got {sorted(shapes)}")
    a = np.stack(arrs)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name}: self-attention maps [..., T, T] are needed, got [..., {a.shape[-2]}, {a.shape[-1]}]")
    return _check_maps(name, a, 3)


def is_probability(weights: Float[ArrayLike, "*batch T S"], *, tol: float = 1e-5) -> bool:
    """Whether every row is a (sub-)probability vector: entries ``>= 0``, sums ``<= 1`` (to ``tol``).
    Softmax (with sinks), entmax and normalised linear attention are; sigmoid, ReLU or gated linear
    weights in general are not (entropy is then undefined)."""
    a = _check_maps("weights", weights)
    return bool(np.all(a >= -tol) and np.all(a.sum(-1) <= 1 + tol))


def attention_entropy(weights: Float[ArrayLike, "*batch T S"], *, eps: float = 0.0) -> Float[np.ndarray, "*batch T"]:
    """``-Σ_j A_ij log A_ij`` per query row, shape ``weights.shape[:-1]`` (``0 log 0 = 0``).

    Zhai et al., 2023 (arXiv:2303.06296).  A uniform row over ``S`` keys gives ``log S``, a one-hot
    row 0; a row with no visible key (all zeros) gives 0."""
    a = _check_maps("weights", weights)
    if np.any(a < -1e-7):
        raise ValueError("weights: entropy needs non-negative attention weights (a probability row), got negative "
                         "entries")
    a = np.clip(a, 0.0, None) + eps
    return -np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0), axis=-1)


def head_entropy(weights: Float[ArrayLike, "B H T S"], *,
                 query_mask: Bool[ArrayLike, "B T"] | None = None) -> Float[np.ndarray, " H"]:
    """Mean entropy over the query rows of each head: ``weights [B, H, T, S] -> [H]``
    (``query_mask [B, T]`` selects the rows; default: rows with any weight)."""
    a = _check_maps("weights", weights, 4)
    ent = attention_entropy(a)                                     # [B, H, T]
    rows = a.sum(-1) > 0 if query_mask is None else np.broadcast_to(np.asarray(query_mask, bool)[:, None], ent.shape)
    return np.sum(np.where(rows, ent, 0.0), axis=(0, 2)) / np.maximum(np.sum(rows, axis=(0, 2)), 1)


def sink_scores(weights: Float[ArrayLike, "*batch T S"], *, key: int = 0) -> Float[np.ndarray, "*batch"]:
    """``α_k = 1/(T-k) Σ_{i>=k} A_ik``: mean attention paid to key ``key`` by the queries that can
    see it (Gu et al., 2024, arXiv:2410.10781); ``weights [..., T, S] -> [...]``."""
    a = _check_maps("weights", weights)
    T, S = a.shape[-2:]
    if not 0 <= key < min(T, S):
        raise ValueError(f"key: expected a key index in [0, {min(T, S)}), got {key}")
    return a[..., key:, key].mean(-1)


def sink_ratio(weights: Float[ArrayLike, "B H T S"] | Sequence | dict, *, key: int = 0,
               threshold: float = 0.3) -> float:
    """``Sink^ε_k``: the share of heads (over every layer and head, averaged over the batch) whose
    mean attention on key ``key`` exceeds ``threshold`` (ε = 0.3 in Gu et al., 2024).

    ``weights``: one layer's ``[B, H, T, S]`` or a list of them (layers)."""
    layers = [weights] if not isinstance(weights, (list, tuple, dict)) else list(
        weights.values() if isinstance(weights, dict) else weights)
    scores = [sink_scores(_check_maps("weights", w, 4), key=key) for w in layers]      # each [B, H]
    return float(np.mean([np.mean(s > threshold) for s in scores]))


def massive_activations(hidden: Float[ArrayLike, "*batch T d"], *, top_k: int = 4, min_abs: float = 100.0,
                        min_ratio: float = 1000.0) -> dict:
    """Massive-activation statistics of hidden states ``[..., T, d]`` (Sun et al., 2024,
    arXiv:2402.17762): ``top`` (the ``top_k`` largest ``|h|``), ``positions`` (their ``(token,
    channel)`` indices, batch axes flattened into the token index), ``median`` (median ``|h|``),
    ``ratio`` (top-1 / median), ``count`` (entries with ``|h| > min_abs`` and ``|h| >= min_ratio ×
    median``), ``channels`` (the distinct channels of those entries)."""
    h = np.abs(_check_maps("hidden", hidden))
    d = h.shape[-1]
    flat = h.reshape(-1, d)
    med = float(np.median(flat))
    order = np.argsort(flat, axis=None)[::-1][:top_k]
    tok, ch = np.unravel_index(order, flat.shape)
    massive = (flat > min_abs) & (flat >= min_ratio * med)
    return {"top": flat.reshape(-1)[order], "positions": list(zip(tok.tolist(), ch.tolist())), "median": med,
            "ratio": float(flat.max() / med) if med > 0 else float("inf"), "count": int(massive.sum()),
            "channels": sorted(set(np.nonzero(massive)[1].tolist()))}


def retrieval_score(weights: Float[ArrayLike, "B H T S"], key_tokens: Int[ArrayLike, "B S"],
                    output_tokens: Int[ArrayLike, "B T"], needle: Bool[ArrayLike, "B S"], *,
                    query_mask: Bool[ArrayLike, "B T"] | None = None) -> Float[np.ndarray, " H"]:
    """Retrieval score per head (Wu et al., 2024, arXiv:2404.15574): ``weights [B, H, T, S]`` of
    the generating queries, ``key_tokens int [B, S]`` (the tokens at the keys), ``output_tokens
    int [B, T]`` (the token generated at each query), ``needle bool [B, S]`` (the needle's keys),
    ``query_mask bool [B, T]`` (the generation steps; default all).  Returns ``[H]``: per head,
    the needle tokens it copied (a step ``t`` whose output is in the needle and whose argmax key
    is a needle key holding that token) over the number of needle tokens, summed over the batch."""
    a = _check_maps("weights", weights, 4)
    B, H, T, S = a.shape
    keys, outs, nd = np.asarray(key_tokens), np.asarray(output_tokens), np.asarray(needle, bool)
    for name, x, shape in (("key_tokens", keys, (B, S)), ("output_tokens", outs, (B, T)), ("needle", nd, (B, S))):
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    qm = np.ones((B, T), bool) if query_mask is None else np.asarray(query_mask, bool)
    top = a.argmax(-1)                                                  # [B, H, T]
    hit_tok = np.take_along_axis(keys[:, None, :].repeat(H, 1), top, axis=-1)      # token at the argmax key
    hit_needle = np.take_along_axis(nd[:, None, :].repeat(H, 1), top, axis=-1)
    in_needle = np.array([[o in set(keys[b][nd[b]].tolist()) for o in outs[b]] for b in range(B)])   # [B, T]
    copied = hit_needle & (hit_tok == outs[:, None, :]) & (in_needle & qm)[:, None, :]
    return copied.sum(axis=(0, 2)) / max(int(nd.sum()), 1)


def lookback_ratio(weights: Float[ArrayLike, "*batch T T"], num_context: int) -> Float[np.ndarray, "*batch _"]:
    """Lookback ratio (Chuang et al., 2024, arXiv:2407.07071) of every query after the context:
    ``weights [..., T, T]`` over a sequence whose first ``num_context`` tokens are the context;
    returns ``[..., T - num_context]``: ``mean_{j < N} A_tj / (mean_{j < N} A_tj + mean_{N <= j < t}
    A_tj)`` (the first generated token has no earlier new token: ratio 1)."""
    a = _check_maps("weights", weights)
    T = a.shape[-1]
    N = int(num_context)
    if not 0 < N < T:
        raise ValueError(f"num_context: expected an int in [1, {T}), got {num_context}")
    ctx = a[..., N:, :N].mean(-1)
    t = np.arange(N, T)
    new_mask = (np.arange(T)[None, :] >= N) & (np.arange(T)[None, :] < t[:, None])       # [T-N, T]
    n_new = new_mask.sum(-1)
    new = np.where(n_new > 0, (a[..., N:, :] * new_mask).sum(-1) / np.maximum(n_new, 1), 0.0)
    total = ctx + new
    return np.where(total > 0, ctx / np.where(total > 0, total, 1.0), 0.0)


def residual_maps(maps: Sequence[Float[ArrayLike, "B H T T"]] | dict, *,
                  residual: float = 0.5) -> Float[np.ndarray, "L B T T"]:
    """``Ã_l = (1 - r) mean_h A_l + r I``, rows renormalised (Abnar & Zuidema, 2020): a list of
    ``[B, H, T, T]`` (or head-averaged ``[B, T, T]``) maps -> ``[L, B, T, T]``."""
    a = _stack("maps", maps)
    if a.ndim == 5:
        a = a.mean(2)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a float in [0, 1], got {residual}")
    T = a.shape[-1]
    aug = (1.0 - residual) * a + residual * np.eye(T)
    s = aug.sum(-1, keepdims=True)
    return aug / np.where(s > 0, s, 1.0)


def attention_rollout(maps: Sequence[Float[ArrayLike, "B H T T"]] | dict, *,
                      residual: float = 0.5) -> Float[np.ndarray, "B T T"]:
    """Attention rollout ``Ã_L ··· Ã_1`` ``[B, T, T]`` (Abnar & Zuidema, 2020, arXiv:2005.00928):
    row ``i`` is the share of output token ``i`` attributed to each input token."""
    a = residual_maps(maps, residual=residual)
    r = a[0]
    for layer in a[1:]:
        r = layer @ r
    return r


def max_flow(capacity: Float[ArrayLike, "N N"], source: int, sink: int) -> float:
    """Maximum flow from ``source`` to ``sink`` of a graph given by its ``[N, N]`` capacity matrix
    (Edmonds-Karp: shortest augmenting paths by breadth-first search)."""
    cap = np.array(capacity, np.float64)
    n = cap.shape[0]
    if cap.shape != (n, n) or np.any(cap < 0):
        raise ValueError(f"capacity: expected a non-negative [N, N] matrix, got shape {cap.shape}")
    flow = 0.0
    while True:
        parent = np.full(n, -1)
        parent[source] = source
        queue = collections.deque([source])
        while queue and parent[sink] < 0:
            u = queue.popleft()
            for v in np.nonzero((cap[u] > 1e-12) & (parent < 0))[0]:
                parent[v] = u
                queue.append(v)
        if parent[sink] < 0:
            return flow
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(cap[u, v] for u, v in path)
        for u, v in path:
            cap[u, v] -= push
            cap[v, u] += push
        flow += push


def attention_flow(maps: Sequence[Float[ArrayLike, "B H T T"]] | dict, *, residual: float = 0.5,
                   batch: int = 0) -> Float[np.ndarray, "T T"]:
    """Attention flow ``[T, T]`` of batch row ``batch`` (Abnar & Zuidema, 2020): entry ``(i, j)``
    is the maximum flow from output node ``(L, i)`` to input node ``(0, j)`` in the layered graph
    with capacities ``Ã_l[i, j]`` on the edges ``(l, i) -> (l-1, j)``.  ``O(T^2)`` max-flows on
    ``(L+1) T`` nodes: short sequences only."""
    a = residual_maps(maps, residual=residual)[:, batch]          # [L, T, T]
    L, T = a.shape[0], a.shape[-1]
    n = (L + 1) * T
    cap = np.zeros((n, n))
    for layer in range(1, L + 1):             # node (l, i) has index l * T + i
        cap[layer * T:(layer + 1) * T, (layer - 1) * T:layer * T] = a[layer - 1]
    out = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            out[i, j] = max_flow(cap, L * T + i, j)
    return out


def gradient_weighted_rollout(maps: Sequence[Float[ArrayLike, "B H T T"]] | dict,
                              grads: Sequence[Float[ArrayLike, "B H T T"]] | dict) -> Float[np.ndarray, "B T T"]:
    """Chefer et al., 2021 (arXiv:2103.15679), eqs. 5-6 for self-attention: ``Ā_l = mean_h
    (∇A_l ⊙ A_l)^+``, ``R = I``, then ``R <- R + Ā_l R`` layer by layer; ``maps`` and ``grads``:
    lists of ``[B, H, T, T]`` (the gradient of the explained output with respect to each map,
    :func:`attn_jax.analysis.heads.attention_gradients`).  Returns ``R [B, T, T]``; row ``i``
    explains output token ``i``."""
    a, g = _stack("maps", maps), _stack("grads", grads)
    if a.shape != g.shape or a.ndim != 5:
        raise ValueError(f"grads: expected one gradient [B, H, T, T] per map, got shapes {g.shape} vs maps {a.shape}")
    T = a.shape[-1]
    r = np.broadcast_to(np.eye(T), a.shape[1:2] + (T, T)).copy()
    for al, gl in zip(a, g):
        abar = np.clip(al * gl, 0.0, None).mean(1)
        r = r + abar @ r
    return r


def normalize_importance(scores: dict | Sequence) -> dict:
    """Michel et al., 2019: head-importance scores ``{layer: [H]}`` divided by their ℓ2 norm per layer."""
    items = scores.items() if isinstance(scores, dict) else enumerate(scores)
    out = {}
    for k, s in items:
        s = np.asarray(s, np.float64)
        n = np.linalg.norm(s)
        out[k] = s / n if n > 0 else s
    return out


def prune_order(scores: dict) -> list[tuple]:
    """Every ``(layer, head)`` sorted by increasing importance (the greedy pruning order of Michel
    et al., 2019); ties keep layer then head order."""
    flat = [(float(v), i, k, h) for i, (k, s) in enumerate(scores.items()) for h, v in enumerate(np.asarray(s))]
    return [(k, h) for _, _, k, h in sorted(flat, key=lambda t: (t[0], t[1], t[3]))]
