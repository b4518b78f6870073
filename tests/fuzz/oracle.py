"""A float64 NumPy oracle for the fuzzer, written from the definitions and independent of attn_jax.

Nothing here imports attn_jax or JAX: masks are plain dicts (:func:`visibility`), attention is
computed densely in float64, and its VJP is the analytic one (written out below, not autodiff).
``tests/fuzz/test_oracle.py`` checks :func:`attention` against the loop form
:func:`attention_loop` and :func:`attention_vjp` against central finite differences.

Exact attention (``q [B, T, H, Dk]``, ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]``, head ``h`` reads
k/v head ``h // (H / K)``)::

    s_ij = scale q_i . k_j;   s = c tanh(s / c) (softcap c);   s += bias_ij;   s = -inf where hidden
    m_i  = max(max_j s_ij, sink_h);   l_i = sum_j exp(s_ij - m_i) + exp(sink_h - m_i)
    p_ij = exp(s_ij - m_i) / l_i;     o_i = sum_j p_ij v_j;      lse_i = m_i + log l_i
    (o_i = 0, lse_i = -inf when row i has no visible key and no sink)

NaN rule: a query row or key/value column that no visible (query, key) pair uses is replaced by
zeros before anything is computed, so NaN/Inf there reaches no output and gets zero gradient.

VJP (cotangents ``do``, ``dlse``)::

    D_i  = sum_d do_id o_id - dlse_i
    dv_j = sum_i p_ij do_i;   dp_ij = do_i . v_j;   ds_ij = p_ij (dp_ij - D_i)   (= dbias)
    ds'  = ds (1 - tanh^2(scale q.k / c)) (softcap);   dq_i = scale sum_j ds'_ij k_j;   dk_j = scale sum_i ds'_ij q_i
    dsink_h = -sum_{b,i} exp(sink_h - lse_i) D_i

Masks (plain dicts; ``offset`` None = ``S - T``, an int, or a list of per-row ints; query ``i``
sits at position ``p = i + offset``)::

    {"kind": "causal", "offset": o}                        j <= p
    {"kind": "window", "left": l, "right": r, "offset": o} p - l <= j <= p + r
    {"kind": "chunked", "size": c, "offset": o}            floor(p / c) == floor(j / c)
    {"kind": "prefix", "n": n, "offset": o}                j < n or j <= p
    {"kind": "segments", "q": [[...]], "kv": [[...]]|None} q_id == kv_id != 0
    {"kind": "key_padding", "lengths": [...]}              j < lengths[b]
    {"kind": "dense", "rows": [[[[0/1 ...]]]]}             an explicit [B|1, H|1, T, S] array
    {"kind": "and" | "or", "parts": [...]}

Linear family: token loops (:func:`gated_loop`, :func:`delta_loop`, :func:`normalised_loop`) of
the recurrences, with packed segments (id 0 = transparent padding, a new non-zero id after the
last non-padding token resets the state) and an initial state that belongs to the first document.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["visibility", "attention", "attention_vjp", "attention_loop", "alibi_slopes", "alibi_bias",
           "gated_loop", "delta_loop", "normalised_loop", "elu_plus_one", "finite_difference"]


# ----------------------------------------------------------------------------- masks


def _offsets(offset, B, T, S):
    if offset is None:
        return np.full((B, 1, 1), S - T, np.int64)
    if isinstance(offset, (list, tuple, np.ndarray)):
        return np.asarray(offset, np.int64).reshape(-1, 1, 1)
    return np.full((B, 1, 1), int(offset), np.int64)


def visibility(spec, B: int, H: int, T: int, S: int) -> np.ndarray:
    """``bool [B, H, T, S]``: which (query, key) pairs the mask ``spec`` allows (None: all)."""
    if spec is None:
        return np.ones((B, H, T, S), bool)
    kind = spec["kind"]
    i = np.arange(T, dtype=np.int64)[None, :, None]
    j = np.arange(S, dtype=np.int64)[None, None, :]
    if kind in ("and", "or"):
        parts = [visibility(p, B, H, T, S) for p in spec["parts"]]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if kind == "and" else (out | p)
        return out
    if kind in ("causal", "window", "chunked", "prefix"):
        p = i + _offsets(spec.get("offset"), B, T, S)
        if kind == "causal":
            vis = j <= p
        elif kind == "window":
            vis = (j >= p - spec["left"]) & (j <= p + spec["right"])
        elif kind == "chunked":
            vis = np.floor_divide(p, spec["size"]) == np.floor_divide(j, spec["size"])
        else:
            vis = (j < spec["n"]) | (j <= p)
        return np.broadcast_to(vis[:, None], (B, H, T, S)).copy()
    if kind == "segments":
        qi = np.asarray(spec["q"], np.int64)
        ki = qi if spec.get("kv") is None else np.asarray(spec["kv"], np.int64)
        vis = (qi[:, :, None] == ki[:, None, :]) & (qi[:, :, None] != 0)
        return np.broadcast_to(vis[:, None], (B, H, T, S)).copy()
    if kind == "key_padding":
        n = np.asarray(spec["lengths"], np.int64).reshape(-1, 1, 1, 1)
        return np.broadcast_to(np.arange(S)[None, None, None, :] < n, (B, H, T, S)).copy()
    if kind == "dense":
        return np.broadcast_to(np.asarray(spec["rows"], bool), (B, H, T, S)).copy()
    raise ValueError(f"unknown mask kind {kind!r}")


def alibi_slopes(H: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022, arXiv:2108.12409): ``2^(-8 k / n)`` for a power of two
    ``n``, else those of ``p = 2^floor(log2 H)`` heads then every other slope of ``2p`` heads."""
    def pow2(n):
        return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]
    p = 2 ** int(math.floor(math.log2(H)))
    return np.array(pow2(p) + pow2(2 * p)[0::2][: H - p], np.float64)


def alibi_bias(slopes, T: int, S: int) -> np.ndarray:
    """``[1, H, T, S]``: ``-m_h |i + (S - T) - j|`` (bottom-right aligned query positions)."""
    i = np.arange(T)[:, None] + (S - T)
    j = np.arange(S)[None, :]
    return -np.asarray(slopes, np.float64)[None, :, None, None] * np.abs(i - j)[None, None]


# ----------------------------------------------------------------------------- exact attention


def _used(vis, K):
    """(rows [B, T, H], cols [B, S, K]): query rows / key columns that some visible pair uses."""
    B, H, T, S = vis.shape
    rows = vis.any(axis=3).transpose(0, 2, 1)
    cols = vis.reshape(B, K, H // K, T, S).any(axis=(2, 3)).transpose(0, 2, 1)
    return rows, cols


def _forward(q, k, v, vis, bias, scale, softcap, sinks):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, Dk = q.shape
    K = k.shape[2]
    G = H // K
    scale = Dk ** -0.5 if scale is None else scale
    rows, cols = _used(vis, K)
    q = np.where(rows[..., None], q, 0.0)
    k = np.where(cols[..., None], k, 0.0)
    v = np.where(cols[..., None], v, 0.0)
    kh, vh = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)        # [B, S, H, D]
    s0 = np.einsum("bthd,bshd->bhts", q, kh) * scale
    t = None
    s = s0
    if softcap is not None:
        t = np.tanh(s0 / softcap)
        s = softcap * t
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None])
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m[..., None])
    den = e.sum(-1)
    if sinks is not None:
        den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None] - m)
    mass = den > 0
    p = e / np.where(mass, den, 1.0)[..., None]
    o = np.einsum("bhts,bshd->bthd", p, vh)
    lse = np.where(mass, m + np.log(np.where(mass, den, 1.0)), -np.inf).transpose(0, 2, 1)
    return dict(q=q, kh=kh, vh=vh, t=t, p=p, o=o, lse=lse, rows=rows, cols=cols, scale=scale, G=G)


def attention(q, k, v, vis, *, bias=None, scale=None, softcap=None, sinks=None):
    """``(o [B, T, H, Dv], lse [B, T, H])`` in float64 (see the module docstring)."""
    f = _forward(q, k, v, vis, bias, scale, softcap, sinks)
    return f["o"], f["lse"]


def attention_vjp(q, k, v, vis, do, dlse=None, *, bias=None, scale=None, softcap=None, sinks=None):
    """``dict(dq, dk, dv, dbias [B, H, T, S], dsinks [H] | None)`` for cotangents ``do``, ``dlse``
    (``dlse`` is ignored on rows whose lse is -inf).  ``dbias`` is per (b, h, i, j); sum it to a
    broadcast bias' shape."""
    f = _forward(q, k, v, vis, bias, scale, softcap, sinks)
    B, T, H, _ = f["q"].shape
    K, G, sc = k.shape[2], f["G"], f["scale"]
    do = np.asarray(do, np.float64)
    dl = np.zeros((B, T, H)) if dlse is None else np.where(np.isfinite(f["lse"]), np.asarray(dlse, np.float64), 0.0)
    D = (do * f["o"]).sum(-1) - dl                                   # [B, T, H]
    p = f["p"]
    dv_h = np.einsum("bhts,bthd->bshd", p, do)
    dp = np.einsum("bthd,bshd->bhts", do, f["vh"])
    ds = p * (dp - D.transpose(0, 2, 1)[..., None])
    ds = np.where(vis, ds, 0.0)
    dsc = ds if f["t"] is None else ds * (1.0 - f["t"] ** 2)
    dq = sc * np.einsum("bhts,bshd->bthd", dsc, f["kh"])
    dk_h = sc * np.einsum("bhts,bthd->bshd", dsc, f["q"])
    S = k.shape[1]
    dk = dk_h.reshape(B, S, K, G, -1).sum(3)
    dv = dv_h.reshape(B, S, K, G, -1).sum(3)
    dq = np.where(f["rows"][..., None], dq, 0.0)
    dk = np.where(f["cols"][..., None], dk, 0.0)
    dv = np.where(f["cols"][..., None], dv, 0.0)
    dsinks = None
    if sinks is not None:
        ps = np.exp(np.asarray(sinks, np.float64)[None, None, :] - f["lse"])      # [B, T, H]
        dsinks = -(ps * D).sum(axis=(0, 1))
    return dict(dq=dq, dk=dk, dv=dv, dbias=ds, dsinks=dsinks)


def attention_loop(q, k, v, vis, *, bias=None, scale=None, softcap=None, sinks=None):
    """The same function as :func:`attention`, one query row at a time with Python loops."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    scale = Dk ** -0.5 if scale is None else scale
    o = np.zeros((B, T, H, Dv))
    lse = np.full((B, T, H), -np.inf)
    for b in range(B):
        for h in range(H):
            kh = h // G
            for i in range(T):
                logits = []
                vals = []
                for j in range(S):
                    if not vis[b, h, i, j]:
                        continue
                    x = scale * float(q[b, i, h] @ k[b, j, kh])
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    if bias is not None:
                        x += float(np.broadcast_to(bias, (B, H, T, S))[b, h, i, j])
                    logits.append(x)
                    vals.append(v[b, j, kh])
                if sinks is not None:
                    logits.append(float(sinks[h]))
                    vals.append(np.zeros(Dv))
                if not logits:
                    continue
                mx = max(logits)
                w = [math.exp(x - mx) for x in logits]
                z = sum(w)
                o[b, i, h] = sum(wi * vi for wi, vi in zip(w, vals)) / z
                lse[b, i, h] = mx + math.log(z)
    return o, lse


def finite_difference(f, x, direction, eps=1e-6):
    """Central difference ``(f(x + eps d) - f(x - eps d)) / (2 eps)`` of a scalar ``f``."""
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


# ----------------------------------------------------------------------------- linear family


def _layout(segment_ids, B, T):
    """(valid [B, T], reset [B, T], first_doc [B, T]) of packed segment ids (None: one document)."""
    if segment_ids is None:
        return np.ones((B, T), bool), np.zeros((B, T), bool), np.ones((B, T), bool)
    seg = np.asarray(segment_ids, np.int64)
    valid = seg != 0
    reset = np.zeros((B, T), bool)
    first = np.zeros((B, T), bool)
    for b in range(B):
        last, docs = None, 0
        for t in range(T):
            if not valid[b, t]:
                continue
            if last is not None and seg[b, t] != last:
                reset[b, t] = True
                docs += 1
            first[b, t] = docs == 0
            last = seg[b, t]
    return valid, reset, first


def _token_loop(q, k, v, update, *, scale, initial_state, segment_ids):
    """The recurrences' shared token loop: per (batch, query head), skip padding, reset the state at
    a document start, ``S = update(S, b, t, h, k_t, v_t)``, ``o_t = scale q_t S``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, Dk = q.shape
    K, Dv = k.shape[2], v.shape[3]
    G = H // K
    scale = Dk ** -0.5 if scale is None else scale
    valid, reset, _ = _layout(segment_ids, B, T)
    o = np.zeros((B, T, H, Dv))
    state = np.zeros((B, H, Dk, Dv)) if initial_state is None else np.array(initial_state, np.float64)
    for b in range(B):
        for h in range(H):
            St = state[b, h].copy()
            for t in range(T):
                if not valid[b, t]:
                    continue
                if reset[b, t]:
                    St = np.zeros((Dk, Dv))
                St = update(St, b, t, h, k[b, t, h // G], v[b, t, h // G])
                o[b, t, h] = scale * q[b, t, h] @ St
            state[b, h] = St
    return o, state


def gated_loop(q, k, v, log_g=None, *, scale=None, initial_state=None, segment_ids=None):
    """Causal gated linear attention, token by token: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``,
    ``o_t = scale q_t S_t`` (``log_g``: None, ``[B, T, H]`` or ``[B, T, H, Dk]``).  Returns
    ``(o [B, T, H, Dv], final_state [B, H, Dk, Dv])``."""

    def update(St, b, t, h, kt, vt):
        if log_g is not None:
            g = np.asarray(log_g, np.float64)[b, t, h]
            St = np.exp(g).reshape(-1, 1) * St if np.ndim(g) else math.exp(float(g)) * St
        return St + np.outer(kt, vt)

    return _token_loop(q, k, v, update, scale=scale, initial_state=initial_state, segment_ids=segment_ids)


def delta_loop(q, k, v, beta, log_g=None, *, scale=None, initial_state=None, segment_ids=None):
    """(Gated) delta rule, token by token: ``S_t = a_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t``,
    ``o_t = scale q_t S_t`` (``a_t = exp(log_g)`` or 1).  Returns ``(o, final_state)``."""
    beta = np.asarray(beta, np.float64)

    def update(St, b, t, h, kt, vt):
        a = 1.0 if log_g is None else math.exp(float(np.asarray(log_g, np.float64)[b, t, h]))
        bt = beta[b, t, h]
        return a * (np.eye(len(kt)) - bt * np.outer(kt, kt)) @ St + bt * np.outer(kt, vt)

    return _token_loop(q, k, v, update, scale=scale, initial_state=initial_state, segment_ids=segment_ids)


def elu_plus_one(x):
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def normalised_loop(q, k, v, *, eps=1e-6, segment_ids=None):
    """Causal normalised linear attention with the elu + 1 map (scale 1), token by token:
    ``S_t = S_{t-1} + φ(k_t)^T v_t``, ``z_t = z_{t-1} + φ(k_t)``, ``o_t = φ(q_t) S_t / (φ(q_t) z_t + eps)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, Dk = q.shape
    K, Dv = k.shape[2], v.shape[3]
    G = H // K
    valid, reset, _ = _layout(segment_ids, B, T)
    o = np.zeros((B, T, H, Dv))
    for b in range(B):
        for h in range(H):
            St, z = np.zeros((Dk, Dv)), np.zeros(Dk)
            for t in range(T):
                if not valid[b, t]:
                    continue
                if reset[b, t]:
                    St, z = np.zeros((Dk, Dv)), np.zeros(Dk)
                fk = elu_plus_one(k[b, t, h // G])
                St = St + np.outer(fk, v[b, t, h // G])
                z = z + fk
                fq = elu_plus_one(q[b, t, h])
                o[b, t, h] = (fq @ St) / (fq @ z + eps)
    return o
