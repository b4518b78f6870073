"""Mega (chunked) as a Flax NNX token mixer: damped EMA + single-head gated attention.

Paper: Ma, Zhou, Kong, He, Gui, Neubig, May, Zettlemoyer, "Mega: Moving Average Equipped Gated
Attention", 2022 (ICLR 2023), arXiv:2209.10655, §3.  Constants and edge cases follow the
official code (facebookresearch/mega, ``fairseq/modules/moving_average_gated_attention.py``,
``exponential_moving_average.py``, ``relative_positional_bias.py``).

For ``X: [B, T, d]`` (§3.1-3.3; ``φ_silu`` = SiLU, ``σ`` = sigmoid):

    X' = φ_silu(EMA(X) + ω ⊙ X)                                   damped EMA, attn_jax.linear.mega
    Z  = φ_silu(X' W_z + b_z)                                      [T, z]  (shared representation)
    Q  = κ_q ⊙ Z + μ_q,   K = κ_k ⊙ Z + μ_k                       single head
    V  = φ_silu(X W_v + b_v)                                       [T, v]  (v = h_dim)
    O  = softmax(Q K^T / sqrt(z) + b_rel + mask) V                 mask = chunked(c) & causal
    γ  = φ_silu(X' W_γ + b_γ)                                      reset gate   [T, v]
    φ  = σ(X' W_φ + b_φ)                                           update gate  [T, d]
    Ĥ  = φ_silu(X' W_h + (γ ⊙ O) U_h + b_h)
    Y  = φ ⊙ Ĥ + (1 − φ) ⊙ X

EMA: ``u_t = α ⊙ β x_t + (1 − α ⊙ δ) ⊙ u_{t−1}``, ``EMA(X)_t = η^T u_t`` per channel with
``ema_dim`` (``h`` in the paper) EMA dimensions; ``α = σ(α̃), δ = σ(δ̃)``, and ``η`` is scaled by
``ema_dim^{-1/2}`` as in the official code.  Mega-chunk (§3.5): attention only inside fixed chunks
of ``chunk_size`` tokens (``masks.chunked(c) & masks.causal()``) while the EMA runs over the whole
sequence, so the cost is linear in ``T``.  Full (quadratic) Mega is ``chunk_size >= T``.

Relative position: the "simple" learned relative bias of the official code, ``b_rel[i, j] =
w[i − j]`` for ``0 <= i − j < c`` (``rel_pos_bias="simple"``, default; ``"none"`` disables it).
Offsets are index offsets, equal to position offsets inside a chunk of a contiguous document.

Deviations from the paper / official code (stated, on purpose):

* No internal normalisation (the official layer applies its own pre-/post-norm); the model's
  pre-norm block does that, so the ``(1 − φ) ⊙ X`` path carries the mixer's (normalised) input.
* ``X' = φ_silu(EMA(X) + ω ⊙ X)`` (the official code's residual + SiLU); the paper writes
  ``X' = EMA(X)``.  Set ``ema_residual=False`` for the paper's equation.
* Softmax attention only (no ``laplace`` / ``relu²`` attention functions); no rotary bias;
  no dropout; causal only (no bidirectional EMA — ``causal=False`` raises).
* Padding tokens (segment id 0) are transparent to the EMA (no write, no decay) and output zero;
  the official code zeroes them but keeps decaying.  Packed documents reset the EMA and attend
  only inside their own document; chunk boundaries follow ``positions`` (default: the index
  within each document, so packed == padded for any chunk size).

Decoding: the cache (:class:`MegaCache`) is the EMA state ``[B, d, ema_dim]`` (float32) plus a
:class:`~attn_jax.softmax.kv_cache.RingKVCache` of ``chunk_size`` slots holding the keys and
values of the current chunk (a query attends over ``concat(ring, new tokens)`` with a chunk-id
and validity mask, so any prefill length works).  Memory is ``O(chunk_size)`` — ``max_len`` of
``init_cache`` is ignored.  With a cache, chunk boundaries come from the cache's token count.

Single head: ``num_heads``, ``num_kv_heads`` and ``head_dim`` (passed by the model builders)
are accepted and ignored; the attention width is ``z_dim`` and the value width ``h_dim``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.core import masks
from attn_jax.core.bias import StructuredBias, query_positions
from attn_jax.linear.common import segment_layout
from attn_jax.linear.mega import EMA_IMPLS, damped_ema, damped_ema_step
from attn_jax.nn.layers import check_mixer_input, check_positive_int, param
from attn_jax.softmax.api import attention
from attn_jax.softmax.kv_cache import RingKVCache

__all__ = ["MegaMixer", "MegaCache", "MegaRelativeBias", "chunk_mask"]

REL_POS = ("simple", "none")


# ----------------------------------------------------------------------------- relative bias


@jax.tree_util.register_pytree_node_class
class MegaRelativeBias(StructuredBias):
    """Learned causal relative bias ``b[i, j] = table[i − j]`` (clipped to ``[0, len(table) − 1]``;
    pairs outside that range are masked by the chunk mask anyway).  Head-independent, pytree."""

    num_heads = None

    def __init__(self, table):
        self.table = table

    def tile(self, q_idx, k_idx, T: int, S: int):
        rel = query_positions(jnp.asarray(q_idx, jnp.int32), T, S)[:, None] - jnp.asarray(k_idx, jnp.int32)[None, :]
        idx = jnp.clip(rel, 0, self.table.shape[0] - 1)
        return jnp.take(self.table.astype(jnp.float32), idx, axis=0)[None, None]

    def parameters(self):
        return (self.table,)

    def tree_flatten(self):
        return (self.table,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


# ----------------------------------------------------------------------------- cache


@dataclasses.dataclass(frozen=True)
class MegaCache:
    """Decode cache: ``ema [B, d, ema_dim]`` float32 and ``kv`` — a ring of the current chunk."""

    ema: jax.Array
    kv: RingKVCache

    @property
    def lengths(self):
        return self.kv.lengths


jax.tree_util.register_dataclass(MegaCache, data_fields=["ema", "kv"], meta_fields=[])


# ----------------------------------------------------------------------------- masks


def _within_document_positions(segment_ids, B: int, T: int):
    """Index of each token inside its document (counted from the document's first token)."""
    lay = segment_layout(segment_ids, B, T)
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first = lay.valid & (jnp.cumsum(lay.valid.astype(jnp.int32), axis=1) == 1)
    start = jax.lax.cummax(jnp.where(lay.reset | first, t, 0), axis=1)
    return t - start


def chunk_mask(chunk_size: int, B: int, T: int, *, positions=None, segment_ids=None):
    """Causal Mega-chunk mask for a full forward: same chunk (``position // chunk_size``), same
    document, and causal.  Without positions or segments it is the static
    ``masks.chunked(c) & masks.causal()``."""
    if positions is None and segment_ids is None:
        return masks.chunked(chunk_size) & masks.causal()
    if positions is None:
        positions = _within_document_positions(segment_ids, B, T)
    chunk = jnp.broadcast_to(jnp.asarray(positions, jnp.int32) // chunk_size, (B, T))
    m = masks.segments(chunk + 1) & masks.causal()
    if segment_ids is not None:
        m = m & masks.segments(segment_ids)
    return m


# ----------------------------------------------------------------------------- the mixer


def _normal(std):
    return nnx.initializers.normal(stddev=std)


def _beta_init(key, shape, dtype):
    # Official init: N(0, 0.02) around the pattern [1, -1, 1, -1, ...] over the EMA dims.
    sign = np.where(np.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
    return (nnx.initializers.normal(0.02)(key, shape, dtype) + jnp.asarray(sign, dtype)).astype(dtype)


class MegaMixer(nnx.Module):
    """Mega-chunk token mixer (module docstring); the ``"mega"`` registry entry.

    Args:
      d_model: model width ``d``.
      num_heads, num_kv_heads, head_dim: accepted for the mixer protocol and ignored (single head).
      z_dim: shared representation / query-key width ``z`` (default 64).
      h_dim: value width ``v`` (default ``2 * d_model``, as in the paper's LM setups).
      ema_dim: EMA dimensions per channel (``h`` of §3.1; default 16).
      chunk_size: attention chunk ``c`` (default 16); full Mega is ``c >= T``.
      rel_pos_bias: ``"simple"`` (learned ``w[i − j]``, ``c`` values) or ``"none"``.
      ema_residual: ``X' = silu(EMA(X) + ω ⊙ X)`` (official code; default) vs ``X' = EMA(X)``.
      causal: must be True (decoder mixer).
      ema_impl: :data:`attn_jax.linear.mega.EMA_IMPLS` for the full forward.
      dtype: compute dtype; param_dtype: storage dtype.  impl: passed to :func:`attn_jax.attention`.
    """

    SUPPORTED_FEATURES = frozenset({"causal", "chunked", "segments"})

    def __init__(self, d_model: int, num_heads: int = 1, *, z_dim: int = 64, h_dim: int | None = None,
                 ema_dim: int = 16, chunk_size: int = 16, rel_pos_bias: str = "simple", ema_residual: bool = True,
                 causal: bool = True, num_kv_heads: int | None = None, head_dim: int | None = None,
                 ema_impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32, impl="auto",
                 rngs: nnx.Rngs):
        del num_heads, num_kv_heads, head_dim   # single head (see the module docstring)
        d = check_positive_int("d_model", d_model)
        z = check_positive_int("z_dim", z_dim)
        hv = 2 * d if h_dim is None else check_positive_int("h_dim", h_dim)
        n = check_positive_int("ema_dim", ema_dim)
        c = check_positive_int("chunk_size", chunk_size)
        if rel_pos_bias not in REL_POS:
            raise ValueError(f"rel_pos_bias: expected one of {REL_POS}, got {rel_pos_bias!r}")
        if not causal:
            raise ValueError("causal: MegaMixer is causal only (the bidirectional EMA is not implemented)")
        if ema_impl not in EMA_IMPLS:
            raise ValueError(f"ema_impl: expected one of {EMA_IMPLS}, got {ema_impl!r}")
        self.d_model, self.z_dim, self.h_dim, self.ema_dim, self.chunk_size = d, z, hv, n, c
        self.rel_pos_bias, self.ema_residual, self.causal = rel_pos_bias, bool(ema_residual), True
        self.ema_impl, self.dtype, self.impl = ema_impl, dtype, impl
        zeros = nnx.initializers.zeros
        w = _normal(0.02)   # official init of every projection: N(0, 0.02), zero biases

        # EMA (§3.1): logits of α and δ, expansion β, projection η, residual weight ω.
        self.ema_alpha = param(rngs, _normal(0.2), (d, n), ("embed", None), param_dtype)
        self.ema_delta = param(rngs, _normal(0.2), (d, n), ("embed", None), param_dtype)
        self.ema_beta = param(rngs, _beta_init, (d, n), ("embed", None), param_dtype)
        self.ema_eta = param(rngs, _normal(1.0), (d, n), ("embed", None), param_dtype)
        self.ema_omega = param(rngs, _normal(1.0), (d,), ("embed",), param_dtype)
        # V = silu(X W_v + b_v)
        self.w_v = param(rngs, w, (d, hv), ("embed", "mlp"), param_dtype)
        self.b_v = param(None, zeros, (hv,), ("mlp",), param_dtype)
        # From X': update gate φ (d), Z (z), reset gate γ (v), W_h X' (d).
        self.w_phi = param(rngs, w, (d, d), ("embed", None), param_dtype)
        self.b_phi = param(None, zeros, (d,), ("embed",), param_dtype)
        self.w_z = param(rngs, w, (d, z), ("embed", "head_dim"), param_dtype)
        self.b_z = param(None, zeros, (z,), ("head_dim",), param_dtype)
        self.w_gamma = param(rngs, w, (d, hv), ("embed", "mlp"), param_dtype)
        self.b_gamma = param(None, zeros, (hv,), ("mlp",), param_dtype)
        self.w_h = param(rngs, w, (d, d), ("embed", None), param_dtype)
        self.b_h = param(None, zeros, (d,), ("embed",), param_dtype)
        self.u_h = param(rngs, w, (hv, d), ("mlp", "embed"), param_dtype)
        # Q, K = κ ⊙ Z + μ  (row 0: query, row 1: key)
        self.qk_scale = param(rngs, w, (2, z), (None, "head_dim"), param_dtype)
        self.qk_offset = param(None, zeros, (2, z), (None, "head_dim"), param_dtype)
        if rel_pos_bias == "simple":
            self.rel_bias = param(rngs, w, (c,), (None,), param_dtype)
        else:
            self.rel_bias = None

    # ------------------------------------------------------------------ cache

    def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32) -> MegaCache:
        """Empty cache: zero EMA state and an empty ring of ``chunk_size`` slots (``max_len`` ignored)."""
        kv = RingKVCache.init(batch, self.chunk_size - 1, 1, self.z_dim, dtype, value_dim=self.h_dim,
                              capacity=self.chunk_size)
        return MegaCache(jnp.zeros((kv.batch, self.d_model, self.ema_dim), jnp.float32), kv)

    # ------------------------------------------------------------------ pieces

    def _p(self, p):
        return p[...].astype(self.dtype)

    def ema_coefficients(self):
        """``(α, δ, β, η · ema_dim^-1/2)`` in float32 — the arguments of :func:`damped_ema`."""
        f = lambda p: p[...].astype(jnp.float32)  # noqa: E731
        return (jax.nn.sigmoid(f(self.ema_alpha)), jax.nn.sigmoid(f(self.ema_delta)), f(self.ema_beta),
                f(self.ema_eta) * self.ema_dim ** -0.5)

    def _bias(self):
        return None if self.rel_bias is None else MegaRelativeBias(self.rel_bias[...].astype(jnp.float32))

    def _project(self, x, ema_out):
        """Everything but the attention: ``(q, k, v, phi, gamma, hx)``."""
        xp = ema_out + x * self._p(self.ema_omega) if self.ema_residual else ema_out
        xp = jax.nn.silu(xp) if self.ema_residual else xp
        v = jax.nn.silu(x @ self._p(self.w_v) + self._p(self.b_v))
        phi = jax.nn.sigmoid(xp @ self._p(self.w_phi) + self._p(self.b_phi))
        zz = jax.nn.silu(xp @ self._p(self.w_z) + self._p(self.b_z))
        gamma = jax.nn.silu(xp @ self._p(self.w_gamma) + self._p(self.b_gamma))
        hx = xp @ self._p(self.w_h) + self._p(self.b_h)
        kappa, mu = self._p(self.qk_scale), self._p(self.qk_offset)
        q = (zz * kappa[0] + mu[0])[:, :, None, :]
        k = (zz * kappa[1] + mu[1])[:, :, None, :]
        return q, k, v[:, :, None, :], phi, gamma, hx

    def _output(self, x, o, phi, gamma, hx, valid):
        h = jax.nn.silu(hx + (gamma * o[:, :, 0].astype(self.dtype)) @ self._p(self.u_h))
        y = x + phi * (h - x)
        return jnp.where(valid[:, :, None], y, 0).astype(self.dtype)

    # ------------------------------------------------------------------ forward

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        """``(y [B, T, d], cache)``; see :mod:`attn_jax.nn.protocol` for the protocol."""
        B, T, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        x = x.astype(self.dtype)
        if positions is not None:
            positions = jnp.asarray(positions)
            if not jnp.issubdtype(positions.dtype, jnp.integer):
                raise TypeError(f"positions: expected an integer array, got dtype {positions.dtype}")
            if positions.shape not in ((T,), (B, T), (1, T)):
                raise ValueError(f"positions: expected shape [T]=({T},) or [B, T]=({B}, {T}), got {positions.shape}")
        if cache is not None and not isinstance(cache, MegaCache):
            raise TypeError(f"cache: expected a MegaCache from init_cache, got {type(cache).__name__}")
        alpha, delta, beta, eta = self.ema_coefficients()
        scale = self.z_dim ** -0.5
        if cache is None:
            ema_out, _ = damped_ema(x, alpha, delta, beta, eta, segment_ids=segment_ids, impl=self.ema_impl)
            q, k, v, phi, gamma, hx = self._project(x, ema_out.astype(self.dtype))
            mask = chunk_mask(self.chunk_size, B, T, positions=positions, segment_ids=segment_ids)
            o = attention(q, k, v, mask=mask, bias=self._bias(), scale=scale, impl=self.impl)
            valid = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0
            return self._output(x, o, phi, gamma, hx, valid), None
        return self._extend(x, segment_ids, cache, alpha, delta, beta, eta, scale)

    def _extend(self, x, segment_ids, cache: MegaCache, alpha, delta, beta, eta, scale):
        """Append ``T`` tokens (prefill or a decode step) to the cache."""
        B, T, _ = x.shape
        c = self.chunk_size
        valid = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0
        n = jnp.sum(valid, axis=1).astype(jnp.int32)
        if T == 1:
            ema_out, ema = damped_ema_step(x[:, 0], cache.ema, alpha, delta, beta, eta, valid=valid[:, 0])
            ema_out = ema_out[:, None]
        else:
            ema_out, ema = damped_ema(x, alpha, delta, beta, eta, initial_state=cache.ema, return_final_state=True,
                                      segment_ids=None if segment_ids is None else valid.astype(jnp.int32),
                                      impl=self.ema_impl if segment_ids is None else "parallel")
        q, k, v, phi, gamma, hx = self._project(x, ema_out.astype(self.dtype))
        dt = cache.kv.dtype
        before = cache.kv.lengths
        # Ring in chronological order: index j holds position before - c + j (negative: empty),
        # so index offsets in concat(ring, new) are position offsets (the relative bias relies on it).
        k_old, v_old, pos_old = cache.kv.chronological()
        pos_new = before[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        q_chunk = jnp.where(valid, pos_new // c + 1, 0)
        k_chunk = jnp.concatenate([jnp.where(pos_old >= 0, pos_old // c + 1, 0), q_chunk], axis=1)
        mask = masks.segments(q_chunk, k_chunk) & masks.causal()
        kk = jnp.concatenate([k_old, k.astype(dt)], axis=1)
        vv = jnp.concatenate([v_old, v.astype(dt)], axis=1)
        o = attention(q.astype(dt), kk, vv, mask=mask, bias=self._bias(), scale=scale, impl=self.impl)
        kv = cache.kv.append(k.astype(dt), v.astype(dt), n)
        y = self._output(x, o, phi, gamma, hx, valid)
        return y, MegaCache(ema.astype(jnp.float32), kv)
