"""The model of a (config, task) pair: DecoderLM ("lm"), a causal regression Transformer
("regress"), ViT ("image"); ``forward(model, inputs, deterministic)`` -> logits / predictions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.models import DecoderConfig, DecoderLM, ViT, ViTConfig
from attn_jax.models.decoder_lm import StackConfig, TransformerBlock
from attn_jax.nn.layers import make_norm

from experiments.common.config import ConfigError, layer_pattern

__all__ = ["RegressionTransformer", "build_model", "forward", "param_count"]


class RegressionTransformer(nnx.Module):
    """``[B, T, input_dim] -> [B, T, output_dim]``: Linear, causal TransformerBlocks, norm, Linear."""

    def __init__(self, cfg: StackConfig, input_dim: int, output_dim: int, *, rngs: nnx.Rngs):
        self.config = cfg
        self.inp = nnx.Linear(input_dim, cfg.d_model, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(cfg, n, rngs=rngs) for n in cfg.layer_mixers()])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype)
        self.out = nnx.Linear(cfg.d_model, output_dim, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = True):
        x = self.inp(x.astype(self.config.dtype))
        for block in self.blocks:
            x, _ = block(x, deterministic=deterministic)
        return self.out(self.final_norm(x)).astype(jnp.float32)


def _common(config) -> dict:
    m = config.model
    return dict(d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
                num_kv_heads=m.get("num_kv_heads"), mixer_pattern=layer_pattern(config),
                mixer_kwargs={k: dict(v) for k, v in m.mixer_kwargs.items()}, mlp=m.mlp,
                dropout_rate=m.dropout_rate, dtype=jnp.bfloat16 if config.train.bf16 else jnp.float32,
                param_dtype=jnp.float32)


def build_model(config, task, *, rngs: nnx.Rngs) -> nnx.Module:
    kw = _common(config)
    try:
        if task.kind == "lm":
            return DecoderLM(DecoderConfig(vocab_size=task.vocab_size, **kw), rngs=rngs)
        if task.kind == "regress":
            cfg = StackConfig(**kw)
            cfg.layer_mixers()
            return RegressionTransformer(cfg, task.input_dim, task.output_dim, rngs=rngs)
        if task.kind == "image":
            h, w, c = task.image_shape
            vkw = {k: v for k, v in kw.items() if not (k == "mixer_kwargs" and not v)}  # keep ViT's default
            return ViT(ViTConfig(num_classes=task.num_classes, image_size=(h, w), channels=c,
                                 patch_size=config.model.patch_size, **vkw), rngs=rngs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None
    raise ConfigError(f"config.task.name: task {task.name!r} has unknown kind {task.kind!r} "
                      f"(expected 'lm', 'regress' or 'image')")


def forward(model, inputs, *, deterministic: bool = True):
    if isinstance(model, DecoderLM):
        return model(inputs, deterministic=deterministic)[0]
    return model(inputs, deterministic=deterministic)


def param_count(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
