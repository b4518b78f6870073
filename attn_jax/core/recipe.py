"""Layer recipes: typed, frozen descriptions of a linear-attention layer, as data.

A mechanism file in :mod:`attn_jax.linear` declares its layer with a :class:`LinearLayer`
(see :mod:`attn_jax.core.declaration`); :mod:`attn_jax.nn.components` turns each spec below into
the NNX module that owns its parameters, and :class:`attn_jax.nn.linear_mixers.LinearAttentionMixer`
composes them in one skeleton::

    q, k, v = x W_q, x W_k, x W_v              Projections (+ ShortConv, activations, L2)
    log_g   = Decay(x)                         FixedDecay | LowRankGate | DeltaGate | None
    φ(q), φ(k) = FeatureMap(q, k, positions)   RandomFeatureMap | DPFPMap | HedgehogMap | ...
    β       = WriteStrength(x)                 (delta rule)
    o       = Rule(q, k, v, log_g, β)          GatedRule | NormalizedRule | DeltaRule | ...
    y       = OutputNorm(o, OutputGate(x)) W_o

The specs live here, below the families, so an op file can describe its layer without
importing :mod:`attn_jax.nn` (which imports the op files).  A spec's ``OPTIONS`` are the
constructor keywords of the mixer it takes (e.g. ``num_features=`` for
:class:`RandomFeatureMap`); a keyword no component of a recipe takes is refused by the mixer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

__all__ = ["Projections", "FixedDecay", "LowRankGate", "DeltaGate", "WriteStrength", "OutputGate", "OutputNorm",
           "RandomFeatureMap", "DPFPMap", "HedgehogMap", "CosformerMap", "LogNormalMap", "GatedRule",
           "NormalizedRule", "DeltaRule", "FlowRule", "EfficientRule", "AgentRule", "LinearLayer", "OUTPUT_NORMS"]

_ACTIVATIONS = (None, "identity", "silu")


def _frozen(cls):
    return dataclasses.dataclass(frozen=True)(cls)


@_frozen
class Projections:
    """q/k/v projections: head dims ``d_model * expand / H`` (``key_dim`` fixes ``Dk``),
    activations after the optional short convolution (None: SiLU with a conv, else identity),
    L2-normalised q/k, the op's scale (``"rsqrt"``: ``Dk^-1/2``; ``"one"``)."""

    expand_k: float = 1.0
    expand_v: float = 1.0
    key_dim: int | None = None
    qk_activation: str | None = None
    v_activation: str | None = None
    qk_l2: bool = False
    short_conv: bool = False
    scale: str = "rsqrt"

    def __post_init__(self):
        for name in ("qk_activation", "v_activation"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ValueError(f"{name}: expected one of {_ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.scale not in ("rsqrt", "one"):
            raise ValueError(f"scale: expected 'rsqrt' or 'one', got {self.scale!r}")


# ----------------------------------------------------------------------------- decays (log forget gates)
@_frozen
class FixedDecay:
    """Fixed per-head decays ``λ_h = decays(H)`` in (0, 1) (RetNet, Lightning): ``log_g = log λ``."""

    decays: Callable


@_frozen
class LowRankGate:
    """GLA's gate ``α = sigmoid(x W_1 W_2 + b)^{1/τ}``: rank ``rank`` projection, ``τ = temperature``."""

    rank: int = 16
    temperature: float = 16.0


@_frozen
class DeltaGate:
    """Mamba-2's per-head decay ``log a = −exp(A_log) softplus(x W_Δ + dt_bias)``;
    ``scale_values``: the value is written as ``Δ v`` and the ``D`` skip ``y += D v`` is added (SSD)."""

    scale_values: bool = False


@_frozen
class WriteStrength:
    """The delta rule's per-head write strength ``β = sigmoid(x W_β)``."""


# ----------------------------------------------------------------------------- output
@_frozen
class OutputGate:
    """``g = act(x W_g)``; ``activation``: ``"swish"`` or ``"linear"``."""

    activation: str = "swish"

    def __post_init__(self):
        if self.activation not in ("swish", "linear"):
            raise ValueError(f"activation: expected 'swish' or 'linear', got {self.activation!r}")


OUTPUT_NORMS = ("group", "rms_head", "rms_all", "srms_all")


@_frozen
class OutputNorm:
    """Output normalisation: ``"group"`` (per-head mean/variance, affine), ``"rms_head"`` (per-head
    RMSNorm, scale shared by heads), ``"rms_all"`` (RMSNorm over all heads' channels),
    ``"srms_all"`` (parameter-free).  ``gated``: ``norm(o ⊙ g)`` (Mamba-2) instead of ``norm(o) ⊙ g``."""

    kind: str
    gated: bool = False

    def __post_init__(self):
        if self.kind not in OUTPUT_NORMS:
            raise ValueError(f"kind: expected one of {OUTPUT_NORMS}, got {self.kind!r}")


# ----------------------------------------------------------------------------- feature maps in the layer
@_frozen
class RandomFeatureMap:
    """Performer FAVOR+ with a non-trainable random projection of ``num_features`` rows (None: ``2 Dk``)."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("num_features",)
    num_features: int | None = None


@_frozen
class DPFPMap:
    """DPFP-ν on q and k (``D' = 2 Dk ν``)."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("nu",)
    nu: int = 1


@_frozen
class HedgehogMap:
    """Hedgehog's learned per-head maps (``F = feature_dim``, None: ``Dk``; ``D' = 2F``)."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("feature_dim",)
    feature_dim: int | None = None


@_frozen
class CosformerMap:
    """cosFormer's ReLU features re-weighted by ``cos / sin(πt / 2M)``, ``M = max_len``."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("max_len",)
    max_len: int = 2048


@_frozen
class LogNormalMap:
    """LLN's ``exp(α q̂)``, ``exp(β k̂)`` on RMS-normalised q, k, with the unit-variance moment match."""


# ----------------------------------------------------------------------------- rules (the op)
@_frozen
class GatedRule:
    """``S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t`` (:func:`attn_jax.linear.gated.gated_linear_attention`)."""


@_frozen
class NormalizedRule:
    """Normalised linear attention with the op's feature map ``feature_map`` (``"identity"`` when
    the layer computes the features); the state carries the normaliser column."""

    feature_map: str = "identity"


@_frozen
class DeltaRule:
    """The (gated) delta rule, ``β`` from a :class:`WriteStrength`."""


@_frozen
class FlowRule:
    """Flowformer's Flow-Attention (state: a ``FlowState``)."""


@_frozen
class EfficientRule:
    """Efficient Attention (non-causal only)."""


@_frozen
class AgentRule:
    """Agent attention (non-causal only): ``num_agents`` agents per document, at most
    ``max_segments`` documents per packed row."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("num_agents", "max_segments")
    num_agents: int = 16
    max_segments: int = 8


_RULES = (GatedRule, NormalizedRule, DeltaRule, FlowRule, EfficientRule, AgentRule)
_DECAYS = (FixedDecay, LowRankGate, DeltaGate)
_FEATURES = (RandomFeatureMap, DPFPMap, HedgehogMap, CosformerMap, LogNormalMap)


@_frozen
class LinearLayer:
    """A linear-attention layer as components (see the module docstring)."""

    rule: object
    projections: Projections = Projections()
    decay: object = None
    write_strength: WriteStrength | None = None
    features: object = None
    output_gate: OutputGate | None = None
    output_norm: OutputNorm | None = None

    def __post_init__(self):
        def check(name, value, kinds, optional=True):
            if (value is None and optional) or isinstance(value, kinds):
                return
            raise TypeError(f"{name}: expected {' | '.join(k.__name__ for k in kinds)}"
                            f"{' | None' if optional else ''}, got {type(value).__name__}")

        check("rule", self.rule, _RULES, optional=False)
        check("projections", self.projections, (Projections,), optional=False)
        check("decay", self.decay, _DECAYS)
        check("write_strength", self.write_strength, (WriteStrength,))
        check("features", self.features, _FEATURES)
        check("output_gate", self.output_gate, (OutputGate,))
        check("output_norm", self.output_norm, (OutputNorm,))
        if isinstance(self.rule, DeltaRule) != (self.write_strength is not None):
            raise ValueError("write_strength: the delta rule needs a WriteStrength, and only the delta rule takes one")

    def components(self) -> tuple:
        """The non-empty component specs, in skeleton order."""
        return tuple(c for c in (self.projections, self.decay, self.features, self.write_strength, self.rule,
                                 self.output_gate, self.output_norm) if c is not None)

    def options(self) -> dict[str, object]:
        """Constructor option -> the component spec that takes it."""
        return {o: c for c in self.components() for o in getattr(c, "OPTIONS", ())}
