"""Multi-head Latent Attention (MLA): low-rank joint key/value compression with a decoupled RoPE key,
a latent KV cache with absorbed-projection decoding, and the MHA → MLA conversion.

"DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", DeepSeek-AI,
2024, arXiv:2405.04434, Sec. 2.1.  For the input ``h_t`` of token ``t`` and query head ``i``::

    c_t^KV = W^DKV h_t                                   the latent (d_c wide; cached)
    k_{t,i}^C = W^UK_i c_t^KV,   v_{t,i} = W^UV_i c_t^KV  per-head keys and values, up-projected
    c_t^Q  = W^DQ h_t,  q_{t,i}^C = W^UQ_i c_t^Q          low-rank query path (d_c' wide; optional)
    q_{t,i}^R = RoPE(W^QR_i c_t^Q)                         per-head rotary query part (d^R)
    k_t^R  = RoPE(W^KR h_t)                                one rotary key shared by all heads (cached)
    score_{t,j,i} = (q_{t,i}^C · k_{j,i}^C + q_{t,i}^R · k_j^R) / sqrt(d_h + d^R)
    o_{t,i} = sum_j softmax_j(score_{t,j,i}) v_{j,i},     u_t = W^O [o_{t,1}; ...; o_{t,H}]

(i.e. ``q = [q^C; q^R]``, ``k = [k^C; k^R]``: softmax attention with ``Dk = d_h + d^R``,
``Dv = d_h``).  A token costs ``d_c + d^R`` cache elements instead of MHA's ``2 H d_h``
(DeepSeek-V2: ``d_c = 4 d_h``, ``d^R = d_h / 2``, so ``4.5 d_h``).  DeepSeek-V2 also puts an
RMSNorm after ``c^KV`` and ``c^Q`` (Sec. 3.1.2; the layer's ``latent_norm``).

**Absorbed decode.**  ``q^C_{t,i} · (W^UK_i c_j) = ((W^UK_i)^T q^C_{t,i}) · c_j`` and
``sum_j p_j W^UV_i c_j = W^UV_i sum_j p_j c_j``: with ``W^UK`` absorbed into the query and
``W^UV`` into the output, attention runs over the cached latent rows directly, as MQA (one key
head)::

    q~_{t,i} = [(W^UK_i)^T q^C_{t,i}; q^R_{t,i}]          (d_c + d^R)
    key_j = value_j = [c_j^KV; k_j^R]                      (the cache row)
    o_{t,i} = W^UV_i (sum_j softmax_j(q~_{t,i} · key_j / sqrt(d_h + d^R)) value_j)[:d_c]

which equals the materialised form exactly (up to rounding): :func:`mla_attention` with
``impl="absorbed"`` and :func:`mla_prefill` over a :class:`LatentKVCache`.  Value and key are
the same array (the output's last ``d^R`` entries are dropped), so the cache is read once.

**Generalisations** (named deviations; DeepSeek-V2 is ``K = H``, ``G = 1``): the up-projections
give ``K`` key/value heads, each shared by ``H / K`` query heads (GQA), and there are ``G``
rotary keys (``G | K``; kv head ``g`` uses rotary key ``g // (K / G)``).  With ``G > 1`` the cache
row is ``[c; k^R_1; ...; k^R_G]`` (``d_c + G d^R``) and query head ``i``'s rotary part sits in
its group's slot of ``q~`` (zeros elsewhere) — still one MQA over the latent rows.  Each rotary
group rotates its ``d^R / 2`` pairs ``(x_p, x_{p + d^R/2})`` with the frequencies
``base^(-2 f / D_ref)`` of its own pair indices ``f`` (:func:`rope_inv_freq`; default
``D_ref = d^R``, ``f = 0 .. d^R/2 - 1``: ordinary RoPE of width ``d^R``).

**MHA → MLA** ("Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in
Any Transformer-based LLMs", Ji et al., 2025, arXiv:2502.14837, MHA2MLA):

1. partial RoPE: each kv head keeps RoPE on ``r`` of its ``D/2`` frequency pairs
   (:func:`select_rope_pairs`; ``"2-norm"``: the pairs ``f`` with the largest
   ``sum_{i in group} mean_t ||q_{t,i,(f, f+D/2)}|| · mean_t ||k_{t,g,(f, f+D/2)}||``;
   ``"high"``: ``f < r``; ``"low"``: the last ``r``; ``"uniform"``: evenly spaced); the other
   ``D - 2r`` dimensions of q and k lose RoPE and become ``q^C``, ``k^C``.  The kept rotary
   dimensions stay per kv head (``G = K``), as in MHA2MLA.
2. joint SVD of the non-rotary key and the value projections:
   ``[W^K_nope, W^V] (d × K(D - 2r + Dv)) = U Σ V^T``; ``W^DKV = U_c Σ_c^{1/2}``,
   ``[W^UK, W^UV] = Σ_c^{1/2} V_c^T`` (:func:`mha_to_mla`; the split of ``Σ`` between the two
   factors is our choice, their product is the rank-``d_c`` truncation).

At full rank (``d_c`` = the joint matrix's rank, ``<= min(d, K(D - 2r + Dv))``) step 2 is exact, so
a converted layer reproduces the MHA layer whenever step 1 changes nothing: an MHA without RoPE,
or ``r = D/2`` (every pair kept).  X-EcoMLA ("X-EcoMLA: Upcycling Pre-Trained Attention into MLA
for Efficient and Extreme KV Compression", Li et al., 2025, arXiv:2503.11132) initialises MLA
from the pre-trained weights by SVD as well and then distils; the distillation is training, not
part of this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.positional.rope import positions_for, rope_frequencies, rotate
from attn_jax.softmax.api import attention
from attn_jax.softmax.decode import decode_attention
from attn_jax.softmax.kv_cache import KVCache, new_token_counts

__all__ = ["LatentKVCache", "mla_attention", "mla_reference", "mla_prefill", "absorb_query", "latent_rows",
           "rope_inv_freq", "apply_grouped_rope", "select_rope_pairs", "mha_to_mla", "MLAConversion",
           "ROPE_SELECTIONS", "IMPLS"]

IMPLS = ("auto", "reference", "materialized", "absorbed")
ROPE_SELECTIONS = ("2-norm", "high", "low", "uniform")


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, x, lo: int, hi: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}")
    if x < lo or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {rng}, got {x}")
    return int(x)


@dataclasses.dataclass(frozen=True)
class _Dims:
    B: int
    T: int
    S: int
    H: int
    K: int
    G: int
    C: int
    Dn: int
    Dr: int
    Dv: int


def _check_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv) -> _Dims:
    """Shapes of the MLA inputs (see :func:`mla_attention`); errors name the argument."""
    layouts = (("q_nope", q_nope, 4, "[B, T, H, Dn]"), ("q_rope", q_rope, 4, "[B, T, H, Dr]"),
               ("c_kv", c_kv, 3, "[B, S, C]"), ("k_rope", k_rope, 4, "[B, S, G, Dr]"),
               ("w_uk", w_uk, 3, "[C, K, Dn]"), ("w_uv", w_uv, 3, "[C, K, Dv]"))
    for name, x, rank, layout in layouts:
        V.check_float_array(name, x)
        V.check_rank(name, x, rank, layout)
    B, T, H, Dn = q_nope.shape
    if q_rope.shape[:3] != (B, T, H):
        raise ValueError(f"q_rope: expected [B={B}, T={T}, H={H}, Dr] (as q_nope), got {V.shape_str(q_rope)}")
    Dr = q_rope.shape[3]
    if c_kv.shape[0] != B:
        raise ValueError(f"c_kv: expected batch B={B} (as q_nope), got {V.shape_str(c_kv)}")
    S, C = c_kv.shape[1:]
    if k_rope.shape[:2] != (B, S) or k_rope.shape[3] != Dr:
        raise ValueError(f"k_rope: expected [B={B}, S={S}, G, Dr={Dr}], got {V.shape_str(k_rope)}")
    G = k_rope.shape[2]
    if w_uk.shape[0] != C or w_uk.shape[2] != Dn:
        raise ValueError(f"w_uk: expected [C={C}, K, Dn={Dn}], got {V.shape_str(w_uk)}")
    K = w_uk.shape[1]
    if w_uv.shape[:2] != (C, K):
        raise ValueError(f"w_uv: expected [C={C}, K={K}, Dv], got {V.shape_str(w_uv)}")
    if K == 0 or H % K:
        raise ValueError(f"w_uk: its K={K} kv heads must divide the H={H} query heads")
    if G == 0 or K % G:
        raise ValueError(f"k_rope: its G={G} rotary key heads must divide the K={K} kv heads")
    if Dn + Dr == 0:
        raise ValueError("q_nope/q_rope: the query-key width Dn + Dr is 0")
    if C == 0 or w_uv.shape[2] == 0:
        raise ValueError(f"c_kv/w_uv: empty latent or value width (C={C}, Dv={w_uv.shape[2]})")
    return _Dims(B, T, S, H, K, G, C, Dn, Dr, w_uv.shape[2])


def _scale(scale, d: _Dims) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d.Dn + d.Dr)
    V.check_positive_scalar("scale", scale)
    return float(scale)


def _mm(eq: str, a, b):
    """``einsum`` accumulated in at least float32, returned in ``a``'s dtype."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.einsum(eq, a, b.astype(a.dtype), preferred_element_type=acc).astype(a.dtype)


# ----------------------------------------------------------------------------- the two forms


def _materialize(c_kv, k_rope, w_uk, w_uv, d: _Dims):
    """Per-kv-head keys ``[B, S, K, Dn + Dr]`` and values ``[B, S, K, Dv]`` from the latent."""
    k_c = _mm("bsc,ckn->bskn", c_kv, w_uk)
    k_r = jnp.repeat(k_rope.astype(c_kv.dtype), d.K // d.G, axis=2)
    v = _mm("bsc,ckv->bskv", c_kv, w_uv)
    return jnp.concatenate([k_c, k_r], axis=-1), v


def latent_rows(c_kv: Float[ArrayLike, "B S C"], k_rope: Float[ArrayLike, "B S G Dr"]) -> Float[Array, "B S L"]:
    """The cache rows ``[c^KV; k^R_1; ...; k^R_G]`` (``L = C + G * Dr``) in ``c_kv``'s dtype."""
    B, S = c_kv.shape[:2]
    return jnp.concatenate([c_kv, jnp.asarray(k_rope).astype(c_kv.dtype).reshape(B, S, -1)], axis=-1)


def absorb_query(q_nope: Float[ArrayLike, "B T H Dn"], q_rope: Float[ArrayLike, "B T H Dr"],
                 w_uk: Float[ArrayLike, "C K Dn"], rope_key_heads: int = 1) -> Float[Array, "B T H L"]:
    """The absorbed query ``q~ = [(W^UK_g)^T q^C; q^R in its rotary group's slot]``
    (``L = C + G * Dr``, ``G = rope_key_heads``): ``q~ · latent_rows(c, k^R)`` is the MLA score."""
    B, T, H, Dn = q_nope.shape
    C, K, _ = w_uk.shape
    G = _check_int("rope_key_heads", rope_key_heads, 1)
    q_c = _mm("btkgn,ckn->btkgc", q_nope.reshape(B, T, K, H // K, Dn), w_uk).reshape(B, T, H, C)
    Dr = q_rope.shape[-1]
    if G == 1:
        q_r = q_rope.astype(q_c.dtype)
    else:
        slot = (np.arange(H) // (H // G))[:, None] == np.arange(G)[None, :]          # [H, G] one-hot
        q_r = (q_rope[:, :, :, None, :] * jnp.asarray(slot, q_rope.dtype)[None, None, :, :, None])
        q_r = q_r.reshape(B, T, H, G * Dr).astype(q_c.dtype)
    return jnp.concatenate([q_c, q_r], axis=-1)


def _up_project(o_latent, w_uv, d: _Dims):
    """``o [B, T, H, Dv] = W^UV_g o~[..., :C]`` (the absorbed output)."""
    B, T, H = o_latent.shape[:3]
    o = o_latent[..., :d.C].reshape(B, T, d.K, H // d.K, d.C)
    return _mm("btkgc,ckv->btkgv", o, w_uv).reshape(B, T, H, d.Dv)


def mla_reference(q_nope: Float[ArrayLike, "B T H Dn"], q_rope: Float[ArrayLike, "B T H Dr"],
                  c_kv: Float[ArrayLike, "B S C"], k_rope: Float[ArrayLike, "B S G Dr"],
                  w_uk: Float[ArrayLike, "C K Dn"], w_uv: Float[ArrayLike, "C K Dv"], *, mask=None,
                  scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """The spec: per-head keys ``[k^C; k^R]`` and values materialised from the latent, then
    :func:`attn_jax.softmax.attention_reference` (``impl="reference"``) with ``q = [q^C; q^R]``."""
    return mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask=mask, scale=scale, impl="reference")


def mla_attention(q_nope: Float[ArrayLike, "B T H Dn"], q_rope: Float[ArrayLike, "B T H Dr"],
                  c_kv: Float[ArrayLike, "B S C"], k_rope: Float[ArrayLike, "B S G Dr"],
                  w_uk: Float[ArrayLike, "C K Dn"], w_uv: Float[ArrayLike, "C K Dv"], *, mask=None,
                  scale: float | None = None, impl: str = "auto",
                  attention_impl="auto") -> Float[Array, "B T H Dv"]:
    """MLA over full sequences (see the module docstring for the equations).

    Args:
      q_nope: ``q^C [B, T, H, Dn]``; q_rope: ``q^R [B, T, H, Dr]``, RoPE already applied.
      c_kv: the latent ``c^KV [B, S, C]``; k_rope: the rotary keys ``k^R [B, S, G, Dr]``, RoPE applied.
      w_uk: ``W^UK [C, K, Dn]``; w_uv: ``W^UV [C, K, Dv]`` (``K | H`` kv heads, ``G | K``).
      mask: any :mod:`attn_jax.core.masks` mask, as in :func:`attn_jax.attention`.
      scale: logit scale; default ``(Dn + Dr)^-1/2`` (that of the materialised heads).
      impl: ``"reference"`` (materialised K/V, reference attention), ``"materialized"``
        (materialised K/V through :func:`attn_jax.attention` with ``attention_impl``: every
        backend and mask), ``"absorbed"`` (MQA over the latent rows, ``W^UK`` in the query and
        ``W^UV`` after the attention), ``"auto"`` = ``"materialized"`` (the training form: for
        ``T ≈ S`` the absorbed form's ``(C + G Dr)``-wide dot products cost more FLOPs).
    Returns ``o [B, T, H, Dv]`` in ``q_nope``'s dtype (before ``W^O``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    d = _check_inputs(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    s = _scale(scale, d)
    dtype = q_nope.dtype
    q_rope, c_kv = jnp.asarray(q_rope).astype(dtype), jnp.asarray(c_kv).astype(dtype)
    if impl == "absorbed":
        rows = latent_rows(c_kv, k_rope)[:, :, None, :]                      # [B, S, 1, L]: K = 1
        o = attention(absorb_query(q_nope, q_rope, w_uk, d.G), rows, rows, mask=mask, scale=s, impl=attention_impl)
        return _up_project(o, w_uv, d)
    k, v = _materialize(c_kv, k_rope, w_uk, w_uv, d)
    q = jnp.concatenate([jnp.asarray(q_nope), q_rope], axis=-1)
    return attention(q, k, v, mask=mask, scale=s, impl="reference" if impl == "reference" else attention_impl)


# ----------------------------------------------------------------------------- latent cache


@dataclasses.dataclass(frozen=True)
class LatentKVCache:
    """MLA's decode cache: one row ``[c^KV; k^R_1..G]`` (``L = C + G * Dr`` elements) per token.

    ``latent: [B, S_max, L]``, ``lengths: int32[B]``.  Same write rule, overflow behaviour and
    ragged rows (``n_new``) as :class:`attn_jax.softmax.kv_cache.KVCache`, whose ``append`` it
    uses (as a one-kv-head cache with a zero-width value buffer).
    """

    latent: Any   # [B, S, L]
    lengths: Any   # [B]

    @classmethod
    def init(cls, batch: int, max_len: int, latent_dim: int, dtype=jnp.float32) -> "LatentKVCache":
        """Empty cache for ``max_len`` tokens of ``latent_dim = C + G * Dr`` elements per row."""
        batch = _check_int("batch", batch, 1)
        max_len = _check_int("max_len", max_len, 1)
        latent_dim = _check_int("latent_dim", latent_dim, 1)
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        return cls(jnp.zeros((batch, max_len, latent_dim), dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    @property
    def max_len(self) -> int:
        return self.latent.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.latent.shape[2]

    @property
    def dtype(self):
        return self.latent.dtype

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies (per layer): ``L * itemsize``."""
        return self.latent_dim * jnp.dtype(self.dtype).itemsize

    def append(self, latent_new: Float[ArrayLike, "B T L"], n_new: Int[ArrayLike, "B"] | None = None
               ) -> "LatentKVCache":
        """Write ``latent_new[b, :n_new[b]]`` at positions ``lengths[b] ...``; return the new cache."""
        V.check_float_array("latent_new", latent_new)
        V.check_rank("latent_new", latent_new, 3, "[B, T, L]")
        B, S, L = self.latent.shape
        if latent_new.shape[0] != B or latent_new.shape[2] != L:
            raise ValueError(f"latent_new: expected [B={B}, T, L={L}], got {V.shape_str(latent_new)}")
        T = latent_new.shape[1]
        if T == 0 or T > S:
            raise ValueError(f"latent_new: chunk of T_new={T} tokens; expected 1 <= T_new <= max_len={S}")
        new = jnp.asarray(latent_new)[:, :, None, :]
        kv = KVCache(self.latent[:, :, None, :], self.latent[:, :, None, :0], self.lengths)
        kv = kv.append(new, new[..., :0], n_new)
        return LatentKVCache(kv.k[:, :, 0, :], kv.lengths)

    def replace(self, **kw) -> "LatentKVCache":
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(LatentKVCache, data_fields=["latent", "lengths"], meta_fields=[])


def mla_prefill(q_nope: Float[ArrayLike, "B T H Dn"], q_rope: Float[ArrayLike, "B T H Dr"],
                c_new: Float[ArrayLike, "B T C"], k_rope_new: Float[ArrayLike, "B T G Dr"],
                w_uk: Float[ArrayLike, "C K Dn"], w_uv: Float[ArrayLike, "C K Dv"], cache: LatentKVCache, *,
                n_new: Int[ArrayLike, "B"] | None = None, scale: float | None = None, impl="auto",
                num_splits: int | None = None, attention_impl="auto") -> tuple[Float[Array, "B T H Dv"],
                                                                             LatentKVCache]:
    """Append ``T`` tokens' latent rows to ``cache`` and attend their queries over it in the
    absorbed form; returns ``(o [B, T, H, Dv], new_cache)``.

    Query ``t`` of row ``b`` sits at position ``lengths[b] + t`` and sees the cached tokens and
    the chunk causally (:func:`attn_jax.softmax.decode.decode_attention` over the written rows,
    one kv head; ``impl``/``num_splits``/``attention_impl`` are passed to it).  ``n_new``: valid
    tokens per row (default all ``T``); outputs of padding queries are zero.  Several prefills,
    one prefill then ``T = 1`` steps, or :func:`mla_attention` over the whole sequence with a
    causal mask give the same outputs.
    """
    if not isinstance(cache, LatentKVCache):
        raise TypeError(f"cache: expected a LatentKVCache, got {type(cache).__name__}")
    d = _check_inputs(q_nope, q_rope, c_new, k_rope_new, w_uk, w_uv)
    if cache.batch != d.B:
        raise ValueError(f"cache: holds B={cache.batch} rows, q_nope has B={d.B}")
    if d.S != d.T:
        raise ValueError(f"c_new: expected the same number of new tokens as q_nope (T={d.T}), got "
                         f"{V.shape_str(c_new)}")
    if cache.latent_dim != d.C + d.G * d.Dr:
        raise ValueError(f"cache: rows of L={cache.latent_dim} elements, but C + G * Dr = {d.C} + {d.G} * {d.Dr} "
                         f"= {d.C + d.G * d.Dr}")
    s = _scale(scale, d)
    dt = cache.dtype
    before = cache.lengths
    n = new_token_counts(n_new, d.B, d.T)
    new = cache.append(latent_rows(jnp.asarray(c_new).astype(dt), k_rope_new), n)
    rows = new.latent[:, :, None, :]
    q = absorb_query(jnp.asarray(q_nope).astype(dt), jnp.asarray(q_rope).astype(dt), w_uk, d.G)
    o = decode_attention(q, rows, rows, lengths=new.lengths, offset=before, scale=s, impl=impl,
                         num_splits=num_splits, attention_impl=attention_impl)
    o = _up_project(o, w_uv, d)
    valid = (jnp.arange(d.T)[None, :] < n[:, None])[:, :, None, None]
    return jnp.where(valid, o, 0).astype(o.dtype), new


# ----------------------------------------------------------------------------- decoupled RoPE


def rope_inv_freq(pairs: Sequence[Sequence[int]], ref_dim: int, *, base: float = 10000.0) -> Float[Array, "G R"]:
    """Inverse frequencies ``base^(-2 f / ref_dim)`` of the pair indices ``pairs[g]`` of each rotary
    group (float32 ``[G, R]``; ``R = Dr / 2``), the same numbers as
    :func:`attn_jax.positional.rope_frequencies` ``(ref_dim)[f]``."""
    ref_dim = _check_int("ref_dim", ref_dim, 2)
    if ref_dim % 2:
        raise ValueError(f"ref_dim: expected an even rotary width, got {ref_dim}")
    idx = np.asarray(pairs)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"pairs: expected integer pair indices [G, R], got {np.asarray(pairs).shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= ref_dim // 2):
        raise ValueError(f"pairs: pair indices must lie in [0, {ref_dim // 2}), got {idx.min()}..{idx.max()}")
    return rope_frequencies(ref_dim, base=base)[jnp.asarray(idx)]


def apply_grouped_rope(x: Float[ArrayLike, "B T N Dr"], positions, inv_freq: Float[ArrayLike, "G R"]
                       ) -> Float[Array, "B T N Dr"]:
    """RoPE with per-group frequencies: head ``n`` of ``x`` (``G | N``) rotates its pairs
    ``(x_p, x_{p + Dr/2})`` by ``positions * inv_freq[n // (N / G), p]`` (half-split pairing, as
    :func:`attn_jax.positional.apply_rope`; computed in float32, returned in ``x``'s dtype)."""
    B, T, N, Dr = x.shape
    G, R = inv_freq.shape
    if Dr != 2 * R or N % G:
        raise ValueError(f"inv_freq: expected [G | {N}, {Dr // 2}] for x {V.shape_str(x)}, got {V.shape_str(inv_freq)}")
    pos = positions_for(positions, B, T)
    angles = pos[:, :, None, None] * jnp.asarray(inv_freq, jnp.float32)[None, None]      # [B|1, T, G, R]
    angles = jnp.repeat(angles, N // G, axis=2)
    out = rotate(jnp.asarray(x).astype(jnp.float32), jnp.cos(angles), jnp.sin(angles), interleaved=False)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- MHA -> MLA


def select_rope_pairs(q: Float[ArrayLike, "*N H D"] | None, k: Float[ArrayLike, "*N K D"] | None, num_pairs: int,
                      *, strategy: str = "2-norm", head_dim: int | None = None,
                      kv_heads: int | None = None) -> Int[np.ndarray, "K r"]:
    """MHA2MLA's partial-RoPE selection: which ``num_pairs`` of the ``D/2`` frequency pairs
    ``(f, f + D/2)`` each kv head keeps rotary (sorted int ``[K, num_pairs]``).

    ``"2-norm"`` ranks the pairs by ``sum_{heads i of kv head g} mean_n ||q_{n,i,pair}|| ·
    mean_n ||k_{n,g,pair}||`` over calibration projections ``q [..., H, D]``, ``k [..., K, D]``
    (before RoPE); ``"high"`` keeps ``f < num_pairs`` (the highest frequencies), ``"low"`` the
    last ``num_pairs``, ``"uniform"`` evenly spaced ones — these three need no data: pass
    ``q = k = None`` with ``head_dim`` and ``kv_heads``.
    """
    if strategy not in ROPE_SELECTIONS:
        raise ValueError(f"strategy: expected one of {ROPE_SELECTIONS}, got {strategy!r}")
    if strategy == "2-norm":
        if q is None or k is None:
            raise ValueError("q/k: the '2-norm' selection needs calibration projections q [..., H, D], k [..., K, D]")
        q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
        if q.ndim < 2 or k.ndim < 2 or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"q/k: expected [..., H, D] and [..., K, D] with the same leading axes and D, got "
                             f"{q.shape} and {k.shape}")
        H, D = q.shape[-2:]
        K = k.shape[-2]
        if H % K:
            raise ValueError(f"k: its K={K} kv heads must divide the H={H} query heads")
    else:
        if head_dim is None or kv_heads is None:
            raise ValueError(f"head_dim/kv_heads: required by strategy={strategy!r} (no calibration data)")
        D, K = _check_int("head_dim", head_dim, 2), _check_int("kv_heads", kv_heads, 1)
    if D % 2:
        raise ValueError(f"head_dim: RoPE pairs need an even head dim, got {D}")
    half = D // 2
    r = _check_int("num_pairs", num_pairs, 0, half)
    if strategy == "high":
        pick = np.tile(np.arange(r), (K, 1))
    elif strategy == "low":
        pick = np.tile(np.arange(half - r, half), (K, 1))
    elif strategy == "uniform":
        pick = np.tile(np.floor(np.arange(r) * half / max(r, 1)).astype(np.int64), (K, 1))
    else:
        def pair_norms(x):   # [..., heads, D] -> [heads, D/2]: mean over samples of each pair's norm
            x = x.reshape(-1, x.shape[-2], 2, half)
            return np.sqrt((x * x).sum(axis=2)).mean(axis=0)
        score = (pair_norms(q).reshape(K, H // K, half) * pair_norms(k)[:, None, :]).sum(axis=1)    # [K, D/2]
        pick = np.argsort(-score, axis=1, kind="stable")[:, :r]
    return np.sort(pick, axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class MLAConversion:
    """MLA weights converted from an MHA layer (:func:`mha_to_mla`), as NumPy float64 arrays.

    ``w_q [d, H, Dn + Dr]`` (each head's non-rotary dims, then its kv head's rotary dims),
    ``w_dkv [d, C]``, ``w_uk [C, K, Dn]``, ``w_uv [C, K, Dv]``, ``w_kr [d, K, Dr]`` (per-kv-head
    rotary keys: ``G = K``), ``rope_pairs [K, r]`` (pair indices of a ``ref_dim = D`` RoPE),
    ``singular_values`` of the joint ``[W^K_nope, W^V]`` matrix (all of them; the first ``C`` kept).
    """

    w_q: np.ndarray
    w_dkv: np.ndarray
    w_uk: np.ndarray
    w_uv: np.ndarray
    w_kr: np.ndarray
    rope_pairs: np.ndarray
    ref_dim: int
    singular_values: np.ndarray

    @property
    def kv_rank(self) -> int:
        return self.w_dkv.shape[1]

    @property
    def relative_error(self) -> float:
        """``||[W^K_nope, W^V] - W^DKV [W^UK, W^UV]||_F / ||[W^K_nope, W^V]||_F`` of the truncation."""
        s = self.singular_values
        total = float(np.sqrt((s * s).sum()))
        return float(np.sqrt((s[self.kv_rank:] ** 2).sum())) / total if total > 0 else 0.0


def mha_to_mla(w_q: Float[ArrayLike, "d H D"], w_k: Float[ArrayLike, "d K D"], w_v: Float[ArrayLike, "d K Dv"], *,
               kv_rank: int, rope_pairs: Int[ArrayLike, "K r"] | None = None) -> MLAConversion:
    """MHA2MLA conversion of the projections of an (MHA or GQA) attention layer.

    ``w_q [d, H, D]``, ``w_k [d, K, D]``, ``w_v [d, K, Dv]`` as ``x @ w`` per head, RoPE of width
    ``D`` in the half-split pairing (``(f, f + D/2)``).  ``rope_pairs [K, r]``: the pairs each kv
    head keeps rotary (:func:`select_rope_pairs`; ``None`` = none, for an MHA without RoPE).
    ``kv_rank``: the latent width ``d_c``, ``1 <= kv_rank <= min(d, K (D - 2r + Dv))``; at the
    joint matrix's rank the factorisation is exact.
    """
    wq, wk, wv = (np.asarray(w, np.float64) for w in (w_q, w_k, w_v))
    for name, w, layout in (("w_q", wq, "[d, H, D]"), ("w_k", wk, "[d, K, D]"), ("w_v", wv, "[d, K, Dv]")):
        if w.ndim != 3:
            raise ValueError(f"{name}: expected rank 3 {layout}, got shape {w.shape}")
    d, H, D = wq.shape
    K = wk.shape[1]
    if wk.shape != (d, K, D) or wv.shape[:2] != (d, K):
        raise ValueError(f"w_k/w_v: expected [d={d}, K, D={D}] and [d={d}, K, Dv], got {wk.shape} and {wv.shape}")
    if H % K:
        raise ValueError(f"w_k: its K={K} kv heads must divide the H={H} query heads")
    if D % 2:
        raise ValueError(f"w_q: RoPE pairs need an even head dim D, got {D}")
    Dv, half = wv.shape[2], D // 2
    pairs = np.zeros((K, 0), np.int64) if rope_pairs is None else np.asarray(rope_pairs)
    if pairs.ndim != 2 or pairs.shape[0] != K or not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"rope_pairs: expected integer pair indices [K={K}, r], got {np.asarray(rope_pairs).shape}")
    r = pairs.shape[1]
    if r > half or (r and (pairs.min() < 0 or pairs.max() >= half)) or any(len(set(p)) != r for p in pairs.tolist()):
        raise ValueError(f"rope_pairs: expected r <= {half} distinct pair indices in [0, {half}) per kv head, got "
                         f"{pairs.tolist()}")
    Dn = D - 2 * r
    kv_rank = _check_int("kv_rank", kv_rank, 1, min(d, K * (Dn + Dv)))
    rope_idx = np.concatenate([pairs, pairs + half], axis=1)                                       # [K, 2r]
    nope_idx = np.stack([np.setdiff1d(np.arange(D), row) for row in rope_idx]) if Dn else np.zeros((K, 0), int)
    group = np.arange(H) // (H // K)
    w_q_new = np.concatenate([np.take_along_axis(wq, nope_idx[group][None], axis=2),
                              np.take_along_axis(wq, rope_idx[group][None], axis=2)], axis=2)
    w_kr = np.take_along_axis(wk, rope_idx[None], axis=2)
    w_k_nope = np.take_along_axis(wk, nope_idx[None], axis=2)
    joint = np.concatenate([w_k_nope.reshape(d, K * Dn), wv.reshape(d, K * Dv)], axis=1)
    u, s, vt = np.linalg.svd(joint, full_matrices=False)
    root = np.sqrt(s[:kv_rank])
    w_dkv = u[:, :kv_rank] * root[None, :]
    up = root[:, None] * vt[:kv_rank]
    return MLAConversion(w_q=w_q_new, w_dkv=w_dkv, w_uk=up[:, :K * Dn].reshape(kv_rank, K, Dn),
                         w_uv=up[:, K * Dn:].reshape(kv_rank, K, Dv), w_kr=w_kr, rope_pairs=pairs, ref_dim=D,
                         singular_values=s)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="mla", family="variants", title="Multi-head Latent Attention (MLA; latent cache, MHA→MLA conversion)",
    papers=(Paper("DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", 2024,
                  "2405.04434", "DeepSeek-AI"),
            Paper("Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in Any "
                  "Transformer-based LLMs", 2025, "2502.14837", "Ji et al."),
            Paper("X-EcoMLA: Upcycling Pre-Trained Attention into MLA for Efficient and Extreme KV Compression", 2025,
                  "2503.11132", "Li et al.")),
    summary="c = W^DKV h; k = [W^UK c; RoPE(W^KR h)], v = W^UV c; q = [q^C; RoPE(q^R)]; decode: MQA of "
            "[(W^UK)ᵀ q^C; q^R] over cached rows [c; k^R], then W^UV",
    op=mla_attention, forms=("materialized", "absorbed"), directions=("causal",),
    layer="attn_jax.nn.mla:MultiHeadLatentAttention",
    notes="cache: LatentKVCache (C + G·Dr per token); conversion: select_rope_pairs + mha_to_mla (joint SVD)"))
