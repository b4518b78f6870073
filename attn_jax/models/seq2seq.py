"""Encoder-decoder Transformer with cross-attention (Vaswani et al., 2017, arXiv:1706.03762).

    m        = Encoder(E_src[src])                               (bidirectional mixers)
    h'_l     = h_{l-1} + SelfMixer_l(Norm(h_{l-1}))              (causal, from attn_jax.mixers)
    h''_l    = h'_l + CrossAttention_l(Norm(h'_l), m)            (q from the decoder, k/v from m)
    h_l      = h''_l + MLP(Norm(h''_l))
    logits   = Norm(h_L) E_tgt^T  (tied)  or  Norm(h_L) W_out

Decoding: ``memory = model.encode(src)``, ``cache = model.init_cache(memory, src_padding_mask,
max_len)`` (decoder self-attention caches plus each layer's projected memory, computed
once), then ``logits, cache = model.decode(tgt_chunk, cache=cache)``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from attn_jax.core import checks
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import Embed, check_positive_int, default_kernel_init, make_mlp, make_norm, param
from attn_jax.models.decoder_lm import TransformerConfig, build_mixer, parse_mixer_pattern, validate_common
from attn_jax.models.encoder import Encoder

__all__ = ["Seq2SeqConfig", "Seq2Seq", "CrossDecoderBlock"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig(TransformerConfig):
    """Configuration of :class:`Seq2Seq` (``tgt_vocab_size`` defaults to ``src_vocab_size``;
    shared fields: :class:`TransformerConfig`)."""

    src_vocab_size: int
    tgt_vocab_size: int | None = None
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    encoder_mixer_pattern: str | Sequence[str] = "softmax"
    decoder_mixer_pattern: str | Sequence[str] = "softmax"
    tie_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        for f in ("encoder_mixer_pattern", "decoder_mixer_pattern"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))

    @property
    def target_vocab(self) -> int:
        return self.src_vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    def validate(self) -> "Seq2SeqConfig":
        check_positive_int("src_vocab_size", self.src_vocab_size)
        if self.tgt_vocab_size is not None:
            check_positive_int("tgt_vocab_size", self.tgt_vocab_size)
        validate_common(self)
        parse_mixer_pattern(self.encoder_mixer_pattern, self.num_encoder_layers, "encoder_mixer_pattern")
        parse_mixer_pattern(self.decoder_mixer_pattern, self.num_decoder_layers, "decoder_mixer_pattern")
        return self

class CrossDecoderBlock(nnx.Module):
    """Causal self-mixer, cross-attention to the memory, MLP; each pre-norm with a residual."""

    def __init__(self, cfg: Seq2SeqConfig, mixer_name: str, *, rngs: nnx.Rngs):
        d, nrm = cfg.d_model, dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm_self = make_norm(cfg.norm, d, **nrm)
        self.self_mixer = build_mixer(mixer_name, d, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                      head_dim=cfg.head_dim, kwargs=cfg.mixer_kwargs.get(mixer_name),
                                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm_cross = make_norm(cfg.norm, d, **nrm)
        self.cross = MultiHeadAttention(d, cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                        cross=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm_mlp = make_norm(cfg.norm, d, **nrm)
        self.mlp = make_mlp(cfg.mlp, d, cfg.hidden, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x, *, memory=None, memory_segment_ids=None, positions=None, segment_ids=None,
                 self_cache=None, cross_cache=None, deterministic: bool = True):
        h, self_cache = self.self_mixer(self.norm_self(x), positions=positions, segment_ids=segment_ids,
                                        cache=self_cache, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        h, _ = self.cross(self.norm_cross(x), context=memory, context_segment_ids=memory_segment_ids,
                          cache=cross_cache, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        x = x + self.dropout(self.mlp(self.norm_mlp(x)), deterministic=deterministic)
        return x, self_cache


class Seq2Seq(nnx.Module):
    """``logits [B, T, tgt_vocab] = model(src [B, S], tgt [B, T], src_padding_mask=None)`` (teacher forcing)."""

    def __init__(self, config: Seq2SeqConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config: expected a Seq2SeqConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        enc_names = parse_mixer_pattern(cfg.encoder_mixer_pattern, cfg.num_encoder_layers, "encoder_mixer_pattern")
        dec_names = parse_mixer_pattern(cfg.decoder_mixer_pattern, cfg.num_decoder_layers, "decoder_mixer_pattern")
        self.src_embed = Embed(cfg.src_vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               rngs=rngs)
        self.encoder = Encoder(cfg, enc_names, rngs=rngs)
        self.tgt_embed = Embed(cfg.target_vocab, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               rngs=rngs)
        self.blocks = nnx.List([CrossDecoderBlock(cfg, n, rngs=rngs) for n in dec_names])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype)
        self.lm_head = None if cfg.tie_embeddings else param(
            rngs, default_kernel_init, (cfg.d_model, cfg.target_vocab), ("embed", "vocab"), cfg.param_dtype)

    @staticmethod
    def _segments(mask, shape):
        if mask is None:
            return None
        mask = jnp.asarray(mask, bool)
        if mask.shape != shape:
            raise ValueError(f"src_padding_mask: expected shape {shape}, got {mask.shape}")
        return mask.astype(jnp.int32)

    def encode(self, src, *, src_padding_mask=None, deterministic: bool = True):
        """Memory ``[B, S, d]`` of the source tokens (padding keys masked when a mask is given)."""
        src = jnp.asarray(src)
        seg = self._segments(src_padding_mask, src.shape)
        checks.check_token_ids("src", src, self.config.src_vocab_size, valid=None if seg is None else seg != 0)
        return self.encoder(self.src_embed(src), segment_ids=seg, deterministic=deterministic)

    def init_cache(self, memory, src_padding_mask=None, max_len: int = 64, dtype=jnp.float32) -> dict:
        """Decoder caches: ``{"self": per-layer self-mixer caches, "cross": per-layer projected memory}``."""
        seg = self._segments(src_padding_mask, memory.shape[:2])
        B = memory.shape[0]
        return {"self": tuple(b.self_mixer.init_cache(B, max_len, dtype) for b in self.blocks),
                "cross": tuple(b.cross.cross_cache(memory, seg) for b in self.blocks)}

    def decode(self, tgt, memory=None, *, src_padding_mask=None, positions=None, segment_ids=None, cache=None,
               deterministic: bool = True):
        """Decoder logits ``[B, T, tgt_vocab]`` and the updated cache (``None`` without one)."""
        tgt = jnp.asarray(tgt)
        if (memory is None) == (cache is None):
            raise ValueError("memory: pass exactly one of memory (full forward) or cache (incremental decoding)")
        mem_seg = None if memory is None else self._segments(src_padding_mask, memory.shape[:2])
        checks.check_token_ids("tgt", tgt, self.config.target_vocab,
                               valid=None if segment_ids is None else jnp.asarray(segment_ids) != 0)
        x = self.tgt_embed(tgt)
        new_self = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, memory=memory, memory_segment_ids=mem_seg, positions=positions, segment_ids=segment_ids,
                         self_cache=None if cache is None else cache["self"][i],
                         cross_cache=None if cache is None else cache["cross"][i], deterministic=deterministic)
            new_self.append(c)
        x = self.final_norm(x)
        logits = self.tgt_embed.attend(x) if self.lm_head is None else x @ self.lm_head[...].astype(x.dtype)
        new_cache = None if cache is None else {"self": tuple(new_self), "cross": cache["cross"]}
        return logits.astype(jnp.float32), new_cache

    def __call__(self, src, tgt, *, src_padding_mask=None, deterministic: bool = True):
        memory = self.encode(src, src_padding_mask=src_padding_mask, deterministic=deterministic)
        logits, _ = self.decode(tgt, memory, src_padding_mask=src_padding_mask, deterministic=deterministic)
        return logits
