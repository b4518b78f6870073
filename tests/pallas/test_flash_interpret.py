"""Pallas flash attention in interpret mode (CPU) against the reference: values, LSE and VJPs.

Both kernels run through the attn_jax adapter (:func:`attn_jax.softmax.pallas.flash_attention`),
so mask translation, block lists, padding and ALiBi/segment handling are exercised exactly as
``impl="pallas"`` does on a device.  TPU kernels run under ``pltpu.InterpretParams`` with race
detection and NaN-filled uninitialised memory.  Interpret mode is slow: shapes are tiny and
each test combines several features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.alibi import ALiBi, alibi
from attn_jax.softmax import pallas as P
from pallas_kernels.flash_attention import block_lists, dropout_keep, evaluate_terms
from pallas_kernels.flash_attention.block_sizes import get_block_sizes
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.testing import tpu_race_check

PLATFORMS = ["gpu", "tpu"]


def _blocks(platform):
    # Triton tiles must be >= 16 (tl.dot); TPU interpret mode accepts small tiles.
    return dict(block_q=16, block_k=16)


# XLA:CPU compile time dominates; the optimisation level does not change results.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Inputs as one fast-compiled program per shape (eager jax.random compiles with the default options).
_random_qkv = tk.random_qkv_compiled
_normal = tk.fast_jit(lambda key, shape: jax.random.normal(key, shape, jnp.float32), static_argnums=1)


def _jit_vjp(fn, primals, key):
    g = jax.jit(lambda p: tk.vjp_with_random_cotangent(fn, p, key))
    return g.lower(primals).compile(_FAST_COMPILE)(primals)


def _check(platform, q, k, v, *, mask=None, bias=None, sinks=None, softcap=None, scale=None, dtype=None,
           dropout_rate=0.0):
    """Forward (o, lse) and VJP (q, k, v[, bias][, sinks][, ALiBi slopes]) parity with the reference."""
    is_alibi = isinstance(bias, ALiBi)

    def wrap(run):
        def f(q, k, v, bias_leaf, sinks):
            b = ALiBi(bias_leaf) if is_alibi else bias_leaf
            return run(q, k, v, mask=mask, bias=b, sinks=sinks, softcap=softcap, scale=scale, return_lse=True,
                       dropout_rate=dropout_rate, dropout_rng=jax.random.key(11) if dropout_rate else None)
        return f

    kern = wrap(lambda *a, **kw: P.flash_attention(*a, platform=platform, interpret=True, **_blocks(platform),
                                                   **kw))
    ref = wrap(lambda *a, **kw: aj.attention(*a, impl="reference", **kw))
    bias_leaf = bias.slopes if is_alibi else bias
    primals = (q, k, v, bias_leaf, sinks)
    key = jax.random.key(42)
    with tpu_race_check() as races:
        (o, lse), grads = jax.block_until_ready(_jit_vjp(kern, primals, key))
    assert not races.races_found, "TPU interpret mode detected a data race"
    assert platform != "tpu" or races.states, "race detection did not run"
    (ro, rlse), rgrads = _jit_vjp(ref, primals, key)
    tk.assert_close(o, ro, dtype=dtype, name="o")
    tk.assert_close(lse, rlse, dtype=dtype or "float32", name="lse")
    for name, g, rg in zip(["dq", "dk", "dv", "dbias", "dsinks"], grads, rgrads):
        if rg is None:
            continue
        tk.assert_close(g, rg, dtype=dtype, grad=True, name=name)
    return o, lse, grads


@pytest.mark.parametrize("platform", PLATFORMS)
def test_causal_gqa_softcap_sinks_alibi_dropout_ragged(platform):
    """T < S bottom-right causal, GQA (H=4, K=2), Dk != Dv, ragged T/S, softcap, sinks, ALiBi (dslopes),
    dropout (in-kernel counter hash)."""
    q, k, v = _random_qkv(jax.random.key(0), B=1, T=23, S=37, H=4, K=2, Dk=32, Dv=16)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)
    bias = ALiBi(alibi(4).slopes * 4.0)  # steeper slopes so the bias matters at these lengths
    _check(platform, q, k, v, mask=masks.causal(), bias=bias, sinks=sinks, softcap=3.0, dropout_rate=0.2)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_segments_window_bias_fully_masked_rows(platform):
    """Packed segments with padding (fully masked rows), sliding window, dense bias with dbias."""
    B, T, H = 2, 40, 2
    q, k, v = _random_qkv(jax.random.key(1), B=B, T=T, H=H, Dk=16)
    seg = np.array(tk.random_segment_ids(jax.random.key(3), B, T))
    seg[0, -7:] = 0       # padding rows: fully masked
    seg[1, 5:9] = 0       # padding in the middle
    seg = jnp.asarray(seg)
    # NaN in padded positions must not leak
    pad = (seg == 0)[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    bias = _normal(jax.random.key(4), (1, H, T, T))
    mask = masks.segments(seg) & masks.sliding_window(9, 3)
    o, lse, grads = _check(platform, q, k, v, mask=mask, bias=bias)
    rows = np.asarray(seg == 0)
    assert np.all(np.asarray(o)[rows] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[rows]))
    for g in grads[:3]:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g)[rows] == 0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_causal_no_sinks(platform):
    q, k, v = _random_qkv(jax.random.key(5), B=1, T=32, H=2, Dk=32, dtype=jnp.bfloat16)
    _check(platform, q, k, v, mask=masks.causal(), dtype=jnp.bfloat16)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_chunked_prefix_key_padding_batched_bias(platform):
    """chunked & prefix_lm (static) & key_padding (traced lists), T > S, per-batch bias [B, 1, T, S]."""
    B, T, S, H = 2, 36, 30, 2
    q, k, v = _random_qkv(jax.random.key(6), B=B, T=T, S=S, H=H, K=1, Dk=16, Dv=32)
    bias = _normal(jax.random.key(7), (B, 1, T, S))
    mask = masks.chunked(12) & masks.prefix_lm(5) & masks.key_padding(jnp.array([30, 17]))
    _check(platform, q, k, v, mask=mask, bias=bias, scale=0.3)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_one_query_odd_head_dim_fp16(platform):
    """T = 1 against S = 27 keys (decode), odd head dim 24 (zero-padded to 32 on GPU), float16."""
    q, k, v = _random_qkv(jax.random.key(8), B=1, T=1, S=27, H=2, Dk=24, dtype=jnp.float16)
    _check(platform, q, k, v, mask=masks.causal(), dtype=jnp.float16)


# ----------------------------------------------------------------------------- cheap unit tests


def test_block_lists_static_and_traced_agree():
    rng = np.random.default_rng(0)
    ne = rng.random((2, 5, 7)) < 0.4
    ne[0, 2] = False  # an empty row
    st = block_lists(ne, static=True)
    dy = block_lists(jnp.asarray(ne), static=False)
    for a, b in ((st[1], dy[1]), (st[3], dy[3])):
        np.testing.assert_array_equal(a, np.asarray(b))
    for idx, cnt, dense in ((st[0], st[1], ne), (st[2], st[3], ne.swapaxes(1, 2))):
        for b in range(2):
            for r in range(dense.shape[1]):
                np.testing.assert_array_equal(idx[b, r, :cnt[b, r]], np.nonzero(dense[b, r])[0])
                # unused slots repeat the last used index (no new DMA on TPU)
                assert np.all(idx[b, r, cnt[b, r]:] == (idx[b, r, cnt[b, r] - 1] if cnt[b, r] else 0))


def test_dropout_keep_mask_bitwise_equal_to_attn_jax():
    from jax import lax

    from attn_jax.core import random as aj_random
    seed = aj_random.dropout_seed(jax.random.key(3))
    s32 = lax.bitcast_convert_type(seed, jnp.int32)
    ar = lambda n, ax: jnp.arange(n, dtype=jnp.int32).reshape([-1 if a == ax else 1 for a in range(4)])
    for rate in (0.1, 0.5):
        ours, theirs = tk.compiled(lambda seed, s32: (
            dropout_keep(rate, s32[0], s32[1], ar(2, 0), ar(3, 1), ar(33, 2), ar(70, 3)),
            aj_random.keep_mask(seed, rate, ar(2, 0), ar(3, 1), ar(33, 2), ar(70, 3))), seed, s32)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_mask_terms_match_mask_objects():
    T, S = 19, 26
    cases = [(masks.causal(), ("causal", S - T)), (masks.sliding_window(4, 2), ("window", S - T, 4, 2)),
             (masks.chunked(5, offset=-3), ("chunked", -3, 5)), (masks.prefix_lm(7), ("prefix", S - T, 7))]
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    for m, term in cases:
        terms, _, _, reasons = P._translate_mask(m, T, S)
        assert terms == (term,) and not reasons
        np.testing.assert_array_equal(np.asarray(evaluate_terms(terms, i, j)), np.asarray(m.materialize(T, S))[0, 0])


def test_kernel_reference_matches_attn_jax_reference():
    q, k, v = _random_qkv(jax.random.key(9), B=1, T=12, S=12, H=2, K=1, Dk=8)
    (o, lse), (ro, rlse) = tk.compiled(lambda q, k, v: (
        flash_attention_reference(q, k, v, mask_terms=(("window", 0, 3, 1),), softcap=2.0,
                                  sinks=jnp.array([0.1, 0.2])),
        aj.attention(q, k, v, mask=masks.sliding_window(3, 1), softcap=2.0, sinks=jnp.array([0.1, 0.2]),
                     return_lse=True, impl="reference")), q, k, v)
    tk.assert_close(o, ro)
    tk.assert_close(lse, rlse)


def test_unsupported_reasons():
    q, k, v = _random_qkv(jax.random.key(0), B=1, T=8, H=2, Dk=8)
    seg = jnp.ones((1, 8), jnp.int32)

    def reasons(platform, **kw):
        return " | ".join(str(aj.explain(q, k, v, impl="pallas", platform=platform, **kw)).splitlines())

    assert "need a GPU or TPU" in reasons("cpu")
    assert "UNSERVABLE" not in reasons("tpu", mask=masks.causal() & masks.segments(seg))
    assert "UNSERVABLE" not in reasons("cuda", bias=alibi(2))
    assert "UNSERVABLE" not in reasons("tpu", dropout_rate=0.1)
    assert "'|' compositions" in reasons("tpu", mask=masks.causal() | masks.sliding_window(2, 2))
    assert "dense boolean masks" in reasons("cuda", mask=jnp.ones((1, 1, 8, 8), bool))
    assert "per-row" in reasons("tpu", mask=masks.causal(offset=jnp.array([3])))
    from attn_jax.positional.t5 import T5RelativeBias
    t5 = T5RelativeBias(jnp.zeros((32, 2)))
    assert "no in-kernel form" in reasons("tpu", bias=t5)
    with pytest.raises(ValueError, match="dense boolean masks"):
        P.flash_attention(q, k, v, mask=jnp.ones((1, 1, 8, 8), bool), platform="tpu", interpret=True)


def test_block_size_table():
    assert get_block_sizes("tpu", 128, jnp.bfloat16, 4096, 4096).block_q == 512
    bs = get_block_sizes("tpu", 64, jnp.float32, 100, 300)
    assert (bs.block_q, bs.block_k) == (104, 304)  # one block covering the padded sequence is legal
    assert get_block_sizes("tpu", 64, jnp.float32, 1000, 3000).block_k == 512
    g = get_block_sizes("gpu", 64, jnp.bfloat16, 4096, 4096)
    assert (g.block_q, g.block_k, g.num_warps, g.num_stages) == (128, 64, 4, 3)
    g = get_block_sizes("gpu", 256, jnp.float32, 20, 20)
    assert g.block_q == 32 and g.block_k == 32
    assert get_block_sizes("gpu", 64, jnp.float32, 20, 20, block_q=16).block_q == 16
