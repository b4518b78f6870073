"""Mixture-of-Head attention (MoH): heads as experts, a router weights and selects them per token.

"MoH: Multi-Head Attention as Mixture-of-Head Attention", Jin, Zhu, Yuan, Yan, 2024,
arXiv:2410.11842 (§3).  Multi-head attention is a sum over heads, ``y = sum_h o_h W^O_h``; MoH
makes it a weighted sum with per-token gates ``g_h``, ``y = sum_h g_h o_h W^O_h``.  The first
``h_s`` heads are *shared* (always on), the other ``H - h_s`` are *routed* (the top ``k`` per
token); constants follow the authors' code (SkyworkAI/MoH, ``MoH-ViT/attention_native.py``):

    r    = softmax(x W_r)                                   over the routed heads
    g_r  = k * topk_mask(r) ⊙ r / sum(topk_mask(r) ⊙ r)     renormalised over the selected k
    g_s  = h_s * softmax(x W_s)   (h_s > 1),   g_s = h_s   (h_s = 1)
    [α_s, α_r] = 2 * softmax(x W_0)                         (only with shared heads)
    g    = [α_s g_s ; α_r g_r]                              [B, T, H]
    o_h <- g_h o_h                                          before W^O

and the load-balancing loss of the routed heads, ``L_b = E^2 * mean_e(P_e f_e)`` with ``P_e`` the
mean router probability and ``f_e`` the fraction of tokens selecting head ``e`` (``E = H - h_s``).

Forms.  The gate is a per-token, per-head scale on the attention output, so the op is
:func:`attn_jax.attention` followed by the gate (every backend, mask, GQA).  Deviation, stated: the
heads a token does not select are still computed (their output is multiplied by 0); skipping them
needs a kernel that gathers the selected (token, head) pairs, which is what gives MoH its
inference savings and is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention
from attn_jax.softmax.reference import attention_reference
from attn_jax.variants.dense_scores import check_inputs

__all__ = ["mixture_of_heads_attention", "mixture_of_heads_attention_reference", "head_gates"]


def _check_logits(name, x, last=None):
    x = jnp.asarray(x)
    V.check_float_array(name, x)
    if x.ndim != 3 or (last is not None and x.shape[-1] != last):
        want = f"[B, T, {last}]" if last is not None else "[B, T, E]"
        raise ValueError(f"{name}: expected {want}, got {tuple(x.shape)}")
    return x.astype(jnp.float32)


def head_gates(router_logits: Float[ArrayLike, "B T E"], *, top_k: int,
               shared_logits: Float[ArrayLike, "B T Hs"] | None = None,
               mix_logits: Float[ArrayLike, "B T 2"] | None = None,
               num_shared: int = 0) -> tuple[Float[Array, "B T H"], Float[Array, ""]]:
    """``(g [B, T, h_s + E], load_balance_loss)``: the MoH head gates (module docstring) from the
    router logits of the ``E`` routed heads, the shared-head logits (``h_s > 1``) and the two
    shared/routed mixing logits (``h_s > 0``)."""
    r_logits = _check_logits("router_logits", router_logits)
    E = r_logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected an int in [1, {E}] (the routed heads), got {top_k!r}")
    if isinstance(num_shared, bool) or not isinstance(num_shared, (int, np.integer)) or num_shared < 0:
        raise ValueError(f"num_shared: expected an int >= 0, got {num_shared!r}")
    r = jax.nn.softmax(r_logits, axis=-1)
    _, idx = jax.lax.top_k(r, top_k)
    selected = jnp.sum(jax.nn.one_hot(idx, E, dtype=r.dtype), axis=-2)          # [B, T, E] 0/1
    kept = r * selected
    g_r = top_k * kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), jnp.finfo(r.dtype).eps)
    aux = jnp.mean(jnp.mean(r, axis=(0, 1)) * jnp.mean(selected, axis=(0, 1))) * E * E
    if num_shared == 0:
        return g_r, aux
    B, T = r.shape[:2]
    if num_shared > 1:
        g_s = num_shared * jax.nn.softmax(_check_logits("shared_logits", shared_logits, num_shared), axis=-1)
    else:
        g_s = jnp.ones((B, T, 1), r.dtype)
    alpha = 2 * jax.nn.softmax(_check_logits("mix_logits", mix_logits, 2), axis=-1)
    return jnp.concatenate([alpha[..., :1] * g_s, alpha[..., 1:] * g_r], axis=-1), aux


def _check_gates(gates, dims):
    gates = jnp.asarray(gates)
    V.check_float_array("gates", gates)
    if gates.shape != (dims.B, dims.T, dims.H):
        raise ValueError(f"gates: expected [B, T, H]=({dims.B}, {dims.T}, {dims.H}), got {tuple(gates.shape)}")
    return gates


def mixture_of_heads_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                               v: Float[ArrayLike, "B S K Dv"], gates: Float[ArrayLike, "B T H"], *, mask=None,
                               bias=None, scale: float | None = None, softcap: float | None = None,
                               sinks: Float[ArrayLike, " H"] | None = None, impl="auto") -> Float[Array, "B T H Dv"]:
    """``g_h ⊙ attention(q, k, v, ...)_h`` with the head gates ``gates [B, T, H]`` (e.g. from
    :func:`head_gates`); other arguments as :func:`attn_jax.attention`."""
    dims = V.check_qkv(q, k, v)
    g = _check_gates(gates, dims)
    o = attention(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks, impl=impl)
    return (o * g[..., None].astype(o.dtype)).astype(o.dtype)


def mixture_of_heads_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                         v: Float[ArrayLike, "B S K Dv"], gates: Float[ArrayLike, "B T H"], *,
                                         mask=None, scale: float | None = None,
                                         sinks: Float[ArrayLike, " H"] | None = None) -> Float[Array, "B T H Dv"]:
    """The exact-attention reference, each head's output scaled by its gate."""
    dims, mask = check_inputs(q, k, v, mask)
    g = _check_gates(gates, dims)
    o = attention_reference(q, k, v, mask=mask, scale=scale, sinks=sinks)
    return (o * g[..., None].astype(o.dtype)).astype(o.dtype)


DECLARATION = declare(Declaration(
    name="moh", family="variants", title="Mixture-of-Head attention (routed + shared heads)",
    papers=(Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024, "2410.11842", "Jin et al."),),
    summary="y = Σ_h g_h o_h W^O_h; g: top-k renormalised router softmax (routed) and softmax (shared) heads",
    op=mixture_of_heads_attention, forms=("auto",), directions=("causal", "bidirectional"),
    layer="attn_jax.nn.variant_attention:MixtureOfHeadsAttention",
    notes="unselected heads are computed and multiplied by 0 (no gather kernel); load-balance loss sown"))
