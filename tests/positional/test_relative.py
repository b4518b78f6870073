"""Relative embeddings (Shaw / Music Transformer): the skewed form equals the gathered one (float64,
values and the gradients of q, k, v and E); the per-tile RelativeEmbedding bias through aj.attention
(reference, dense, xla with several tiles) equals attention with the materialised bias (causal, GQA,
T != S, shared-head table, bf16); no T x S array in the xla path; refusals and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.relative import (RelativeEmbedding, relative_attention, relative_attention_reference,
                                          relative_logits_gathered, skew)
from attn_jax.softmax.xla import attention_blockwise


def _table(key, n, h, d, dtype=jnp.float32):
    return 0.5 * jax.random.normal(key, (n, h, d), jnp.float32).astype(dtype)


def _inputs64(seed, *, T, S, H, K, D, N, He):
    """q, k, v and a table in float64 from NumPy (no per-shape compile of a random generator)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float64)
                 for s in ((2, T, H, D), (2, S, K, D), (2, S, K, D), (N, He, D)))


def _parity64(fast, ref, args):
    """tk.check_vjp_parity's checks in float64 as one program with the kit's FAST_COMPILE options
    (the kit compiles float64 at full optimisation, ~3x slower to build for these small shapes)."""
    key = jax.random.key(1)
    both = jax.jit(lambda *p: (tk.vjp_with_random_cotangent(fast, p, key), tk.vjp_with_random_cotangent(ref, p, key)),
                   compiler_options=tk.FAST_COMPILE)
    (o, grads), (o_ref, grads_ref) = both(*args)
    tk.assert_close(o, o_ref, name="output")
    for name, a, b in zip(("q", "k", "v", "E"), grads, grads_ref, strict=True):
        tk.assert_close(a, b, grad=True, name=f"d{name}")


def test_skew_moves_row_a_left_by_tq_minus_1_minus_a():
    tq, tk_ = 3, 5
    x = np.arange(tq * (tq + tk_ - 1), dtype=np.float32).reshape(tq, tq + tk_ - 1)
    want = np.array([[x[a, c - a + tq - 1] for c in range(tk_)] for a in range(tq)])
    np.testing.assert_array_equal(np.asarray(skew(jnp.asarray(x), tk_)), want)


@pytest.mark.parametrize("causal,N,T,S", [(False, 5, 7, 12), (True, 11, 6, 11)])
def test_skewed_equals_gathered_values_and_grads_float64(causal, N, T, S):
    """N = 5 clips at R = 2 (Shaw); N = S = 11 gives every causal distance its row (Music Transformer)."""
    with tk.float64():
        args = _inputs64(0, T=T, S=S, H=3, K=3, D=6, N=N, He=3)
        f = lambda form: lambda *a: relative_attention_reference(*a, causal=causal, form=form)  # noqa: E731
        _parity64(f("skewed"), f("gathered"), args)


def _materialised(q, k, v, e, *, causal, mask, scale=None):
    """aj.attention's reference with the relative logits as a dense [B, H, T, S] bias (gathered form)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = scale * relative_logits_gathered(q, e, S=k.shape[1], causal=causal)
    return aj.attention(q, k, v, bias=bias, mask=mask, scale=scale, impl="reference")


# (impl, causal, T, S, H, K, table heads, N): GQA, T != S (bottom-right), a head-shared table.
CASES = [
    ("reference", True, 10, 13, 4, 2, 4, 6),
    ("dense", False, 10, 13, 4, 2, 1, 7),
    ("xla", True, 10, 13, 4, 2, 4, 6),          # 4 x 5 tiles: ragged, partial and full
    ("xla", False, 13, 13, 4, 1, 1, 31),        # N > bq + bk - 1: the window-rows branch
]


@pytest.mark.parametrize("impl,causal,T,S,H,K,He,N", CASES)
def test_attention_with_relative_embedding_equals_materialised_bias(impl, causal, T, S, H, K, He, N):
    with tk.float64():
        args = _inputs64(2, T=T, S=S, H=H, K=K, D=8, N=N, He=He)
        mask = masks.causal() if causal else None

        def fast(q, k, v, e):
            bias = RelativeEmbedding(e, causal=causal)
            if impl == "xla":
                return attention_blockwise(q, k, v, bias=bias, mask=mask, block_q=3, block_k=4)
            return aj.attention(q, k, v, bias=bias, mask=mask, impl=impl)

        ref = lambda q, k, v, e: _materialised(q, k, v, e, causal=causal, mask=mask)  # noqa: E731
        _parity64(fast, ref, args)


def test_bf16_xla_within_tolerance_of_float32_reference():
    q, k, v = tk.random_qkv_compiled(jax.random.key(4), B=1, T=24, S=24, H=2, K=2, Dk=16)
    e = _table(jax.random.key(5), 9, 2, 16)
    args32 = (q, k, v, e)
    args16 = tuple(x.astype(jnp.bfloat16) for x in args32)
    mask = masks.causal()
    fast = lambda *a: attention_blockwise(*a[:3], bias=RelativeEmbedding(a[3], causal=True), mask=mask,  # noqa: E731
                                          block_q=8, block_k=8)
    ref = lambda *a: _materialised(*a, causal=True, mask=mask)  # noqa: E731
    key = jax.random.key(6)
    (o, g), (o_ref, g_ref) = tk.compiled(lambda a16, a32: (tk.vjp_with_random_cotangent(fast, a16, key),
                                                           tk.vjp_with_random_cotangent(ref, a32, key)),
                                         args16, args32)
    assert o.dtype == jnp.bfloat16
    tk.assert_close(o, o_ref, dtype=jnp.bfloat16, name="output")
    for n, a, b in zip("qkvE", g, g_ref):
        tk.assert_close(a, b, dtype=jnp.bfloat16, grad=True, name=f"d{n}")


def test_relative_attention_causal_is_causal_and_matches_reference():
    q, k, v = tk.random_qkv_compiled(jax.random.key(7), B=1, T=12, S=12, H=2, K=2, Dk=8)
    e = _table(jax.random.key(8), 12, 2, 8)
    got, want = tk.compiled(lambda *a: (relative_attention(*a, causal=True, impl="xla"),
                                        relative_attention_reference(*a, causal=True)), q, k, v, e)
    tk.assert_close(got, want, name="relative_attention")


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation (loop bodies included) produces."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()) or (1,))))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _largest_intermediate(inner))
    return best


def test_xla_path_builds_no_t_by_s_array_forward_and_backward():
    """Traced only (no compile): the tiled path's largest array, forward and backward, with the
    bias is that of the same call without it (tiles and O(T D) buffers), far below T x S."""
    T = S = 512
    q, k, v = (jax.ShapeDtypeStruct((1, T, 1, 16), jnp.float32) for _ in range(3))
    e = jax.ShapeDtypeStruct((2 * T - 1, 1, 16), jnp.float32)

    def largest(bias_of):
        def loss(q, k, v, e):
            o = attention_blockwise(q, k, v, bias=bias_of(e), mask=masks.causal(), block_q=64, block_k=64)
            return o.sum()
        return _largest_intermediate(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, e).jaxpr)

    with_bias, without = largest(RelativeEmbedding), largest(lambda e: None)
    assert with_bias <= max(without, 2 * T * 16) and with_bias < T * S // 16, (with_bias, without)


def test_pallas_and_cudnn_refuse_with_a_reason():
    q, k, v = (jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32) for _ in range(3))
    bias = RelativeEmbedding(jnp.zeros((5, 2, 8)))
    text = str(aj.explain(q, k, v, bias=bias, platform="cuda"))
    assert "query-dependent bias RelativeEmbedding" in text
    assert "xla" in text
    with pytest.raises(ValueError, match="query-dependent"):
        aj.attention(jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 16, 2, 8)), bias=bias,
                     impl="cudnn")


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="table: causal=False needs N = 2R"):
        RelativeEmbedding(jnp.zeros((4, 1, 8)))
    with pytest.raises(ValueError, match=r"table: expected shape \[N, H\|1, Dk\]"):
        RelativeEmbedding(jnp.zeros((5, 8)))
    with pytest.raises(TypeError, match="causal: expected a bool"):
        RelativeEmbedding(jnp.zeros((5, 1, 8)), causal=1)
    with pytest.raises(ValueError, match="structured bias is defined for 3 heads, q has H=2"):
        x = jnp.zeros((1, 4, 2, 8))
        aj.attention(x, x, x, bias=RelativeEmbedding(jnp.zeros((5, 3, 8))))
    with pytest.raises(ValueError, match="depends on the queries"):
        RelativeEmbedding(jnp.zeros((5, 1, 8))).tile(jnp.arange(2), jnp.arange(2), 2, 2)


@pytest.mark.parametrize("impl", ["direct", "split_k"])
def test_decode_one_row_per_batch_equals_full_forward_last_row(impl):
    """Rows of different lengths (12 and 9 of a 16-slot cache): the decoded query at each row's last
    position equals the full causal forward's row there (split-K: key chunks at offsets 0, 6, 12)."""
    from attn_jax.softmax.decode import decode_attention
    q, k, v = tk.random_qkv_compiled(jax.random.key(9), B=2, T=16, S=16, H=4, K=2, Dk=8)
    e = _table(jax.random.key(10), 8, 4, 8)
    lengths = jnp.array([12, 9], jnp.int32)

    def run(q, k, v, e):
        bias = RelativeEmbedding(e, causal=True)
        qd = jnp.stack([q[0, 11], q[1, 8]])[:, None]                       # [B, 1, H, Dk]
        kw = dict(num_splits=3) if impl == "split_k" else {}
        got = decode_attention(qd, k, v, lengths=lengths, bias=bias, impl=impl, **kw)[:, 0]
        full12 = aj.attention(q[:, :12], k[:, :12], v[:, :12], bias=bias, mask=masks.causal(), impl="reference")
        full9 = aj.attention(q[:, :9], k[:, :9], v[:, :9], bias=bias, mask=masks.causal(), impl="reference")
        return got, jnp.stack([full12[0, 11], full9[1, 8]])

    got, want = tk.compiled(run, q, k, v, e)
    tk.assert_close(got, want, name=f"decode ({impl}) vs full forward")


def test_per_distance_scalar_on_xla_equals_reference_values_and_grads():
    """RelativeEmbedding(E, scalar=b): the skewed per-tile window (xla, 3 x 4 tiles) vs the reference's
    gathered materialisation, with gradients to b as well."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(11), B=1, T=9, S=12, H=2, K=1, Dk=8)
    e = _table(jax.random.key(12), 7, 2, 8)
    b = jax.random.normal(jax.random.key(13), (7, 2))
    fast = lambda q, k, v, e, b: attention_blockwise(  # noqa: E731
        q, k, v, bias=RelativeEmbedding(e, scalar=b), block_q=3, block_k=4)
    ref = lambda q, k, v, e, b: aj.attention(q, k, v, bias=RelativeEmbedding(e, scalar=b),  # noqa: E731
                                             impl="reference")
    tk.check_vjp_parity(fast, ref, (q, k, v, e, b), ("q", "k", "v", "E", "scalar"))
