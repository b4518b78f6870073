"""Bidirectional Transformer encoder and a sequence classifier on top of it.

The encoder is the stack of Vaswani et al., 2017 (arXiv:1706.03762) with pre-norm blocks
and *non-causal* mixers from :mod:`attn_jax.mixers` (``causal=False`` is passed to the
factory), as in BERT (Devlin et al., 2018, arXiv:1810.04805):

    h_l = h'_l + MLP(Norm(h'_l)),   h'_l = h_{l-1} + Mixer(Norm(h_{l-1}))

Classification pools the final normalised states — ``"cls"``: a learned token prepended to
the sequence (BERT's [CLS]); ``"mean"``: the average over valid (non-padding) tokens — and
applies a linear head: ``logits = pool(h_L) W_c + b_c``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from attn_jax.core import checks
from attn_jax.nn.layers import Embed, check_positive_int, default_kernel_init, make_norm, param
from attn_jax.models.decoder_lm import StackConfig, TransformerBlock, validate_common

__all__ = ["Encoder", "EncoderConfig", "EncoderClassifier", "pool"]


class Encoder(nnx.Module):
    """A stack of bidirectional pre-norm blocks and a final norm; ``x [B, T, d] -> [B, T, d]``."""

    def __init__(self, cfg, mixer_names: Sequence[str], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([TransformerBlock(cfg, n, causal=False, rngs=rngs) for n in mixer_names])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype)

    def __call__(self, x, *, positions=None, segment_ids=None, deterministic: bool = True):
        for block in self.blocks:
            x, _ = block(x, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
        return self.final_norm(x)


def pool(x, valid, kind: str):
    """``"cls"``: ``x[:, 0]``; ``"mean"``: mean over ``valid`` (bool ``[B, T]``) positions."""
    if kind == "cls":
        return x[:, 0]
    w = valid.astype(jnp.float32)[..., None]
    return ((x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)).astype(x.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig(StackConfig):
    """Configuration of :class:`EncoderClassifier` (shared fields: :class:`TransformerConfig`)."""

    vocab_size: int
    num_classes: int
    pooling: str = "cls"

    def validate(self) -> "EncoderConfig":
        check_positive_int("vocab_size", self.vocab_size)
        check_positive_int("num_classes", self.num_classes)
        validate_common(self)
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling: expected 'cls' or 'mean', got {self.pooling!r}")
        self.layer_mixers()
        return self

class EncoderClassifier(nnx.Module):
    """``logits [B, num_classes] = model(tokens [B, T], padding_mask=None)``.

    ``padding_mask``: bool ``[B, T]``, True at real tokens (default all).  Padding keys are
    masked in every mixer (they form segment 0) and excluded from mean pooling.
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config: expected an EncoderConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.cls_token = (param(rngs, nnx.initializers.normal(0.02), (cfg.d_model,), ("embed",), cfg.param_dtype)
                          if cfg.pooling == "cls" else None)
        self.encoder = Encoder(cfg, cfg.layer_mixers(), rngs=rngs)
        self.head_w = param(rngs, default_kernel_init, (cfg.d_model, cfg.num_classes), ("embed", None),
                            cfg.param_dtype)
        self.head_b = param(None, nnx.initializers.zeros, (cfg.num_classes,), (None,), cfg.param_dtype)

    def __call__(self, tokens, *, padding_mask=None, deterministic: bool = True):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int [B, T], got shape {tokens.shape}")
        B, T = tokens.shape
        valid = jnp.ones((B, T), bool) if padding_mask is None else jnp.asarray(padding_mask, bool)
        if valid.shape != (B, T):
            raise ValueError(f"padding_mask: expected shape [B, T]=({B}, {T}), got {valid.shape}")
        checks.check_token_ids("tokens", tokens, self.config.vocab_size, valid=valid)
        x = self.embed(tokens)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (B, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            valid = jnp.concatenate([jnp.ones((B, 1), bool), valid], axis=1)
        seg = None if padding_mask is None else valid.astype(jnp.int32)
        h = self.encoder(x, segment_ids=seg, deterministic=deterministic)
        pooled = pool(h, valid, self.config.pooling)
        dt = self.config.dtype
        return (pooled @ self.head_w[...].astype(dt) + self.head_b[...].astype(dt)).astype(jnp.float32)
