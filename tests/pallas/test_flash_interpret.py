"""Pallas flash attention: the adapter's unit pieces (block lists, dropout hash, mask terms, refusals).

Interpret-mode parity of both kernels (GPU/Triton and TPU/Mosaic with race detection) with the
reference -- values, LSE and every gradient, through the attn_jax adapter
(:func:`attn_jax.softmax.pallas.flash_attention`) -- is part of the conformance suite
(tests/softmax/test_conformance.py, runners ``pallas-gpu`` and ``pallas-tpu``), which also checks
that every case the adapter declares unsupported raises with its reasons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.alibi import alibi
from attn_jax.softmax import pallas as P
from pallas_kernels.flash_attention import block_lists, dropout_keep, evaluate_terms
from pallas_kernels.flash_attention.block_sizes import get_block_sizes
from pallas_kernels.flash_attention.reference import flash_attention_reference

_random_qkv = tk.random_qkv_compiled


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
