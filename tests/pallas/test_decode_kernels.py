"""Split-K decode kernels (pallas_kernels.decode_attention): interpret parity and cuda/tpu lowering.

Numerics run in interpret mode on CPU (GPU kernels with ``interpret=True``, TPU kernels with
``pltpu.InterpretParams`` race detection / NaN-filled uninitialised memory / raising OOB reads,
see :mod:`pallas_kernels.testing`) against the dense reference; lowering is checked with
``jax.export`` for ``cuda`` (Triton custom call) and ``tpu`` (Mosaic custom call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core.testing import fast_jit
from pallas_kernels.decode_attention import (decode_attention, decode_partials, merge_partials,
                                             paged_decode_attention)
from pallas_kernels.decode_attention.reference import decode_reference, gather_pages
from pallas_kernels.testing import KERNEL_CALL_TARGET, custom_call_targets, lower_for, tpu_race_check

PLATFORMS = ["gpu", "tpu"]
S_ = jax.ShapeDtypeStruct


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-5)


@functools.partial(fast_jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7), static_argnames=("Dv",))
def _qkv(B, T, H, K, D, S, dtype, seed=0, Dv=None):
    """One fast-compiled program per shape (eager jax.random compiles with the default options)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, Dv or D), jnp.float32).astype(dtype)
    sinks = jax.random.normal(ks[3], (H,), jnp.float32)
    return q, k, v, sinks


def _run(platform, fn):
    """Run ``jit(fn)()`` (one XLA program: faster than eager interpret; fast-compiled, see
    ``attn_jax.core.testing.FAST_COMPILE``) and materialise it; on TPU inside the race recorder,
    asserting that race detection ran and found no race."""
    if platform == "tpu":
        with tpu_race_check() as rec:
            out = jax.block_until_ready(fast_jit(fn)())
        assert rec.states, "race detection did not run"
        assert not rec.races_found
        return out
    return jax.block_until_ready(fast_jit(fn)())


def _ref(q, k, v, lengths, **kw):
    return fast_jit(lambda *a: decode_reference(*a, **kw))(q, k, v, lengths)


def _assert_match(o, lse, ro, rlse, dtype):
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ro, np.float32), **_tol(dtype))
    lse, rlse = np.asarray(lse), np.asarray(rlse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=1e-4 if dtype == jnp.float32 else 2e-2, rtol=1e-4)


# name -> (B, T, H, K, D, S, lengths, num_splits, dtype, extras)
CASES = {
    # num_splits * block_k (3 * 8 / 16) does not divide S=40: the wrapper pads the cache
    "mha_T1_ragged": (3, 1, 2, 2, 32, 40, [0, 17, 40], 3, jnp.float32, {}),
    "gqa_T4_ragged": (3, 4, 4, 2, 32, 40, [0, 3, 40], 3, jnp.float32, {}),   # L=3 < T: first query sees nothing
    "mqa_T2_one_split": (2, 2, 4, 1, 32, 32, [32, 9], 1, jnp.float32, {}),
    "gqa_T4_bf16_softcap_sinks": (2, 4, 4, 2, 32, 48, [0, 45], 4, jnp.bfloat16, dict(softcap=5.0, sinks=True)),
    "gqa_T8_noncausal_offsets": (2, 8, 2, 1, 32, 32, [20, 32], 2, jnp.float32,
                                 dict(causal=False, offsets=[5, 24])),
    "gqa_T3_offsets_hd128": (2, 3, 4, 2, 128, 32, [30, 7], 2, jnp.float32, dict(offsets=[10, 2])),
    # Dv != Dk, and NaN in the cache past each row's length (must never reach the output)
    "gqa_T1_dv16_nan_tail": (2, 1, 4, 2, 32, 32, [21, 5], 2, jnp.float32, dict(Dv=16, nan_tail=True)),
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", list(CASES))
def test_contiguous_matches_reference(platform, case):
    B, T, H, K, D, S, lengths, n, dtype, ex = CASES[case]
    q, k, v, sinks = _qkv(B, T, H, K, D, S, dtype, Dv=ex.get("Dv"))
    lengths = jnp.array(lengths, jnp.int32)
    ref_kv = k, v
    if ex.get("nan_tail"):
        tail = (jnp.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
        k, v = jnp.where(tail, jnp.nan, k), jnp.where(tail, jnp.nan, v)
    kw = dict(softcap=ex.get("softcap"), causal=ex.get("causal", True),
              offsets=None if "offsets" not in ex else jnp.array(ex["offsets"], jnp.int32),
              sinks=sinks if ex.get("sinks") else None)
    bk = 16 if platform == "gpu" else 8
    o, lse = _run(platform, lambda: decode_attention(q, k, v, lengths, num_splits=n, block_k=bk, platform=platform,
                                                     interpret=True, **kw))
    assert o.shape == (B, T, H, v.shape[-1]) and o.dtype == dtype and lse.shape == (B, T, H)
    ro, rlse = _ref(q, *ref_kv, lengths, **kw)
    _assert_match(o, lse, ro, rlse, dtype)
    if not ex.get("sinks"):
        assert np.all(np.asarray(o, np.float32)[np.asarray(lengths) == 0] == 0)   # empty rows -> zero


@pytest.mark.parametrize("platform", PLATFORMS)
def test_empty_splits_have_neg_inf_lse(platform):
    q, k, v, _ = _qkv(2, 1, 2, 1, 32, 64, jnp.float32)
    lengths = jnp.array([5, 0], jnp.int32)
    o, lse = _run(platform, lambda: decode_partials(q, k, v, lengths, num_splits=4, block_k=16, platform=platform,
                                                    interpret=True))
    assert lse.shape == (2, 4, 1, 2) and o.shape == (2, 4, 1, 2, 32) and o.dtype == jnp.float32
    lse, o = np.asarray(lse), np.asarray(o)
    assert np.all(np.isfinite(lse[0, 0])) and np.all(np.isneginf(lse[0, 1:])) and np.all(np.isneginf(lse[1]))
    assert np.all(o[0, 1:] == 0) and np.all(o[1] == 0)
    mo, mlse = merge_partials(o, lse, dtype=jnp.float32)
    ro, rlse = _ref(q, k, v, lengths)
    _assert_match(mo, mlse, ro, rlse, jnp.float32)


def _paged(k, v, lengths, ps, seed=1, extra_pages=3):
    """A pool + shuffled page table holding the contiguous ``k, v`` (pages past the length unallocated)."""
    B, S = k.shape[:2]
    Mp = S // ps
    P = B * Mp + extra_pages
    perm = np.random.default_rng(seed).permutation(P)
    table = perm[:B * Mp].reshape(B, Mp).astype(np.int32)
    alloc = np.arange(Mp)[None, :] * ps < np.asarray(lengths)[:, None]
    table = np.where(alloc, table, -1)
    kp = np.full((P, ps, *k.shape[2:]), np.nan, np.float32)   # NaN in unused pages: must never be read
    vp = np.full((P, ps, *v.shape[2:]), np.nan, np.float32)
    kk = np.asarray(k, np.float32).reshape(B, Mp, ps, *k.shape[2:])
    vv = np.asarray(v, np.float32).reshape(B, Mp, ps, *v.shape[2:])
    for b in range(B):
        for i in range(Mp):
            if table[b, i] >= 0:
                kp[table[b, i]], vp[table[b, i]] = kk[b, i], vv[b, i]
    return jnp.asarray(kp, k.dtype), jnp.asarray(vp, v.dtype), jnp.asarray(table)


# name -> (B, T, H, K, D, page_size, max_pages, lengths, pages_per_split, dtype, extras)
PAGED = {
    "mha_T1_pps1_softcap_sinks": (3, 1, 2, 2, 32, 8, 5, [0, 13, 40], 1, jnp.float32, dict(softcap=10.0, sinks=True)),
    # 2 pages per split does not divide 5 pages (the table is padded with -1); also checked
    # against the contiguous kernel over the same cache
    "gqa_T4_pps2_vs_contiguous": (3, 4, 4, 2, 32, 8, 5, [3, 16, 37], 2, jnp.float32, dict(contiguous=True)),
    "gqa_T2_bf16_pps3": (2, 2, 4, 1, 32, 8, 6, [48, 20], 3, jnp.bfloat16, {}),
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", list(PAGED))
def test_paged_matches_contiguous(platform, case):
    B, T, H, K, D, ps, Mp, lengths, pps, dtype, ex = PAGED[case]
    q, k, v, sinks = _qkv(B, T, H, K, D, Mp * ps, dtype, seed=2)
    lengths = jnp.array(lengths, jnp.int32)
    kw = dict(softcap=ex.get("softcap"), sinks=sinks if ex.get("sinks") else None)
    kp, vp, table = _paged(k, v, lengths, ps)
    # the shuffled pool round-trips to the contiguous cache on the allocated pages
    for b in range(B):
        n = int(lengths[b])
        np.testing.assert_array_equal(np.asarray(gather_pages(kp, table), np.float32)[b, :n],
                                      np.asarray(k, np.float32)[b, :n])
    o, lse = _run(platform, lambda: paged_decode_attention(q, kp, vp, table, lengths, pages_per_split=pps,
                                                           platform=platform, interpret=True, **kw))
    assert o.shape == (B, T, H, D) and o.dtype == dtype
    ro, rlse = _ref(q, k, v, lengths, **kw)
    _assert_match(o, lse, ro, rlse, dtype)
    if ex.get("contiguous"):
        oc, lsec = _run(platform, lambda: decode_attention(q, k, v, lengths, num_splits=-(-Mp // pps), block_k=ps,
                                                           platform=platform, interpret=True, **kw))
        np.testing.assert_allclose(np.asarray(o), np.asarray(oc), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(lsec), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- lowering


def _lowering_config(layout, dtype, head_dim):
    cfg = dict(layout=layout, dtype=dtype, head_dim=head_dim, B=2, H=8, K=2, T=4 if dtype == jnp.bfloat16 else 1)
    if layout == "paged":
        return dict(cfg, num_pages=64, page_size=16, max_pages=32, pages_per_split=8, softcap=30.0)
    return dict(cfg, S=1024, num_splits=4)


#: name -> lowered configuration (cache layout, dtype, sizes, split); benchmarks/hardware_check.py runs these.
LOWERING = {
    f"{layout}_{name}_hd{head_dim}": _lowering_config(layout, dtype, head_dim)
    for layout in ("contiguous", "paged") for name, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32))
    for head_dim in (64, 128)
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_lowering(platform, name):
    c = LOWERING[name]
    dtype, D, B, T, H, K = c["dtype"], c["head_dim"], c["B"], c["T"], c["H"], c["K"]
    kp = {"cuda": "gpu", "tpu": "tpu"}[platform]
    if c["layout"] == "paged":
        P, ps, Mp = c["num_pages"], c["page_size"], c["max_pages"]
        fn = functools.partial(paged_decode_attention, pages_per_split=c["pages_per_split"], softcap=c["softcap"],
                               platform=kp)
        args = [S_((B, T, H, D), dtype), S_((P, ps, K, D), dtype), S_((P, ps, K, D), dtype),
                S_((B, Mp), jnp.int32), S_((B,), jnp.int32)]
    else:
        fn = functools.partial(decode_attention, num_splits=c["num_splits"], platform=kp)
        args = [S_((B, T, H, D), dtype), S_((B, c["S"], K, D), dtype), S_((B, c["S"], K, D), dtype),
                S_((B,), jnp.int32)]
    exported = lower_for(lambda *a: fn(*a, sinks=jnp.zeros((H,), jnp.float32)), platform, *args)
    assert KERNEL_CALL_TARGET[platform] in custom_call_targets(exported)
    o, lse = exported.out_avals
    assert o.shape == (B, T, H, D) and o.dtype == dtype and lse.shape == (B, T, H)


def test_decode_registry_method_pallas_lowers_to_the_kernels_and_explains_cpu():
    import attn_jax.softmax.decode as D

    B, S, H, K, Dh = 2, 256, 4, 2, 64
    q = jax.ShapeDtypeStruct((B, 1, H, Dh), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, K, Dh), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = lambda q, k, v, n: D.decode_attention(q, k, v, lengths=n, impl="pallas", num_splits=2,
                                              sinks=jnp.zeros((H,), jnp.bfloat16))
    for platform, call in (("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")):
        text = lower_for(f, platform, q, kv, kv, lengths).mlir_module()
        assert call in text, platform
    d = aj.explain(D.decode_attention, jnp.zeros((B, 1, H, Dh)), jnp.zeros((B, S, K, Dh)), jnp.zeros((B, S, K, Dh)),
                         lengths=jnp.full((B,), S, jnp.int32), impl="pallas", window=8, platform="cpu")
    assert d.chosen["cpu"] is None
    assert "need a GPU or TPU" in str(d) and "sliding windows" in str(d)


def test_paged_attention_method_pallas_lowers_to_the_kernels():
    import attn_jax.softmax.decode as D
    from attn_jax.softmax.kv_cache import PagedKVCache

    B, H, K, Dh, ps, M = 2, 4, 2, 64, 16, 4
    cache = PagedKVCache.init(B, num_pages=B * M, page_size=ps, max_pages_per_seq=M, kv_heads=K, head_dim=Dh,
                              dtype=jnp.bfloat16, page_table=jnp.arange(B * M, dtype=jnp.int32).reshape(B, M))
    q = jax.ShapeDtypeStruct((B, 1, H, Dh), jnp.bfloat16)
    f = lambda q, c: D.paged_attention(q, c, pages_per_split=2, impl="pallas")
    for platform, call in (("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")):
        assert call in lower_for(f, platform, q, cache).mlir_module(), platform
    with pytest.raises(ValueError, match="need a GPU or TPU"):
        jax.jit(f)(jnp.zeros((B, 1, H, Dh), jnp.bfloat16), cache)
