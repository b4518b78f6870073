"""Chunked GLA Pallas kernels lower for ``cuda`` (Triton) and ``tpu`` (Mosaic) on this CPU machine.

Every configuration is exported through :func:`pallas_kernels.chunked_gla.chunked_gla`, forward
and backward (``jax.grad`` of a scalar loss of the output and the final state over q, k, v,
log_g and h0), with default chunk and tile sizes unless stated, so the TPU (8, 128) block rules
and the Triton power-of-two rules are checked by the real lowering.  Export checks tracing and
the Pallas -> Triton / Mosaic lowering, not the device compilers (no numerics; see
test_gla_interpret.py for those).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attn_jax as aj
from pallas_kernels.chunked_gla import chunked_gla, unsupported_reasons
from pallas_kernels.testing import KERNEL_CALL_TARGET, custom_call_targets, lower_for

PLATFORMS = ["cuda", "tpu"]
S_ = jax.ShapeDtypeStruct
B, T, H = 1, 256, 2

# name -> (dtype, scalar gates, Dk, Dv, extras)
CONFIGS = {
    f"{kind}_{jnp.dtype(dt).name}_d{d}": dict(dtype=dt, scalar=kind == "scalar", Dk=d, Dv=d)
    for kind in ("vector", "scalar") for dt in (jnp.float32, jnp.bfloat16) for d in (64, 128)
}
CONFIGS.update({
    "vector_dk128_dv64_oddT_h0": dict(dtype=jnp.float32, scalar=False, Dk=128, Dv=64, T=200, h0=True),
    "scalar_bf16_dk64_dv128_h0_chunk128": dict(dtype=jnp.bfloat16, scalar=True, Dk=64, Dv=128, h0=True,
                                               chunk_size=128),
    "vector_bf16_d256_chunk32": dict(dtype=jnp.bfloat16, scalar=False, Dk=256, Dv=256, chunk_size=32),
    "vector_f32_d16_dv48": dict(dtype=jnp.float32, scalar=False, Dk=16, Dv=48, T=100),
})


def _problem(cfg, platform):
    t, dt, dk, dv = cfg.get("T", T), cfg["dtype"], cfg["Dk"], cfg["Dv"]
    args = [S_((B, t, H, dk), dt), S_((B, t, H, dk), dt), S_((B, t, H, dv), dt),
            S_((B, t, H) if cfg["scalar"] else (B, t, H, dk), jnp.float32)]
    if cfg.get("h0"):
        args.append(S_((B, H, dk, dv), jnp.float32))
    assert unsupported_reasons(*args[:4], chunk_size=cfg.get("chunk_size"), platform=platform) == []

    def fn(q, k, v, lg, *h0):
        return chunked_gla(q, k, v, lg, initial_state=h0[0] if h0 else None, chunk_size=cfg.get("chunk_size"),
                           platform=platform)

    return fn, args


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_and_backward_lower(platform, name):
    fn, args = _problem(CONFIGS[name], platform)
    target = KERNEL_CALL_TARGET[platform]
    fwd = lower_for(fn, platform, *args)
    assert custom_call_targets(fwd).count(target) == 1

    def loss(*a):
        o, st = fn(*a)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(st ** 2)

    bwd = lower_for(jax.grad(loss, argnums=tuple(range(len(args)))), platform, *args)
    # forward (residuals) + dq sweep + dk/dv/dh0 reverse sweep
    assert custom_call_targets(bwd).count(target) == 3


# ----------------------------------------------------------------------------- through attn_jax.linear
@pytest.mark.parametrize("platform", PLATFORMS)
def test_linear_ops_dispatch_to_the_kernel_when_lowered_for_accelerators(platform):
    """``aj.linear.gla`` / ``ssd`` with impl="auto" lower to the kernel on cuda/tpu (forward and
    backward) while the same function runs the XLA chunk form on this CPU."""
    from attn_jax import linear

    q = S_((1, 128, 2, 64), jnp.float32)
    g_vec, g_sc = S_((1, 128, 2, 64), jnp.float32), S_((1, 128, 2), jnp.float32)
    gla_loss = lambda q, k, v, g: jnp.sum(linear.gla(q, k, v, g)[0])
    ssd_loss = lambda q, k, v, g: jnp.sum(linear.ssd(q, k, v, g)[0])
    for loss, g, calls in ((gla_loss, g_vec, 1), (ssd_loss, g_sc, 1)):
        fwd = custom_call_targets(lower_for(loss, platform, q, q, q, g))
        assert fwd.count(KERNEL_CALL_TARGET[platform]) == calls, fwd
        bwd = custom_call_targets(lower_for(jax.grad(loss, argnums=(0, 1, 2, 3)), platform, q, q, q, g))
        assert bwd.count(KERNEL_CALL_TARGET[platform]) == 2, bwd  # the two backward sweeps (o is unused)
    assert aj.explain(linear.gated_linear_attention, q, q, q, g_vec, platform="cpu").chosen["cpu"] == "chunk"


def test_explicit_pallas_on_cpu_lists_the_reasons():
    from attn_jax import linear

    x = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="targets cuda and tpu"):
        linear.gla(x, x, x, x, impl="pallas")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_normalised_linear_attention_dispatches_to_the_kernel(platform):
    """``aj.linear.linear_attention`` (elu features, normalised: one engine call on ``[v, 1]``, so
    Dv = 65, no gate) with impl="auto" lowers to the kernel on cuda/tpu, forward and backward."""
    from attn_jax import linear

    x = S_((1, 128, 2, 64), jnp.float32)
    loss = lambda q, k, v: jnp.sum(linear.linear_attention(q, k, v)[0])
    target = KERNEL_CALL_TARGET[platform]
    assert custom_call_targets(lower_for(loss, platform, x, x, x)).count(target) == 1
    # forward (o is needed: the normaliser divides it) + dq sweep + dk/dv reverse sweep
    bwd = custom_call_targets(lower_for(jax.grad(loss, argnums=(0, 1, 2)), platform, x, x, x))
    assert bwd.count(target) == 3, bwd


@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_packed_segments_lower(platform, scalar):
    """``segment_ids`` (document resets, transparent padding) with an initial state: the kernel
    forward and backward, and ``gated_linear_attention`` with impl="auto" picks the kernel for
    packed segments too (forward; its backward is the kernel's, checked above)."""
    from attn_jax import linear

    t = 100  # not a chunk multiple: padded
    x, seg = S_((B, t, H, 64), jnp.float32), S_((B, t), jnp.int32)
    lg = S_((B, t, H) if scalar else (B, t, H, 64), jnp.float32)
    h0 = S_((B, H, 64, 64), jnp.float32)
    target = KERNEL_CALL_TARGET[platform]

    def loss(q, k, v, g, h, ids):
        o, st = chunked_gla(q, k, v, g, initial_state=h, segment_ids=ids, platform=platform)
        return jnp.sum(o ** 2) + jnp.sum(st ** 2)

    assert custom_call_targets(lower_for(loss, platform, x, x, x, lg, h0, seg)).count(target) == 1
    bwd = lower_for(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), platform, x, x, x, lg, h0, seg)
    assert custom_call_targets(bwd).count(target) == 3

    def engine(q, k, v, g, h, ids):
        return linear.gated_linear_attention(q, k, v, g, initial_state=h, segment_ids=ids, return_final_state=True)

    assert aj.explain(linear.gated_linear_attention, *(jnp.zeros(a.shape, a.dtype) for a in (x, x, x, lg)),
                                segment_ids=jnp.ones((B, t), jnp.int32), platform=platform).chosen[platform] == "pallas"
    assert custom_call_targets(lower_for(engine, platform, x, x, x, lg, h0, seg)).count(target) == 1
