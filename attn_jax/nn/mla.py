"""Multi-head Latent Attention as a Flax NNX mixer (the ``"mla"`` registry entry).

Equations, the absorbed decode and the MHA → MLA conversion: :mod:`attn_jax.variants.mla`
(DeepSeek-V2, arXiv:2405.04434; MHA2MLA, arXiv:2502.14837).  Training (no cache) materialises
per-kv-head keys ``[k^C; k^R]`` and values from the latent and calls :func:`attn_jax.attention`
(every backend and mask); with a cache the layer appends latent rows ``[c^KV; k^R]`` to a
:class:`~attn_jax.variants.mla.LatentKVCache` and attends in the absorbed form
(:func:`~attn_jax.variants.mla.mla_prefill`), so prefill + decode == the full forward.

Parameters (``x @ W`` layout; "embed", "heads", "kv_heads", "head_dim" logical axes, the latent
axes unnamed): ``W^Q [d, H, Dn + Dr]`` or, with ``q_rank``, ``W^DQ [d, d_c']`` and
``W^UQ [d_c', H, Dn + Dr]``; ``W^DKV [d, d_c]``, ``W^UK [d_c, K, Dn]``, ``W^UV [d_c, K, Dv]``,
``W^KR [d, G, Dr]``, ``W^O [H, Dv, d]``; RMSNorm scales of ``c^Q`` and ``c^KV`` with
``latent_norm``.  Zero-width parts (``Dn = 0`` or ``Dr = 0``, as conversions produce) have no
parameter.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.core import masks
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import (check_mixer_input, check_positive_int, default_head_dim, default_kernel_init,
                                mixer_positions, param)
from attn_jax.variants.mla import (LatentKVCache, apply_grouped_rope, mha_to_mla, mla_attention, mla_prefill,
                                   rope_inv_freq, select_rope_pairs)

__all__ = ["MultiHeadLatentAttention"]


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return value


def _check_rank(name: str, value, hi: int, what: str) -> int:
    check_positive_int(name, value)
    if value > hi:
        raise ValueError(f"{name}: expected 1 <= {name} <= {hi} ({what}), got {value}")
    return value


def _rms(x, scale):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * scale[...].astype(jnp.float32)
    return y.astype(x.dtype)


class MultiHeadLatentAttention(nnx.Module):
    """MLA mixer (see the module docstring); causal self-attention with a latent decode cache.

    Args:
      d_model: model width ``d``.  num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``K`` after the up-projection (``H % K == 0``); default ``H``
        (DeepSeek-V2).
      head_dim: ``Dn``, the non-rotary query/key width per head (DeepSeek-V2's ``d_h``); default
        ``d_model // num_heads``; may be 0 when ``rope_head_dim > 0``.
      rope_head_dim: ``Dr``, the decoupled rotary width (even, >= 0); default ``head_dim // 2``
        rounded down to even (DeepSeek-V2: ``d_h / 2``).
      value_head_dim: ``Dv`` (default ``head_dim``).
      kv_rank: latent width ``d_c`` (``1 <= d_c <= K (Dn + Dv)``); default
        ``min(4 * head_dim, K (Dn + Dv))`` (DeepSeek-V2: ``4 d_h``).
      q_rank: width ``d_c'`` of the low-rank query path (``1 <= q_rank <= H (Dn + Dr)``); None =
        a full-rank ``W^Q``.
      rope_key_heads: ``G`` rotary keys (``G | K``; default 1, shared by every head).
      rope_pairs / rope_ref_dim: per rotary group, the pair indices into a RoPE of width
        ``rope_ref_dim`` (:func:`~attn_jax.variants.mla.rope_inv_freq`); default ordinary RoPE
        of width ``Dr`` (set by :meth:`from_mha`).
      latent_norm: RMSNorm after ``c^KV`` and ``c^Q`` (DeepSeek-V2).  rope_base: RoPE base.
      causal: must be True (decoder mixer; MLA's point is its decode cache).
      dtype / param_dtype: compute / storage dtypes.  impl: passed to :func:`attn_jax.attention`
        (training) and as ``attention_impl`` to the decode attention.
    """

    SUPPORTED_FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "segments", "key_padding", "rope", "bf16"})

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 rope_head_dim: int | None = None, value_head_dim: int | None = None, kv_rank: int | None = None,
                 q_rank: int | None = None, rope_key_heads: int = 1,
                 rope_pairs: Sequence[Sequence[int]] | None = None, rope_ref_dim: int | None = None,
                 latent_norm: bool = True, rope_base: float = 10000.0, causal: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl="auto", rngs: nnx.Rngs):
        head_dim = default_head_dim(d_model, num_heads, head_dim)
        if causal is not True:
            raise ValueError(f"causal: MultiHeadLatentAttention is a causal decoder mixer, got causal={causal!r}")
        Dn = _check_nonneg_int("head_dim", head_dim)
        Dr = (Dn // 2) // 2 * 2 if rope_head_dim is None else _check_nonneg_int("rope_head_dim", rope_head_dim)
        if Dr % 2:
            raise ValueError(f"rope_head_dim: RoPE rotates pairs, expected an even width, got {Dr}")
        if Dn + Dr == 0:
            raise ValueError("head_dim/rope_head_dim: the query-key width head_dim + rope_head_dim is 0")
        Dv = check_positive_int("value_head_dim", Dn if value_head_dim is None else value_head_dim)
        H = num_heads
        K = H if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if H % K:
            raise ValueError(f"num_kv_heads: {K} kv heads do not divide num_heads={H}")
        G = check_positive_int("rope_key_heads", rope_key_heads)
        if K % G:
            raise ValueError(f"rope_key_heads: {G} rotary keys do not divide num_kv_heads={K}")
        C = min(4 * max(Dn, 1), K * (Dn + Dv)) if kv_rank is None else _check_rank(
            "kv_rank", kv_rank, K * (Dn + Dv), "a latent wider than the keys and values it replaces")
        if q_rank is not None:
            _check_rank("q_rank", q_rank, H * (Dn + Dr), "a query latent wider than the queries")
        if rope_pairs is None:
            pairs = tuple(tuple(range(Dr // 2)) for _ in range(G))
            ref = max(Dr, 2) if rope_ref_dim is None else rope_ref_dim
        else:
            pairs = tuple(tuple(int(f) for f in row) for row in rope_pairs)
            if len(pairs) != G or any(len(row) != Dr // 2 for row in pairs):
                raise ValueError(f"rope_pairs: expected [rope_key_heads={G}, rope_head_dim/2={Dr // 2}] pair indices, "
                                 f"got {[len(row) for row in pairs]}")
            if rope_ref_dim is None:
                raise ValueError("rope_ref_dim: required with rope_pairs (the width of the RoPE they index)")
            ref = rope_ref_dim
        if Dr:
            rope_inv_freq(pairs, ref, base=rope_base)   # validates the pairs against ref and base

        self.d_model, self.num_heads, self.num_kv_heads = d_model, H, K
        self.head_dim, self.rope_head_dim, self.value_head_dim = Dn, Dr, Dv
        self.kv_rank, self.q_rank, self.rope_key_heads = C, q_rank, G
        self.rope_pairs, self.rope_ref_dim, self.rope_base = pairs, int(ref), float(rope_base)
        self.latent_norm, self.causal, self.dtype, self.impl = bool(latent_norm), True, dtype, impl
        d = d_model
        ones = nnx.initializers.ones

        def kernel(shape, axes, in_axis, out_axis):
            return param(rngs, default_kernel_init, shape, axes, param_dtype, in_axis=in_axis, out_axis=out_axis)

        if q_rank is None:
            self.w_dq, self.q_norm = None, None
            self.w_q = kernel((d, H, Dn + Dr), ("embed", "heads", "head_dim"), 0, (1, 2))
        else:
            self.w_dq = kernel((d, q_rank), ("embed", None), 0, 1)
            self.q_norm = param(None, ones, (q_rank,), (None,), param_dtype) if latent_norm else None
            self.w_q = kernel((q_rank, H, Dn + Dr), (None, "heads", "head_dim"), 0, (1, 2))
        self.w_dkv = kernel((d, C), ("embed", None), 0, 1)
        self.kv_norm = param(None, ones, (C,), (None,), param_dtype) if latent_norm else None
        self.w_uk = kernel((C, K, Dn), (None, "kv_heads", "head_dim"), 0, (1, 2)) if Dn else None
        self.w_uv = kernel((C, K, Dv), (None, "kv_heads", "head_dim"), 0, (1, 2))
        self.w_kr = kernel((d, G, Dr), ("embed", "kv_heads", "head_dim"), 0, (1, 2)) if Dr else None
        self.w_o = kernel((H, Dv, d), ("heads", "head_dim", "embed"), (0, 1), 2)

    # ------------------------------------------------------------------ caches

    @property
    def latent_dim(self) -> int:
        """Cache elements per token: ``d_c + G * Dr``."""
        return self.kv_rank + self.rope_key_heads * self.rope_head_dim

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> LatentKVCache:
        """Empty :class:`~attn_jax.variants.mla.LatentKVCache` of ``d_c + G * Dr`` elements per token."""
        return LatentKVCache.init(batch, max_len, self.latent_dim, dtype)

    # ------------------------------------------------------------------ forward

    def _w(self, p, shape=None):
        if p is None:   # a zero-width part
            return jnp.zeros(shape, self.dtype)
        return p[...].astype(self.dtype)

    def project(self, x, positions=None, cache=None):
        """``(q_nope [B,T,H,Dn], q_rope [B,T,H,Dr], c_kv [B,T,d_c], k_rope [B,T,G,Dr])`` of ``x``,
        RoPE applied at ``positions`` (default: after the cache's fill)."""
        B, T, _ = x.shape
        G, Dn, Dr = self.rope_key_heads, self.head_dim, self.rope_head_dim
        x = x.astype(self.dtype)
        cq = x
        if self.q_rank is not None:
            cq = x @ self._w(self.w_dq)
            if self.q_norm is not None:
                cq = _rms(cq, self.q_norm)
        q = jnp.einsum("btd,dhf->bthf", cq, self._w(self.w_q))
        c = x @ self._w(self.w_dkv)
        if self.kv_norm is not None:
            c = _rms(c, self.kv_norm)
        q_nope, q_rope = q[..., :Dn], q[..., Dn:]
        if Dr:
            k_rope = jnp.einsum("btd,dgf->btgf", x, self._w(self.w_kr))
            pos = mixer_positions(positions, B, T, cache)
            inv_freq = rope_inv_freq(self.rope_pairs, self.rope_ref_dim, base=self.rope_base)
            q_rope = apply_grouped_rope(q_rope, pos, inv_freq)
            k_rope = apply_grouped_rope(k_rope, pos, inv_freq)
        else:
            k_rope = jnp.zeros((B, T, G, 0), self.dtype)
        return q_nope, q_rope, c, k_rope

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        """``(y [B, T, d], cache)``; see :mod:`attn_jax.nn.protocol` for the protocol."""
        B, T, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        if cache is not None and not isinstance(cache, LatentKVCache):
            raise TypeError(f"cache: expected a LatentKVCache from init_cache, got {type(cache).__name__}")
        q_nope, q_rope, c, k_rope = self.project(x, positions, cache)
        w_uk = self._w(self.w_uk, (self.kv_rank, self.num_kv_heads, 0))
        w_uv = self._w(self.w_uv)
        if cache is None:
            m = masks.causal()
            if segment_ids is not None:
                m = m & masks.segments(segment_ids)
            o = mla_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv, mask=m, impl="materialized",
                              attention_impl=self.impl)
        else:
            n_new = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
            o, cache = mla_prefill(q_nope, q_rope, c, k_rope, w_uk, w_uv, cache, n_new=n_new,
                                   attention_impl=self.impl)
        y = jnp.einsum("bthf,hfd->btd", o.astype(self.dtype), self._w(self.w_o))
        return y, cache

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_mha(cls, mha, *, kv_rank: int, rope_pairs=None, strategy: str = "2-norm",
                 calibration=None) -> "MultiHeadLatentAttention":
        """MHA2MLA: an MLA layer initialised from a :class:`~attn_jax.nn.MultiHeadAttention`.

        ``rope_pairs``: for a RoPE layer, the pairs each kv head keeps rotary — an int (that many,
        chosen by :func:`~attn_jax.variants.mla.select_rope_pairs` with ``strategy``; ``"2-norm"``
        reads the projections of ``calibration [N, T, d]``) or an int array ``[K, r]``; must be
        None for ``positional="none"``.  ``kv_rank``: the latent width (joint SVD,
        :func:`~attn_jax.variants.mla.mha_to_mla`).  Output projection, dtypes and RoPE base are
        kept; the result has no latent norm and ``G = K`` rotary keys.  Options MLA does not
        carry (qk-norm, gates, sinks, softcap, ALiBi/T5, windows, cross-attention) raise.
        """
        if not isinstance(mha, MultiHeadAttention):
            raise TypeError(f"mha: expected a MultiHeadAttention, got {type(mha).__name__}")
        unsupported = [name for name, bad in (
            ("qk_norm", mha.qk_norm is not None), ("gate", mha.gate is not None), ("sinks", mha.sinks is not None),
            ("softcap", mha.softcap is not None), ("window", mha.window is not None), ("cross", mha.cross),
            ("causal", not mha.causal), ("dropout_rate", mha.dropout_rate > 0),
            ("positional", mha.positional not in ("rope", "none"))) if bad]
        if unsupported:
            raise ValueError(f"mha: options without an MLA counterpart: {', '.join(unsupported)}")
        w_q, w_k, w_v = (np.asarray(w[...], np.float64) for w in (mha.w_q, mha.w_k, mha.w_v))
        K, D = mha.num_kv_heads, mha.head_dim
        if mha.positional == "none":
            if rope_pairs is not None:
                raise ValueError("rope_pairs: the MHA layer has no RoPE (positional='none'); pass None")
            pairs = None
        elif rope_pairs is None:
            raise ValueError("rope_pairs: required for a RoPE layer (an int count or pair indices [K, r])")
        elif isinstance(rope_pairs, (int, np.integer)) and not isinstance(rope_pairs, bool):
            q = k = None
            if strategy == "2-norm":
                if calibration is None:
                    raise ValueError("calibration: the '2-norm' selection needs calibration inputs [N, T, d_model]")
                xc = np.asarray(calibration, np.float64)
                q, k = np.einsum("ntd,dhf->nthf", xc, w_q), np.einsum("ntd,dkf->ntkf", xc, w_k)
            pairs = select_rope_pairs(q, k, int(rope_pairs), strategy=strategy, head_dim=D, kv_heads=K)
        else:
            pairs = np.asarray(rope_pairs)
        conv = mha_to_mla(w_q, w_k, w_v, kv_rank=kv_rank, rope_pairs=pairs)
        r = conv.rope_pairs.shape[1]
        param_dtype = mha.w_q[...].dtype
        # every parameter is overwritten below: build the layer abstractly (no random init)
        mla = nnx.eval_shape(lambda: cls(
            mha.d_model, mha.num_heads, num_kv_heads=K, head_dim=D - 2 * r, rope_head_dim=2 * r,
            value_head_dim=mha.value_head_dim, kv_rank=conv.kv_rank, rope_key_heads=K if r else 1,
            rope_pairs=conv.rope_pairs.tolist() if r else None, rope_ref_dim=D if r else None, latent_norm=False,
            rope_base=mha.rope_base, dtype=mha.dtype, param_dtype=param_dtype, impl=mha.impl, rngs=nnx.Rngs(0)))
        for name, value in (("w_q", conv.w_q), ("w_dkv", conv.w_dkv), ("w_uk", conv.w_uk), ("w_uv", conv.w_uv),
                            ("w_kr", conv.w_kr), ("w_o", np.asarray(mha.w_o[...]))):
            p = getattr(mla, name)
            if p is not None:
                p.set_value(jnp.asarray(value, param_dtype))
        return mla
