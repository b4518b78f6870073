"""Linear / recurrent attention mixers: one skeleton, composed of typed components.

:class:`LinearAttentionMixer` wraps the pure ops of :mod:`attn_jax.linear` in the token-mixer
protocol (:mod:`attn_jax.nn.protocol`).  A mechanism's layer is declared, as data, in the
mechanism's own file (``DECLARATION.layer``, a :class:`attn_jax.core.recipe.LinearLayer`); the
mixer builds one NNX module per component (:mod:`attn_jax.nn.components`, each owning its
parameters) and runs them in one skeleton, top to bottom::

    q = x W_q  [B, T, H, Dk],   k = x W_k  [B, T, K, Dk],   v = x W_v  [B, T, K, Dv]   (GQA: H % K == 0)
    q, k, v <- ShortConv (optional, per channel, causal, width 4), activations, L2 norms
    log_g, Δ = decay(x)                         FixedDecay | LowRankGate | DeltaGate   (or none)
    v <- Δ v                                    (DeltaGate with scale_values: Mamba-2)
    φ(q), φ(k) = features(q, k, positions)      RandomFeatureMap | DPFPMap | HedgehogMap | ...
    β = write_strength(x)                       (delta rule)
    o, state = rule(q, k, v, log_g, β, state)   GatedOp | NormalizedOp | DeltaOp | FlowOp | ...
    o <- o + D v                                (Mamba-2's skip)
    y = OutputNorm(o, OutputGate(x)) W_o        (W_o: [H, Dv, d]; padding outputs zero)

Defaults follow the papers / fla (see each declaration: ``python -m attn_jax.feature_matrix
--list``, and the mechanism's module docstring): head dims ``d_model / H`` (``expand_k`` /
``expand_v`` / ``key_dim`` of the recipe's projections); short convolutions as the recipe says
(``short_conv=`` overrides; with a conv, q/k/v get SiLU unless the recipe says otherwise).

Positions are used only by a feature map that asks for them (cosFormer's re-weighting); the
other mechanisms are position-aware through their decays and the causal short convolution (or
not at all: pure feature maps are permutation-equivariant over the visible keys); a
``positions`` argument is accepted and ignored.

Non-causal (encoder) form: ``causal=False`` (what :class:`attn_jax.models.Encoder` and
``TransformerBlock(causal=False)`` pass to a factory) sums over the whole document of each
token instead of its prefix (the ops' ``causal=False``); it exists for the declarations whose
``directions`` include ``"bidirectional"`` (with a short convolution the convolution stays
causal); the decayed and delta-rule mechanisms raise ``ValueError`` at construction (a decay
needs an order).  A non-causal mixer has no cache (``init_cache`` and ``cache=`` raise).
Encoder-only mechanisms (``directions=("bidirectional",)``) raise ``ValueError`` naming the
mechanism when constructed with the default ``causal=True``, as a decoder does.

Decoding: the cache is a :class:`LinearAttentionCache` (bounded: ``max_len`` is ignored).  A
``T == 1`` step uses the recurrent step (:func:`~attn_jax.linear.gated.recurrent_step` /
:func:`~attn_jax.linear.delta_rule.delta_rule_step`; ``linear_attention(impl="recurrent")``,
i.e. ``recurrent_step`` on ``[v, 1]``, for the normalised mechanisms, whose state is
``[B, H, D', Dv + 1]`` with ``D'`` the feature dimension); a ``T > 1`` prefill runs the chunk form
from ``initial_state = cache.state`` with ``return_final_state=True``; ``segment_ids`` marks the
valid tokens of each row (padding is transparent in the ops and the short conv, outputs zero,
and ``lengths`` advance by each row's valid count).

The layer body is one jitted pure function of the module's state (nested inside a caller's
``jit`` it is inlined; called eagerly it is one compiled program instead of hundreds of
op-by-op dispatches).  Parameters are created by the components' initializers (drawn in
float32, then cast to ``param_dtype``)
(``kernel_init=`` for the q/k/v/o projections, ``initializers={component: {argument: init}}``
for the others, e.g. ``initializers={"decay": {"dt_bias_init": ...}}``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.core import declaration
from attn_jax.core import recipe
from attn_jax.core.numerics import l2_normalize
from attn_jax.linear.common import expand_kv_heads
from attn_jax.nn import components
from attn_jax.nn.components import RandomFeatures, float32_draw, lecun_init, param
from attn_jax.nn.layers import check_mixer_input, check_positive_int, mixer_positions
from attn_jax.nn.short_conv import ShortConv

__all__ = ["LinearAttentionMixer", "LinearAttentionCache", "RandomFeatures", "make_factory", "linear_declarations",
           "supports_causal", "supports_noncausal"]

declaration.load("attn_jax.linear")


def linear_declarations() -> dict[str, declaration.Declaration]:
    """Every declaration whose layer is a typed :class:`~attn_jax.core.recipe.LinearLayer`, by name."""
    return {d.name: d for d in declaration.declarations() if isinstance(d.layer, recipe.LinearLayer)}


def supports_causal(decl: declaration.Declaration) -> bool:
    """Whether the mechanism has a causal (decoder) form."""
    return decl.causal


def supports_noncausal(decl: declaration.Declaration) -> bool:
    """Whether the mechanism has a non-causal (encoder) form."""
    return decl.bidirectional


@dataclasses.dataclass(frozen=True)
class LinearAttentionCache:
    """Decode cache: ``state`` float32 ``[B, H, Dk, Dv]`` (``[B, H, D', Dv + 1]`` for the
    normalised mechanisms: feature dimension ``D'``, normaliser column last), ``conv_state`` a
    ``(q, k, v)`` tuple of ``[B, w-1, heads, dim]`` (or None without short convs), ``lengths``
    int32 ``[B]`` tokens seen per row.  Flowformer keeps a
    :class:`~attn_jax.linear.flowformer.FlowState` pytree as its ``state``."""

    state: jax.Array
    conv_state: tuple | None
    lengths: jax.Array


jax.tree_util.register_dataclass(LinearAttentionCache, data_fields=["state", "conv_state", "lengths"],
                                 meta_fields=[])


def _act(x, kind):
    return jax.nn.silu(x) if kind == "silu" else x


_OPTIONS = ("num_features", "nu", "feature_dim", "max_len", "num_agents", "max_segments")
_COMPONENTS = ("decay", "features", "write_strength", "rule", "output_gate", "output_norm")


def _resolve(mechanism) -> declaration.Declaration:
    table = linear_declarations()
    if isinstance(mechanism, str):
        if mechanism not in table:
            raise ValueError(f"mechanism: expected one of {sorted(table)}, got {mechanism!r}")
        return table[mechanism]
    if not isinstance(mechanism, declaration.Declaration) or not isinstance(mechanism.layer, recipe.LinearLayer):
        raise TypeError(f"mechanism: expected a name or a Declaration with a LinearLayer recipe, got "
                        f"{type(mechanism).__name__}")
    return mechanism


class LinearAttentionMixer(nnx.Module):
    """Linear / recurrent attention mixer (see the module docstring).

    Args:
      d_model, num_heads: width and query heads ``H``.
      mechanism: the name of a declaration with a :class:`~attn_jax.core.recipe.LinearLayer`
        layer, or such a :class:`~attn_jax.core.declaration.Declaration`.
      num_kv_heads: key/value heads ``K`` (GQA; default ``H``).
      head_dim: ``Dk`` (default ``d_model * expand_k / H``); value_head_dim: ``Dv`` (default
        ``d_model * expand_v / H``).
      short_conv: q/k/v short convolutions (default per recipe); conv_size: their width.
      output_gate: False drops the output gate (default: the recipe's).
      causal: True (decoder, default) or False (encoder: sums over the whole document; only
        for mechanisms declaring ``"bidirectional"``; no cache).  Encoder-only mechanisms
        require ``causal=False``.
      num_features: :class:`~attn_jax.core.recipe.RandomFeatureMap`'s ``m`` (default ``2 Dk``).
      nu: :class:`~attn_jax.core.recipe.DPFPMap`'s ν (default 1).  feature_dim:
        :class:`~attn_jax.core.recipe.HedgehogMap`'s ``F`` (default ``Dk``).
      max_len: :class:`~attn_jax.core.recipe.CosformerMap`'s ``M`` (default 2048; positions are
        clipped to ``M − 1``).
      num_agents, max_segments: :class:`~attn_jax.core.recipe.AgentRule`'s agents per document
        (default 16) and documents per packed row (default 8; a row with more outputs NaN).
      eps: the output norm's epsilon.
      kernel_init: initializer of ``w_q``, ``w_k``, ``w_v``, ``w_o`` (default LeCun truncated
        normal over the fan-in); conv_init: of the short-conv kernels (default PyTorch's
        ``U(±1/sqrt(w))``); initializers: ``{component: {argument: init}}`` for the components
        (``"decay"``, ``"features"``, ``"write_strength"``, ``"output_gate"``, ``"output_norm"``).
      dtype / param_dtype: compute / storage dtypes.  impl, chunk_size: for the ops.

    Parameters carry logical axes: ``w_q [d, H, Dk]`` ("embed", "heads", "head_dim"),
    ``w_k``/``w_v [d, K, D]`` ("embed", "kv_heads", "head_dim"), ``w_o [H, Dv, d]``, the
    components' as documented in :mod:`attn_jax.nn.components`.
    """

    def __init__(self, d_model: int, num_heads: int, *, mechanism, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_head_dim: int | None = None, short_conv: bool | None = None,
                 conv_size: int = 4, output_gate: bool | None = None, causal: bool = True,
                 num_features: int | None = None, nu: int | None = None, feature_dim: int | None = None,
                 max_len: int | None = None, num_agents: int | None = None,
                 max_segments: int | None = None, eps: float = 1e-5, kernel_init=None, conv_init=None,
                 initializers: dict | None = None, dtype=jnp.float32, param_dtype=jnp.float32, impl="auto",
                 chunk_size: int = 64, rngs: nnx.Rngs):
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        decl = _resolve(mechanism)
        layer: recipe.LinearLayer = decl.layer
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if causal and not decl.causal:
            raise ValueError(f"causal: the {decl.name!r} mixer is non-causal only (an encoder mixer: its "
                             f"normalisation or agents summarise the whole sequence); build it with causal=False, "
                             f"as attn_jax.models.Encoder does — it cannot be a decoder (causal) mixer")
        if not causal and not decl.bidirectional:
            why = "decay" if layer.decay is not None else f"{type(layer.rule).__name__} rule"
            raise ValueError(f"causal: the {decl.name!r} mixer has no non-causal form (its {why} needs a token "
                             f"order); causal=False is available for "
                             f"{sorted(n for n, d in linear_declarations().items() if d.bidirectional)}")
        given = dict(num_features=num_features, nu=nu, feature_dim=feature_dim, max_len=max_len,
                     num_agents=num_agents, max_segments=max_segments)
        takes = layer.options()
        options = {}
        for name in _OPTIONS:
            if given[name] is None:
                continue
            if name not in takes:
                users = sorted(n for n, d in linear_declarations().items() if name in d.layer.options())
                raise ValueError(f"{name}: only used by the {', '.join(map(repr, users))} mechanism(s), "
                                 f"not by {decl.name!r}")
            options[name] = check_positive_int(name, given[name])
        initializers = dict(initializers or {})
        unknown = set(initializers) - set(_COMPONENTS)
        if unknown:
            raise ValueError(f"initializers: expected keys among {_COMPONENTS}, got {sorted(unknown)}")
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} kv heads do not divide num_heads={num_heads}")
        proj = layer.projections

        def _dim(name, given, expand):
            if given is not None:
                return check_positive_int(name, given)
            total = int(round(d_model * expand))
            if total % num_heads or total == 0:
                raise ValueError(f"{name}: d_model * {expand} = {total} is not divisible by num_heads={num_heads} "
                                 f"(pass {name} explicitly)")
            return total // num_heads

        H, K, d = num_heads, num_kv_heads, d_model
        if head_dim is None and proj.key_dim is not None:
            head_dim = proj.key_dim
        Dk, Dv = _dim("head_dim", head_dim, proj.expand_k), _dim("value_head_dim", value_head_dim, proj.expand_v)
        check_positive_int("conv_size", conv_size)
        self.decl, self.d_model, self.num_heads, self.num_kv_heads = decl, d, H, K
        self.head_dim, self.value_head_dim, self.causal = Dk, Dv, causal
        self.eps, self.dtype, self.chunk_size = float(eps), dtype, int(chunk_size)
        self.impl = tuple(impl) if isinstance(impl, list) else impl
        self.scale = Dk ** -0.5 if proj.scale == "rsqrt" else 1.0
        use_conv = proj.short_conv if short_conv is None else bool(short_conv)
        self.use_conv = use_conv
        self.qk_activation = proj.qk_activation or ("silu" if use_conv else "identity")
        self.v_activation = proj.v_activation or ("silu" if use_conv else "identity")
        self.qk_l2 = proj.qk_l2

        # the skeleton's own parameters: q/k/v/o projections (LeCun truncated normal over the fan-in)
        kin = kernel_init or lecun_init(0, (1, 2))
        self.w_q = param(rngs, kin, (d, H, Dk), ("embed", "heads", "head_dim"), param_dtype)
        self.w_k = param(rngs, kin, (d, K, Dk), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.w_v = param(rngs, kin, (d, K, Dv), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.w_o = param(rngs, kernel_init or lecun_init((0, 1), 2), (H, Dv, d), ("heads", "head_dim", "embed"),
                         param_dtype)
        lim = conv_size ** -0.5   # PyTorch's Conv1d default: U(±1/sqrt(fan_in)), fan_in = conv_size (depthwise)
        conv_init = float32_draw(conv_init or (lambda key, shape, dt: jax.random.uniform(key, shape, dt, -lim, lim)))
        conv = functools.partial(ShortConv, kernel_size=conv_size, activation=None, dtype=dtype,
                                 param_dtype=param_dtype, kernel_init=conv_init, rngs=rngs)
        self.conv_q = conv((H, Dk), axes=("heads", "head_dim")) if use_conv else None
        self.conv_k = conv((K, Dk), axes=("kv_heads", "head_dim")) if use_conv else None
        self.conv_v = conv((K, Dv), axes=("kv_heads", "head_dim")) if use_conv else None

        def build(attr, spec):
            if spec is None:
                return None
            return components.build(
                spec, name=decl.name, d_model=d, num_heads=H, head_dim=Dk, value_head_dim=Dv, options=options,
                op_settings=dict(scale=self.scale, causal=causal, impl=self.impl, chunk_size=self.chunk_size),
                eps=self.eps, dtype=dtype, param_dtype=param_dtype, inits=initializers.get(attr, {}), rngs=rngs)

        self.decay = build("decay", layer.decay)
        self.features = build("features", layer.features)
        self.write_strength = build("write_strength", layer.write_strength)
        self.rule = build("rule", layer.rule)
        self.output_gate = build("output_gate", None if output_gate is False else layer.output_gate)
        self.output_norm = build("output_norm", layer.output_norm)
        # D', the state's key dimension of the normalised rule (None otherwise)
        self.feature_dim = None if not isinstance(self.rule, components.NormalizedOp) else (
            self.features.dim if self.features is not None else self.rule.feature_dim(Dk))

    def redraw(self, key) -> None:
        """Draw a new random projection (mechanisms with random features only, e.g. ``"performer"``)."""
        if not isinstance(self.features, components.RandomFeatureMap):
            raise ValueError(f"redraw: only a mechanism with random features has a projection to redraw, not "
                             f"{self.decl.name!r}")
        self.features.redraw(key)

    # ------------------------------------------------------------------ cache
    def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32) -> LinearAttentionCache:
        """Empty cache (``max_len`` is ignored: the state is bounded); ``dtype`` is the conv state's."""
        if not self.causal:
            raise ValueError(f"init_cache: this {self.decl.name!r} mixer was built with causal=False (an encoder "
                             f"mixer): it has no decode cache")
        Dk = self.head_dim if self.feature_dim is None else self.feature_dim
        conv = None
        if self.use_conv:
            conv = (self.conv_q.init_state(batch, dtype), self.conv_k.init_state(batch, dtype),
                    self.conv_v.init_state(batch, dtype))
        state = self.rule.init_state(batch, self.num_heads, Dk, self.value_head_dim)
        return LinearAttentionCache(state, conv, jnp.zeros((batch,), jnp.int32))

    # ------------------------------------------------------------------ forward
    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        """``(y [B, T, d], cache)``; see :mod:`attn_jax.nn.protocol`.  ``positions`` is used only by a
        feature map that asks for them (cosFormer)."""
        del deterministic  # no dropout
        if cache is not None and not self.causal:
            raise ValueError(f"cache: this {self.decl.name!r} mixer was built with causal=False (an encoder mixer): "
                             f"it has no decode cache")
        if cache is not None and not isinstance(cache, LinearAttentionCache):
            raise TypeError(f"cache: expected a LinearAttentionCache from init_cache, got {type(cache).__name__}")
        B, T, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        uses_positions = self.features is not None and self.features.uses_positions
        positions = jnp.broadcast_to(mixer_positions(positions, B, T, cache), (B, T)) if uses_positions else None
        graphdef, state = nnx.split(self)
        if cache is None:
            y, _, _ = _forward(graphdef, state, x, segment_ids, positions, None, None, False)
            return y, None
        y, new_state, conv_state = _forward(graphdef, state, x, segment_ids, positions, cache.state,
                                            cache.conv_state, T == 1)
        n_new = T if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        return y, LinearAttentionCache(new_state, conv_state, cache.lengths + n_new)

    def _project(self, x, segment_ids, conv_state):
        """``(q, k, v, new_conv_state)``: projections, short convs, activations, L2 norms."""
        dt = self.dtype
        q = jnp.einsum("btd,dhf->bthf", x, self.w_q[...].astype(dt))
        k = jnp.einsum("btd,dhf->bthf", x, self.w_k[...].astype(dt))
        v = jnp.einsum("btd,dhf->bthf", x, self.w_v[...].astype(dt))
        new_conv = None
        if self.use_conv:
            cq, ck, cv = (None, None, None) if conv_state is None else conv_state
            (q, cq), (k, ck), (v, cv) = (self.conv_q(q, segment_ids=segment_ids, conv_state=cq),
                                         self.conv_k(k, segment_ids=segment_ids, conv_state=ck),
                                         self.conv_v(v, segment_ids=segment_ids, conv_state=cv))
            new_conv = (cq, ck, cv)
        q, k, v = _act(q, self.qk_activation), _act(k, self.qk_activation), _act(v, self.v_activation)
        if self.qk_l2:
            q, k = l2_normalize(q), l2_normalize(k)
        return q, k, v, new_conv

    def _body(self, x, segment_ids, positions, state, conv_state, decode: bool):
        """The skeleton (module docstring), top to bottom."""
        x = x.astype(self.dtype)
        q, k, v, new_conv = self._project(x, segment_ids, conv_state)
        log_g, delta = (None, None) if self.decay is None else self.decay(x)
        v_in = v
        if delta is not None and self.decay.scale_values:     # Mamba-2 writes Δ_t x_t (Δ per query head)
            k, v_in = expand_kv_heads(k, self.num_heads), self.decay.scale(v, delta, self.num_heads)
        if self.features is not None:                         # feature maps run in float32
            f32 = jnp.float32
            q, k, v_in = self.features(q.astype(f32), k.astype(f32), v_in.astype(f32), positions)
        beta = None if self.write_strength is None else self.write_strength(x)
        o, new_state = self.rule(q, k, v_in, log_g, beta, state, segment_ids, decode)
        if delta is not None and self.decay.scale_values:     # the D skip
            o = self.decay.skip(o, v, self.num_heads)
        of = o.astype(jnp.float32)
        g = None if self.output_gate is None else self.output_gate(x)
        if self.output_norm is not None:
            of = self.output_norm(of, g)
        elif g is not None:
            of = of * g
        o = of.astype(self.dtype)
        if segment_ids is not None:  # padding outputs zero (norm biases / skips would leak otherwise)
            o = jnp.where((segment_ids != 0)[:, :, None, None], o, 0.0)
        y = jnp.einsum("bthv,hvd->btd", o, self.w_o[...].astype(self.dtype))
        return y, new_state, new_conv

    def distillation_loss(self, x, *, positions=None, segment_ids=None):
        """Hedgehog's attention-distillation loss for this layer (learned feature maps only).

        ``mean_{b,h,i} −Σ_j A_ij log Â_ij`` with the teacher ``A = softmax(q·k/√Dk)`` and the
        Hedgehog weights ``Â_ij = φ_q(q_i)·φ_k(k_j) / Σ_l φ_q(q_i)·φ_k(k_l)`` over the keys
        visible to ``i`` (its document; ``j <= i`` when causal), mean over valid queries; q and
        k are this layer's projections of ``x``; the teacher's gradient is stopped
        (:func:`~attn_jax.linear.feature_maps.hedgehog_distillation_loss`).  Differentiate it
        with respect to the ``hh_*`` parameters only to train the maps.  ``positions`` is
        ignored.
        """
        del positions
        if not isinstance(self.features, components.HedgehogMap):
            raise ValueError(f"distillation_loss: only a mechanism with learned feature maps (e.g. 'hedgehog') has "
                             f"one, not {self.decl.name!r}")
        _, _, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        graphdef, state = nnx.split(self)
        return _hedgehog_loss(graphdef, state, x, segment_ids)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _forward(graphdef, state, x, segment_ids, positions, cache_state, conv_state, decode: bool):
    """The whole layer as one pure function (one compiled program even when called eagerly)."""
    return nnx.merge(graphdef, state)._body(x, segment_ids, positions, cache_state, conv_state, decode)


@functools.partial(jax.jit, static_argnums=0)
def _hedgehog_loss(graphdef, state, x, segment_ids):
    m = nnx.merge(graphdef, state)
    q, k, _, _ = m._project(x.astype(m.dtype), segment_ids, None)
    return m.features.distillation_loss(q, k, causal=m.causal, segment_ids=segment_ids)


def make_factory(name: str, **defaults):
    """A registry factory ``factory(d_model, num_heads, *, rngs, **kwargs)`` for the declaration ``name``.

    ``SUPPORTED_FEATURES`` claims ``"causal"`` / ``"bidirectional"`` as the declaration's
    ``directions`` say (encoder-only mechanisms claim only the latter; their factories raise
    unless given ``causal=False``), ``"dk_ne_dv"`` when the recipe's key and value widths differ."""
    decl = _resolve(name)
    proj = decl.layer.projections

    def factory(d_model: int, num_heads: int, *, rngs: nnx.Rngs, **kwargs) -> LinearAttentionMixer:
        return LinearAttentionMixer(d_model, num_heads, mechanism=decl, rngs=rngs, **{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = f"{decl.name}_mixer"
    factory.__doc__ = f"The ``{decl.name!r}`` registry entry: :class:`LinearAttentionMixer` with mechanism {decl.name!r}."
    feats = {"mha", "gqa", "bf16", "segments"}
    feats |= {"causal"} if decl.causal else set()
    feats |= {"bidirectional"} if decl.bidirectional else set()
    feats |= {"dk_ne_dv"} if proj.expand_k != proj.expand_v else set()
    factory.SUPPORTED_FEATURES = frozenset(feats)
    return factory
