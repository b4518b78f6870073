"""Linear / recurrent attention mixers: one layer, parameterised by a mechanism spec.

:class:`LinearAttentionMixer` wraps the pure ops of :mod:`attn_jax.linear` in the token-mixer
protocol (:mod:`attn_jax.nn.mixer`).  Its skeleton is shared by every mechanism::

    q = x W_q  [B, T, H, Dk],   k = x W_k  [B, T, K, Dk],   v = x W_v  [B, T, K, Dv]   (GQA: H % K == 0)
    q, k, v <- ShortConv (optional, per channel, causal, width 4) then the feature activation
    o = Op(q, k, v, gates)                            (state float32 [B, H, Dk, Dv], chunk form)
    y = (OutGate(x) ⊙ OutNorm(o)) W_o                 (W_o: [H, Dv, d])

and a :class:`Mechanism` record says which gates, activations, norm and gate each
mechanism uses (every output gate is stored as ``w_g``).  Defaults follow the papers / fla:
head dims ``d_model / H`` (GLA's keys ``d_model / 2H``); short convolutions on for ``"ssd"``,
``"deltanet"`` and ``"gated_deltanet"``, off for the others (``short_conv=`` overrides; with a
conv, q/k/v get SiLU unless the mechanism says otherwise).  The registered mechanisms
(``attn_jax.mixers.get(name)``):

* ``"linear"`` — Katharopoulos et al., "Transformers are RNNs", 2020, arXiv:2006.16236:
  ``φ = elu + 1`` on q and k, normalised ``o_i = φ(q_i) S_i / (φ(q_i) z_i + eps)`` by
  :func:`attn_jax.linear.linear_attention.linear_attention` (the state carries the
  normaliser as an extra value column: ``[B, H, Dk, Dv + 1]``); no output norm or gate.
* ``"retnet"`` — Sun et al., "Retentive Network", 2023, arXiv:2307.08621 §2.2-2.3:
  retention with fixed multi-scale decays ``γ_h = 1 - 2^{-5-h}``, ``scale = Dk^-1/2``;
  ``y = (swish(x W_G) ⊙ GroupNorm_H(Retention(x))) W_O`` (GroupNorm = per-head mean/variance
  normalisation with per-channel affine).  Not implemented: the xPos rotation of q/k (the
  decays already make it position-aware) and the "retention score normalization" of §2.2
  (per-token, per-head rescalings that GroupNorm cancels up to its eps).
* ``"lightning"`` — TransNormerLLM (Qin et al., 2023, arXiv:2307.14995 §3.2) with Lightning
  attention (arXiv:2401.04658): ``q = SiLU(x W_q)``, ``k = SiLU(x W_k)``, fixed decays
  ``λ_h = exp(-slope_h)`` (ALiBi slopes), no scale; ``y = (SRMSNorm(o) ⊙ x W_U) W_O`` where
  SRMSNorm is the parameter-free RMSNorm over all heads' channels and the gate ``U = x W_U`` is
  linear (no activation), as in the paper's "gated linear attention" block.
* ``"gla"`` — Yang et al., "Gated Linear Attention Transformers", 2023, arXiv:2312.06635 §4.4:
  ``α = sigmoid(x W_α1 W_α2 + b)^{1/τ}`` (rank-16 gate projection, ``τ = 16``) as log gates
  ``[B, T, H, Dk]``; key dim halved (``expand_k = 0.5``); ``y = (swish(x W_r) ⊙
  RMSNorm_head(o)) W_O`` (fla's RMSNorm in place of the paper's LayerNorm).
* ``"ssd"`` — Mamba-2's SSD as an attention-like mixer (Dao & Gu, 2024, arXiv:2405.21060):
  ``C, B, x`` = q, k, v through ShortConv + SiLU; ``Δ = softplus(x W_Δ + dt_bias)`` per head,
  ``log a = -exp(A_log) Δ``; the value is scaled by ``Δ``, no scale, plus the ``D`` skip
  ``y_t += D_h x_t``; ``y = RMSNorm(o ⊙ SiLU(x W_z)) W_O`` (Mamba-2's gated norm over all
  heads).  Not the full Mamba block: no expansion/MLP, q/k have heads like attention
  (``H`` query heads; ``K`` key/value heads) instead of Mamba-2's shared ``B``/``C`` groups.
* ``"based"`` — Arora et al., "Simple linear attention language models balance the
  recall-throughput tradeoff", 2024, arXiv:2402.18668: the linear-attention layer of BASED —
  q/k projected to ``d' = 16`` features per head (the state-size dial; ``head_dim=`` overrides),
  the 2nd-order Taylor map ``φ(q)·φ(k) = 1 + t + t²/2`` (``t = q·k/√d'``), normalised as
  ``"linear"``.  The paper's sliding-window softmax layers are the ``"sliding_window"`` mixer:
  BASED is ``mixer_pattern="based,sliding_window"`` (separate layers, as the paper builds it).
* ``"deltanet"`` — Yang et al., "Parallelizing Linear Transformers with the Delta Rule", 2024,
  arXiv:2406.06484: q, k through ShortConv + SiLU + L2 normalisation, v through ShortConv +
  SiLU, ``β = sigmoid(x W_β)`` per head, :func:`attn_jax.linear.delta_rule.delta_rule`;
  ``y = (RMSNorm_head(o) ⊙ swish(x W_g)) W_O`` (the Gated DeltaNet block's output; fla's
  DeltaNet defaults to no gate — pass ``output_gate=False`` for that).
* ``"gated_deltanet"`` — Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024,
  arXiv:2412.06464: as ``"deltanet"`` plus Mamba-2's decay ``log α = -exp(A_log) softplus(x W_a
  + dt_bias)`` and :func:`~attn_jax.linear.delta_rule.gated_delta_rule`.

* ``"performer"`` — Choromanski et al., "Rethinking Attention with Performers", 2020,
  arXiv:2009.14794 (FAVOR+, positive orthogonal random features):
  ``φ(x) = exp(W x − |x|²/2) / √m`` on ``x = q Dk^{-1/4}`` and ``x = k Dk^{-1/4}``
  (:func:`~attn_jax.linear.feature_maps.performer_features`), so that
  ``E[φ(q)·φ(k)] = exp(q·k/√Dk)``, normalised as ``"linear"`` (numerator and normaliser of
  softmax attention both estimated).  ``W: [m, Dk]`` comes from
  :func:`~attn_jax.linear.feature_maps.orthogonal_random_projection` (orthogonal blocks, χ
  row norms), **one projection shared by every head of the layer** (as the authors' FAVOR+
  code), drawn at construction from ``rngs.params()`` and stored as a non-trainable
  :class:`RandomFeatures` variable (not an ``nnx.Param``: optimisers over ``nnx.Param`` skip
  it, and it receives no gradient); ``mixer.redraw(key)`` draws a new one (the paper's
  periodic redrawing during training; redraw between sequences, never inside a cached
  decode).  ``m = num_features`` (default ``2 Dk``; the estimator's variance falls as ``1/m``
  and the state is ``[B, H, m, Dv + 1]``).  Query features are shifted by their per-token max
  (a per-query factor that cancels in the ratio, up to ``eps``); key features are not shifted
  (a shift over keys would have to look at future keys).
* ``"dpfp"`` — Schlag, Irie & Schmidhuber, "Linear Transformers Are Secretly Fast Weight
  Programmers", 2021, arXiv:2102.11174 (DPFP-ν): with ``r = [relu(x), relu(−x)]``,
  ``φ_ν(x)_{i + 2Dk(j−1)} = r_i r_{i+j}`` (cyclic, ``j = 1..ν``; ``D' = 2 Dk ν``, ``nu``
  default 1) on q and k (:func:`~attn_jax.linear.feature_maps.dpfp`), normalised as
  ``"linear"`` (the paper's feature-map comparison in linear attention; its delta-rule
  update is the ``"deltanet"`` mixer).
* ``"hedgehog"`` — Zhang, Bhatia, Kumbong & Ré, "The Hedgehog & the Porcupine: Expressive
  Linear Attentions with Softmax Mimicry", 2024, arXiv:2402.04347: learned per-head maps
  ``φ(x) = [softmax(x W + b), softmax(−(x W + b))]``
  (:func:`~attn_jax.linear.feature_maps.hedgehog`; ``D' = 2F``, ``F = feature_dim``, default
  ``Dk``), separate trainable ``hh_wq``/``hh_wk: [H, Dk, F]`` and ``hh_bq``/``hh_bk: [H, F]``
  initialised to the identity and zero (as the paper's reference code initialises the map);
  keys are mapped per query head (GQA: k expanded first).  Normalised as ``"linear"``.
  ``mixer.distillation_loss(x)`` is the paper's attention-distillation objective for this
  layer (cross-entropy of the Hedgehog weights against ``softmax(q·k/√Dk)`` over the visible
  keys, teacher gradient stopped): train only the ``hh_*`` parameters with it to convert a
  softmax layer.
* ``"cosformer"`` — Qin et al., "cosFormer: Rethinking Softmax in Attention", 2022,
  arXiv:2202.08791: ReLU features re-weighted by position,
  ``φ(x_t) = [relu(x_t) cos(πt/2M), relu(x_t) sin(πt/2M)]`` on q and k, so
  ``φ(q_i)·φ(k_j) = relu(q_i)·relu(k_j) cos(π(i − j)/2M)``; normalised as ``"linear"``
  (``D' = 2 Dk``).  ``t`` is the token's ``positions`` entry (default ``arange(T)``, continuing
  from ``cache.lengths`` when decoding; packed documents should pass restarting positions,
  although only differences within a document matter).  ``M = max_len`` (default 2048) is a
  fixed constant (the paper takes the sequence length, which a decoder does not know in
  advance).  Positions are clipped to ``[0, M − 1]`` (a traced value cannot raise): all
  angles then lie in ``[0, π/2)`` so every weight stays ``> 0``; beyond ``M − 1`` the
  re-weighting saturates (tokens past ``M − 1`` get no further locality bias among
  themselves).  Keep ``max_len`` above the longest sequence.
* ``"lln"`` — Nahshan, Kampeas & Haleva, "Linear Log-Normal Attention with Unbiased
  Concentration", 2023, arXiv:2311.13541: ``φ_q(q) = exp(α q̂)``, ``φ_k(k) = exp(β k̂)``,
  normalised as ``"linear"``.  The op (:mod:`attn_jax.linear.log_normal`) moment-matches α, β
  to batch statistics of q and k, which sees future tokens; this layer instead RMS-normalises
  q and k per head (``q̂ = q / rms(q)``, parameter-free, so entries have unit second moment)
  and uses the fixed ``(α, β) = lln_moment_matching(1, 1) ≈ (2.136, 2.136)`` — the moment
  matching of :func:`~attn_jax.linear.log_normal.lln_moment_matching` for unit-variance
  entries — which keeps the layer causal and its decode consistent.  ``φ_q`` is shifted by its per-token max (cancels in the ratio); keys are not
  shifted (``|β k̂| ≤ β √Dk`` is bounded).  The paper's block-diagonal "LLN+Diag" term is not
  included.
* ``"flow"`` — Wu, Wu, Xu, Wang & Long, "Flowformer: Linearizing Transformers with Conservation
  Flows", 2022, arXiv:2202.06258: Flow-Attention on the projected q, k, v
  (:func:`~attn_jax.linear.flowformer.flow_attention`: sigmoid features, incoming/outgoing
  flows, competition over sources and allocation over sinks; the causal form rescales the
  flows by the prefix length).  Its decode state is a
  :class:`~attn_jax.linear.flowformer.FlowState` (flow prefix sums, running log-sum-exp of the
  competition logits and the ``[D, Dv]`` value state), advanced by
  :func:`~attn_jax.linear.flowformer.flow_attention_step`; no output norm or gate.

Positions are unused except by ``"cosformer"``: the other mechanisms are position-aware
through their decays and the causal short convolution (or not at all: ``"linear"`` and the
other pure feature maps are permutation-equivariant over the visible keys); a ``positions``
argument is accepted and ignored.

Non-causal (encoder) form: ``causal=False`` (what :class:`attn_jax.models.Encoder` and
``TransformerBlock(causal=False)`` pass to a factory) sums over the whole document of each
token instead of its prefix (the ops' ``causal=False``).  It exists for rule ``"normalized"``
without decays (``"linear"``, ``"based"``, ``"performer"``, ``"dpfp"``, ``"hedgehog"``,
``"cosformer"``, ``"lln"``; with a short convolution the convolution stays causal), for
``"flow"`` (the paper's non-causal Flow-Attention) and for the
two encoder-only mechanisms below; the decayed and delta-rule mechanisms raise ``ValueError``
at construction (a decay needs an order).  A non-causal mixer has no cache (``init_cache``
and ``cache=`` raise).  Encoder-only mechanisms (non-causal only — constructing them with the
default ``causal=True``, as a decoder does, raises ``ValueError`` naming the mechanism):

* ``"efficient"`` — Shen, Zhang, Zhao, Yi & Li, "Efficient Attention: Attention with Linear
  Complexities", 2021, arXiv:1812.01243: ``o = ρ_q(q) (ρ_k(k)ᵀ v)`` with ``ρ_q`` a softmax over
  each query's features and ``ρ_k`` a softmax over the positions of each key channel (within
  each document; :func:`~attn_jax.linear.efficient_attention.efficient_attention`), no
  temperature; no output norm or gate.
* ``"agent"`` — Han et al., "Agent Attention: On the Integration of Softmax and Linear
  Attention", 2024, arXiv:2312.08874: ``n = num_agents`` (default 16) agent tokens ``A``
  pooled from q (adaptive average pooling over each row's valid tokens),
  ``V_A = softmax(A kᵀ/√Dk) v``, ``o = softmax(q Aᵀ/√Dk) V_A``
  (:func:`~attn_jax.linear.agent.agent_attention`).  Not included: the paper's agent bias and
  depthwise-convolution term ``DWC(v)``.  Packed rows: each document pools its own agents
  and its queries read only them (``max_segments``, default 8, bounds the documents per row:
  ``num_agents × max_segments`` agent slots; a row with more documents outputs NaN, loudly
  rather than silently wrong).

Decoding: the cache is a :class:`LinearAttentionCache` (bounded: ``max_len`` is ignored).  A
``T == 1`` step uses the recurrent step (:func:`~attn_jax.linear.gated.recurrent_step` /
:func:`~attn_jax.linear.delta_rule.delta_rule_step`; ``linear_attention(impl="recurrent")``,
i.e. ``recurrent_step`` on ``[v, 1]``, for the normalised mechanisms, whose state is
``[B, H, D', Dv + 1]`` with ``D'`` the feature dimension); a ``T > 1`` prefill runs the chunk form
from ``initial_state = cache.state`` with ``return_final_state=True``; ``segment_ids`` marks the
valid tokens of each row (padding is transparent in the ops and the short conv, outputs zero,
and ``lengths`` advance by each row's valid count).

The layer body is one jitted pure function of the parameters (nested inside a caller's
``jit`` it is inlined; called eagerly it is one compiled program instead of hundreds of
op-by-op dispatches), and all initial parameter values come from one jitted draw.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.linear.agent import agent_attention
from attn_jax.linear.common import expand_kv_heads
from attn_jax.linear.delta_rule import delta_rule, delta_rule_step, gated_delta_rule
from attn_jax.linear.efficient_attention import efficient_attention
from attn_jax.linear.flowformer import flow_attention, flow_attention_step, init_flow_state
from attn_jax.linear.feature_maps import (dpfp, hedgehog, hedgehog_distillation_loss, orthogonal_random_projection,
                                          performer_features, resolve_feature_map)
from attn_jax.linear.gated import gated_linear_attention, recurrent_step
from attn_jax.linear.gla import gla_log_gates
from attn_jax.linear.lightning import lightning_decays
from attn_jax.linear.linear_attention import linear_attention
from attn_jax.linear.log_normal import lln_moment_matching
from attn_jax.linear.retention import retnet_decays
from attn_jax.linear.ssd import ssd_log_decay
from attn_jax.nn.layers import check_positive_int, param
from attn_jax.nn.short_conv import ShortConv, causal_conv1d

__all__ = ["Mechanism", "MECHANISMS", "LinearAttentionMixer", "LinearAttentionCache", "RandomFeatures",
           "make_factory", "supports_causal", "supports_noncausal"]


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """What distinguishes one linear-attention layer from another (see the module docstring)."""

    name: str
    rule: str = "additive"          # "additive" (gated engine) | "normalized" (linear_attention) | "delta"
    #                                 | "flow" (Flowformer) | "efficient" | "agent" (encoder-only ops)
    decay: str | None = None        # None | "retnet" | "lightning" | "gla" | "mamba" (data-dependent scalar)
    qk_act: str | None = None       # after the conv: "identity" | "silu"; None = "silu" with a conv, else identity
    v_act: str | None = None        # as qk_act, for v
    feature_map: str = "identity"   # the op's feature map φ (rule "normalized": linear_attention's, e.g. "elu")
    features: str | None = None     # a feature map the layer computes itself (parameters / positions):
    #                                 "performer" | "dpfp" | "hedgehog" | "cosformer" | "lln"
    qk_l2: bool = False             # L2-normalise q and k (DeltaNet)
    beta: bool = False              # per-head write strength sigmoid(x W_β) (DeltaNet)
    scale: str = "rsqrt"            # "rsqrt" = Dk^-1/2 | "one"
    short_conv: bool = False
    expand_k: float = 1.0
    expand_v: float = 1.0
    out_norm: str | None = None     # None | "group" | "rms_head" | "srms_all" | "rms_all"
    out_gate: str | None = None     # None | "swish" | "linear"
    gate_before_norm: bool = False  # Mamba-2: norm(o ⊙ silu(z))
    value_dt: bool = False          # Mamba-2: value scaled by Δ, plus the D skip
    key_dim: int | None = None      # a fixed Dk (BASED's feature dim d' = 16) unless head_dim is given


def _spec(d) -> Mechanism:
    """The layer spec of declaration ``d`` (its :class:`attn_jax.core.recipe.LinearLayer`)."""
    from attn_jax.core import recipe as r
    L = d.layer
    P = L.projections
    rule = {r.GatedRule: "additive", r.NormalizedRule: "normalized", r.DeltaRule: "delta", r.FlowRule: "flow",
            r.EfficientRule: "efficient", r.AgentRule: "agent"}[type(L.rule)]
    decay = None
    if isinstance(L.decay, r.FixedDecay):
        decay = d.name
    elif isinstance(L.decay, r.LowRankGate):
        decay = "gla"
    elif isinstance(L.decay, r.DeltaGate):
        decay = "mamba"
    feats = {r.RandomFeatureMap: "performer", r.DPFPMap: "dpfp", r.HedgehogMap: "hedgehog",
             r.CosformerMap: "cosformer", r.LogNormalMap: "lln", type(None): None}[type(L.features)]
    return Mechanism(d.name, rule=rule, decay=decay, qk_act=P.qk_activation, v_act=P.v_activation,
                     feature_map=L.rule.feature_map if rule == "normalized" else "identity", features=feats,
                     qk_l2=P.qk_l2, beta=L.write_strength is not None, scale=P.scale, short_conv=P.short_conv,
                     expand_k=P.expand_k, expand_v=P.expand_v,
                     out_norm=None if L.output_norm is None else L.output_norm.kind,
                     out_gate=None if L.output_gate is None else L.output_gate.activation,
                     gate_before_norm=L.output_norm is not None and L.output_norm.gated,
                     value_dt=isinstance(L.decay, r.DeltaGate) and L.decay.scale_values, key_dim=P.key_dim)


def _mechanisms():
    from attn_jax.core import declaration
    from attn_jax.core.recipe import LinearLayer
    declaration.load("attn_jax.linear")
    return {d.name: _spec(d) for d in declaration.declarations() if isinstance(d.layer, LinearLayer)}


MECHANISMS = _mechanisms()

GLA_GATE_RANK = 16
GLA_TEMPERATURE = 16.0
ENCODER_ONLY_RULES = ("efficient", "agent")
COSFORMER_MAX_LEN = 2048
AGENT_NUM_AGENTS = 16

# mechanism-specific constructor options: option -> the mechanism (features or rule) that takes it
AGENT_MAX_SEGMENTS = 8
_OPTIONS = {"num_features": "performer", "nu": "dpfp", "feature_dim": "hedgehog", "max_len": "cosformer",
            "num_agents": "agent", "max_segments": "agent"}


def supports_causal(spec: Mechanism) -> bool:
    """Whether ``spec`` has a causal (decoder) form: everything but the encoder-only ops."""
    return spec.rule not in ENCODER_ONLY_RULES


def supports_noncausal(spec: Mechanism) -> bool:
    """Whether ``spec`` has a non-causal (encoder) form: the normalised rule without decays and
    the encoder-only ops (a decay or a delta-rule write needs an order)."""
    return spec.rule in ("normalized", "flow") + ENCODER_ONLY_RULES and spec.decay is None


class RandomFeatures(nnx.Variable):
    """A non-trainable buffer (Performer's random projection ``W: [m, Dk]``): not an
    ``nnx.Param``, so optimisers built over ``nnx.Param`` leave it alone (it is redrawn by
    :meth:`LinearAttentionMixer.redraw`, never trained)."""


@dataclasses.dataclass(frozen=True)
class LinearAttentionCache:
    """Decode cache: ``state`` float32 ``[B, H, Dk, Dv]`` (``[B, H, D', Dv + 1]`` for the
    normalised mechanisms: feature dimension ``D'``, normaliser column last), ``conv_state`` a
    ``(q, k, v)`` tuple of ``[B, w-1, heads, dim]`` (or None without short convs), ``lengths``
    int32 ``[B]`` tokens seen per row.  ``"flow"`` keeps a
    :class:`~attn_jax.linear.flowformer.FlowState` pytree as its ``state``."""

    state: jax.Array
    conv_state: tuple | None
    lengths: jax.Array


jax.tree_util.register_dataclass(LinearAttentionCache, data_fields=["state", "conv_state", "lengths"],
                                 meta_fields=[])


def _act(x, kind):
    if kind in (None, "identity"):
        return x
    if kind == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"activation: expected None, 'identity' or 'silu', got {kind!r}")


def _l2(x, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)


# ----------------------------------------------------------------------------- initialisation
# Every initial value of a mixer comes out of ONE jitted program (one truncated-normal and one
# uniform draw, sliced): on CPU, compiling a truncated normal per parameter shape costs far more
# than the layer itself, and the registry tests build every mixer.
_TRUNC_STD = 0.87962566103423978   # std of a unit normal truncated to [-2, 2] (flax's variance_scaling)


def _init_value(kind, shape, arg, z, u):
    """``z``/``u``: truncated-normal / uniform draws of ``prod(shape)`` entries (or None)."""
    if kind == "fan_in":          # variance_scaling(1, "fan_in", "truncated_normal"), fan-in = arg
        return z.reshape(shape) * (math.sqrt(1.0 / arg) / _TRUNC_STD)
    if kind == "uniform":         # U(-arg, arg)
        return (2.0 * u - 1.0).reshape(shape) * arg
    if kind == "dt_bias":         # Mamba: Δ ~ logU(1e-3, 0.1) (floor 1e-4), bias = softplus⁻¹(Δ)
        dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
        return (dt + jnp.log(-jnp.expm1(-dt))).reshape(shape)
    if kind == "a_log":           # Mamba-2: A ~ U(1, 16), stored as log A
        return jnp.log(1.0 + 15.0 * u).reshape(shape)
    if kind == "eye":             # identity on the last two axes (Hedgehog's map)
        return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1]), shape)
    return jnp.full(shape, 0.0 if kind == "zeros" else 1.0)


_DRAWS_NORMAL, _DRAWS_UNIFORM = ("fan_in",), ("uniform", "dt_bias", "a_log")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_values(key, table, param_dtype):
    """``table``: ``((kind, shape, arg), ...)``; returns the initial values, in order."""
    sizes = [math.prod(shape) for _, shape, _ in table]
    normal = [kind in _DRAWS_NORMAL for kind, _, _ in table]
    kz, ku = jax.random.split(key)
    z = jax.random.truncated_normal(kz, -2.0, 2.0, (max(1, sum(n for n, f in zip(sizes, normal) if f)),))
    u = jax.random.uniform(ku, (max(1, sum(n for n, f in zip(sizes, normal) if not f)),))
    out, oz, ou = [], 0, 0
    for (kind, shape, arg), n, is_normal in zip(table, sizes, normal):
        zi, ui = (z[oz:oz + n], None) if is_normal else (None, u[ou:ou + n])
        oz, ou = (oz + n, ou) if is_normal else (oz, ou + n)
        out.append(_init_value(kind, shape, arg, zi, ui).astype(param_dtype))
    return out


def _option(name, value, spec, default):
    owner = _OPTIONS[name]
    if value is None:
        return default
    if owner not in (spec.features, spec.rule):
        raise ValueError(f"{name}: only used by the {owner!r} mechanism, not by {spec.name!r}")
    return check_positive_int(name, value)


class LinearAttentionMixer(nnx.Module):
    """Linear / recurrent attention mixer (see the module docstring).

    Args:
      d_model, num_heads: width and query heads ``H``.
      mechanism: a key of :data:`MECHANISMS` or a :class:`Mechanism`.
      num_kv_heads: key/value heads ``K`` (GQA; default ``H``).
      head_dim: ``Dk`` (default ``d_model * expand_k / H``); value_head_dim: ``Dv`` (default
        ``d_model * expand_v / H``).
      short_conv: q/k/v short convolutions (default per mechanism); conv_size: their width.
      output_gate: False drops the output gate (default: the mechanism's).
      causal: True (decoder, default) or False (encoder: sums over the whole document; only
        for mechanisms with a non-causal form; no cache).  Encoder-only mechanisms
        (``"efficient"``, ``"agent"``) require ``causal=False``.
      num_features: ``"performer"``'s number of random features ``m`` (default ``2 Dk``).
      nu: ``"dpfp"``'s ν (default 1).  feature_dim: ``"hedgehog"``'s ``F`` (default ``Dk``).
      max_len: ``"cosformer"``'s ``M`` (default 2048; positions are clipped to ``M − 1``).
      num_agents: ``"agent"``'s number of pooled agents per document (default 16).
      max_segments: ``"agent"``'s bound on documents per packed row (default 8; a row with more
        outputs NaN).
      dtype / param_dtype: compute / storage dtypes.  impl, chunk_size: for the ops.

    Parameters carry logical axes: ``w_q [d, H, Dk]`` ("embed", "heads", "head_dim"),
    ``w_k``/``w_v [d, K, D]`` ("embed", "kv_heads", "head_dim"), ``w_o [H, Dv, d]``, gates
    ``[d, H(, Dv)]``, per-head scalars ``[H]`` ("heads",).
    """

    def __init__(self, d_model: int, num_heads: int, *, mechanism="gla", num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_head_dim: int | None = None, short_conv: bool | None = None,
                 conv_size: int = 4, output_gate: bool | None = None, causal: bool = True,
                 num_features: int | None = None, nu: int | None = None, feature_dim: int | None = None,
                 max_len: int | None = None, num_agents: int | None = None,
                 max_segments: int | None = None, eps: float = 1e-5,
                 dtype=jnp.float32, param_dtype=jnp.float32, impl="auto", chunk_size: int = 64, rngs: nnx.Rngs):
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        if isinstance(mechanism, str):
            if mechanism not in MECHANISMS:
                raise ValueError(f"mechanism: expected one of {sorted(MECHANISMS)}, got {mechanism!r}")
            mechanism = MECHANISMS[mechanism]
        if not isinstance(mechanism, Mechanism):
            raise TypeError(f"mechanism: expected a name or a Mechanism, got {type(mechanism).__name__}")
        spec = mechanism
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if causal and not supports_causal(spec):
            raise ValueError(f"causal: the {spec.name!r} mixer is non-causal only (an encoder mixer: its "
                             f"normalisation or agents summarise the whole sequence); build it with causal=False, "
                             f"as attn_jax.models.Encoder does — it cannot be a decoder (causal) mixer")
        if not causal and not supports_noncausal(spec):
            raise ValueError(f"causal: the {spec.name!r} mixer has no non-causal form (its "
                             f"{'decay' if spec.decay else spec.rule + ' rule'} needs a token order); causal=False is "
                             f"available for {sorted(n for n, m in MECHANISMS.items() if supports_noncausal(m))}")
        if output_gate is not None and not output_gate:
            spec = dataclasses.replace(spec, out_gate=None)
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} kv heads do not divide num_heads={num_heads}")

        def _dim(name, given, expand):
            if given is not None:
                return check_positive_int(name, given)
            total = int(round(d_model * expand))
            if total % num_heads or total == 0:
                raise ValueError(f"{name}: d_model * {expand} = {total} is not divisible by num_heads={num_heads} "
                                 f"(pass {name} explicitly)")
            return total // num_heads

        H, K, d = num_heads, num_kv_heads, d_model
        if head_dim is None and spec.key_dim is not None:
            head_dim = spec.key_dim
        Dk, Dv = _dim("head_dim", head_dim, spec.expand_k), _dim("value_head_dim", value_head_dim, spec.expand_v)
        num_features = _option("num_features", num_features, spec, 2 * Dk)
        nu = _option("nu", nu, spec, 1)
        feature_dim = _option("feature_dim", feature_dim, spec, Dk)
        max_len = _option("max_len", max_len, spec, COSFORMER_MAX_LEN)
        num_agents = _option("num_agents", num_agents, spec, AGENT_NUM_AGENTS)
        max_segments = _option("max_segments", max_segments, spec, AGENT_MAX_SEGMENTS)
        if spec.features == "dpfp" and nu > 2 * Dk - 1:
            raise ValueError(f"nu: at most 2 * head_dim - 1 = {2 * Dk - 1}, got {nu}")
        self.spec, self.d_model, self.num_heads, self.num_kv_heads = spec, d, H, K
        self.head_dim, self.value_head_dim, self.causal = Dk, Dv, causal
        self.use_conv = spec.short_conv if short_conv is None else bool(short_conv)
        check_positive_int("conv_size", conv_size)
        self.eps, self.dtype, self.impl, self.chunk_size = float(eps), dtype, impl, int(chunk_size)
        self.scale = Dk ** -0.5 if spec.scale == "rsqrt" else 1.0
        lln_ab = (0.0, 0.0)
        if spec.features == "lln":
            with jax.ensure_compile_time_eval():  # concrete even when the layer is built under a trace
                lln_ab = tuple(float(a) for a in lln_moment_matching(1.0, 1.0))
        self.feature_dim = self._feature_dim(spec, Dk, num_features, nu, feature_dim)
        self._cfg = _Config(spec, H, K, Dk, Dv, self.use_conv, self.eps, self.scale, dtype,
                            tuple(impl) if isinstance(impl, list) else impl, self.chunk_size, causal, nu, max_len,
                            lln_ab, num_agents, max_segments)

        # (name, shape, logical axes, init kind, init arg); "fan_in" = LeCun truncated normal
        table = [("w_q", (d, H, Dk), ("embed", "heads", "head_dim"), "fan_in", d),
                 ("w_k", (d, K, Dk), ("embed", "kv_heads", "head_dim"), "fan_in", d),
                 ("w_v", (d, K, Dv), ("embed", "kv_heads", "head_dim"), "fan_in", d),
                 ("w_o", (H, Dv, d), ("heads", "head_dim", "embed"), "fan_in", H * Dv)]
        if self.use_conv:  # PyTorch Conv1d default: U(±1/sqrt(fan_in)), fan_in = conv_size (depthwise)
            lim = conv_size ** -0.5
            table += [("conv_q", (conv_size, H, Dk), (None, "heads", "head_dim"), "uniform", lim),
                      ("conv_k", (conv_size, K, Dk), (None, "kv_heads", "head_dim"), "uniform", lim),
                      ("conv_v", (conv_size, K, Dv), (None, "kv_heads", "head_dim"), "uniform", lim)]
        if spec.decay == "gla":
            table += [("w_gate_a", (d, GLA_GATE_RANK), ("embed", None), "fan_in", d),
                      ("w_gate_b", (GLA_GATE_RANK, H, Dk), (None, "heads", "head_dim"), "fan_in", GLA_GATE_RANK),
                      ("b_gate", (H, Dk), ("heads", "head_dim"), "zeros", None)]
        elif spec.decay == "mamba":
            table += [("w_dt", (d, H), ("embed", "heads"), "fan_in", d),
                      ("dt_bias", (H,), ("heads",), "dt_bias", None),
                      ("A_log", (H,), ("heads",), "a_log", None)]
        if spec.features == "hedgehog":  # the paper's identity initialisation of the learned maps
            F = feature_dim
            table += [("hh_wq", (H, Dk, F), ("heads", "head_dim", None), "eye", None),
                      ("hh_bq", (H, F), ("heads", None), "zeros", None),
                      ("hh_wk", (H, Dk, F), ("heads", "head_dim", None), "eye", None),
                      ("hh_bk", (H, F), ("heads", None), "zeros", None)]
        if spec.value_dt:
            table.append(("D", (H,), ("heads",), "ones", None))
        if spec.beta:
            table.append(("w_beta", (d, H), ("embed", "heads"), "fan_in", d))
        if spec.out_gate is not None:
            table.append(("w_g", (d, H, Dv), ("embed", "heads", "head_dim"), "fan_in", d))
        if spec.out_norm in ("group", "rms_all"):
            table.append(("norm_scale", (H, Dv), ("heads", "head_dim"), "ones", None))
        elif spec.out_norm == "rms_head":
            table.append(("norm_scale", (Dv,), ("head_dim",), "ones", None))
        if spec.out_norm == "group":
            table.append(("norm_bias", (H, Dv), ("heads", "head_dim"), "zeros", None))
        values = _init_values(rngs.params(), tuple((kind, shape, arg) for _, shape, _, kind, arg in table),
                              jnp.dtype(param_dtype))
        self._names = tuple(name for name, *_ in table if not name.startswith("conv_"))
        for (name, shape, axes, _, _), value in zip(table, values):
            const = lambda key, shape, dtype, value=value: value.astype(dtype)  # noqa: E731
            if name.startswith("conv_"):
                setattr(self, name, ShortConv(shape[1:], conv_size, activation=None, axes=axes[1:], dtype=dtype,
                                              param_dtype=param_dtype, kernel_init=const, rngs=rngs))
            else:
                setattr(self, name, param(None, const, shape, axes, param_dtype))
        if spec.features == "performer":  # float32 buffer, shared by the heads, not a Param
            self.projection = RandomFeatures(orthogonal_random_projection(rngs.params(), num_features, Dk),
                                             out_sharding=(None, "head_dim"), eager_sharding=False)

    @staticmethod
    def _feature_dim(spec, Dk, num_features, nu, feature_dim) -> int | None:
        """``D'``, the state's key dimension for the normalised rule (None otherwise)."""
        if spec.rule != "normalized":
            return None
        f = spec.features
        if f is None:
            return jax.eval_shape(resolve_feature_map(spec.feature_map),
                                  jax.ShapeDtypeStruct((1, Dk), jnp.float32)).shape[-1]
        return {"performer": num_features, "dpfp": 2 * Dk * nu, "hedgehog": 2 * feature_dim,
                "cosformer": 2 * Dk, "lln": Dk}[f]

    def _params(self) -> dict:
        params = {name: getattr(self, name)[...] for name in self._names}
        if self.use_conv:
            params.update(conv_q=self.conv_q.kernel[...], conv_k=self.conv_k.kernel[...],
                          conv_v=self.conv_v.kernel[...])
        if self.spec.features == "performer":
            params["projection"] = self.projection[...]
        return params

    def redraw(self, key) -> None:
        """Draw a new random projection (``"performer"`` only; the paper's feature redrawing)."""
        if self.spec.features != "performer":
            raise ValueError(f"redraw: only the 'performer' mechanism has random features, not {self.spec.name!r}")
        m, Dk = self.projection[...].shape
        self.projection[...] = orthogonal_random_projection(key, m, Dk)

    # ------------------------------------------------------------------ cache
    def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32) -> LinearAttentionCache:
        """Empty cache (``max_len`` is ignored: the state is bounded); ``dtype`` is the conv state's."""
        if not self.causal:
            raise ValueError(f"init_cache: this {self.spec.name!r} mixer was built with causal=False (an encoder "
                             f"mixer): it has no decode cache")
        H, Dk, Dv = self.num_heads, self.head_dim, self.value_head_dim
        if self.spec.rule == "normalized":  # the state lives in feature space: [B, H, D', Dv + 1]
            Dk, Dv = self.feature_dim, Dv + 1
        conv = None
        if self.use_conv:
            conv = (self.conv_q.init_state(batch, dtype), self.conv_k.init_state(batch, dtype),
                    self.conv_v.init_state(batch, dtype))
        state = (init_flow_state(batch, H, Dk, Dv) if self.spec.rule == "flow"
                 else jnp.zeros((batch, H, Dk, Dv), jnp.float32))
        return LinearAttentionCache(state, conv, jnp.zeros((batch,), jnp.int32))

    # ------------------------------------------------------------------ forward
    def _check_x(self, x, segment_ids):
        if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected [B, T, d_model={self.d_model}], got shape {getattr(x, 'shape', None)}")
        B, T, _ = x.shape
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids)
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer) or segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids: expected an integer array [B, T] = ({B}, {T}), got "
                                 f"{segment_ids.dtype} {segment_ids.shape}")
            segment_ids = segment_ids.astype(jnp.int32)
        return B, T, segment_ids

    def _positions(self, positions, B, T, cache):
        if positions is None:
            base = jnp.zeros((B, 1), jnp.int32) if cache is None else cache.lengths[:, None]
            return base + jnp.arange(T, dtype=jnp.int32)[None]
        positions = jnp.asarray(positions)
        if not jnp.issubdtype(positions.dtype, jnp.integer) or positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions: expected an integer array [T] or [B, T] = ({B}, {T}), got "
                             f"{positions.dtype} {positions.shape}")
        return jnp.broadcast_to(positions.astype(jnp.int32), (B, T))

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        """``(y [B, T, d], cache)``; see :mod:`attn_jax.nn.mixer`.  ``positions`` is used by
        ``"cosformer"`` only."""
        del deterministic  # no dropout
        if cache is not None and not self.causal:
            raise ValueError(f"cache: this {self.spec.name!r} mixer was built with causal=False (an encoder mixer): "
                             f"it has no decode cache")
        if cache is not None and not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"cache: expected a LinearAttentionCache from init_cache, got {type(cache).__name__}")
        B, T, segment_ids = self._check_x(x, segment_ids)
        positions = self._positions(positions, B, T, cache) if self.spec.features == "cosformer" else None
        params = self._params()
        if cache is None:
            y, _, _ = _forward(self._cfg, params, x, segment_ids, positions, None, None, False)
            return y, None
        y, state, conv_state = _forward(self._cfg, params, x, segment_ids, positions, cache.state, cache.conv_state,
                                        T == 1)
        n_new = T if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        return y, LinearAttentionCache(state, conv_state, cache.lengths + n_new)

    def distillation_loss(self, x, *, positions=None, segment_ids=None):
        """Hedgehog's attention-distillation loss for this layer (``"hedgehog"`` only).

        ``mean_{b,h,i} −Σ_j A_ij log Â_ij`` with the teacher ``A = softmax(q·k/√Dk)`` and the
        Hedgehog weights ``Â_ij = φ_q(q_i)·φ_k(k_j) / Σ_l φ_q(q_i)·φ_k(k_l)`` over the keys
        visible to ``i`` (its document; ``j <= i`` when causal), mean over valid queries; q and
        k are this layer's projections of ``x``; the teacher's gradient is stopped
        (:func:`~attn_jax.linear.feature_maps.hedgehog_distillation_loss`).  Differentiate it
        with respect to the ``hh_*`` parameters only to train the maps.  ``positions`` is
        ignored.
        """
        del positions
        if self.spec.features != "hedgehog":
            raise ValueError(f"distillation_loss: only the 'hedgehog' mechanism has learned feature maps, "
                             f"not {self.spec.name!r}")
        _, _, segment_ids = self._check_x(x, segment_ids)
        return _hedgehog_loss(self._cfg, self._params(), x, segment_ids)


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static part of a forward (hashable: the jit cache key)."""

    spec: Mechanism
    H: int
    K: int
    Dk: int
    Dv: int
    use_conv: bool
    eps: float
    scale: float
    dtype: object
    impl: object
    chunk_size: int
    causal: bool = True
    nu: int = 1
    max_len: int = COSFORMER_MAX_LEN
    lln_alpha_beta: tuple = (0.0, 0.0)
    num_agents: int = AGENT_NUM_AGENTS
    max_segments: int = AGENT_MAX_SEGMENTS


def _log_gates(cfg: _Config, p, x):
    """``(log_g, Δ)``: log forget gates ``[B, T, H]`` / ``[B, T, H, Dk]`` (or None) and Mamba's Δ."""
    decay, (B, T, H) = cfg.spec.decay, (*x.shape[:2], cfg.H)
    if decay is None:
        return None, None
    if decay in ("retnet", "lightning"):
        lam = retnet_decays(H) if decay == "retnet" else lightning_decays(H)
        return jnp.broadcast_to(jnp.log(jnp.asarray(lam, jnp.float32)), (B, T, H)), None
    w = lambda n: p[n].astype(cfg.dtype)  # noqa: E731
    if decay == "gla":
        logits = jnp.einsum("btr,rhk->bthk", jnp.einsum("btd,dr->btr", x, w("w_gate_a")), w("w_gate_b")) + w("b_gate")
        return gla_log_gates(logits, temperature=GLA_TEMPERATURE), None
    dt_logits = jnp.einsum("btd,dh->bth", x, w("w_dt"))
    log_a = ssd_log_decay(dt_logits, p["A_log"], dt_bias=p["dt_bias"])
    delta = jax.nn.softplus(dt_logits.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    return log_a, delta


def _norm_gate(cfg: _Config, p, o, x):
    spec, f32 = cfg.spec, jnp.float32
    of, g = o.astype(f32), None
    if spec.out_gate is not None:
        g = jnp.einsum("btd,dhv->bthv", x, p["w_g"].astype(cfg.dtype)).astype(f32)
        g = jax.nn.silu(g) if spec.out_gate == "swish" else g
    if spec.gate_before_norm and g is not None:
        of, g = of * g, None
    if spec.out_norm == "group":
        mu = jnp.mean(of, -1, keepdims=True)
        var = jnp.mean(jnp.square(of - mu), -1, keepdims=True)
        of = (of - mu) * jax.lax.rsqrt(var + cfg.eps) * p["norm_scale"].astype(f32) + p["norm_bias"].astype(f32)
    elif spec.out_norm == "rms_head":
        of = of * jax.lax.rsqrt(jnp.mean(of * of, -1, keepdims=True) + cfg.eps) * p["norm_scale"].astype(f32)
    elif spec.out_norm in ("srms_all", "rms_all"):
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=(-2, -1), keepdims=True) + cfg.eps)
        if spec.out_norm == "rms_all":
            of = of * p["norm_scale"].astype(f32)
    if g is not None:
        of = of * g
    return of.astype(cfg.dtype)


# ----------------------------------------------------------------------------- layer feature maps
def _rms_normalise(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _cosformer_features(x, positions, max_len: int):
    """``[relu(x) cos(πt/2M), relu(x) sin(πt/2M)]`` with ``t = clip(positions, 0, M − 1)``;
    ``x: [B, T, heads, D]``, ``positions: int [B, T]``; float32 ``[B, T, heads, 2D]``."""
    f = jax.nn.relu(x.astype(jnp.float32))
    t = jnp.clip(positions, 0, max_len - 1).astype(jnp.float32)
    ang = ((math.pi / 2) * t / max_len)[:, :, None, None]
    return jnp.concatenate([f * jnp.cos(ang), f * jnp.sin(ang)], axis=-1)


def _features(cfg: _Config, p, q, k, v, positions):
    """``(φ(q), φ(k), v)`` for the mechanisms whose feature map lives in the layer (float32)."""
    f, f32 = cfg.spec.features, jnp.float32
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    if f == "performer":
        s = cfg.Dk ** -0.25
        w = jax.lax.stop_gradient(p["projection"].astype(f32))
        xq = q * s
        zq = jnp.einsum("bthd,md->bthm", xq, w) - 0.5 * jnp.sum(xq * xq, -1, keepdims=True)
        fq = jnp.exp(zq - jax.lax.stop_gradient(jnp.max(zq, -1, keepdims=True))) / math.sqrt(w.shape[0])
        return fq, performer_features(k * s, w), v
    if f == "dpfp":
        return dpfp(q, nu=cfg.nu), dpfp(k, nu=cfg.nu), v
    if f == "hedgehog":  # per query head maps: expand the kv heads first
        k, v = expand_kv_heads(k, cfg.H), expand_kv_heads(v, cfg.H)
        return hedgehog(q, p["hh_wq"], p["hh_bq"]), hedgehog(k, p["hh_wk"], p["hh_bk"]), v
    if f == "cosformer":
        return _cosformer_features(q, positions, cfg.max_len), _cosformer_features(k, positions, cfg.max_len), v
    if f == "lln":
        alpha, beta = cfg.lln_alpha_beta
        zq = alpha * _rms_normalise(q)
        fq = jnp.exp(zq - jax.lax.stop_gradient(jnp.max(zq, -1, keepdims=True)))
        return fq, jnp.exp(beta * _rms_normalise(k)), v
    raise ValueError(f"features: unknown layer feature map {f!r}")


def _flow(cfg: _Config, q, k, v, state, segment_ids, decode: bool):
    """Flowformer: the full op, a prefill from ``state`` or (``decode``) one :func:`flow_attention_step`."""
    if decode:
        o_t, s = flow_attention_step(q[:, 0], k[:, 0], v[:, 0], state)
        if segment_ids is not None:  # a padding step leaves the state alone and outputs zero
            valid = segment_ids[:, 0] != 0
            s = jax.tree.map(lambda new, old: jnp.where(valid.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                             s, state)
            o_t = jnp.where(valid[:, None, None], o_t, 0.0)
        return o_t[:, None], s
    return flow_attention(q, k, v, causal=cfg.causal, segment_ids=segment_ids, initial_state=state,
                          return_final_state=state is not None, impl=cfg.impl, chunk_size=cfg.chunk_size)


def _op(cfg: _Config, q, k, v, log_g, beta, state, segment_ids, decode: bool):
    """``(o [B, T, H, Dv], new_state)``; ``state`` None = no cache (full forward)."""
    rule = cfg.spec.rule
    if rule == "efficient":
        return efficient_attention(q, k, v, causal=False, segment_ids=segment_ids, impl=cfg.impl), None
    if rule == "agent":
        return agent_attention(q, k, v, num_agents=cfg.num_agents, scale=cfg.scale, segment_ids=segment_ids,
                               max_segments=cfg.max_segments if segment_ids is not None else None,
                               impl=cfg.impl), None
    if rule == "flow":
        return _flow(cfg, q, k, v, state, segment_ids, decode)
    if decode and rule != "normalized":  # T == 1 with a cache: the recurrent step
        g_t = None if log_g is None else log_g[:, 0]
        if rule == "delta":
            o_t, s = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, log_alpha_t=g_t, scale=cfg.scale)
        else:
            o_t, s = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g_t, state, scale=cfg.scale)
        if segment_ids is not None:  # a padding step neither writes nor decays
            valid = segment_ids[:, 0] != 0
            s = jnp.where(valid[:, None, None, None], s, state)
            o_t = jnp.where(valid[:, None, None], o_t, 0.0)
        return o_t[:, None], s
    kw = dict(scale=cfg.scale, initial_state=state, return_final_state=state is not None, segment_ids=segment_ids,
              impl="recurrent" if decode else cfg.impl, chunk_size=cfg.chunk_size, causal=cfg.causal)
    if rule == "normalized":  # decode: impl="recurrent" is recurrent_step on [φ(k), ...], [v, 1]
        fmap = "identity" if cfg.spec.features is not None else cfg.spec.feature_map
        return linear_attention(q, k, v, feature_map=fmap, **kw)
    if rule == "delta":
        if log_g is None:
            return delta_rule(q, k, v, beta, **kw)
        return gated_delta_rule(q, k, v, beta, log_g, **kw)
    return gated_linear_attention(q, k, v, log_g, mechanism=cfg.spec.name, **kw)


def _project(cfg: _Config, p, x, segment_ids, conv_state):
    """``(q, k, v, new_conv_state)``: projections, short convs, activations, L2 norms."""
    spec, dt = cfg.spec, cfg.dtype
    w = lambda n: p[n].astype(dt)  # noqa: E731
    q = jnp.einsum("btd,dhf->bthf", x, w("w_q"))
    k = jnp.einsum("btd,dhf->bthf", x, w("w_k"))
    v = jnp.einsum("btd,dhf->bthf", x, w("w_v"))
    new_conv = None
    if cfg.use_conv:
        cs = (None, None, None) if conv_state is None else conv_state
        (q, cq), (k, ck), (v, cv) = (causal_conv1d(a, w(n), segment_ids=segment_ids, conv_state=c)
                                     for a, n, c in ((q, "conv_q", cs[0]), (k, "conv_k", cs[1]), (v, "conv_v", cs[2])))
        new_conv = (cq, ck, cv)
    qk_act = spec.qk_act if spec.qk_act is not None or not cfg.use_conv else "silu"
    v_act = spec.v_act if spec.v_act is not None or not cfg.use_conv else "silu"
    q, k, v = _act(q, qk_act), _act(k, qk_act), _act(v, v_act)
    if spec.qk_l2:
        q, k = _l2(q), _l2(k)
    return q, k, v, new_conv


@functools.partial(jax.jit, static_argnums=(0, 7))
def _forward(cfg: _Config, p, x, segment_ids, positions, state, conv_state, decode: bool):
    """The whole layer as one pure function (one compiled program even when called eagerly)."""
    spec, dt = cfg.spec, cfg.dtype
    x = x.astype(dt)
    q, k, v, new_conv = _project(cfg, p, x, segment_ids, conv_state)
    log_g, delta = _log_gates(cfg, p, x)
    v_in = v
    if spec.value_dt:  # Mamba-2 writes Δ_t x_t; Δ is per query head, so expand the kv heads
        k = expand_kv_heads(k, cfg.H)
        v_in = (expand_kv_heads(v, cfg.H).astype(jnp.float32) * delta[..., None]).astype(v.dtype)
    if spec.features is not None:
        q, k, v_in = _features(cfg, p, q, k, v_in, positions)
    beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, p["w_beta"].astype(dt)).astype(jnp.float32)) \
        if spec.beta else None
    o, new_state = _op(cfg, q, k, v_in, log_g, beta, state, segment_ids, decode)
    if spec.value_dt:  # the D skip
        o = o + (p["D"].astype(jnp.float32)[:, None] * expand_kv_heads(v, cfg.H)).astype(o.dtype)
    o = _norm_gate(cfg, p, o, x)
    if segment_ids is not None:  # padding outputs zero (norm biases / skips would leak otherwise)
        o = jnp.where((segment_ids != 0)[:, :, None, None], o, 0.0)
    y = jnp.einsum("bthv,hvd->btd", o, p["w_o"].astype(dt))
    return y, new_state, new_conv


@functools.partial(jax.jit, static_argnums=0)
def _hedgehog_loss(cfg: _Config, p, x, segment_ids):
    q, k, _, _ = _project(cfg, p, x.astype(cfg.dtype), segment_ids, None)
    return hedgehog_distillation_loss(q, k, p["hh_wq"], p["hh_wk"], p["hh_bq"], p["hh_bk"], causal=cfg.causal,
                                      segment_ids=segment_ids)


def make_factory(name: str, **defaults):
    """A registry factory ``factory(d_model, num_heads, *, rngs, **kwargs)`` for mechanism ``name``.

    ``SUPPORTED_FEATURES`` claims ``"causal"`` when the mechanism has a causal (decoder) form
    and ``"bidirectional"`` when it accepts ``causal=False`` (encoder); encoder-only mechanisms
    claim only the latter (their factories raise unless given ``causal=False``)."""
    mech = MECHANISMS[name]

    def factory(d_model: int, num_heads: int, *, rngs: nnx.Rngs, **kwargs) -> LinearAttentionMixer:
        return LinearAttentionMixer(d_model, num_heads, mechanism=mech, rngs=rngs, **{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = f"{name}_mixer"
    factory.__doc__ = f"The ``{name!r}`` registry entry: :class:`LinearAttentionMixer` with mechanism {name!r}."
    feats = {"mha", "gqa", "bf16"}
    feats |= {"segments"}
    feats |= {"causal"} if supports_causal(mech) else set()
    feats |= {"bidirectional"} if supports_noncausal(mech) else set()
    feats |= {"dk_ne_dv"} if mech.expand_k != mech.expand_v else set()
    factory.SUPPORTED_FEATURES = frozenset(feats)
    return factory
