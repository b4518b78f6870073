"""Decoder-only language model with per-layer mixers from the registry (hybrids welcome).

Pre-norm Transformer decoder (Vaswani et al., 2017, arXiv:1706.03762, with the pre-norm
placement of Xiong et al., 2020, arXiv:2002.04745):

    h_0     = E[tokens]                                   (E: [vocab, d_model])
    h'_l    = h_{l-1} + Mixer_l(Norm(h_{l-1}))            (Mixer_l from attn_jax.mixers)
    h_l     = h'_l + MLP_l(Norm(h'_l))
    logits  = Norm(h_L) E^T   (tied)   or   Norm(h_L) W_out

``mixer_pattern`` names the mixer of every layer: one name for all layers, a
comma-separated string or a list (``"gla,gla,softmax"``), repeated to ``num_layers``
when it divides it.  Packed sequences: pass ``segment_ids`` (0 = padding) and
``positions`` (restarting per document).  Decoding: ``cache = model.init_cache(B,
max_len)``; ``logits, cache = model(tokens, cache=cache)`` appends the tokens (see
:mod:`attn_jax.nn.protocol`; with a cache, ``segment_ids`` marks the valid prefix of each
row of a right-padded chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from attn_jax import mixers
from attn_jax.core import checks
from attn_jax.nn.layers import Embed, check_positive_int, default_kernel_init, make_mlp, make_norm, param

__all__ = ["TransformerConfig", "StackConfig", "DecoderConfig", "DecoderBlock", "TransformerBlock", "DecoderLM", "build_mixer", "freeze_kwargs",
           "validate_common", "mlp_width", "parse_mixer_pattern", "check_heads"]


def parse_mixer_pattern(pattern: str | Sequence[str], num_layers: int, field: str = "mixer_pattern") -> list[str]:
    """Per-layer mixer names; every name must be registered (``ValueError`` naming ``field``)."""
    if isinstance(pattern, str):
        names = [p.strip() for p in pattern.split(",")]
    elif isinstance(pattern, (list, tuple)):
        names = list(pattern)
    else:
        raise TypeError(f"{field}: expected a string or a list of mixer names, got {type(pattern).__name__}")
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"{field}: expected non-empty mixer names, got {pattern!r}")
    for n in names:
        try:
            mixers.get(n)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    if num_layers % len(names):
        raise ValueError(f"{field}: {len(names)} mixer names do not tile num_layers={num_layers} "
                         f"(give 1, {num_layers} or a divisor of it)")
    return names * (num_layers // len(names))


def freeze_kwargs(cfg) -> None:
    """Make ``cfg.mixer_kwargs`` (and a list ``mixer_pattern``) hashable in a frozen dataclass."""
    kw = cfg.mixer_kwargs
    if isinstance(kw, Mapping) and all(isinstance(v, Mapping) for v in kw.values()):
        object.__setattr__(cfg, "mixer_kwargs", FrozenDict({k: FrozenDict(v) for k, v in kw.items()}))
    if isinstance(getattr(cfg, "mixer_pattern", None), list):
        object.__setattr__(cfg, "mixer_pattern", tuple(cfg.mixer_pattern))


def mlp_width(cfg) -> int:
    """``mlp_hidden`` or its default: ``4 d`` (gelu), ``8/3 d`` rounded up to a multiple of 8 (swiglu)."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return -(-(8 * cfg.d_model // 3) // 8) * 8


def validate_common(cfg) -> None:
    """Checks shared by every model config; errors name the offending field."""
    for field in ("num_layers", "num_encoder_layers", "num_decoder_layers"):
        if hasattr(cfg, field):
            check_positive_int(field, getattr(cfg, field))
    check_heads(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    if cfg.mlp not in ("swiglu", "gelu"):
        raise ValueError(f"mlp: expected 'swiglu' or 'gelu', got {cfg.mlp!r}")
    if cfg.norm not in ("rms", "layer"):
        raise ValueError(f"norm: expected 'rms' or 'layer', got {cfg.norm!r}")
    if cfg.mlp_hidden is not None:
        check_positive_int("mlp_hidden", cfg.mlp_hidden)
    if not (isinstance(cfg.dropout_rate, (int, float)) and 0.0 <= cfg.dropout_rate < 1.0):
        raise ValueError(f"dropout_rate: expected a float in [0, 1), got {cfg.dropout_rate!r}")
    if not isinstance(cfg.mixer_kwargs, Mapping) or any(not isinstance(v, Mapping) for v in cfg.mixer_kwargs.values()):
        raise TypeError("mixer_kwargs: expected a mapping from mixer name to a dict of keyword arguments")
    for name in cfg.mixer_kwargs:
        try:
            mixers.get(name)
        except ValueError as e:
            raise ValueError(f"mixer_kwargs: {e}") from None


def check_heads(d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None) -> None:
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    if head_dim is None and d_model % num_heads:
        raise ValueError(f"num_heads: {num_heads} heads do not divide d_model={d_model}")
    if head_dim is not None:
        check_positive_int("head_dim", head_dim)
    if num_kv_heads is not None:
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} kv heads do not divide num_heads={num_heads}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Fields every model shares: widths, heads, MLP, norm, dropout, dtypes.

    ``mixer_kwargs`` maps a mixer name to the keyword arguments of its factory (e.g.
    ``{"softmax": {"positional": "alibi"}, "sliding_window": {"window": 64}}``).
    ``mlp_hidden`` defaults to ``4 * d_model`` (gelu) or ``8/3 * d_model`` rounded up to a
    multiple of 8 (swiglu, Shazeer 2020's parameter-matched width).
    """

    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mixer_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    norm: str = "layer"
    norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Hashable fields: the config is static metadata of the module graph (jit cache key).
        freeze_kwargs(self)

    @property
    def hidden(self) -> int:
        return mlp_width(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig(TransformerConfig):
    """A single stack of ``num_layers`` blocks whose mixers follow ``mixer_pattern``."""

    num_layers: int = 2
    mixer_pattern: str | Sequence[str] = "softmax"

    def layer_mixers(self) -> list[str]:
        return parse_mixer_pattern(self.mixer_pattern, self.num_layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig(StackConfig):
    """Configuration of :class:`DecoderLM` (validated when the model is built); see
    :class:`TransformerConfig` for the shared fields."""

    vocab_size: int
    mlp: str = "swiglu"
    norm: str = "rms"
    tie_embeddings: bool = True

    def validate(self) -> "DecoderConfig":
        check_positive_int("vocab_size", self.vocab_size)
        validate_common(self)
        self.layer_mixers()
        return self


def build_mixer(name: str, d_model: int, num_heads: int, *, num_kv_heads=None, head_dim=None, kwargs=None,
                dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(kwargs or {})
    if num_kv_heads is not None:
        kw.setdefault("num_kv_heads", num_kv_heads)
    if head_dim is not None:
        kw.setdefault("head_dim", head_dim)
    kw.setdefault("dtype", dtype)
    kw.setdefault("param_dtype", param_dtype)
    return mixers.get(name)(d_model, num_heads, rngs=rngs, **kw)


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + Mixer(Norm(x))`` then ``x + MLP(Norm(x))``.

    ``cfg`` is any config with the fields of :class:`DecoderConfig` used here (the encoder,
    ViT and seq2seq configs share them); ``causal=False`` builds a bidirectional mixer
    (``causal=False`` is passed to its factory).
    """

    def __init__(self, cfg, mixer_name: str, *, causal: bool = True, rngs: nnx.Rngs):
        d = cfg.d_model
        self.mixer_name = mixer_name
        self.norm_mixer = make_norm(cfg.norm, d, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        kwargs = dict(cfg.mixer_kwargs.get(mixer_name, {}))
        if not causal:
            kwargs.setdefault("causal", False)
        self.mixer = build_mixer(mixer_name, d, cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                 kwargs=kwargs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm_mlp = make_norm(cfg.norm, d, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.mlp = make_mlp(cfg.mlp, d, cfg.hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        h, cache = self.mixer(self.norm_mixer(x), positions=positions, segment_ids=segment_ids, cache=cache,
                              deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        x = x + self.dropout(self.mlp(self.norm_mlp(x)), deterministic=deterministic)
        return x, cache


DecoderBlock = TransformerBlock


class DecoderLM(nnx.Module):
    """Decoder-only LM; ``logits, cache = model(tokens, positions=, segment_ids=, cache=, deterministic=)``.

    ``tokens: int [B, T]``; ``logits: float32 [B, T, vocab]``.  Ids outside ``[0, vocab_size)``
    (except at padding, ``segment_ids == 0``) give meaningless logits; :func:`attn_jax.checked`
    reports them (:mod:`attn_jax.core.checks`).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config: expected a DecoderConfig, got {type(config).__name__}")
        self.config = config.validate()
        cfg = config
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(cfg, name, rngs=rngs) for name in cfg.layer_mixers()])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, default_kernel_init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> tuple:
        """One cache per layer (a tuple pytree)."""
        return tuple(b.mixer.init_cache(batch, max_len, dtype) for b in self.blocks)

    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, deterministic: bool = True):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int [B, T], got shape {tokens.shape}")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache: expected {len(self.blocks)} layer caches (from init_cache), got {len(cache)}")
        checks.check_token_ids("tokens", tokens, self.config.vocab_size,
                               valid=None if segment_ids is None else jnp.asarray(segment_ids) != 0)
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions=positions, segment_ids=segment_ids,
                         cache=None if cache is None else cache[i], deterministic=deterministic)
            new_cache.append(c)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.lm_head[...].astype(x.dtype)
        return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))
