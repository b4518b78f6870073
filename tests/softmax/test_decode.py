"""KV caches, prefill/step decoding, ring buffers, paged caches and split-K decoding.

Ground truth everywhere is the full forward with ``impl="reference"``; decoding runs
through ``impl="auto"`` (the chunked XLA path on CPU) unless a test says otherwise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing
from attn_jax.core.testing import assert_close, check_prefill_decode
from attn_jax.positional import T5RelativeBias, alibi
from attn_jax.softmax import decode as D
from attn_jax.softmax.kv_cache import KVCache, PageAllocator, PagedKVCache, RingKVCache


def random_qkv(*args, **kwargs):
    """NumPy inputs: slicing them per step must not compile a slice per token position."""
    return tuple(np.array(x) for x in testing.random_qkv_compiled(*args, **kwargs))


#: jax.random.normal as one fast-compiled program per shape (eager, it compiles with the defaults).
_normal = testing.fast_jit(lambda key, shape: jax.random.normal(key, shape), static_argnums=1)


#: The decode logic (caches, offsets, masks, merges) is tested through the fast-to-compile
#: reference; ``test_auto_impl`` runs every path through ``impl="auto"`` (the XLA path on CPU).
IMPL = "reference"


def _jit(fn, **kw):
    """Tests run jitted: eager dispatch of the attention loops would dominate the runtime.

    Programs compile with ``testing.FAST_COMPILE`` (compile time dominates; float32 results agree).
    """
    if fn in (D.prefill, D.decode_step, D.decode_attention, D.decode_attention_split_k):
        kw.setdefault("attention_impl", IMPL)
    return testing.fast_jit(functools.partial(fn, **kw))


def _full(q, k, v, mask=None, **kw):
    mask = masks.causal() if mask is None else mask
    return _jit(aj.attention, mask=mask, impl="reference", **kw)(q, k, v)


def _decode_all(cache, q, k, v, n_prefill, **kw):
    """Prefill n_prefill tokens then step the rest; concatenated outputs and final cache."""
    o, cache = _jit(D.prefill, **kw)(q[:, :n_prefill], k[:, :n_prefill], v[:, :n_prefill], cache)
    outs = [o]
    step = _jit(D.decode_step, **kw)
    for t in range(n_prefill, q.shape[1]):
        o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
        outs.append(o)
    return np.concatenate(outs, axis=1), cache


# ----------------------------------------------------------------------------- contiguous cache


@pytest.mark.parametrize("H,K,Dk,Dv", [(4, 2, 16, 8)])
def test_prefill_then_steps_equals_full_forward(H, K, Dk, Dv):
    B, T, n_prefill = 2, 11, 6
    q, k, v = random_qkv(jax.random.key(0), B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv)

    @testing.fast_jit
    def prefill_fn(q, k, v):
        return D.prefill(q, k, v, KVCache.init(B, 16, K, Dk, value_dim=Dv), attention_impl=IMPL)

    @testing.fast_jit
    def step_fn(cache, q, k, v):
        return D.decode_step(q, k, v, cache, attention_impl=IMPL)

    check_prefill_decode(_full, prefill_fn, step_fn, q, k, v, n_prefill=n_prefill)


def test_chunked_prefill_equals_full_forward():
    B, T, H, K, Dk = 2, 13, 4, 2, 16
    q, k, v = random_qkv(jax.random.key(1), B=B, T=T, H=H, K=K, Dk=Dk)
    cache = KVCache.init(B, 20, K, Dk)
    pre = _jit(D.prefill)
    o1, cache = pre(q[:, :5], k[:, :5], v[:, :5], cache)
    o2, cache = pre(q[:, 5:11], k[:, 5:11], v[:, 5:11], cache)
    o3, cache = _jit(D.decode_step)(q[:, 11:12], k[:, 11:12], v[:, 11:12], cache)
    o4, cache = pre(q[:, 12:], k[:, 12:], v[:, 12:], cache)
    assert_close(np.concatenate([o1, o2, o3, o4], axis=1), _full(q, k, v))
    np.testing.assert_array_equal(cache.lengths, [T, T])
    np.testing.assert_array_equal(cache.k[:, :T], k)  # the cache holds exactly the tokens


def test_batch_of_prompts_with_different_lengths():
    """Row b has a prompt of n[b] tokens (padded to T0), then every row decodes 4 tokens."""
    H, K, Dk, T0, steps = 4, 2, 16, 7, 4
    n = np.array([7, 3, 5])
    B = len(n)
    q, k, v = random_qkv(jax.random.key(2), B=B, T=T0 + steps, H=H, K=K, Dk=Dk)
    # Row b's real sequence: its first n[b] prompt tokens, then its decoded tokens (stored at T0 + s).
    seq_idx = [np.r_[np.arange(n[b]), T0 + np.arange(steps)] for b in range(B)]
    cache = KVCache.init(B, 16, K, Dk)
    o_pre, cache = _jit(D.prefill)(q[:, :T0], k[:, :T0], v[:, :T0], cache, n_new=np.asarray(n, np.int32))
    step = _jit(D.decode_step)
    o_steps = []
    for s in range(steps):
        t = T0 + s
        o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
        o_steps.append(o)
    o_steps = np.concatenate(o_steps, axis=1)
    np.testing.assert_array_equal(cache.lengths, n + steps)
    for b in range(B):
        idx = seq_idx[b]
        ref = _full(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx])
        got = np.concatenate([o_pre[b:b + 1, :n[b]], o_steps[b:b + 1]], axis=1)
        assert_close(got, ref, name=f"row {b}")
        # padding queries of the prompt give zero output
        assert not np.any(np.asarray(o_pre[b, n[b]:]))


def test_append_writes_per_row_and_drops_overflow():
    cache = KVCache.init(2, 4, 1, 2)
    cache = cache.replace(lengths=np.array([1, 3], np.int32))
    kn = np.arange(1, 4, dtype=np.float32).reshape(1, 3, 1, 1) * np.ones((2, 3, 1, 2), np.float32)
    append = testing.fast_jit(lambda c, k, v, n=None: c.append(k, v, n))
    new = append(cache, kn, kn)
    np.testing.assert_array_equal(new.lengths, [4, 4])  # row 1 saturates at max_len
    np.testing.assert_array_equal(new.k[0, :, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(new.k[1, :, 0, 0], [0, 0, 0, 1])  # only the token that fits
    new = append(cache, kn, kn, np.array([1, 0], np.int32))
    np.testing.assert_array_equal(new.lengths, [2, 3])
    np.testing.assert_array_equal(new.k[0, :, 0, 0], [0, 1, 0, 0])
    np.testing.assert_array_equal(new.k[1, :, 0, 0], [0, 0, 0, 0])


# ----------------------------------------------------------------------------- biases and extras


def _t5(H):
    return T5RelativeBias(_normal(jax.random.key(4), (8, H)), bidirectional=False, num_buckets=8,
                          max_distance=6)


@pytest.mark.parametrize("kind,method", [("alibi", "direct"), ("softcap+scale+sinks", "direct"),
                                         ("t5+sinks", "split_k")])
def test_bias_softcap_sinks_through_decode(kind, method):
    B, T, H, K, Dk, n_prefill = 2, 9, 4, 2, 16, 5
    q, k, v = random_qkv(jax.random.key(3), B=B, T=T, H=H, K=K, Dk=Dk)
    sinks = _normal(jax.random.key(5), (H,))
    kw = {"alibi": dict(bias=alibi(H)), "softcap+scale+sinks": dict(softcap=2.0, scale=0.7, sinks=sinks),
          "t5+sinks": dict(bias=_t5(H), sinks=sinks)}[kind]
    extra = dict(impl=method, num_splits=3) if method == "split_k" else {}
    got, _ = _decode_all(KVCache.init(B, 14, K, Dk), q, k, v, n_prefill, **kw, **extra)
    assert_close(got, _full(q, k, v, **kw))


def test_t5_bias_through_ring_and_paged():
    """T5 buckets depend on the relative position: a wrong per-row offset would show (ALiBi: test_auto_impl)."""
    B, T, H, K, Dk, w = 2, 10, 4, 2, 16, 3
    q, k, v = random_qkv(jax.random.key(6), B=B, T=T, H=H, K=K, Dk=Dk)
    bias = _t5(H)
    got, _ = _decode_all(RingKVCache.init(B, w, K, Dk), q, k, v, 6, bias=bias)
    assert_close(got, _full(q, k, v, mask=masks.causal() & masks.sliding_window(w), bias=bias), name="ring")
    got, _ = _decode_all(PagedKVCache.init(B, 8, 4, 4, K, Dk), q, k, v, 6, bias=bias, pages_per_split=2)
    assert_close(got, _full(q, k, v, bias=bias), name="paged")


def test_window_on_contiguous_cache():
    B, T, H, Dk, w = 2, 10, 2, 8, 2
    q, k, v = random_qkv(jax.random.key(8), B=B, T=T, H=H, Dk=Dk)
    ref = _full(q, k, v, mask=masks.causal() & masks.sliding_window(w))
    for extra in ({}, dict(impl="split_k", num_splits=4)):
        got, _ = _decode_all(KVCache.init(B, 12, H, Dk), q, k, v, 4, window=w, **extra)
        assert_close(got, ref, name=str(extra))


def test_bf16_cache():
    B, T, H, Dk = 1, 9, 2, 16
    q, k, v = random_qkv(jax.random.key(9), B=B, T=T, H=H, Dk=Dk, dtype=jnp.bfloat16)
    got, cache = _decode_all(KVCache.init(B, 12, H, Dk, jnp.bfloat16), q, k, v, 4)
    assert got.dtype == jnp.bfloat16 and cache.k.dtype == jnp.bfloat16
    assert_close(got, _full(q, k, v), dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------- ring buffer


@pytest.mark.parametrize("w,capacity,n_prefill,K", [(3, None, 7, 2), (3, 3, 2, 1), (4, 9, 5, 4), (0, None, 3, 2)])
def test_ring_buffer_equals_sliding_window_forward(w, capacity, n_prefill, K):
    B, T, H, Dk = 2, 12, 4, 16
    q, k, v = random_qkv(jax.random.key(10), B=B, T=T, H=H, K=K, Dk=Dk)
    cache = RingKVCache.init(B, w, K, Dk, capacity=capacity)
    got, cache = _decode_all(cache, q, k, v, n_prefill)
    assert_close(got, _full(q, k, v, mask=masks.causal() & masks.sliding_window(w)))
    W = cache.capacity
    expect = np.array([max(p for p in range(T) if p % W == s) if s < T else -1 for s in range(W)])
    np.testing.assert_array_equal(cache.positions, np.broadcast_to(expect, (B, W)))
    np.testing.assert_array_equal(cache.lengths, [T, T])


def test_ring_chunks_longer_than_capacity_and_ragged_rows():
    """Chunks of 5 tokens through a ring of 3 slots; rows with 2 and 5 valid prompt tokens."""
    B, H, K, Dk, w = 2, 2, 1, 8, 2
    n = np.array([5, 2])
    q, k, v = random_qkv(jax.random.key(11), B=B, T=13, H=H, K=K, Dk=Dk)
    cache = RingKVCache.init(B, w, K, Dk)
    pre = _jit(D.prefill)
    o1, cache = pre(q[:, :5], k[:, :5], v[:, :5], cache, n_new=np.asarray(n, np.int32))
    o2, cache = pre(q[:, 5:10], k[:, 5:10], v[:, 5:10], cache)
    o3, cache = pre(q[:, 10:], k[:, 10:], v[:, 10:], cache)
    mask = masks.causal() & masks.sliding_window(w)
    for b in range(B):
        idx = np.r_[np.arange(n[b]), np.arange(5, 13)]
        ref = _full(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx], mask=mask)
        got = np.concatenate([o1[b:b + 1, :n[b]], o2[b:b + 1], o3[b:b + 1]], axis=1)
        assert_close(got, ref, name=f"row {b}")
        assert not np.any(np.asarray(o1[b, n[b]:]))
    np.testing.assert_array_equal(cache.lengths, n + 8)


# ----------------------------------------------------------------------------- paged cache


def test_paged_equals_gather_reference_and_plain_cache():
    B, T, H, K, Dk, ps, M = 3, 10, 4, 2, 16, 4, 5
    n = np.array([6, 2, 4])
    q, k, v = random_qkv(jax.random.key(12), B=B, T=T, H=H, K=K, Dk=Dk)
    alloc = PageAllocator(num_pages=17, page_size=ps, batch=B, max_pages_per_seq=M, shuffle=True, seed=1)
    for b in range(B):
        alloc.reserve(b, n[b] + (T - 6))
    paged = PagedKVCache.init(B, 17, ps, M, K, Dk, page_table=alloc.page_table)
    plain = KVCache.init(B, M * ps, K, Dk)
    nn = np.asarray(n, np.int32)
    outs = {}
    # (pages_per_split that does not divide max_pages_per_seq: test_auto_impl[paged])
    for name, cache, kw in (("paged-1", paged, dict(pages_per_split=1)), ("gather", paged, dict(impl="gather")),
                            ("plain", plain, {})):
        o, cache = _jit(D.prefill, **kw)(q[:, :6], k[:, :6], v[:, :6], cache, n_new=nn)
        step = _jit(D.decode_step, **kw)
        os_ = [o]
        for t in range(6, T):
            o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
            os_.append(o)
        outs[name] = (np.concatenate(os_, axis=1), cache)
    for name in ("paged-1",):
        assert_close(outs[name][0], outs["gather"][0], name=f"{name} vs gather reference")
        assert_close(outs[name][0], outs["plain"][0], name=f"{name} vs plain cache")
    kg, vg = outs["paged-1"][1].gather()
    plain = outs["plain"][1]
    np.testing.assert_array_equal(outs["paged-1"][1].lengths, plain.lengths)
    for b in range(B):
        L = int(plain.lengths[b])
        np.testing.assert_array_equal(kg[b, :L], plain.k[b, :L])
        np.testing.assert_array_equal(vg[b, :L], plain.v[b, :L])
        idx = np.r_[np.arange(n[b]), np.arange(6, T)]  # and against the row's own full forward
        ref = _full(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx])
        got = np.concatenate([outs["paged-1"][0][b:b + 1, :n[b]], outs["paged-1"][0][b:b + 1, 6:]], axis=1)
        assert_close(got, ref, name=f"row {b}")


def test_page_allocator():
    alloc = PageAllocator(num_pages=6, page_size=4, batch=2, max_pages_per_seq=3)
    alloc.reserve(0, 5)
    alloc.reserve(1, 12)
    assert alloc.num_free == 1
    assert len(set(alloc.table[alloc.table >= 0].tolist())) == 5
    alloc.reserve(0, 12)
    assert alloc.num_free == 0 and len(set(alloc.table.ravel().tolist())) == 6
    alloc.release(1)
    assert alloc.num_free == 3 and (alloc.table[1] == -1).all()
    with pytest.raises(ValueError, match="num_tokens"):
        alloc.reserve(0, 13)
    small = PageAllocator(num_pages=2, page_size=4, batch=1, max_pages_per_seq=3)
    with pytest.raises(ValueError, match="out of pages"):
        small.reserve(0, 12)


def test_paged_writes_to_unallocated_pages_are_dropped():
    cache = PagedKVCache.init(1, 4, 2, 3, 1, 2, page_table=jnp.array([[2, -1, 0]], jnp.int32))
    kn = np.ones((1, 4, 1, 2), np.float32)
    new = testing.fast_jit(lambda c, k, v: c.append(k, v))(cache, kn, kn)
    np.testing.assert_array_equal(new.k_pages[2], 1)
    assert not np.any(np.asarray(new.k_pages)[[0, 1, 3]])  # page 1 of the row is unallocated
    np.testing.assert_array_equal(new.lengths, [4])


# ----------------------------------------------------------------------------- split-K


@pytest.mark.parametrize("T,splits", [(1, (3, 7, 21)), (3, (1, 4, 40))])
def test_split_k_equals_direct(T, splits):
    B, S, H, K, Dk = 3, 21, 4, 2, 16
    q, k, v = random_qkv(jax.random.key(13), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=8)
    lengths = jnp.array([21, 4, 11], jnp.int32)  # row 1: every chunk after the first is empty
    k[1, 4:] = np.nan  # garbage past a row's length must not leak
    v[1, 4:] = np.nan
    o_ref, lse_ref = _jit(D.decode_attention, impl="direct", return_lse=True)(q, k, v, lengths=lengths)
    for ns in splits:
        o, lse = _jit(D.decode_attention_split_k, num_splits=ns, return_lse=True)(q, (k, v), lengths)
        assert_close(o, o_ref, name=f"o, num_splits={ns}")
        assert_close(lse, lse_ref, name=f"lse, num_splits={ns}")
    # and the direct method against each row's own causal forward over its valid keys
    for b in range(B if T == 3 else 0):
        L = int(lengths[b])
        ref = _full(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L])
        assert_close(o_ref[b:b + 1], ref, name=f"row {b}")


def test_split_k_with_sinks_and_dense_bias():
    B, T, S, H, Dk = 2, 2, 10, 2, 8
    q, k, v = random_qkv(jax.random.key(14), B=B, T=T, S=S, H=H, Dk=Dk)
    lengths = jnp.array([10, 3], jnp.int32)
    sinks = jnp.array([0.5, -1.0])
    bias = _normal(jax.random.key(15), (1, H, T, S))
    ref = _jit(D.decode_attention, impl="direct", return_lse=True)(
        q, k, v, lengths=lengths, sinks=sinks, bias=bias)
    for ns in (3, 4):
        got = _jit(D.decode_attention, impl="split_k", num_splits=ns, return_lse=True)(
            q, k, v, lengths=lengths, sinks=sinks, bias=bias)
        assert_close(got[0], ref[0], name=f"o {ns}")
        assert_close(got[1], ref[1], name=f"lse {ns}")


def test_decode_registry_choice_and_reasons():
    q, k, v = random_qkv(jax.random.key(16), B=1, T=1, S=8, H=2, Dk=8)
    lengths = jnp.array([8], jnp.int32)
    assert aj.explain(D.decode_attention, q, k, v, lengths=lengths).chosen["cpu"] == "direct"
    assert aj.explain(D.decode_attention, q, k, v, lengths=lengths, num_splits=2).chosen["cpu"] == "split_k"
    with pytest.raises(ValueError, match="mask"):
        D.decode_attention(q, k, v, lengths=lengths, mask=masks.causal(offset=7), impl="split_k", num_splits=2)
    # auto falls back to direct when split-K cannot serve, and says why
    d = aj.explain(D.decode_attention, q, k, v, lengths=lengths, num_splits=2, mask=masks.causal(offset=7))
    assert d.chosen["cpu"] == "direct" and any("mask" in r for r in d.reasons["cpu"]["split_k"])


# ----------------------------------------------------------------------------- compilation


@pytest.mark.parametrize("make_cache", [
    lambda: KVCache.init(2, 16, 2, 8),
    lambda: RingKVCache.init(2, 3, 2, 8),
    lambda: PagedKVCache.init(2, 8, 4, 4, 2, 8),
], ids=["plain", "ring", "paged"])
def test_decode_step_compiles_once(make_cache):
    traces = []

    def step(q, k, v, cache):
        traces.append(1)  # Python side effect: runs only when jit traces
        return D.decode_step(q, k, v, cache, attention_impl=IMPL)

    jstep = testing.fast_jit(step, donate_argnums=3)
    q, k, v = random_qkv(jax.random.key(17), B=2, T=8, H=4, K=2, Dk=8)
    cache = make_cache()
    for t in range(8):
        _, cache = jstep(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
    assert len(traces) == 1
    assert jstep._cache_size() == 1
    np.testing.assert_array_equal(cache.lengths, [8, 8])


# ----------------------------------------------------------------------------- impl="auto"


@pytest.mark.parametrize("path", ["plain", "ring", "paged", "split_k"])
def test_auto_impl(path):
    """Every decode path through impl="auto" (the chunked XLA path on CPU), ragged rows."""
    B, T, H, K, Dk, w = 2, 9, 4, 2, 16, 3
    n = jnp.array([5, 3], jnp.int32)
    q, k, v = random_qkv(jax.random.key(19), B=B, T=T, H=H, K=K, Dk=Dk)
    cache, kw, mask = {
        "plain": (KVCache.init(B, 12, K, Dk), {}, None),
        "ring": (RingKVCache.init(B, w, K, Dk), {}, masks.causal() & masks.sliding_window(w)),
        "paged": (PagedKVCache.init(B, 8, 4, 3, K, Dk), dict(pages_per_split=2), None),
        "split_k": (KVCache.init(B, 12, K, Dk), dict(impl="split_k", num_splits=5), None),
    }[path]
    kw.update(attention_impl="auto", bias=alibi(H))
    o, cache = _jit(D.prefill, **kw)(q[:, :5], k[:, :5], v[:, :5], cache, n_new=n)
    step = _jit(D.decode_step, **kw)
    outs = []
    for t in range(5, T):
        o_t, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
        outs.append(o_t)
    for b in range(B):
        idx = np.r_[np.arange(int(n[b])), np.arange(5, T)]
        ref = _full(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx], mask=mask, bias=alibi(H))
        got = np.concatenate([o[b:b + 1, :int(n[b])]] + [x[b:b + 1] for x in outs], axis=1)
        assert_close(got, ref, name=f"{path} row {b}")


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = random_qkv(jax.random.key(18), B=2, T=3, H=4, K=2, Dk=8)
    with pytest.raises(ValueError, match="cache"):
        D.prefill(q, k, v, KVCache.init(2, 8, 4, 8))           # kv heads mismatch
    with pytest.raises(ValueError, match="cache"):
        D.prefill(q, k, v, KVCache.init(3, 8, 2, 8))           # batch mismatch
    with pytest.raises(ValueError, match="cache"):
        D.prefill(q, k, v, KVCache.init(2, 8, 2, 16))          # head_dim mismatch
    with pytest.raises(ValueError, match="k: chunk of T_new=3"):
        D.prefill(q, k, v, KVCache.init(2, 2, 2, 8))           # T_new > capacity
    with pytest.raises(ValueError, match="k: chunk of T_new=3"):
        D.prefill(q, k, v, PagedKVCache.init(2, 4, 1, 2, 2, 8))
    with pytest.raises(ValueError, match="k_new"):
        KVCache.init(2, 2, 2, 8).append(k, v)
    with pytest.raises(ValueError, match="q: decode_step"):
        D.decode_step(q, k, v, KVCache.init(2, 8, 2, 8))
    with pytest.raises(TypeError, match="q: dtype"):
        D.prefill(q, k, v, KVCache.init(2, 8, 2, 8, jnp.bfloat16))
    with pytest.raises(ValueError, match="window"):
        D.prefill(q, k, v, RingKVCache.init(2, 4, 2, 8), window=3)
    with pytest.raises(ValueError, match="capacity"):
        RingKVCache.init(2, 4, 2, 8, capacity=3)
    with pytest.raises(ValueError, match="num_splits"):
        D.decode_attention_split_k(q, KVCache.init(2, 8, 2, 8), num_splits=0)
    with pytest.raises(ValueError, match="n_new"):
        D.prefill(q, k, v, KVCache.init(2, 8, 2, 8), n_new=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        D.decode_attention(q, k, v, lengths=jnp.array([1, 2, 3]))


def test_write_first_path_with_dense_bias_and_mask():
    """A dense bias or an extra mask takes the write-then-attend path; it must agree too."""
    B, T, H, K, Dk, S = 2, 6, 4, 2, 8, 10
    q, k, v = random_qkv(jax.random.key(20), B=B, T=T, H=H, K=K, Dk=Dk)
    bias = np.asarray(_normal(jax.random.key(21), (1, H, T, T)))
    cache = KVCache.init(B, S, K, Dk)
    cache = cache.replace(lengths=np.array([0, 0], np.int32))
    dense = np.zeros((1, H, T, S), np.float32)
    dense[..., :T] = bias  # cache coordinates: keys 0..T-1 are this prompt
    o, c = _jit(D.prefill, mask=masks.causal(offset=np.zeros(B, np.int32)))(q, k, v, cache, bias=dense)
    assert_close(o, _full(q, k, v, bias=bias))
    np.testing.assert_array_equal(c.lengths, [T, T])


def test_checked_append_past_capacity_or_onto_unallocated_pages_raises():
    # The two silent-drop cases above (row 1 overflows; page 1 of the row is unallocated), with
    # value checks enabled (attn_jax.checked): errors naming k_new instead of dropped tokens.
    cache = KVCache.init(2, 4, 1, 2).replace(lengths=np.array([1, 3], np.int32))
    kn = np.ones((2, 3, 1, 2), np.float32)
    checked_append = aj.checked(lambda c, k, v, n=None: c.append(k, v, n), jit=True,
                                compiler_options=testing.FAST_COMPILE)
    with pytest.raises(ValueError, match=r"k_new: appending past the cache capacity max_len=4: a row holding 3 "
                                         r"tokens receives 3 more"):
        checked_append(cache, kn, kn)
    new = checked_append(cache, kn, kn, np.array([3, 1], np.int32))       # fills both rows exactly
    np.testing.assert_array_equal(new.lengths, [4, 4])
    paged = PagedKVCache.init(1, 4, 2, 3, 1, 2, page_table=jnp.array([[2, -1, 0]], jnp.int32))
    kp = np.ones((1, 4, 1, 2), np.float32)
    with pytest.raises(ValueError, match=r"k_new: 2 new tokens land on unallocated pages"):
        checked_append(paged, kp, kp)
    new = checked_append(paged, kp, kp, np.array([2], np.int32))          # only the allocated first page
    np.testing.assert_array_equal(new.lengths, [2])
