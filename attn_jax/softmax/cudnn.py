"""``impl="cudnn"``: delegate to cuDNN's fused attention through ``jax.nn.dot_product_attention``.

cuDNN serves a subset of attn_jax's features; :func:`unsupported` lists, for a
given lowering platform and problem, every reason it cannot serve, so dispatch
never silently drops an argument.  Known traps handled here: ``jax.nn``'s
``is_causal`` is top-left aligned, so a causal mask with ``T != S`` (decode,
chunked prefill) is refused rather than silently misaligned; a fully masked row
there returns ``mean(V)`` instead of zero, so only masks that never hide a
whole row (none, or a top-left-consistent causal mask) are accepted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn_jax.core import masks as M


def _causal_offset(mask):
    """The causal mask's offset if ``mask`` is exactly ``causal(...)``; else raise LookupError."""
    if isinstance(mask, M.Causal):
        return mask.offset
    raise LookupError


@functools.cache
def _cudnn_traceable() -> bool:
    """jax.nn's cuDNN path queries the installed cuDNN while *tracing*, so it cannot even be
    traced (or exported for cuda) on a machine without the CUDA plugin."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        check_cudnn_version()
        return True
    except Exception:  # RuntimeError("cuDNN is not detected.") or a missing private module
        return False


def unsupported(platform: str, p) -> list[str]:
    r = []
    if platform != "cuda":
        r.append(f"cuDNN runs only on CUDA GPUs (lowering platform '{platform}')")
    elif not _cudnn_traceable():
        r.append("cuDNN is not installed here (jax.nn's cuDNN path checks the cuDNN version at trace time)")
    if p.dtype not in (jnp.bfloat16, jnp.float16):
        r.append(f"cuDNN flash attention needs float16/bfloat16 inputs, got {jnp.dtype(p.dtype).name}")
    d = p.dims
    if d.Dk != d.Dv:
        r.append(f"cuDNN needs Dk == Dv, got Dk={d.Dk}, Dv={d.Dv}")
    if d.Dk % 8 or d.Dk > 128:
        r.append(f"cuDNN needs head_dim a multiple of 8 and <= 128, got {d.Dk}")
    if p.softcap is not None:
        r.append("softcap is not supported by jax.nn's cuDNN path")
    if p.has_sinks:
        r.append("learned sinks are not supported by jax.nn's cuDNN path")
    if p.dropout_rate > 0:
        r.append("dropout is not exposed by jax.nn.dot_product_attention")
    if p.return_lse:
        r.append("return_lse is not exposed by jax.nn.dot_product_attention")
    if p.bias_kind == "structured":
        r.append("structured biases (ALiBi, T5) would have to be materialised as T x S")
    if p.bias_kind == "query":
        r.append(f"query-dependent bias {type(p.bias).__name__} would have to be materialised as T x S")
    if p.mask is not None:
        try:
            off = _causal_offset(p.mask)
            eff = (d.S - d.T) if off is None else off
            if not isinstance(eff, int) or eff != 0:
                r.append("jax.nn's is_causal is top-left aligned; this causal mask needs offset "
                         f"{eff if isinstance(eff, int) else 'per-row'} (T={d.T}, S={d.S})")
        except LookupError:
            r.append(f"mask {p.mask!r}: only causal() maps onto jax.nn's cuDNN path (other masks can hide "
                     "whole rows, where jax.nn returns mean(V) instead of zero)")
    return r


def attention_cudnn(p, q, k, v, bias, sinks, dropout_rng):
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                        scale=p.scale, is_causal=p.mask is not None, implementation="cudnn")
