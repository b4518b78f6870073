"""MoBA: the gate against a NumPy routing, the engine path against dense attention under the token mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.sparse import moba, moba_gate, moba_reference


def numpy_routing(q, k, block_size, top_k):
    """sel[b, h, t, blk] from the paper's definition, written independently in NumPy (float64)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    nb = -(-S // block_size)
    kbar = np.stack([k[:, i * block_size:(i + 1) * block_size].mean(axis=1) for i in range(nb)], axis=1)  # [B,nb,K,D]
    sel = np.zeros((B, H, T, nb), bool)
    for b in range(B):
        for h in range(H):
            scores = q[b, :, h] @ kbar[b, :, h // (H // K)].T                                         # [T, nb]
            for t in range(T):
                own = (t + S - T) // block_size
                sel[b, h, t, own] = True
                past = np.argsort(-scores[t, :own], kind="stable")[:top_k - 1]
                sel[b, h, t, past] = True
    return sel


@pytest.mark.parametrize("T,S,top_k", [(45, 45, 3), (30, 45, 2)])
def test_gate_matches_definition(T, S, top_k):
    """Own block always, never a future block, the top_k - 1 best past blocks by mean-pooled key score."""
    q, k, _ = tk.random_qkv_compiled(jax.random.key(0), B=2, T=T, S=S, H=4, K=2, Dk=8)
    sel = np.asarray(tk.compiled(lambda q, k: moba_gate(q, k, block_size=8, top_k=top_k), q, k))
    np.testing.assert_array_equal(sel, numpy_routing(q, k, 8, top_k))
    own = (np.arange(T) + S - T) // 8
    assert not (sel & (np.arange(sel.shape[-1])[None, :] > own[:, None])).any()
    np.testing.assert_array_equal(sel.sum(-1), np.broadcast_to(np.minimum(top_k, own + 1), sel.shape[:3]))


CASES = {
    # name: T, S, H, K, block_size, top_k, block_q
    "gqa_small_query_blocks": (45, 45, 4, 2, 8, 3, 4),
    "mqa_T_ne_S": (30, 45, 2, 1, 8, 2, 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_matches_reference(name):
    """Values and the VJPs of q, k, v against dense attention under MoBA's materialised token mask."""
    T, S, H, K, bs, top_k, bq = CASES[name]
    q, k, v = tk.random_qkv_compiled(jax.random.key(1), B=2, T=T, S=S, H=H, K=K, Dk=16, Dv=8)
    tk.check_vjp_parity(lambda q, k, v: moba(q, k, v, block_size=bs, top_k=top_k, block_q=bq),
                        lambda q, k, v: moba_reference(q, k, v, block_size=bs, top_k=top_k), (q, k, v), ("q", "k", "v"))


def test_all_blocks_is_causal_attention_and_causality():
    """top_k >= number of blocks is exact causal attention; later tokens never change earlier outputs."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(2), B=1, T=32, H=2, Dk=8)
    full = tk.compiled(lambda q, k, v: (moba(q, k, v, block_size=8, top_k=4),
                                        aj.attention(q, k, v, mask=masks.causal(), impl="reference")), q, k, v)
    tk.assert_close(*full, name="top_k = nb vs causal attention")
    fn = jax.jit(lambda q, k, v: moba(q, k, v, block_size=8, top_k=2), compiler_options=tk.FAST_COMPILE)
    tk.check_causality_by_perturbation(fn, q, k, v)


def test_offsets_and_segments_match_reference():
    """Per-row query offsets (a cache's lengths) and packed segment ids, engine vs reference."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=2, T=5, S=24, H=2, K=2, Dk=8)
    off = jnp.asarray([7, 19], jnp.int32)
    kv_ids = (jnp.arange(24)[None, :] < off[:, None] + 5).astype(jnp.int32)
    kw = dict(block_size=4, top_k=2, q_offset=off, segment_ids=(jnp.ones((2, 5), jnp.int32), kv_ids))
    out = tk.compiled(lambda q, k, v: (moba(q, k, v, **kw), moba_reference(q, k, v, **kw)), q, k, v)
    tk.assert_close(*out, name="offsets + segments")


def test_mixer_prefill_then_decode():
    """The registered mixer with real routing (4-token blocks over 16 tokens): prefill + one-token
    decode steps over a KVCache equal the full forward."""
    from flax import nnx

    m = tk.build_module(aj.mixers.get("moba"), 32, 4, num_kv_heads=2, block_size=4, top_k=2)
    graphdef, state = nnx.split(m)
    call = tk.fast_jit(lambda state, x, cache=None: nnx.merge(graphdef, state)(x, cache=cache))
    x = jax.random.normal(jax.random.key(4), (2, 16, 32))
    full = call(state, x)[0]
    y, _ = tk.prefill_then_decode(lambda c, cache: call(state, c, cache), x, m.init_cache(2, 20, jnp.float32), 9)
    tk.assert_close(y, full, name="moba mixer: prefill + decode vs full")


def test_bad_inputs():
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="top_k"):
        moba(x, x, x, block_size=4, top_k=0)
    with pytest.raises(ValueError, match="block_size"):
        moba(x, x, x, block_size=2.0, top_k=1)
    with pytest.raises(ValueError, match="impl"):
        moba(x, x, x, block_size=4, top_k=1, impl="pallas")
    with pytest.raises(ValueError, match="block_q"):
        moba(x, x, x, block_size=4, top_k=1, block_q=0)
