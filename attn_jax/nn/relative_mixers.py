"""Softmax attention with learned relative embeddings (Shaw et al. 2018; Music Transformer) and RCMHA, as mixers.

``RelativeAttention`` is :class:`~attn_jax.nn.attention.MultiHeadAttention` (projections, GQA,
qk-norm, output gate, caches) with the bias of :class:`attn_jax.positional.relative.RelativeEmbedding`:

    logits_ij = scale * (q_i · k_j + q_i · E[row(j - i)])

``E: [N, H, Dk]`` is a parameter (init normal(0.02)); ``N = R + 1`` rows of past distances when
causal (Music Transformer), ``2R + 1`` rows clipped at ``±R`` otherwise (Shaw),
``R = max_distance``.  The bias is evaluated per tile from the queries (``impl="xla"`` / ``"dense"``:
no ``T x S`` array); decoding over a :class:`KVCache` places it at the true positions through
:func:`attn_jax.softmax.decode.prefill`, so prefill + step decode equals the full forward.  No RoPE
by default (``positional="none"``; ``"rope"`` may be combined).

``RCMHA`` (Sugiharto, Aradea, Mubarok, "RCMHA: Relative Convolutional Multi-Head Attention for Natural
Language Modelling", 2023, arXiv:2308.03429): the projections are followed by a causal depth-wise
convolution of width 3 over time (one filter per head channel, shared by the heads, with a bias), then
Transformer-XL-style relative scores with learned embeddings::

    q, k, v   <- conv3(x W_q), conv3(x W_k), conv3(x W_v)
    logits_ij = scale * ((q_i + u) · k_j + q_i · E[row(j - i)] + b[row(j - i)])

``u: [H, Dk]`` (query position bias), ``E: [N, H, Dk]``, ``b: [N, H]`` (key position bias).  The
definition follows the abstract and the authors' code (github.com/hermansh-id/rcmha,
``RelativeMultiHeadAttention``: the conv with ``kernel_size=3`` on q, k, v, and the three score
terms); their code keeps ``2 * 4096`` distance rows, here ``R = max_distance`` (clipped beyond, as
Shaw).  It runs on the per-tile path: ``q' = q + u`` goes to the ``q · k`` term and the bias
``RelativeEmbedding(E, scalar=scale * (b - u · E))`` restores ``q · E + b`` exactly.  Decoding
keeps the last two projected q/k/v inputs per row (:class:`RCMHACache`) next to the KV cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.core import masks
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import check_mixer_input, check_positive_int, default_head_dim, default_kernel_init, param
from attn_jax.nn.short_conv import causal_conv1d
from attn_jax.positional.fire import FIRE
from attn_jax.positional.relative import RelativeEmbedding
from attn_jax.softmax.api import attention
from attn_jax.softmax.decode import prefill
from attn_jax.softmax.kv_cache import KVCache

__all__ = ["RelativeAttention", "RCMHA", "RCMHACache", "FIREAttention"]


class RelativeAttention(MultiHeadAttention):
    """Relative-embedding attention mixer (module docstring); the ``"relative"`` registry entry.

    Args:
      d_model, num_heads: as :class:`MultiHeadAttention` (every other keyword is passed to it).
      max_distance: ``R``, the largest distance with its own embedding.
      positional: ``"none"`` (default) or ``"rope"``; ALiBi and T5 would be a second bias.
    """

    SUPPORTED_FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "segments", "key_padding", "bf16",
                                    "bidirectional"})

    def __init__(self, d_model: int, num_heads: int, *, max_distance: int = 64, positional: str = "none",
                 param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs):
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance: expected an int >= 1, got {max_distance!r}")
        if positional not in ("none", "rope"):
            raise ValueError(f"positional: expected 'none' or 'rope' with relative embeddings, got {positional!r}")
        if kwargs.get("cross"):
            raise ValueError("cross: relative embeddings need queries and keys on one axis (self-attention only)")
        if kwargs.get("monitor"):
            raise ValueError("monitor: the logit statistics materialise position-only biases; relative embeddings "
                             "depend on the queries (not supported)")
        super().__init__(d_model, num_heads, positional=positional, param_dtype=param_dtype, rngs=rngs, **kwargs)
        n = max_distance + 1 if self.causal else 2 * max_distance + 1
        self.max_distance = max_distance
        self.rel_table = param(rngs, nnx.initializers.normal(0.02), (n, num_heads, self.head_dim),
                               (None, "heads", "head_dim"), param_dtype)

    def _bias(self):
        """The relative embeddings as this layer's bias (the parent's hook for ALiBi / T5)."""
        return RelativeEmbedding(self.rel_table[...].astype(self.dtype), causal=self.causal)


@dataclasses.dataclass(frozen=True)
class RCMHACache:
    """Decode state of :class:`RCMHA`: the KV cache and the conv states ``[B, 2, H|K, D]`` of q, k, v."""

    kv: KVCache
    conv: tuple


jax.tree_util.register_dataclass(RCMHACache, data_fields=["kv", "conv"], meta_fields=[])


class RCMHA(nnx.Module):
    """Relative convolutional multi-head attention (module docstring); the ``"rcmha"`` registry entry.

    Args:
      d_model, num_heads: model width and query heads ``H``; num_kv_heads: ``K`` (GQA, ``H % K == 0``).
      head_dim: ``Dk = Dv`` (default ``d_model // num_heads``).
      max_distance: ``R``.  causal: decoder (default) or encoder attention (the conv stays causal).
      kernel_size: the conv width (3 in the paper's code).
      dtype / param_dtype / impl: as :class:`MultiHeadAttention`.
    """

    SUPPORTED_FEATURES = frozenset({"mha", "gqa", "causal", "segments", "key_padding", "bf16"})

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
                 max_distance: int = 64, causal: bool = True, kernel_size: int = 3, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl="auto", rngs: nnx.Rngs):
        head_dim = default_head_dim(d_model, num_heads, head_dim)
        K = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % K:
            raise ValueError(f"num_kv_heads: {K} kv heads do not divide num_heads={num_heads}")
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance: expected an int >= 1, got {max_distance!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        H, D, d = num_heads, check_positive_int("head_dim", head_dim), d_model
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d, H, K, D
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.causal, self.max_distance, self.dtype, self.impl = causal, max_distance, dtype, impl
        proj = lambda n: param(rngs, default_kernel_init, (d, n, D), ("embed", "heads", "head_dim"),  # noqa: E731
                               param_dtype, in_axis=0, out_axis=(1, 2))
        self.w_q, self.w_k, self.w_v = proj(H), proj(K), proj(K)
        self.w_o = param(rngs, default_kernel_init, (H, D, d), ("heads", "head_dim", "embed"), param_dtype,
                         in_axis=(0, 1), out_axis=2)
        lim = kernel_size ** -0.5           # PyTorch Conv1d's default for a depthwise filter
        conv_init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -lim, lim)  # noqa: E731
        self.conv_kernel = param(rngs, conv_init, (3, kernel_size, D), (None, None, "head_dim"), param_dtype)
        self.conv_bias = param(rngs, conv_init, (3, D), (None, "head_dim"), param_dtype)
        n = max_distance + 1 if causal else 2 * max_distance + 1
        self.rel_table = param(rngs, nnx.initializers.normal(0.02), (n, H, D), (None, "heads", "head_dim"),
                               param_dtype)
        self.rel_bias = param(None, nnx.initializers.zeros, (n, H), (None, "heads"), param_dtype)
        self.query_bias = param(None, nnx.initializers.zeros, (H, D), ("heads", "head_dim"), param_dtype)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> RCMHACache:
        """Empty KV cache of ``max_len`` and zero conv states."""
        w, H, K, D = self.kernel_size, self.num_heads, self.num_kv_heads, self.head_dim
        conv = tuple(jnp.zeros((batch, w - 1, n, D), dtype) for n in (H, K, K))
        return RCMHACache(KVCache.init(batch, max_len, K, D, dtype), conv)

    def _conv(self, i: int, x, segment_ids, state):
        """The width-``w`` causal depthwise conv ``i`` (0: q, 1: k, 2: v); filters shared by the heads."""
        n = x.shape[2]
        kern = jnp.broadcast_to(self.conv_kernel[i].astype(self.dtype)[:, None, :], (self.kernel_size, n,
                                                                                    self.head_dim))
        bias = jnp.broadcast_to(self.conv_bias[i].astype(self.dtype)[None, :], (n, self.head_dim))
        return causal_conv1d(x, kern, bias=bias, segment_ids=segment_ids, conv_state=state)

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        """``(y [B, T, d], cache)``; ``positions`` are unused (relative positions come from the order)."""
        B, T, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        if cache is not None and not isinstance(cache, RCMHACache):
            raise TypeError(f"cache: expected an RCMHACache from init_cache, got {type(cache).__name__}")
        x = x.astype(self.dtype)
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        qkv = [jnp.einsum("btd,dhf->bthf", x, w(p)) for p in (self.w_q, self.w_k, self.w_v)]
        states = (None,) * 3 if cache is None else tuple(s.astype(self.dtype) for s in cache.conv)
        outs = [self._conv(i, t, segment_ids, s) for i, (t, s) in enumerate(zip(qkv, states))]
        (q, _), (k, _), (v, _) = outs
        scale = self.head_dim ** -0.5
        u, e = w(self.query_bias), w(self.rel_table)
        scalar = scale * (w(self.rel_bias) - jnp.einsum("hd,nhd->nh", u, e))
        bias = RelativeEmbedding(e, causal=self.causal, scalar=scalar)
        q = q + u
        if cache is None:
            m = masks.causal() if self.causal else None
            if segment_ids is not None:
                m = masks.segments(segment_ids) if m is None else m & masks.segments(segment_ids)
            o = attention(q, k, v, mask=m, bias=bias, scale=scale, impl=self.impl)
        else:
            if not self.causal:
                raise ValueError("cache: decoding needs a causal RCMHA (causal=True)")
            n_new = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
            dt = cache.kv.dtype
            o, kv = prefill(q.astype(dt), k.astype(dt), v.astype(dt), cache.kv, n_new=n_new, bias=bias, scale=scale,
                            attention_impl=self.impl)
            cache = RCMHACache(kv, tuple(s.astype(c.dtype) for (_, s), c in zip(outs, cache.conv)))
        y = jnp.einsum("bthf,hfd->btd", o.astype(self.dtype), w(self.w_o))
        return y, cache


class FIREAttention(MultiHeadAttention):
    """Softmax attention with the FIRE bias (:mod:`attn_jax.positional.fire`); the ``"fire"`` registry entry.

    Parameters: the MLP ``w1 [width]``, ``b1 [width]``, ``w2 [width, H]``, ``b2 [H]`` (LeCun-normal
    weights, zero biases) and the scalars ``c`` (init 0.1) and ``L`` (init ``threshold``, 512 in the
    paper), shared by the heads as in the paper.  No RoPE by default.  The normaliser
    ``ψ(max(L, i))`` reads the query's position in the row: in a packed row a later document is
    normalised by its row position, not its position in the document (identical while rows are
    shorter than ``L``), so "segments" is not claimed.
    """

    SUPPORTED_FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "key_padding", "bf16"})

    def __init__(self, d_model: int, num_heads: int, *, width: int = 32, threshold: float = 512.0,
                 positional: str = "none", param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs):
        check_positive_int("width", width)
        if positional not in ("none", "rope"):
            raise ValueError(f"positional: expected 'none' or 'rope' with FIRE, got {positional!r}")
        if kwargs.get("cross"):
            raise ValueError("cross: FIRE needs queries and keys on one axis (self-attention only)")
        super().__init__(d_model, num_heads, positional=positional, param_dtype=param_dtype, rngs=rngs, **kwargs)
        normal = nnx.initializers.normal(1.0)
        self.fire_w1 = param(rngs, normal, (width,), (None,), param_dtype)
        self.fire_b1 = param(None, nnx.initializers.zeros, (width,), (None,), param_dtype)
        self.fire_w2 = param(rngs, nnx.initializers.normal(width ** -0.5), (width, num_heads), (None, "heads"),
                             param_dtype)
        self.fire_b2 = param(None, nnx.initializers.zeros, (num_heads,), ("heads",), param_dtype)
        self.fire_c = param(None, nnx.initializers.constant(0.1), (), (), param_dtype)
        self.fire_L = param(None, nnx.initializers.constant(float(threshold)), (), (), param_dtype)

    def _bias(self):
        """The FIRE bias from this layer's parameters (the parent's hook for ALiBi / T5)."""
        return FIRE(*(p[...].astype(jnp.float32) for p in (self.fire_w1, self.fire_b1, self.fire_w2, self.fire_b2,
                                                             self.fire_c, self.fire_L)))


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

RCMHA_DECLARATION = declare(Declaration(
    name="rcmha", family="softmax", title="RCMHA (depth-wise conv on q/k/v + relative scores)",
    papers=(Paper("RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling", 2023,
                  "2308.03429", "Sugiharto, Aradea, Mubarok"),),
    summary="q, k, v <- causal depth-wise conv3 of the projections; logits = scale ((q + u).k + q.E[r] + b[r])",
    op=None, directions=("causal",), layer=RCMHA,
    notes="softmax attention over the per-tile relative path (RelativeEmbedding with a per-distance scalar); "
          "distances clipped at max_distance (the authors' code keeps 4096 rows each side)"))
