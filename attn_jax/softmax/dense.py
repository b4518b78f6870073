"""``impl="dense"``: exact attention as one fused block, for small problems on CPU.

"Attention Is All You Need", Vaswani et al., 2017, arXiv:1706.03762; the function computed is
exactly that of :mod:`attn_jax.softmax.reference` (GQA by grouping, masks, dense, structured or
query-dependent bias (its ``q`` gradient added to ``dQ``), softcap before bias, learned sinks, dropout,
``return_lse``).  For a small ``T x S`` the tiled online softmax of :mod:`attn_jax.softmax.xla` pays for its loop and its rescaling; here the
whole score block ``[B, K, G, T, S]`` is formed at once, in float32 (float64 for float64 inputs)::

    S   = softcap(scale * Q K^T) + bias,  -inf where masked
    m   = max(rowmax(S), sink),  l = rowsum(exp(S - m)) + exp(sink - m)
    P   = exp(S - m) / l,        O = (P * Z) V,   lse = m + log l     (Z: dropout keep / (1 - rate))

with a custom VJP that keeps ``exp(S - m)`` and ``1 / l`` (no recomputation of ``Q K^T`` or
``exp``)::

    D     = rowsum(dO * O) - dlse
    dV    = (P * Z)^T dO,    dP = (dO V^T) * Z,    dS = P * (dP - D)   (= dbias)
    dS'   = dS * (1 - tanh^2) * scale,   dQ = dS' K,   dK = dS'^T Q
    dsink = -sum_i exp(sink - lse_i) D_i

A fully masked row has ``l = 0``: zero output, ``lse = -inf`` (finite with a sink) and zero
gradients.  Query rows and key/value columns that no pair uses are zeroed before any product, as
in the reference, so NaN in padded positions cannot leak.

Memory.  This path materialises ``B * H * T * S`` scores (and keeps ``P`` for the backward), so
:func:`unsupported` refuses it above :data:`DENSE_BUDGET` elements; ``impl="auto"`` then uses the
linear-memory tiled path.  The budget is a constant, so the dense path's extra memory is bounded
by a constant (a few times ``4 * DENSE_BUDGET`` bytes) whatever the problem size: auto never
picks a quadratic path for a problem that grows.  It is registered for the ``cpu`` platform only
(GPU/TPU have fused kernels; its block was measured on XLA:CPU).

Deviation from the reference: bfloat16/float16 inputs are upcast to float32 for every product
(the reference does the same); the reference's ``Precision.HIGHEST`` is the only precision on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.core import masks as M
from attn_jax.core import random as aj_random
from attn_jax.core.bias import StructuredBias, is_query_dependent

#: Largest ``B * H * T * S`` served by the dense path (elements of one score array; float32:
#: 4 bytes each, so 512 KiB).  Measured on a shared 2-core CPU (B=1, H=8, D=64, causal fp32, fwd
#: and fwd+bwd, peers in one process; see BUILD.md "Benchmarks"): at T = S = 128 the dense block
#: is as fast as the single-tile tiled path or faster (fwd+bwd 2.2 vs 3.0 ms best-of-10); from
#: T = 256 the tiled path with 64 x 64 causal tile skipping is faster (fwd+bwd 7.6 vs 6.3 ms,
#: T = 512: 58 vs 27 ms), and a ``[8, 1024, 1024]`` score matmul is already memory-bound.
DENSE_BUDGET = 1 << 17

#: Platforms for which the dense block was measured to beat the tiled path.
DENSE_PLATFORMS = ("cpu",)


def unsupported(platform: str, p) -> list[str]:
    """Reasons the dense block cannot (or should not) serve ``p`` on ``platform``."""
    r = []
    if platform not in DENSE_PLATFORMS:
        r.append(f"the dense block is tuned for XLA:CPU only (lowering platform '{platform}'; the tiled "
                 "and fused paths are faster there)")
    d = p.dims
    n = d.B * d.H * d.T * d.S
    if n > DENSE_BUDGET:
        r.append(f"T*S*B*H = {d.T}*{d.S}*{d.B}*{d.H} = {n} exceeds the dense budget of {DENSE_BUDGET} "
                 f"score elements ({DENSE_BUDGET * 4 >> 20} MiB in float32); the tiled path keeps "
                 "memory linear in T and S")
    return r


def _heads5(x, B: int, K: int, G: int):
    """[B|1, H|1, T, S] (or lower rank, left-padded) -> [B|1, K|1, G|1, T, S]."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, h, t, s = x.shape
    return x.reshape(b, 1, 1, t, s) if h == 1 else x.reshape(b, K, G, t, s)


def _sum_to(x, shape):
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_dense(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                    mask=None, bias=None, scale: float | None = None, softcap: float | None = None,
                    sinks: Float[Array, " H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                    return_lse: bool = False):
    """Exact attention in one dense block, with the reference's signature.

    Inputs are assumed validated (use :func:`attn_jax.attention` with ``impl="dense"`` for the
    validated entry point); any size is computed, the budget is enforced only by dispatch.
    """
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    dtype = q.dtype
    cdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
    scale = float(Dk ** -0.5 if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    rate = float(dropout_rate)
    mask = M.as_mask(mask)

    def idx():  # made inside each traced function: custom_vjp rules must not close over tracers
        return jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)

    bias_kind, bias_in, bias_const = "none", None, None
    if is_query_dependent(bias):       # bias(scale * q, i, j): differentiated w.r.t. itself and q
        bias_kind, bias_in = "query", bias
    elif isinstance(bias, StructuredBias):
        leaves = jax.tree.leaves(bias)
        if not leaves or (len(leaves) == 1 and leaves[0] is bias):
            bias_kind, bias_const = "structured_const", bias
        else:
            bias_kind, bias_in = "structured", bias
    elif bias is not None:
        bias_kind, bias_in = "dense", jnp.asarray(bias)

    def bias5(b, q5):
        qidx, kidx = idx()
        if bias_kind == "query":
            return b.tile_q(q5 * scale, qidx, kidx, T, S).astype(cdt)
        if bias_kind == "dense":
            return _heads5(b, B, K, G).astype(cdt)
        if bias_kind == "structured":
            return _heads5(b.tile(qidx, kidx, T, S), B, K, G).astype(cdt)
        if bias_kind == "structured_const":
            return _heads5(bias_const.tile(qidx, kidx, T, S), B, K, G).astype(cdt)
        return None

    seed = aj_random.dropout_seed(dropout_rng) if rate > 0 else None
    mask_in = jax.tree.leaves(mask)
    treedef = jax.tree.structure(mask)

    def keep_mask(seed):
        qidx, kidx = idx()
        return aj_random.keep_mask(seed, rate, jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None],
                                   jnp.arange(H, dtype=jnp.int32).reshape(1, K, G, 1, 1),
                                   qidx[None, None, None, :, None], kidx[None, None, None, None, :])

    # A static mask under which every query row and key column is used (causal with T <= S, ...)
    # needs no NaN-safety zeroing: decided at trace time from the mask's NumPy classification.
    all_used = False
    if mask is not None and mask.is_static:
        cls = np.asarray(mask.classify(T, S, 1, 1)) != M.EMPTY                    # [B|1, H|1, T, S]
        all_used = bool(cls.any(axis=3).all()) and bool(cls.any(axis=2).all())

    def operands(q, k, v, mask_leaves):
        """Laid-out float operands (q5 [B,K,G,T,Dk], k4/v4 [B,K,S,D]) with unused rows zeroed."""
        vis = None
        qidx, kidx = idx()
        if mask is not None:
            m = jax.tree.unflatten(treedef, mask_leaves)
            vis = _heads5(m.predicate(qidx, kidx, T, S), B, K, G)             # [B|1, K|1, G|1, T, S]
        if vis is not None and not all_used:
            row_used = jnp.broadcast_to(vis.any(axis=4), (B, K, G, T))          # [B, K, G, T]
            col_used = jnp.broadcast_to(vis.any(axis=(2, 3)), (B, K, S))        # [B, K, S]
            q = jnp.where(row_used.transpose(0, 3, 1, 2)[..., None].reshape(B, T, H, 1), q, 0)
            col = col_used.transpose(0, 2, 1)[..., None]                        # [B, S, K, 1]
            k = jnp.where(col, k, 0)
            v = jnp.where(col, v, 0)
        q5 = q.astype(cdt).reshape(B, T, K, G, Dk).transpose(0, 2, 3, 1, 4)
        k4 = k.astype(cdt).transpose(0, 2, 1, 3)
        v4 = v.astype(cdt).transpose(0, 2, 1, 3)
        return q5, k4, v4, vis

    def forward(q, k, v, b, sinks, seed, mask_leaves):
        q5, k4, v4, vis = operands(q, k, v, mask_leaves)
        s = jnp.einsum("bkgtd,bksd->bkgts", q5, k4, preferred_element_type=cdt) * scale
        t = None
        if softcap is not None:
            t = jnp.tanh(s / softcap)
            s = softcap * t
        bb = bias5(b, q5)
        if bb is not None:
            s = s + bb
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        m = s.max(axis=-1)
        if sinks is not None:
            sink = sinks.astype(cdt).reshape(1, K, G, 1)
            m = jnp.maximum(m, sink)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.exp(s - m[..., None])
        denom = e.sum(axis=-1)
        if sinks is not None:
            denom = denom + jnp.exp(sink - m)
        has_mass = denom > 0
        safe = jnp.where(has_mass, denom, 1.0)
        inv = jnp.where(has_mass, 1.0 / safe, 0.0)                               # [B, K, G, T]
        ez = e
        if rate > 0:
            ez = jnp.where(keep_mask(seed), e, 0.0)
            inv_o = inv * (1.0 / (1.0 - rate))
        else:
            inv_o = inv
        # Normalise the [T, Dv] output rather than the [T, S] probabilities (one pass fewer).
        o5 = jnp.einsum("bkgts,bksd->bkgtd", ez, v4, preferred_element_type=cdt) * inv_o[..., None]
        lse = jnp.where(has_mass, m + jnp.log(safe), -jnp.inf)                 # [B, K, G, T]
        return o5, lse, (e, inv), t, (q5, k4, v4, vis)

    def finish(o5, lse):
        o = o5.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dv).astype(dtype)
        return o, lse.transpose(0, 3, 1, 2).reshape(B, T, H)

    @jax.custom_vjp
    def core(q, k, v, b, sinks, seed, mask_leaves):
        o5, lse, *_ = forward(q, k, v, b, sinks, seed, mask_leaves)
        return finish(o5, lse)

    def core_fwd(q, k, v, b, sinks, seed, mask_leaves):
        o5, lse, p, t, ops = forward(q, k, v, b, sinks, seed, mask_leaves)
        return finish(o5, lse), (q, k, v, b, sinks, seed, mask_leaves, o5, lse, p, t, ops)

    def core_bwd(res, cts):
        q, k, v, b, sinks, seed, mask_leaves, o5, lse, (e, inv), t, (q5, k4, v4, vis) = res
        p = e * inv[..., None]                      # fused into its consumers by XLA
        do, dlse = cts
        do5 = do.astype(cdt).reshape(B, T, K, G, Dv).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, Dv]
        delta = (do5 * o5).sum(axis=-1) - dlse.astype(cdt).reshape(B, T, K, G).transpose(0, 2, 3, 1)
        dp = jnp.einsum("bkgtd,bksd->bkgts", do5, v4, preferred_element_type=cdt)
        pz = p
        if rate > 0:
            keep = keep_mask(seed)
            pz = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
            dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
        dv4 = jnp.einsum("bkgts,bkgtd->bksd", pz, do5, preferred_element_type=cdt)
        ds = p * (dp - delta[..., None])            # zero where masked (p = 0 there)
        db = None
        if bias_kind == "dense":
            b4 = b.reshape((1,) * (4 - b.ndim) + b.shape)
            g = _sum_to(ds, (b4.shape[0], 1 if b4.shape[1] == 1 else K, 1 if b4.shape[1] == 1 else G, T, S))
            g = g.reshape(g.shape[0], g.shape[1] * g.shape[2], T, S)
            db = _sum_to(g, b4.shape).reshape(b.shape).astype(b.dtype)
        elif bias_kind == "structured":
            qidx, kidx = idx()
            out, pull = jax.vjp(lambda bo: _heads5(bo.tile(qidx, kidx, T, S), B, K, G).astype(cdt), b)
            (gb,) = pull(_sum_to(ds, out.shape))
            db = jax.tree.map(lambda g, x: g.astype(x.dtype), gb, b)
        dq5_bias = None
        if bias_kind == "query":
            qidx, kidx = idx()
            _, pull = jax.vjp(lambda bo, qq: bo.tile_q(qq * scale, qidx, kidx, T, S).astype(cdt), b, q5)
            gb, dq5_bias = pull(ds)
            db = jax.tree.map(lambda g, x: g.astype(x.dtype), gb, b)
        if t is not None:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dq5 = jnp.einsum("bkgts,bksd->bkgtd", ds, k4, preferred_element_type=cdt)
        if dq5_bias is not None:
            dq5 = dq5 + dq5_bias
        dk4 = jnp.einsum("bkgts,bkgtd->bksd", ds, q5, preferred_element_type=cdt)
        dq = dq5.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dk).astype(q.dtype)
        dk = dk4.transpose(0, 2, 1, 3).astype(k.dtype)
        dv = dv4.transpose(0, 2, 1, 3).astype(v.dtype)
        dsinks = None
        if sinks is not None:
            lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
            p_sink = jnp.where(jnp.isfinite(lse), jnp.exp(sinks.astype(cdt).reshape(1, K, G, 1) - lse_safe), 0.0)
            dsinks = (-(p_sink * delta).sum(axis=(0, 3)).reshape(H)).astype(sinks.dtype)
        return dq, dk, dv, db, dsinks, None, [None] * len(mask_leaves)

    core.defvjp(core_fwd, core_bwd)
    o, lse = core(q, k, v, bias_in, sinks, seed, mask_in)
    if not return_lse:
        return o
    return o, lse.astype(jnp.float32 if cdt == jnp.float32 else cdt)


def attention_dense_impl(p, q, k, v, bias, sinks, dropout_rng):
    """Registry entry point for :func:`attn_jax.attention` (``impl="dense"``)."""
    return attention_dense(q, k, v, mask=p.mask, bias=bias, scale=p.scale, softcap=p.softcap, sinks=sinks,
                           dropout_rate=p.dropout_rate, dropout_rng=dropout_rng, return_lse=p.return_lse)
