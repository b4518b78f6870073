"""Token-by-token reference for the chunked GLA kernels (a ``lax.scan`` over time).

It computes exactly the recurrence documented in :mod:`pallas_kernels.chunked_gla` with no
chunking, and is differentiated by JAX's autodiff, so kernel tests can check values and every
gradient without importing attn_jax.  It computes in float32, or float64 when the inputs are
float64 (under ``jax.enable_x64``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def gla_reference(q, k, v, log_g, *, scale=None, initial_state=None, segment_ids=None, **unused):
    """``(o [B, T, H, Dv] (q.dtype), final_state [B, H, Dk, Dv])``; ``log_g`` ``[B, T, H, Dk]`` or ``[B, T, H]``.

    ``S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.  With ``segment_ids``
    (int ``[B, T]``, 0 = padding): a padding token leaves ``S`` unchanged and outputs 0; a document
    starts at a non-padding token whose id differs from the last non-padding id before it, and
    ``S`` is zeroed before that token.  Kernel-only keywords (platform, chunk_size, ...) are ignored.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    ct = jnp.promote_types(q.dtype, jnp.float32)
    scale = Dk ** -0.5 if scale is None else scale
    g = log_g.astype(ct)
    if g.ndim == 3:
        g = g[..., None]
    g = jnp.broadcast_to(g, (B, T, H, Dk))
    S0 = jnp.zeros((B, H, Dk, Dv), ct) if initial_state is None else initial_state.astype(ct)

    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def step(carry, x):
        S, last_id = carry
        qt, kt, vt, gt, it = x                               # [B, H, D], ids [B]
        valid = (it != 0)[:, None, None, None]
        reset = (it != 0) & (last_id != 0) & (it != last_id)
        S_new = jnp.where(reset[:, None, None, None], 0.0, S)
        S_new = jnp.exp(gt)[..., None] * S_new + kt[..., :, None] * vt[..., None, :]
        S = jnp.where(valid, S_new, S)
        o = jnp.where(valid[..., 0], scale * jnp.einsum("bhd,bhde->bhe", qt, S), 0.0)
        return (S, jnp.where(it != 0, it, last_id)), o

    xs = tuple(jnp.moveaxis(x.astype(ct), 1, 0) for x in (q, k, v, g)) + (jnp.moveaxis(seg, 1, 0),)
    (S, _), o = lax.scan(step, (S0, jnp.zeros((B,), jnp.int32)), xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), S
