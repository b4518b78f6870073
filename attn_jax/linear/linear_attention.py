"""Kernelised linear attention (normalised) and cosFormer, on the gated linear-attention engine.

Linear attention: Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", 2020, arXiv:2006.16236 (§3.2-3.4):

    o_i = scale φ(q_i) S_i / (scale φ(q_i)·z_i + eps)
    S_i = Σ_{j ≤ i} φ(k_j)ᵀ v_j,   z_i = Σ_{j ≤ i} φ(k_j)         (causal)

or with the sums over the whole document of ``i`` (``causal=False``).  ``normalize=False``
drops the denominator (``o_i = scale φ(q_i) S_i``).  ``scale`` defaults to 1 (with
normalisation it only matters relative to ``eps``).

Implementation: one call of :func:`attn_jax.linear.gated.gated_linear_attention` (no gate) on
``φ(q)``, ``φ(k)`` and ``[v, 1]`` — the appended ones column makes the normaliser ``z`` the last
output channel.  So the state is float32 ``[B, H, D', Dv + 1]`` (``D'`` the feature dimension)
and **its last column is the normaliser** ``z``; ``initial_state`` must have that shape too
(``[B, H, D', Dv]`` when ``normalize=False``).  Packed segments, padding (transparent, zero
output), GQA and initial/final state follow the engine (:mod:`attn_jax.linear.common`).
Features are computed and accumulated in float32 (float64 stays float64); the output is cast to
the dtype of ``q``.

cosFormer: Qin et al., "cosFormer: Rethinking Softmax in Attention", 2022, arXiv:2202.08791:
ReLU features re-weighted by ``cos(π/2 · (i − j)/M)``,

    o_i = Σ_j φ(q_i)·φ(k_j) cos(π(i−j)/2M) v_j / Σ_j φ(q_i)·φ(k_j) cos(π(i−j)/2M)

decomposed with ``cos(a − b) = cos a cos b + sin a sin b`` into two linear attentions, one on
``φ(x_t) cos(πt/2M)`` and one on ``φ(x_t) sin(πt/2M)``.  We run them as a single engine call on the
concatenated ``2D`` features (the dot product of the concatenations is the sum of the two
attentions' kernels; numerator and normaliser come out of the same call).  ``M = max_len``
(default ``T``; the official code uses the longer of the query and key lengths) must be ``>= T``
so every weight is ``>= 0``.  Positions ``t`` are absolute row indices; only differences
``i − j`` within a document matter, so packed documents need no re-indexing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Real

from attn_jax.core.array_types import ArrayLike, InitialState, RecurrentOutput, SegmentIds
from attn_jax.core.validation import check_qkv, shape_str
from attn_jax.linear.common import expand_kv_heads, segment_layout, validate, zero_padding
from attn_jax.linear.feature_maps import resolve_feature_map
from attn_jax.linear.gated import DEFAULT_CHUNK, gated_linear_attention

__all__ = ["linear_attention", "linear_attention_reference", "cosformer_attention", "cosformer_attention_reference",
           "cosformer_features"]


def _compute_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative Python float, got {eps!r}")
    return float(eps)


def _check_scale(scale):
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive Python float or None, got {scale!r}")
    return float(scale)


def _feature_maps(feature_map):
    if isinstance(feature_map, tuple):
        if len(feature_map) != 2:
            raise ValueError(f"feature_map: a tuple must be (phi_q, phi_k), got {len(feature_map)} entries")
        return resolve_feature_map(feature_map[0]), resolve_feature_map(feature_map[1])
    f = resolve_feature_map(feature_map)
    return f, f


def _featurize(q, k, v, feature_map):
    """φ(q), φ(k) in the compute dtype, plus validation of the feature shapes."""
    check_qkv(q, k, v)
    phi_q, phi_k = _feature_maps(feature_map)
    dt = _compute_dtype(q)
    fq, fk = phi_q(q).astype(dt), phi_k(k).astype(dt)
    if fq.shape[:-1] != q.shape[:-1] or fk.shape[:-1] != k.shape[:-1] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map: must map [..., D] -> [..., D'] with the same D' for q and k; got "
                         f"φ(q) {shape_str(fq)} from q {shape_str(q)} and φ(k) {shape_str(fk)} from k {shape_str(k)}")
    return fq, fk, v.astype(dt)


def _augment(v, normalize):
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1) if normalize else v


def _normalise(o, normalize, eps):
    if not normalize:
        return o
    den = o[..., -1:] + eps
    return o[..., :-1] / jnp.where(den == 0, 1.0, den)


def linear_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"],
                     v: Float[ArrayLike, "B T K Dv"], *,
                     feature_map="elu", normalize: bool = True, eps: float = 1e-6, scale: float | None = None,
                     causal: bool = True, initial_state: InitialState = None, return_final_state: bool = False,
                     segment_ids: SegmentIds = None, impl="auto", chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """Normalised kernel linear attention (see the module docstring); returns ``(o, state)``.

    ``feature_map``: a name (``"elu"``, ``"identity"``, ``"relu"``, ``"taylor"``, ``"dpfp"``),
    a callable ``[..., D] -> [..., D']``, or a pair ``(φ_q, φ_k)``.  ``state`` (float32,
    ``None`` unless ``return_final_state``) is ``[B, H, D', Dv + 1]`` with the normaliser in its
    last column when ``normalize`` (``[B, H, D', Dv]`` otherwise).  ``impl`` selects the engine
    form (``"auto"``, ``"chunk"``, ``"parallel"``, ``"recurrent"``, ``"reference"``).
    """
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {normalize!r}")
    eps = _check_eps(eps)
    scale = _check_scale(scale)
    # padding is zeroed before the feature map (a NaN there would reach the gradient as 0 * φ'(NaN)),
    # and φ(q) of padding after it (φ(0) may be non-zero; the engine ignores padding keys/values)
    q, k, v = zero_padding(segment_ids, q, k, v)
    fq, fk, vc = _featurize(q, k, v, feature_map)
    fq = zero_padding(segment_ids, fq)
    o, state = gated_linear_attention(fq, fk, _augment(vc, normalize), None, scale=scale,
                                      initial_state=initial_state, return_final_state=return_final_state,
                                      segment_ids=segment_ids, causal=causal, impl=impl, chunk_size=chunk_size,
                                      mechanism="linear_attention")
    return _normalise(o, normalize, eps).astype(q.dtype), state


def _check_reference_args(fq, fk, vc, normalize, initial_state, segment_ids, causal):
    # the same checks as the engine, on the featurised problem (errors name the same arguments)
    validate("linear_attention", fq, fk, _augment(vc, normalize), None, initial_state=initial_state,
             segment_ids=segment_ids, causal=causal)


def linear_attention_reference(q, k, v, *, feature_map="elu", normalize: bool = True, eps: float = 1e-6,
                               scale: float | None = None, causal: bool = True, initial_state=None,
                               return_final_state: bool = False, segment_ids=None):
    """The quadratic form of :func:`linear_attention`, written directly (no engine).

    ``A_ij = scale φ(q_i)·φ(k_j)`` on visible pairs (same document, ``j <= i`` if causal,
    ``j`` not padding); ``o_i = Σ_j A_ij v_j / (Σ_j A_ij + eps)``; the initial state adds
    ``scale φ(q_i) S_0`` (numerator and, via its last column, normaliser) for tokens of the first
    document.
    """
    eps = _check_eps(eps)
    scale = _check_scale(scale)
    q, k, v = zero_padding(segment_ids, q, k, v)   # before φ: NaN padding must not reach a gradient
    fq, fk, vc = _featurize(q, k, v, feature_map)
    _check_reference_args(fq, fk, vc, normalize, initial_state, segment_ids, causal)
    if return_final_state and not causal:
        raise ValueError("return_final_state: only defined for causal=True")
    B, T, H = q.shape[:3]
    fk, va = expand_kv_heads(fk, H), expand_kv_heads(_augment(vc, normalize), H)
    lay = segment_layout(segment_ids, B, T)
    visible = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :]        # [B, i, j]
    if causal:
        visible = visible & jnp.tril(jnp.ones((T, T), bool))
    fk = jnp.where(lay.valid[:, :, None, None], fk, 0.0)
    va = jnp.where(lay.valid[:, :, None, None], va, 0.0)
    a = jnp.where(visible[:, None], jnp.einsum("bihd,bjhd->bhij", fq, fk), 0.0) * scale
    o = jnp.einsum("bhij,bjhv->bihv", a, va)
    if initial_state is not None:
        h0 = initial_state.astype(o.dtype)
        o = o + jnp.where((lay.doc == 0)[:, :, None, None], scale * jnp.einsum("bthd,bhdv->bthv", fq, h0), 0.0)
    o = jnp.where(lay.valid[:, :, None, None], _normalise(o, normalize, eps), 0.0).astype(q.dtype)
    state = None
    if return_final_state:
        last = (lay.doc == lay.doc[:, -1:]) & lay.valid
        state = jnp.einsum("bthd,bthv->bhdv", jnp.where(last[:, :, None, None], fk, 0.0), va)
        if initial_state is not None:
            state = state + jnp.where((lay.doc[:, -1] == 0)[:, None, None, None], initial_state.astype(state.dtype), 0.0)
    return o, state


# ----------------------------------------------------------------------------- cosFormer
def _check_max_len(max_len, T):
    if max_len is None:
        return T
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < T:
        raise ValueError(f"max_len: expected an int M >= T = {T} (cos(π/2·(i−j)/M) must stay >= 0), got {max_len!r}")
    return max_len


def cosformer_features(x: Float[ArrayLike, "B T H D"], positions: Real[ArrayLike, "#B T"] | Real[ArrayLike, " T"],
                       max_len: int, feature_map="relu") -> Float[Array, "B T H D2"]:
    """cosFormer's position-reweighted features ``[φ(x_t) cos(πt/2M), φ(x_t) sin(πt/2M)]``
    (``D' = 2D``) for token positions ``t`` (``[T]`` or ``[B|1, T]``) and ``M = max_len``."""
    f = resolve_feature_map(feature_map)(x)
    t = jnp.asarray(positions).astype(f.dtype)
    t = t[None] if t.ndim == 1 else t
    ang = ((math.pi / 2) * t / max_len)[:, :, None, None]
    return jnp.concatenate([f * jnp.cos(ang), f * jnp.sin(ang)], axis=-1)


def cosformer_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K Dv"], *,
                        causal: bool = True, max_len: int | None = None, eps: float = 1e-6, feature_map="relu",
                        segment_ids=None, initial_state=None, return_final_state: bool = False, impl="auto",
                        chunk_size: int = DEFAULT_CHUNK):
    """cosFormer attention (arXiv:2202.08791); returns ``(o, state)``.

    ``state``: ``[B, H, 2D, Dv + 1]`` (cos features then sin features; normaliser last column),
    in the frame of this call's positions ``0 .. T-1``.  Positions restart at 0 in every call, so
    to continue a sequence after ``P`` tokens rotate the carried state into the new frame:
    ``S_cos' = cos θ S_cos + sin θ S_sin``, ``S_sin' = cos θ S_sin − sin θ S_cos`` with
    ``θ = πP / 2M`` (tested in ``tests/linear/test_linear_variants.py``).  The ``"cosformer"``
    mixer (:mod:`attn_jax.nn.linear_mixers`) instead computes features at absolute positions and
    needs no rotation.
    """
    check_qkv(q, k, v)
    M = _check_max_len(max_len, q.shape[1])
    fm = resolve_feature_map(feature_map)
    feats = lambda x: cosformer_features(x, jnp.arange(x.shape[1]), M, fm)
    return linear_attention(q, k, v, feature_map=feats, normalize=True, eps=eps, scale=1.0, causal=causal,
                            initial_state=initial_state, return_final_state=return_final_state,
                            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


def cosformer_attention_reference(q, k, v, *, causal: bool = True, max_len: int | None = None, eps: float = 1e-6,
                                  feature_map="relu", segment_ids=None):
    """cosFormer written densely: ``A_ij = φ(q_i)·φ(k_j) cos(π(i−j)/2M)`` on visible pairs."""
    eps = _check_eps(eps)
    check_qkv(q, k, v)
    q, k, v = zero_padding(segment_ids, q, k, v)   # before φ: NaN padding must not reach a gradient
    B, T, H = q.shape[:3]
    M = _check_max_len(max_len, T)
    dt = _compute_dtype(q)
    fm = resolve_feature_map(feature_map)
    fq, fk = fm(q).astype(dt), expand_kv_heads(fm(k).astype(dt), H)
    vv = expand_kv_heads(v.astype(dt), H)
    lay = segment_layout(segment_ids, B, T)
    visible = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :] & lay.valid[:, :, None]
    if causal:
        visible = visible & jnp.tril(jnp.ones((T, T), bool))
    idx = jnp.arange(T, dtype=dt)
    w = jnp.cos((math.pi / 2) * (idx[:, None] - idx[None, :]) / M)
    a = jnp.einsum("bihd,bjhd->bhij", fq, fk) * w
    a = jnp.where(visible[:, None], a, 0.0)
    vv = jnp.where(lay.valid[:, :, None, None], vv, 0.0)
    num = jnp.einsum("bhij,bjhv->bihv", a, vv)
    den = jnp.moveaxis(a.sum(-1), 1, 2)[..., None] + eps
    o = num / jnp.where(den == 0, 1.0, den)
    return jnp.where(lay.valid[:, :, None, None], o, 0.0).astype(q.dtype)


# ----------------------------------------------------------------------------- declarations
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.feature_maps import (dpfp, hedgehog, orthogonal_random_projection,  # noqa: E402
                                          performer_features, relu)
from attn_jax.linear.parity import feature_state, first  # noqa: E402

_BOTH = ("causal", "bidirectional")
_FORMS = ("chunk", "parallel", "recurrent")


def normalised_call(feature_map) -> Callable:
    """The parity call of normalised linear attention (reference: ``linear_attention_reference``)
    with ``feature_map``: a name of :func:`attn_jax.linear.feature_maps.resolve_feature_map`, or
    ``make(d) -> map`` building a map with fixed weights for head dim ``d``."""

    def call(impl, x, *, causal=True, segment_ids=None, initial_state=None):
        fm = feature_map(x["q"].shape[-1]) if callable(feature_map) else feature_map
        kw = dict(feature_map=fm, causal=causal, segment_ids=segment_ids)
        if initial_state is not None:
            phi = resolve_feature_map(fm)
            kw["initial_state"] = feature_state(initial_state, jax.eval_shape(phi, x["q"]).shape[-1])
        if impl == "reference":
            return first(linear_attention_reference(x["q"], x["k"], x["v"], **kw))
        return first(linear_attention(x["q"], x["k"], x["v"], impl=impl, **kw))

    return call


# the feature maps of normalised linear attention (their op is this file's linear_attention)
# the feature-map mixers normalise as "linear" and compute φ in the layer (parameters / positions)
_PROJECTIONS = recipe.Projections(qk_activation="identity", v_activation="identity", scale="one")


def _layer(features) -> recipe.LinearLayer:
    return recipe.LinearLayer(recipe.NormalizedRule(), _PROJECTIONS, features=features)


def _fixed_performer(d: int):
    """Performer features with a fixed projection (24 features, key 7) for the parity entry."""
    proj = orthogonal_random_projection(jax.random.key(7), 24, d)
    return lambda x: performer_features(x, proj.astype(x.dtype))


def _fixed_hedgehog(d: int):
    """A Hedgehog map with fixed weights (8 features, key 8) for the parity entry."""
    W = jax.random.normal(jax.random.key(8), (d, 8)) / d ** 0.5
    return lambda x: hedgehog(x, W.astype(x.dtype))


RELU = declare(Declaration(
    name="relu_features", family="linear", title="ReLU feature map",
    papers=(Paper("cosFormer: Rethinking Softmax in Attention", 2022, "2202.08791", "Qin et al."),),
    summary="o_i = Σ_j relu(q_i)·relu(k_j) v_j / Σ_j relu(q_i)·relu(k_j)",
    op=relu, forms=_FORMS, directions=_BOTH, parity=Parity(normalised_call("relu")),
    notes="a feature map (cosFormer uses it before its re-weighting); no mixer of its own"))

DPFP = declare(Declaration(
    name="dpfp", family="linear", title="DPFP feature map",
    papers=(Paper("Linear Transformers Are Secretly Fast Weight Programmers", 2021, "2102.11174",
                  "Schlag et al."),),
    summary="φ_ν(x)_{i + 2D(j-1)} = r_i r_{i+j} with r = [relu(x), relu(-x)] (cyclic, j = 1..ν), normalised "
            "linear attention",
    op=dpfp, forms=_FORMS, directions=_BOTH, parity=Parity(normalised_call("dpfp")),
    layer=_layer(recipe.DPFPMap()),
    notes="the paper's delta-rule update is the 'deltanet' mixer"))

PERFORMER = declare(Declaration(
    name="performer", family="linear", title="Performer FAVOR+ (positive orthogonal random features)",
    papers=(Paper("Rethinking Attention with Performers", 2020, "2009.14794", "Choromanski et al."),),
    summary="φ(x) = exp(W x - |x|²/2) / sqrt(m) on x = q Dk^{-1/4}, k Dk^{-1/4}: E[φ(q)·φ(k)] = exp(q·k/sqrt(Dk))",
    op=performer_features, forms=_FORMS, directions=_BOTH,
    parity=Parity(normalised_call(_fixed_performer), notes="projection drawn from an explicit key"),
    layer=_layer(recipe.RandomFeatureMap()),
    notes="one projection shared by the heads, a non-trainable buffer redrawn by mixer.redraw(key)"))

HEDGEHOG = declare(Declaration(
    name="hedgehog", family="linear", title="Hedgehog (learnable softmax-mimicking map)",
    papers=(Paper("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", 2024,
                  "2402.04347", "Zhang et al."),),
    summary="φ(x) = [softmax(x W + b), softmax(-(x W + b))] per head, normalised linear attention",
    op=hedgehog, forms=_FORMS, directions=_BOTH,
    parity=Parity(normalised_call(_fixed_hedgehog), notes="distillation loss: feature_maps.hedgehog_distillation_loss"),
    layer=_layer(recipe.HedgehogMap()),
    notes="maps initialised to the identity; mixer.distillation_loss(x) is the paper's objective"))


# ----------------------------------------------------------------------------- the op's own entries


def _cosformer_dense(x, *, causal, segment_ids, initial_state, eps=1e-6):
    """cosFormer written densely (``cos(π(i−j)/2M)`` weights, ``M = T``) with the initial state
    added explicitly: ``S_0`` is a state of the cos/sin features in this call's position frame,
    so a first-document query ``i`` reads ``[φq_i cos(πi/2M), φq_i sin(πi/2M)] · S_0``
    (numerator columns and, last column, normaliser) — the definition of
    :func:`cosformer_attention` with ``initial_state``."""
    q, k, v = zero_padding(segment_ids, x["q"], x["k"], x["v"])   # before the ReLU (NaN-safe gradients)
    B, T, H = q.shape[:3]
    fq, fk = jnp.maximum(q, 0.0), expand_kv_heads(jnp.maximum(k, 0.0), H)
    lay = segment_layout(segment_ids, B, T)
    vis = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :] & lay.valid[:, :, None]
    if causal:
        vis = vis & jnp.tril(jnp.ones((T, T), bool))
    pos = jnp.arange(T, dtype=q.dtype)
    w = jnp.cos((math.pi / 2) * (pos[:, None] - pos[None, :]) / T)
    a = jnp.where(vis[:, None], jnp.einsum("bihd,bjhd->bhij", fq, fk) * w, 0.0)
    vv = jnp.where(lay.valid[:, :, None, None], expand_kv_heads(v, H), 0.0)
    num = jnp.einsum("bhij,bjhv->bihv", a, vv)
    den = jnp.moveaxis(a.sum(-1), 1, 2)
    if initial_state is not None:
        ang = (math.pi / 2) * pos / T
        psi = jnp.concatenate([fq * jnp.cos(ang)[None, :, None, None], fq * jnp.sin(ang)[None, :, None, None]], -1)
        r = jnp.where(((lay.doc == 0) & lay.valid)[:, :, None, None],
                      jnp.einsum("bthf,bhfv->bthv", psi, initial_state), 0.0)
        num, den = num + r[..., :-1], den + r[..., -1]
    den = den[..., None] + eps
    return jnp.where(lay.valid[:, :, None, None], num / jnp.where(den == 0, 1.0, den), 0.0)


def _cosformer_parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    h0 = None if initial_state is None else feature_state(initial_state, 2 * x["q"].shape[-1])
    if impl == "reference":
        if h0 is None:
            return first(cosformer_attention_reference(x["q"], x["k"], x["v"], causal=causal,
                                                       segment_ids=segment_ids))
        return _cosformer_dense(x, causal=causal, segment_ids=segment_ids, initial_state=h0)
    return first(cosformer_attention(x["q"], x["k"], x["v"], causal=causal, segment_ids=segment_ids,
                                     initial_state=h0, impl=impl))


_TRANSFORMERS_ARE_RNNS = Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020,
                               "2006.16236", "Katharopoulos et al.")

LINEAR = declare(Declaration(
    name="linear", family="linear", title="Linear attention, elu+1 map, normalised",
    papers=(_TRANSFORMERS_ARE_RNNS,),
    summary="o_i = φ(q_i) S_i / (φ(q_i) z_i + eps), S_i = Σ_j φ(k_j)ᵀ v_j, z_i = Σ_j φ(k_j)ᵀ, φ = elu + 1 "
            "(the state carries the normaliser as an extra value column)",
    op=linear_attention, forms=_FORMS, directions=_BOTH,
    parity=Parity(normalised_call("elu"), kernel_gate="none"),
    layer=recipe.LinearLayer(recipe.NormalizedRule("elu"),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one"))))

COSFORMER = declare(Declaration(
    name="cosformer", family="linear", title="cosFormer (ReLU + cos re-weighting)",
    papers=(Paper("cosFormer: Rethinking Softmax in Attention", 2022, "2202.08791", "Qin et al."),),
    summary="φ(x_t) = [relu(x_t) cos(πt/2M), relu(x_t) sin(πt/2M)], so φ(q_i)·φ(k_j) = relu(q_i)·relu(k_j) "
            "cos(π(i-j)/2M); normalised linear attention",
    op=cosformer_attention, forms=_FORMS, directions=_BOTH,
    parity=Parity(_cosformer_parity,
                  notes="initial_state is a state in the call's position frame (positions restart at 0)"),
    layer=recipe.LinearLayer(recipe.NormalizedRule(),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one"),
                             features=recipe.CosformerMap()),
    notes="the layer takes M = max_len (default 2048), fixed, and clips positions to [0, M - 1]"))
