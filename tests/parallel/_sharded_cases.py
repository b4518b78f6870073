"""Parallel ops on 8 simulated CPU devices == the single-device ops (values and gradients).

Not collected by the main test run (the name does not match ``test_*.py``): ``test_parallel.py``
runs this file in its own pytest process with ``--xla_force_host_platform_device_count=8`` appended
to ``XLA_FLAGS`` (the device count is fixed when JAX's backend starts, so it cannot be changed in a
process that has already used JAX).  Each configuration is one compiled program: the sharded op and
``aj.attention`` with the same mask, forward and VJP with one random cotangent (``_check_parity``).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):   # also runnable on its own: set before JAX's backend starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import attn_jax as aj  # noqa: E402
from attn_jax import masks  # noqa: E402
from attn_jax import parallel  # noqa: E402
from attn_jax.core import testing as tk  # noqa: E402


def setup_module():
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()} (XLA_FLAGS)"


def _mask(causal, seg):
    m = masks.causal() if causal else None
    if seg is not None:
        m = masks.segments(seg) if m is None else m & masks.segments(seg)
    return m


def _reference(causal, seg, return_lse=False):
    return lambda q, k, v: aj.attention(q, k, v, mask=_mask(causal, seg), return_lse=return_lse)


def _check_parity(fast, ref, args, names=("q", "k", "v")):
    """``fast`` vs ``ref``: every output (``o`` or ``(o, lse)``) and the VJP of every argument, one random
    cotangent, both in one compiled program (``tk.check_vjp_parity`` for tuple outputs)."""
    key = jax.random.key(1)

    def both(*p):
        return tk.vjp_with_random_cotangent(fast, p, key), tk.vjp_with_random_cotangent(ref, p, key)

    (out, grads), (out_ref, grads_ref) = tk.compiled(both, *args)
    for i, (a, b) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out_ref), strict=True)):
        tk.assert_close(a, b, name=f"output {i}")
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        tk.assert_close(a, b, grad=True, name=f"d{name}")


# ----------------------------------------------------------------------------- ring attention

# (name, mesh axes, B, T, H, K, causal, segments, layout)
RING = [
    ("causal_gqa", dict(sequence=8), 1, 32, 4, 2, True, False, "contiguous"),
    ("zigzag_causal_segments_mqa_dp", dict(data=2, sequence=4), 2, 32, 2, 1, True, True, "zigzag"),
    ("bidirectional_segments", dict(sequence=8), 1, 24, 2, 2, False, True, "contiguous"),
]


@pytest.mark.parametrize("name,axes,B,T,H,K,causal,segments,layout", RING, ids=[r[0] for r in RING])
def test_ring_equals_single_device(name, axes, B, T, H, K, causal, segments, layout):
    mesh = parallel.make_mesh(**axes)
    n = mesh.shape["sequence"]
    q, k, v = tk.random_qkv_compiled(jax.random.key(len(name)), B=B, T=T, H=H, K=K, Dk=8)
    seg = tk.random_segment_ids(jax.random.key(7), B, T) if segments else None
    if layout == "zigzag":
        zz = lambda x: parallel.zigzag_permute(x, n)  # noqa: E731
        seg_z = None if seg is None else zz(seg)

        def ring(q, k, v):
            o, lse = parallel.ring_attention(zz(q), zz(k), zz(v), mesh=mesh, causal=causal, segment_ids=seg_z,
                                             layout="zigzag", return_lse=True)
            return parallel.zigzag_unpermute(o, n), parallel.zigzag_unpermute(lse, n)
        ref = _reference(causal, seg, return_lse=True)
    else:
        ring = lambda q, k, v: parallel.ring_attention(q, k, v, mesh=mesh, causal=causal,  # noqa: E731
                                                       segment_ids=seg)
        ref = _reference(causal, seg)
    _check_parity(ring, ref, (q, k, v))


def test_zigzag_layout_and_inverse():
    x = np.arange(16).reshape(1, 16)
    z = np.asarray(parallel.zigzag_permute(x, 4))
    # device i (2 positions each of 8 chunks of 2) holds chunks i and 7 - i
    np.testing.assert_array_equal(z[0].reshape(4, 2, 2)[:, :, 0], [[0, 14], [2, 12], [4, 10], [6, 8]])
    np.testing.assert_array_equal(np.asarray(parallel.zigzag_unpermute(z, 4)), x)


# ----------------------------------------------------------------------------- Ulysses

# (name, mesh axes, B, T, H, K, causal, segments): K % n != 0 repeats kv heads, K % n == 0 splits them
ULYSSES = [
    ("causal_segments_gqa_k_lt_n", dict(sequence=8), 1, 16, 8, 2, True, True),
    ("bidirectional_gqa_k_split_dp", dict(data=2, sequence=4), 2, 16, 8, 4, False, False),
]


@pytest.mark.parametrize("name,axes,B,T,H,K,causal,segments", ULYSSES, ids=[u[0] for u in ULYSSES])
def test_ulysses_equals_single_device(name, axes, B, T, H, K, causal, segments):
    mesh = parallel.make_mesh(**axes)
    q, k, v = tk.random_qkv_compiled(jax.random.key(len(name)), B=B, T=T, H=H, K=K, Dk=8)
    seg = tk.random_segment_ids(jax.random.key(5), B, T) if segments else None
    uly = lambda q, k, v: parallel.ulysses_attention(q, k, v, mesh=mesh, causal=causal,  # noqa: E731
                                                     segment_ids=seg, return_lse=True)
    _check_parity(uly, _reference(causal, seg, return_lse=True), (q, k, v))


# ----------------------------------------------------------------------------- sharded decode


def test_sharded_decode_equals_single_device():
    from attn_jax.softmax.decode import decode_attention
    mesh = parallel.make_mesh(sequence=8)
    q, _, _ = tk.random_qkv_compiled(jax.random.key(0), B=2, T=3, H=4, K=2, Dk=8)
    _, k, v = tk.random_qkv_compiled(jax.random.key(1), B=2, T=32, H=4, K=2, Dk=8)
    lengths = jnp.array([13, 30])   # row 0: five of the eight cache shards hold no valid key (lse = -inf parts)
    sharded = lambda q, k, v: parallel.sharded_decode_attention(q, k, v, lengths=lengths, mesh=mesh,  # noqa: E731
                                                                return_lse=True)
    _check_parity(sharded, lambda q, k, v: decode_attention(q, k, v, lengths=lengths, return_lse=True), (q, k, v))


# ----------------------------------------------------------------------------- LASP-2 linear attention


def test_sequence_parallel_linear_attention_equals_single_device():
    mesh = parallel.make_mesh(sequence=8)
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=1, T=32, H=4, K=2, Dk=8)
    _check_parity(lambda q, k, v: parallel.sequence_parallel_linear_attention(q, k, v, mesh=mesh),
                  lambda q, k, v: aj.linear.linear_attention(q, k, v, causal=True)[0], (q, k, v))


# ----------------------------------------------------------------------------- validation


def test_mesh_validation():
    mesh = parallel.make_mesh(data=2, tensor=2, sequence=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2}
    with pytest.raises(ValueError, match=r"expected the device count 8, got 6 .*data=3"):
        parallel.make_mesh(data=3, sequence=2)
    with pytest.raises(ValueError, match=r"sequence: expected a positive int, got 0"):
        parallel.make_mesh(sequence=0)
    with pytest.raises(TypeError, match=r"tensor: expected a positive int, got float"):
        parallel.make_mesh(tensor=2.0, sequence=4)
    two = parallel.make_mesh(sequence=2, devices=jax.devices()[:2])
    assert two.devices.shape == (1, 1, 1, 2)


def test_op_validation():
    mesh = parallel.make_mesh(sequence=8)
    x = jnp.zeros((1, 24, 4, 8))
    with pytest.raises(ValueError,
                       match=r"q: expected the sequence length T divisible by 2 \* 'sequence' axis size = 16"):
        parallel.ring_attention(x, x, x, mesh=mesh, causal=True, layout="zigzag")
    with pytest.raises(ValueError, match=r"layout: expected one of"):
        parallel.ring_attention(x, x, x, mesh=mesh, layout="striped")
    with pytest.raises(ValueError, match=r"k: expected \[B, T\] = \(1, 24\) leading"):
        parallel.ring_attention(x, x[:, :16], x, mesh=mesh)
    with pytest.raises(ValueError, match=r"axis_name: expected one of the mesh axes"):
        parallel.ring_attention(x, x, x, mesh=mesh, axis_name="seq")
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \[B, T\] = \(1, 24\)"):
        parallel.ring_attention(x, x, x, mesh=mesh, segment_ids=jnp.ones((1, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"q: expected the number of heads H divisible by the 'sequence' axis size"):
        parallel.ulysses_attention(x, x, x, mesh=mesh)
    with pytest.raises(TypeError, match=r"mesh: expected a jax.sharding.Mesh"):
        parallel.ulysses_attention(x, x, x, mesh=None)
    with pytest.raises(ValueError, match=r"k: expected the cache length S divisible by the 'sequence' axis"):
        parallel.sharded_decode_attention(x, x[:, :20], x[:, :20], lengths=jnp.array([3]), mesh=mesh)
    with pytest.raises(ValueError, match=r"lengths: expected an integer array of shape \[B\] = \(1,\)"):
        parallel.sharded_decode_attention(x, x, x, lengths=jnp.array([3, 4]), mesh=mesh)
    with pytest.raises(ValueError, match=r"q: expected the sequence length T divisible by the 'sequence' axis size 8"):
        parallel.sequence_parallel_linear_attention(x[:, :20], x[:, :20], x[:, :20], mesh=mesh)
