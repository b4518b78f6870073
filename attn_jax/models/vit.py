"""Vision Transformer: "An Image is Worth 16x16 Words", Dosovitskiy et al., 2020, arXiv:2010.11929.

An image ``[B, H, W, C]`` is cut into ``N = (H/p)(W/p)`` non-overlapping ``p x p``
patches, each flattened and linearly embedded, plus 2-D position embeddings:

    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + [0; E_pos]        (E: [p*p*C, d])
    z_l = bidirectional pre-norm Transformer blocks (attn_jax.models.encoder.Encoder)
    y   = Norm(z_L)[cls] W_head      (or the mean over patches, ``pooling="mean"``)

Position embeddings: ``"learned"`` (the paper's default) or ``"sincos2d"`` — fixed 2-D
sinusoids, half the width encoding the patch row and half the column (as in MAE, He et
al., 2021, arXiv:2111.06377 / "Better plain ViT baselines", Beyer et al., 2022,
arXiv:2205.01580).  The mixers get no 1-D positional scheme by default
(``mixer_kwargs={"softmax": {"positional": "none"}}``): positions enter through the
embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from attn_jax.nn.layers import check_positive_int, default_kernel_init, param
from attn_jax.positional import sinusoidal_embedding
from attn_jax.models.decoder_lm import StackConfig, validate_common
from attn_jax.models.encoder import Encoder, pool

__all__ = ["ViTConfig", "ViT", "sincos_2d"]


def sincos_2d(grid_h: int, grid_w: int, dim: int):
    """Fixed 2-D sinusoidal embeddings ``[grid_h * grid_w, dim]`` (row-major patches)."""
    if dim % 4:
        raise ValueError(f"d_model: 2-D sinusoidal embeddings need d_model divisible by 4, got {dim}")
    rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
    return jnp.concatenate([sinusoidal_embedding(rows.reshape(-1), dim // 2),
                            sinusoidal_embedding(cols.reshape(-1), dim // 2)], axis=-1)


def _default_vit_mixer_kwargs():
    return {"softmax": {"positional": "none"}, "sliding_window": {"positional": "none"}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(StackConfig):
    """Configuration of :class:`ViT`; ``image_size`` is an int (square) or ``(H, W)`` (shared
    fields: :class:`TransformerConfig`)."""

    num_classes: int
    image_size: int | tuple[int, int] = 32
    patch_size: int = 4
    channels: int = 3
    mixer_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_default_vit_mixer_kwargs)
    position_embedding: str = "learned"
    pooling: str = "cls"

    def __post_init__(self):
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        super().__post_init__()

    @property
    def grid(self) -> tuple[int, int]:
        h, w = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        return h // self.patch_size, w // self.patch_size

    def validate(self) -> "ViTConfig":
        check_positive_int("num_classes", self.num_classes)
        check_positive_int("patch_size", self.patch_size)
        check_positive_int("channels", self.channels)
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(size) != 2:
            raise ValueError(f"image_size: expected an int or (H, W), got {self.image_size!r}")
        for s in size:
            check_positive_int("image_size", s)
            if s % self.patch_size:
                raise ValueError(f"patch_size: {self.patch_size} does not divide image_size={self.image_size}")
        validate_common(self)
        if self.position_embedding not in ("learned", "sincos2d"):
            raise ValueError(f"position_embedding: expected 'learned' or 'sincos2d', got {self.position_embedding!r}")
        if self.position_embedding == "sincos2d" and self.d_model % 4:
            raise ValueError(f"d_model: 2-D sinusoidal embeddings need d_model divisible by 4, got {self.d_model}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling: expected 'cls' or 'mean', got {self.pooling!r}")
        self.layer_mixers()
        return self



def patchify(images, p: int):
    """``[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]`` (row-major patches)."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class ViT(nnx.Module):
    """``logits [B, num_classes] = model(images [B, H, W, C])``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config: expected a ViTConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        p, d = cfg.patch_size, cfg.d_model
        gh, gw = cfg.grid
        self.patch_w = param(rngs, default_kernel_init, (p * p * cfg.channels, d), (None, "embed"), cfg.param_dtype)
        self.patch_b = param(None, nnx.initializers.zeros, (d,), ("embed",), cfg.param_dtype)
        self.pos_embed = (param(rngs, nnx.initializers.normal(0.02), (gh * gw, d), (None, "embed"), cfg.param_dtype)
                          if cfg.position_embedding == "learned" else None)
        self.cls_token = (param(rngs, nnx.initializers.normal(0.02), (d,), ("embed",), cfg.param_dtype)
                          if cfg.pooling == "cls" else None)
        self.encoder = Encoder(cfg, cfg.layer_mixers(), rngs=rngs)
        self.head_w = param(rngs, nnx.initializers.zeros, (d, cfg.num_classes), ("embed", None), cfg.param_dtype)
        self.head_b = param(None, nnx.initializers.zeros, (cfg.num_classes,), (None,), cfg.param_dtype)

    def __call__(self, images, *, deterministic: bool = True):
        cfg = self.config
        h, w = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
        if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != (h, w, cfg.channels):
            raise ValueError(f"images: expected [B, {h}, {w}, {cfg.channels}], got {getattr(images, 'shape', None)}")
        dt = cfg.dtype
        x = patchify(images.astype(dt), cfg.patch_size) @ self.patch_w[...].astype(dt) + self.patch_b[...].astype(dt)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(dt)
        else:
            x = x + sincos_2d(*cfg.grid, cfg.d_model).astype(dt)
        B = x.shape[0]
        if self.cls_token is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(dt), (B, 1, cfg.d_model)), x], axis=1)
        z = self.encoder(x, deterministic=deterministic)
        pooled = pool(z, jnp.ones(z.shape[:2], bool), cfg.pooling)
        return (pooled @ self.head_w[...].astype(dt) + self.head_b[...].astype(dt)).astype(jnp.float32)
