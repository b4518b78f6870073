"""impl="xla"-specific properties: the public entry point, no T x S temporaries, tile skipping.

Parity of the tiled forward/backward with the reference over the whole feature matrix (masks,
biases, softcap, sinks, dropout, GQA, odd sizes, dtypes, NaN padding, fully masked rows, jit vs
eager, determinism) lives in the conformance suite (tests/softmax/test_conformance.py), which runs
``attention_blockwise`` with 16 x 32 tiles against the float64 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.softmax import xla


def qkv(B=2, T=40, S=None, H=4, K=None, Dk=32, Dv=None, dtype=jnp.float32, seed=0):
    return tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)


def test_through_public_api():
    q, k, v = qkv(T=45, S=70, K=2)
    for return_lse in (False, True):
        a, b = tk.compiled(lambda q, k, v: (
            aj.attention(q, k, v, mask=masks.causal(), impl="xla", return_lse=return_lse),
            aj.attention(q, k, v, mask=masks.causal(), impl="reference", return_lse=return_lse)), q, k, v)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            tk.assert_close(x, y)
    # auto on CPU: the dense block within its fixed budget (this small problem), else the tiled path.
    assert aj.explain(q, k, v, impl="auto", platform="cpu").chosen["cpu"] in ("dense", "xla")


# ----------------------------------------------------------------------------- memory and skipping


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_t_by_s_temporaries_forward_and_backward():
    def loss(q, k, v):
        return xla.attention_blockwise(q, k, v, mask=masks.causal(), block_q=128, block_k=128).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    temps = {}
    for T in (1024, 2048):
        args = [jax.ShapeDtypeStruct((1, T, 1, 32), jnp.float32)] * 3
        temps[T] = (_temp_bytes(loss, *args), _temp_bytes(grad, *args))
    T = 2048
    tss = T * T * 4
    assert temps[T][0] < tss / 8 and temps[T][1] < tss / 8, (temps, tss)
    # Linear, not quadratic, growth in T.
    assert temps[2048][1] < 2.6 * temps[1024][1], temps
    ref_grad = jax.grad(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference").sum(),
                        argnums=(0, 1, 2))
    args = [jax.ShapeDtypeStruct((1, T, 1, 32), jnp.float32)] * 3
    assert _temp_bytes(ref_grad, *args) >= tss  # the yardstick really is quadratic


def test_block_skipping_counts_tiles():
    q, k, v = qkv(B=1, T=256, H=2)
    # One fast-compiled program per mask (eager, the tiled forward ran op by op).
    tiles = tk.fast_jit(xla.forward_tile_count, static_argnames=("block_q", "block_k"))
    count = lambda mask, bq=32, bk=32: int(tiles(q, k, v, mask=mask, block_q=bq, block_k=bk))
    n = 256 // 32
    assert count(None) == n * n
    assert count(masks.causal()) == n * (n + 1) // 2
    assert count(masks.sliding_window(32)) == 2 * n - 1  # O(T w): diagonal + one block left
    assert count(masks.sliding_window(32) & masks.causal()) == 2 * n - 1
    # Data-dependent: 4 equal documents -> only the 4 diagonal 64x64 squares (2x2 tiles each).
    ids = jnp.repeat(jnp.arange(1, 5), 64)[None]
    assert count(masks.segments(ids)) == 4 * 4
    assert count(masks.segments(ids) & masks.causal()) == 4 * 3
    assert count(masks.key_padding(jnp.array([64]))) == n * 2
    # jit-compatible: dynamic skipping happens at run time.
    assert int(jax.jit(lambda ids: xla.forward_tile_count(q, k, v, mask=masks.segments(ids), block_q=32,
                                                          block_k=32))(ids)) == 16
