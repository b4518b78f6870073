"""Models built from :mod:`attn_jax.nn`: decoder LM, encoder classifier, ViT, seq2seq, generation."""

from attn_jax.models.decoder_lm import DecoderBlock, DecoderConfig, DecoderLM, TransformerBlock
from attn_jax.models.encoder import Encoder, EncoderClassifier, EncoderConfig
from attn_jax.models.generate import GenerationOutput, generate, sample_logits
from attn_jax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attn_jax.models.vit import ViT, ViTConfig

__all__ = [
    "DecoderConfig", "DecoderBlock", "TransformerBlock", "DecoderLM", "EncoderConfig", "Encoder",
    "EncoderClassifier", "ViTConfig", "ViT", "Seq2SeqConfig", "Seq2Seq", "generate", "GenerationOutput",
    "sample_logits",
]
