"""Neighborhood attention: the window rule by hand, mask properties, both fast forms vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_jax as aj
from attn_jax.core import masks as M
from attn_jax.core import testing as tk
from attn_jax.local import NeighborhoodMask, neighborhood, neighborhood_mask, neighborhood_spec
from attn_jax.local.neighborhood import NeighborhoodBias
from attn_jax.local.neighborhood import tile_shape, tiled_order, token_order


def _normal(seed, shape):
    """Unit-normal float32 inputs from NumPy (an eager jax.random.normal compiles per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rows(m):
    return [sorted(np.nonzero(r)[0].tolist()) for r in m]


# ----------------------------------------------------------------------------- the rule by hand


def test_mask_worked_by_hand_1d():
    # n=5, k=3: windows shifted (not truncated) at both borders
    assert _rows(neighborhood_mask((5,), 3)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    # even kernel k=2: left radius 1, right radius 0
    assert _rows(neighborhood_mask((4,), 2)) == [[0, 1], [0, 1], [1, 2], [2, 3]]
    # causal k=3: the window ends at the query; fewer keys near the start
    assert _rows(neighborhood_mask((5,), 3, causal=True)) == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    # dilation 2, k=2: two interleaved groups {0,2,4} and {1,3,5}, each its own shifted windows
    assert _rows(neighborhood_mask((6,), 2, dilation=2)) == [[0, 2], [1, 3], [0, 2], [1, 3], [2, 4], [3, 5]]
    # stride 2, k=3: pairs share the window of their centre-most query (the right one), clamped
    assert _rows(neighborhood_mask((6,), 3, stride=2)) == [[0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4],
                                                           [3, 4, 5], [3, 4, 5]]
    # causal + stride 2, k=3: leader = last query of the pair; keys in [leader - 2, i]
    assert _rows(neighborhood_mask((6,), 3, stride=2, causal=True)) == [[0], [0, 1], [1, 2], [1, 2, 3],
                                                                        [3, 4], [3, 4, 5]]


def test_mask_worked_by_hand_2d():
    m = neighborhood_mask((3, 3), 2)        # per axis: rows {0,1}, {0,1}, {1,2}
    assert _rows(m)[0] == [0, 1, 3, 4]      # token (0, 0)
    assert _rows(m)[8] == [4, 5, 7, 8]      # token (2, 2)
    m = neighborhood_mask((3, 4), (3, 1), causal=(True, False))
    assert _rows(m)[4 * 2 + 3] == [3, 7, 11]  # token (2, 3): rows 0..2 (causal), column 3 only


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_mask_properties(data):
    d = data.draw(st.integers(1, 3))
    spatial = tuple(data.draw(st.integers(1, 7 if d < 3 else 4)) for _ in range(d))
    ks = tuple(data.draw(st.integers(1, n)) for n in spatial)
    dil = tuple(data.draw(st.integers(1, n // k)) for n, k in zip(spatial, ks))
    stride = tuple(data.draw(st.integers(1, k)) for k in ks)
    causal = tuple(data.draw(st.booleans()) for _ in range(d))
    m = neighborhood_mask(spatial, ks, dil, stride, causal)
    N = int(np.prod(spatial))
    assert m.shape == (N, N) and m[np.arange(N), np.arange(N)].all()     # every query sees itself
    if not any(causal):
        assert (m.sum(1) == np.prod(ks)).all()                         # exactly prod(kernel) keys
    else:
        assert (m.sum(1) <= np.prod(ks)).all()
    coords = np.stack(np.unravel_index(np.arange(N), spatial), 1)       # [N, d]
    qi, kj = np.nonzero(m)
    for a in range(d):
        assert (coords[qi, a] % dil[a] == coords[kj, a] % dil[a]).all()  # same dilation group
        if causal[a]:
            assert (coords[kj, a] <= coords[qi, a]).all()               # causal per axis
    # the mask object in its token order: classify is exact per tile (NumPy tile any / all)
    block = tile_shape(spatial)
    order = token_order(spatial, block)
    dense = m[order][:, order]
    bq, bk = data.draw(st.sampled_from([(1, 1), (4, 3), (8, 8), (5, 16)]))
    cls = NeighborhoodMask(neighborhood_spec(spatial, ks, dil, stride, causal), block).classify(N, N, bq, bk)[0, 0]
    nq, nk = -(-N // bq), -(-N // bk)
    for i in range(nq):
        for j in range(nk):
            t = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            assert cls[i, j] == (M.EMPTY if not t.any() else M.FULL if t.all() else M.PARTIAL)


def test_mask_predicate_in_blocked_order():
    spatial, ks = (8, 16), (3, 4)
    spec = neighborhood_spec(spatial, ks, (2, 1), (1, 2), (False, True))
    order = token_order(spatial, tile_shape(spatial))
    dense = neighborhood_mask(spatial, ks, (2, 1), (1, 2), (False, True))[order][:, order]
    mask = NeighborhoodMask(spec, tile_shape(spatial))
    pred = tk.compiled(lambda i: mask.predicate(i, i, 128, 128), jnp.arange(128))
    np.testing.assert_array_equal(np.asarray(pred)[0, 0], dense)
    np.testing.assert_array_equal(np.asarray(mask.materialize(128, 128))[0, 0], dense)


def test_relative_position_bias_by_hand():
    # n=5, k=3: table entry y - x + 2; query 0 (window 0..2) reads entries 2, 3, 4, query 4 (2..4) 0, 1, 2
    spec = neighborhood_spec((5,), 3)
    b = np.asarray(NeighborhoodBias(jnp.arange(5.0)[None], spec).materialize(5, 5))[0, 0]
    m = neighborhood_mask((5,), 3)
    assert b[0][m[0]].tolist() == [2, 3, 4] and b[4][m[4]].tolist() == [0, 1, 2] and b[2][m[2]].tolist() == [1, 2, 3]
    # dilation 2: offsets in group coordinates (query 4 = group 0 index 2, window {0, 2, 4} -> 0, 1, 2)
    spec = neighborhood_spec((6,), 3, dilation=2)
    b = np.asarray(NeighborhoodBias(jnp.arange(5.0)[None], spec).materialize(6, 6))[0, 0]
    assert b[4][neighborhood_mask((6,), 3, dilation=2)[4]].tolist() == [0, 1, 2]


def test_stride_group_shares_window_and_interior_is_centred():
    m = neighborhood_mask((12,), 5, stride=3)
    for g in range(4):
        assert len({tuple(r) for r in _rows(m[3 * g:3 * g + 3])}) == 1
    m = neighborhood_mask((9, 9), 3)
    assert _rows(m)[4 * 9 + 4] == [30, 31, 32, 39, 40, 41, 48, 49, 50]   # token (4, 4): a centred 3 x 3


def test_tiled_form_skips_empty_tiles_and_picks_the_cheaper_order():
    # 64 x 64 tokens, 64-token tiles: k=13 touches 484 of 4096 tiles in 8 x 8 blocks, 832 in raster rows
    spec = neighborhood_spec((64, 64), 13)
    blocked = NeighborhoodMask(spec, (8, 8)).classify(4096, 4096, 64, 64)[0, 0]
    raster = NeighborhoodMask(spec, None).classify(4096, 4096, 64, 64)[0, 0]
    assert (blocked != M.EMPTY).sum() == 484 and (raster != M.EMPTY).sum() == 832
    # the cost model picks what was fastest when measured (benchmarks/local.py shapes: B=1, H=4, D=32)
    assert tiled_order(spec, 128) == ((8, 8), 64)
    assert tiled_order(neighborhood_spec((64, 64), 7), 128) == ((4, 8), 32)
    assert tiled_order(neighborhood_spec((16, 16), 3), 128) == (None, 32)    # raster rows
    assert tiled_order(neighborhood_spec((6,), 3), 128) == (None, 6)         # shorter than a tile


# ----------------------------------------------------------------------------- values and gradients


def _parity(shape, H, K, ks, dtype=jnp.float32, Dk=8, Dv=None, rpb=False, **kw):
    """Gather and tiled forms vs the reference on the output and the VJP of q, k, v (and the
    relative position bias table with ``rpb``), all in one compiled program."""
    Dv = Dk if Dv is None else Dv
    q, k, v = (_normal(i, (2, *shape, h, d)).astype(dtype) for i, h, d in ((0, H, Dk), (1, K, Dk), (2, K, Dv)))
    kc = jax.random.key(3)
    spec = neighborhood_spec(shape, ks, kw.get("dilation", 1), kw.get("stride", 1), kw.get("causal", False))
    args = (q, k, v) + ((_normal(4, (H, *(2 * n - 1 for n in spec.kernel_size))),) if rpb else ())
    fn = {impl: (lambda *a, impl=impl: neighborhood(*a[:3], ks, rpb=a[3] if rpb else None, impl=impl, **kw))
          for impl in ("reference", "gather", "tiled")}

    def all_forms(*a):
        return {impl: tk.vjp_with_random_cotangent(f, a, kc) for impl, f in fn.items()}

    res = tk.compiled(all_forms, *args)
    o_ref, g_ref = res["reference"]
    for impl in ("gather", "tiled"):
        o, g = res[impl]
        assert o.dtype == dtype
        tk.assert_close(o, o_ref, name=f"{impl} output")
        for name, a, b in zip(("q", "k", "v", "rpb"), g, g_ref):
            tk.assert_close(a, b, grad=True, name=f"{impl} d{name}")


@pytest.mark.parametrize("shape,H,K,ks,kw", [
    ((11,), 4, 2, 4, dict(causal=True, stride=2, dilation=2)),                           # 1-D: even k, GQA
    ((16, 32), 2, 1, (13, 12), dict(causal=(False, True), stride=(1, 3), rpb=True)),    # 2-D, blocked order, MQA
    ((4, 5, 6), 2, 1, (3, 2, 3), dict(causal=(False, True, False), dilation=(1, 2, 2), rpb=True)),  # 3-D
])
def test_forms_match_reference(shape, H, K, ks, kw):
    if len(shape) == 2:   # this case is there to run the tiled form in a blocked order (8 x 16 tiles)
        spec_kw = {n: x for n, x in kw.items() if n != "rpb"}
        assert tiled_order(neighborhood_spec(shape, ks, **spec_kw), 2 * H * 8) == ((8, 16), 128)
    _parity(shape, H, K, ks, **kw)


def test_bf16_and_distinct_value_dim():
    q, k, v = _normal(4, (1, 7, 9, 2, 8)), _normal(5, (1, 7, 9, 2, 8)), _normal(6, (1, 7, 9, 2, 12))
    kw = dict(kernel_size=(4, 3), dilation=(1, 2), causal=(True, False))
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    outs = tk.compiled(lambda q, k, v: [neighborhood(q, k, v, impl="reference", **kw)]
                       + [neighborhood(bf(q), bf(k), bf(v), impl=i, **kw) for i in ("gather", "tiled")], q, k, v)
    for o in outs[1:]:
        assert o.dtype == jnp.bfloat16 and o.shape == (1, 7, 9, 2, 12)
        tk.assert_close(o, outs[0], dtype=jnp.bfloat16)


def test_reference_is_dense_attention_with_the_mask():
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=1, T=20, H=2, Dk=8)
    grid = lambda x: x.reshape(1, 4, 5, *x.shape[2:])  # noqa: E731
    m = neighborhood_mask((4, 5), (3, 2), stride=(1, 2), causal=(False, True))
    o, o_dense = tk.compiled(lambda q, k, v: (aj.local.neighborhood_reference(grid(q), grid(k), grid(v), (3, 2),
                                                                              stride=(1, 2), causal=(False, True)),
                                              aj.attention(q, k, v, mask=M.dense(jnp.asarray(m)[None, None]),
                                                           impl="reference")), q, k, v)
    tk.assert_close(o.reshape(o_dense.shape), o_dense)


@settings(max_examples=4, deadline=None)
@given(st.sampled_from([(6,), (5, 7), (3, 4, 4)]), st.data())
def test_sweep_forward(shape, data):
    ks = tuple(data.draw(st.integers(1, n)) for n in shape)
    dil = tuple(data.draw(st.integers(1, n // k)) for n, k in zip(shape, ks))
    causal = tuple(data.draw(st.booleans()) for _ in shape)
    q, k, v = (_normal(i, (1, *shape, 2, 4)) for i in range(3))
    outs = tk.compiled(lambda q, k, v: [neighborhood(q, k, v, ks, dilation=dil, causal=causal, impl=i)
                                        for i in ("reference", "gather", "tiled")], q, k, v)
    for o in outs[1:]:
        tk.assert_close(o, outs[0])


def test_auto_picks_tiled_and_gather_for_lengths():
    q = jax.ShapeDtypeStruct((2, 8, 2, 4), jnp.float32)
    d = aj.explain(neighborhood, q, q, q, 3)
    assert d.chosen["cpu"] == "tiled" and d.chosen["tpu"] == "tiled"
    d = aj.explain(neighborhood, q, q, q, 3, lengths=jnp.asarray([8, 5]))
    assert d.chosen["cpu"] == "gather" and "lengths" in d.reasons["cpu"]["tiled"][0]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kw,exc,match", [
    (dict(kernel_size=9), ValueError, "kernel_size"),
    (dict(kernel_size=3, dilation=3), ValueError, "dilation"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(kernel_size=3, stride=4), ValueError, "stride"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(kernel_size=3, causal=(True,)), ValueError, "causal"),
    (dict(kernel_size=3, impl="nope"), ValueError, "impl"),
])
def test_bad_arguments(kw, exc, match):
    x = jnp.zeros((1, 8, 6, 2, 4))
    kernel_size = kw.pop("kernel_size")
    with pytest.raises(exc, match=match):
        neighborhood(x, x, x, kernel_size, **kw)


def test_bad_lengths():
    x = jnp.zeros((2, 8, 6, 2, 4))
    with pytest.raises(ValueError, match="lengths: per-row valid lengths are supported on 1-D grids only"):
        neighborhood(x, x, x, 3, lengths=jnp.asarray([8, 4]))
    with pytest.raises(ValueError, match="lengths: expected shape"):
        neighborhood(x[:, :, 0], x[:, :, 0], x[:, :, 0], 3, lengths=jnp.asarray([8]))
    with pytest.raises(TypeError, match="lengths: expected an integer"):
        neighborhood(x[:, :, 0], x[:, :, 0], x[:, :, 0], 3, lengths=jnp.asarray([8.0, 4.0]))


def test_bad_rpb():
    x = jnp.zeros((1, 8, 6, 2, 4))
    with pytest.raises(ValueError, match=r"rpb: expected the relative position bias table .* \[2, 5, 3\], "
                                         r"got \[2, 5, 5\]"):
        neighborhood(x, x, x, (3, 2), rpb=jnp.zeros((2, 5, 5)))
    with pytest.raises(TypeError, match="rpb"):
        neighborhood(x, x, x, (3, 2), rpb=jnp.zeros((2, 5, 3), jnp.int32))


def test_bad_shapes():
    x = jnp.zeros((1, 8, 6, 2, 4))
    with pytest.raises(ValueError, match="q: expected rank 4, 5 or 6"):
        neighborhood(jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 2)), 3)
    with pytest.raises(ValueError, match="k: expected batch and grid"):
        neighborhood(x, jnp.zeros((1, 8, 5, 2, 4)), x, 3)
    with pytest.raises(ValueError, match="k: expected a head count"):
        neighborhood(jnp.zeros((1, 8, 6, 3, 4)), x, x, 3)
    with pytest.raises(TypeError, match="q: expected a floating-point"):
        neighborhood(x.astype(jnp.int32), x, x, 3)


@pytest.mark.parametrize("kw", [dict(kernel_size=5, dilation=2, stride=2), dict(kernel_size=4, causal=True)])
def test_lengths_rows_equal_rows_alone(kw):
    """1-D right padding: row b with lengths[b] tokens == that row alone (its windows shift at its own
    end); padding outputs are zero; a row shorter than the kernel sees its whole (dilation) group."""
    q, k, v = _normal(7, (3, 13, 2, 4)), _normal(8, (3, 13, 1, 4)), _normal(9, (3, 13, 1, 4))
    lengths = jnp.asarray([13, 10, 3], jnp.int32)

    table = _normal(10, (2, 2 * kw["kernel_size"] - 1))

    def run(q, k, v):
        outs = {i: neighborhood(q, k, v, lengths=lengths, rpb=table, impl=i, **kw) for i in ("reference", "gather")}
        alone = [neighborhood(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], rpb=table, **kw)
                 for b, n in ((0, 13), (1, 10))]
        return outs, alone

    outs, alone = tk.compiled(run, q, k, v)
    tk.assert_close(outs["gather"], outs["reference"], name="gather with lengths")
    for b, n in ((0, 13), (1, 10)):
        tk.assert_close(outs["reference"][b:b + 1, :n], alone[b], name=f"row {b} vs alone")
    assert float(jnp.abs(outs["reference"][1:2, 10:]).max()) == 0 and float(jnp.abs(outs["gather"][2, 3:]).max()) == 0
    with pytest.raises(ValueError, match="lengths"):
        neighborhood(q, k, v, lengths=lengths, impl="tiled", **kw)


def test_shape_annotations_are_checked():
    """tests/conftest.py puts attn_jax.local under jaxtyping's import hook: the annotations are enforced."""
    for fn in (neighborhood, aj.local.axial, aj.local.window_attention, aj.local.multi_scale_window_attention):
        assert hasattr(fn, "__wrapped__"), f"{fn.__name__} is not wrapped by jaxtyping's import hook"


# ----------------------------------------------------------------------------- additional keys / values


def test_extra_kv_is_one_softmax_over_window_and_extras():
    """extra_k / extra_v (seen by every query) merged by LSE equal dense attention over the concatenated
    keys with the NA mask plus always-visible extra columns (and the rpb on the window part only):
    both fast forms, values and the VJPs of q, k, v, extra_k, extra_v and the bias table."""
    shape, ks, kw = (4, 6), (3, 2), {"causal": (True, False), "dilation": (1, 2)}
    B, H, K, D, Mx = 2, 4, 2, 8, 3
    q, k, v = _normal(0, (B, *shape, H, D)), _normal(1, (B, *shape, K, D)), _normal(2, (B, *shape, K, D))
    ek, ev = 2.0 * _normal(3, (B, Mx, K, D)), _normal(4, (B, Mx, K, D))   # extras carry real weight
    spec = neighborhood_spec(shape, ks, kw.get("dilation", 1), 1, kw.get("causal", False))
    rpb = _normal(5, (H, *(2 * n - 1 for n in spec.kernel_size)))
    N = spec.tokens
    vis = np.concatenate([neighborhood_mask(shape, ks, **kw), np.ones((N, Mx), bool)], 1)

    def dense(q, k, v, ek, ev, rpb):
        flat = lambda x: x.reshape(B, N, *x.shape[-2:])  # noqa: E731
        bias = jnp.pad(NeighborhoodBias(rpb, spec).materialize(N, N), ((0, 0), (0, 0), (0, 0), (0, Mx)))
        o = aj.attention(flat(q), jnp.concatenate([flat(k), ek], 1), jnp.concatenate([flat(v), ev], 1),
                         mask=M.dense(jnp.asarray(vis)[None, None]), bias=bias, impl="reference")
        return o.reshape(q.shape)

    fns = {impl: (lambda q, k, v, ek, ev, rpb, impl=impl: neighborhood(q, k, v, ks, rpb=rpb, extra_k=ek, extra_v=ev,
                                                                          impl=impl, **kw))
           for impl in ("gather", "tiled")}
    fns["dense"] = dense
    fns["no extras"] = lambda q, k, v, ek, ev, rpb: neighborhood(q, k, v, ks, rpb=rpb, impl="reference", **kw)
    kc = jax.random.key(6)
    res = tk.compiled(lambda *a: {n: tk.vjp_with_random_cotangent(f, a, kc) for n, f in fns.items()},
                      q, k, v, ek, ev, rpb)
    o_ref, g_ref = res["dense"]
    for impl in ("gather", "tiled"):
        o, g = res[impl]
        tk.assert_close(o, o_ref, name=f"{impl} output")
        for name, a, b in zip(("q", "k", "v", "extra_k", "extra_v", "rpb"), g, g_ref):
            tk.assert_close(a, b, grad=True, name=f"{impl} d{name}")
    # the extras matter: without them the output differs
    assert float(jnp.abs(o_ref - res["no extras"][0]).max()) > 1e-2


def test_bad_extra_kv():
    x = jnp.zeros((1, 4, 4, 2, 8))
    e = jnp.zeros((1, 3, 2, 8))
    with pytest.raises(ValueError, match="extra_k, extra_v: expected both or neither"):
        neighborhood(x, x, x, 3, extra_k=e)
    with pytest.raises(ValueError, match=r"extra_v: expected \[B, M, K, D\] = \[1, M >= 1, 2, 8\], got \[1, 3, 1, 8\]"):
        neighborhood(x, x, x, 3, extra_k=e, extra_v=jnp.zeros((1, 3, 1, 8)))
    with pytest.raises(ValueError, match="extra_v: expected 3 tokens like extra_k"):
        neighborhood(x, x, x, 3, extra_k=e, extra_v=jnp.zeros((1, 2, 2, 8)))
    with pytest.raises(TypeError, match="extra_k: expected q's dtype float32, got bfloat16"):
        neighborhood(x, x, x, 3, extra_k=e.astype(jnp.bfloat16), extra_v=e)
    y = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="extra_k: additional keys are not supported together with lengths"):
        neighborhood(y, y, y, 3, lengths=jnp.array([5]), extra_k=e, extra_v=e)
