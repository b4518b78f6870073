"""The attn_jax test kit: one tolerance table, one comparison, reusable invariants.

Every parity test in the project goes through :func:`assert_close`, which checks
for NaN/Inf first, then the relative RMSE ``||x - ref|| / ||ref||`` and the
max-abs error against the tolerance of the dtype (gradients get twice the
tolerance).  The invariant checkers take any attention-like callable and are
written once, so every registered mechanism is checked the same way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

# dtype -> (relative RMSE, max abs); gradients use GRAD_FACTOR x these.
TOLERANCES = {
    "float64": (1e-10, 1e-9),
    "float32": (1e-5, 1e-4),
    "bfloat16": (1e-2, 5e-2),
    "float16": (2e-3, 1e-2),
}
GRAD_FACTOR = 2.0


def tolerance(dtype, *, grad: bool = False) -> tuple[float, float]:
    rel, atol = TOLERANCES[jnp.dtype(dtype).name]
    f = GRAD_FACTOR if grad else 1.0
    return rel * f, atol * f


def rel_rmse(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return float(num / denom) if denom > 0 else float(num)


def assert_close(x, ref, *, dtype=None, grad: bool = False, rel: float | None = None, atol: float | None = None,
                 name: str = "value") -> None:
    """NaN/Inf check first, then relative RMSE and max-abs error against the dtype's tolerance.

    ``dtype`` selects the row of :data:`TOLERANCES` (default: ``x``'s dtype).  Infinities
    in ``ref`` must be matched exactly (e.g. ``lse = -inf`` of fully masked rows).
    """
    x = np.asarray(jnp.asarray(x, jnp.float32) if jnp.asarray(x).dtype in (jnp.bfloat16, jnp.float16) else x)
    ref = np.asarray(jnp.asarray(ref, jnp.float32) if jnp.asarray(ref).dtype in (jnp.bfloat16, jnp.float16) else ref)
    if x.shape != ref.shape:
        raise AssertionError(f"{name}: shape {x.shape} != reference shape {ref.shape}")
    if np.isnan(ref).any():
        raise AssertionError(f"{name}: the reference contains NaN")
    if np.isnan(x).any():
        raise AssertionError(f"{name}: {int(np.isnan(x).sum())} NaN values (reference has none)")
    inf_x, inf_r = np.isinf(x), np.isinf(ref)
    if (inf_x != inf_r).any() or (x[inf_x] != ref[inf_r]).any():
        raise AssertionError(f"{name}: infinities differ from the reference ({int(inf_x.sum())} vs {int(inf_r.sum())})")
    fin = ~inf_r
    d_rel, d_atol = tolerance(dtype if dtype is not None else (x.dtype if x.dtype != np.float64 else "float64"),
                              grad=grad)
    rel = d_rel if rel is None else rel
    atol = d_atol if atol is None else atol
    err_rel = rel_rmse(x[fin], ref[fin])
    err_abs = float(np.abs(x[fin] - ref[fin]).max()) if fin.any() else 0.0
    if err_rel > rel or err_abs > atol:
        raise AssertionError(f"{name}: relative RMSE {err_rel:.3e} (tol {rel:.1e}), max abs {err_abs:.3e} "
                             f"(tol {atol:.1e})")


@contextlib.contextmanager
def float64():
    """Enable float64 inside the block (for tight reference checks)."""
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------- inputs


def random_qkv(key, B=2, T=16, S=None, H=4, K=None, Dk=32, Dv=None, dtype=jnp.float32):
    """Random ``q [B, T, H, Dk]``, ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]`` (unit normal)."""
    S = T if S is None else S
    K = H if K is None else K
    Dv = Dk if Dv is None else Dv
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, H, Dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, Dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, Dv), jnp.float32).astype(dtype)
    return q, k, v


def random_segment_ids(key, B: int, T: int, max_segments: int = 3, pad_fraction: float = 0.2):
    """Packed segment ids ``int32 [B, T]``: sorted runs 1..n, trailing zeros as padding."""
    rows = []
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
    for _ in range(B):
        n_pad = int(rng.integers(0, int(T * pad_fraction) + 1))
        n_real = T - n_pad
        n_seg = int(rng.integers(1, max_segments + 1))
        cuts = np.sort(rng.choice(np.arange(1, max(n_real, 2)), size=min(n_seg - 1, max(n_real - 1, 0)),
                                  replace=False)) if n_real > 1 else np.array([], int)
        ids = np.zeros(T, np.int32)
        bounds = [0, *cuts.tolist(), n_real]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids[a:b] = s + 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def vjp_with_random_cotangent(fn: Callable, primals: Sequence, key):
    """``(out, grads)``: ``fn(*primals)`` and its VJP for a random normal cotangent.

    Cotangents at non-finite outputs (e.g. lse = -inf) are zeroed.
    """
    out, pullback = jax.vjp(fn, *primals)
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(key, len(leaves))
    cts = [jnp.where(jnp.isfinite(l), jax.random.normal(kk, l.shape, jnp.float32), 0).astype(l.dtype)
           for kk, l in zip(keys, leaves)]
    return out, pullback(jax.tree.unflatten(tree, cts))


#: XLA:CPU options for test programs, whose runtime is dominated by compilation (a jitted
#: ``jax.random.normal`` compiles ~10x faster).  Float32 and lower-precision results are unchanged
#: within tolerance; the options approximate float64 transcendental functions, so tight float64
#: checks compile with the defaults (:func:`compiled` does so whenever x64 is enabled).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn: Callable, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` compiled with :data:`FAST_COMPILE` (not for tight float64 checks)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs)


def build_module(factory: Callable, *args, seed: int = 0, **kwargs):
    """``factory(*args, rngs=nnx.Rngs(seed), **kwargs)`` with every initialiser run inside one
    fast-compiled program: eager construction compiles each parameter's initialiser at its shape
    separately (several times slower for a layer with a dozen parameters).  The parameters are
    the same draws as eager construction (same keys, same initialisers)."""
    from flax import nnx  # the kit's only NNX helper; core does not otherwise import flax

    make = lambda: factory(*args, rngs=nnx.Rngs(seed), **kwargs)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, fast_jit(lambda: nnx.split(make())[1])())


def compiled(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as one compiled XLA program (``jax.jit``; ``kwargs`` are static).

    Eager op-by-op execution compiles every primitive at every shape separately; tests that only
    need values run the whole computation (reference and implementation) as one program instead,
    with :data:`FAST_COMPILE` unless x64 is enabled.  Each call traces afresh: for a function
    called repeatedly, keep one jitted object instead.
    """
    opts = None if jax.config.jax_enable_x64 else FAST_COMPILE
    return jax.jit(lambda *a: fn(*a, **kwargs), compiler_options=opts)(*args)


def compiled_vjp(fn: Callable, primals: Sequence, key):
    """:func:`vjp_with_random_cotangent` as one compiled program (see :func:`compiled`): ``(out, grads)``."""
    return compiled(lambda *p: vjp_with_random_cotangent(fn, p, key), *primals)


#: :func:`random_qkv` as one fast-compiled program per shape (pass the sizes by keyword).  The
#: eager version compiles ``jax.random.normal`` with the default options at every shape.
random_qkv_compiled = fast_jit(random_qkv, static_argnames=("B", "T", "S", "H", "K", "Dk", "Dv", "dtype"))


_bias_tile = jax.jit(lambda b, q, k, T, S: b.tile(q, k, T, S), static_argnums=(3, 4))
_bias_dense = jax.jit(lambda b, T, S: b.materialize(T, S), static_argnums=(1, 2))


def check_structured_bias_tile(bias, T: int, S: int, q_idx, k_idx) -> None:
    """``bias.tile(q_idx, k_idx)`` equals the same rows/columns of ``bias.materialize(T, S)``.

    Index vectors may be in any order and repeat (fast paths pass arbitrary subsets).
    """
    q_idx, k_idx = np.asarray(q_idx, np.int32), np.asarray(k_idx, np.int32)
    tile = np.asarray(_bias_tile(bias, jnp.asarray(q_idx), jnp.asarray(k_idx), T, S))
    dense = np.asarray(_bias_dense(bias, T, S))
    if tile.ndim != 4 or tile.shape[2:] != (len(q_idx), len(k_idx)):
        raise AssertionError(f"tile shape {tile.shape}: expected rank 4 ending in {(len(q_idx), len(k_idx))}")
    np.testing.assert_array_equal(tile, dense[:, :, q_idx][:, :, :, k_idx])


# ----------------------------------------------------------------------------- invariants
# `fn(q, k, v) -> o` with causal semantics for the causal checks; o: [B, T, H, Dv].


def check_causality(fn: Callable, q, k, v, *, dtype=None) -> None:
    """Output at i is unchanged when every token after i changes (CAB's test, for i in [T/2, T))."""
    T = q.shape[1]
    full = fn(q, k, v)
    for i in sorted({T // 2, (3 * T) // 4, T - 2, T - 1} & set(range(T))):
        pre = fn(q[:, : i + 1], k[:, : i + 1], v[:, : i + 1])
        assert_close(pre[:, i], full[:, i], dtype=dtype, name=f"causality at position {i}")


def check_causality_by_perturbation(fn: Callable, q, k, v, *, dtype=None) -> None:
    """Changing tokens after position i must not change outputs up to i."""
    T = q.shape[1]
    i = T // 2
    nk, nv = jax.random.split(jax.random.key(7))
    k2 = k.at[:, i + 1:].set(3 * jax.random.normal(nk, k[:, i + 1:].shape, jnp.float32).astype(k.dtype))
    v2 = v.at[:, i + 1:].set(-jax.random.normal(nv, v[:, i + 1:].shape, jnp.float32).astype(v.dtype))
    q2 = q.at[:, i + 1:].set(q[:, i + 1:] * 2)
    a = fn(q, k, v)[:, : i + 1]
    b = fn(q2, k2, v2)[:, : i + 1]
    assert_close(b, a, dtype=dtype, name="causal prefix after perturbing the future")


def check_prefill_decode(full_fn: Callable, prefill_fn: Callable, step_fn: Callable, q, k, v, *, n_prefill: int,
                         dtype=None) -> None:
    """Prefill ``n_prefill`` tokens into a cache, decode the rest one by one: equals the full forward.

    ``prefill_fn(q, k, v) -> (o, state)``; ``step_fn(state, q_t, k_t, v_t) -> (o_t, state)`` with
    ``*_t`` of sequence length 1.
    """
    T = q.shape[1]
    full = full_fn(q, k, v)
    o, state = prefill_fn(q[:, :n_prefill], k[:, :n_prefill], v[:, :n_prefill])
    outs = [o]
    for t in range(n_prefill, T):
        o_t, state = step_fn(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        outs.append(o_t)
    assert_close(jnp.concatenate(outs, axis=1), full, dtype=dtype, name="prefill + decode vs full forward")


def check_vjp_parity(fast: Callable, ref: Callable, args: Sequence, names: Sequence[str], key=None):
    """``fast(*args)`` against ``ref(*args)`` on the output and the VJP of every argument (one random
    cotangent, both in one compiled program; the kit's tolerances for the dtype).  ``names`` name the
    arguments in failure messages.  Returns ``(out, grads)`` of ``fast`` for further assertions."""
    key = jax.random.key(1) if key is None else key

    def both(*p):
        return vjp_with_random_cotangent(fast, p, key), vjp_with_random_cotangent(ref, p, key)

    (o, grads), (o_ref, grads_ref) = compiled(both, *args)
    assert_close(o, o_ref, name="output")
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        assert_close(a, b, grad=True, name=f"d{name}")
    return o, grads


def prefill_then_decode(step: Callable, x, cache, n_prefill: int):
    """Run a cached layer over ``x [B, T, ...]``: ``step(x[:, :n_prefill], cache)`` then one token at
    a time; returns ``(outputs concatenated over T, final cache)``.  ``step(chunk, cache) -> (y, cache)``
    (usually one jitted callable, so the prefill and the one-token step compile once each)."""
    y, cache = step(x[:, :n_prefill], cache)
    outs = [y]
    for t in range(n_prefill, x.shape[1]):
        y, cache = step(x[:, t:t + 1], cache)
        outs.append(y)
    return jnp.concatenate(outs, axis=1), cache


def check_packed_equals_padded(fn_packed: Callable, fn_single: Callable, q, k, v, segment_ids, *,
                               dtype=None) -> None:
    """Packed sequences (``fn_packed(q, k, v, segment_ids)``) equal each document run alone.

    ``fn_single(q, k, v)`` runs one unpacked document; padding positions (id 0) must give zero.
    """
    packed = fn_packed(q, k, v, segment_ids)
    ids = np.asarray(segment_ids)
    for b in range(ids.shape[0]):
        for s in np.unique(ids[b]):
            pos = np.nonzero(ids[b] == s)[0]
            if s == 0:
                assert_close(packed[b, pos], jnp.zeros_like(packed[b, pos]), dtype=dtype, name="padding output")
                continue
            sl = slice(pos[0], pos[-1] + 1)
            single = fn_single(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl])
            assert_close(packed[b:b + 1, sl], single, dtype=dtype, name=f"row {b} segment {s}")


def check_deterministic(fn: Callable, *args, runs: int = 2) -> None:
    """Repeated calls give bitwise-identical results (same tree, shapes, dtypes and bits; NaN == NaN)."""
    first = jax.tree.map(np.asarray, fn(*args))
    for _ in range(runs - 1):
        again = jax.tree.map(np.asarray, fn(*args))
        try:
            chex.assert_trees_all_equal(first, again)
        except AssertionError as e:
            raise AssertionError(f"results differ between identical calls: {e}") from e


def check_jit_matches_eager(fn: Callable, *args, dtype=None) -> None:
    """``jax.jit(fn)`` returns the same tree, shapes and dtypes as ``fn``, with values within tolerance."""
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted, eager)  # also catches a differing tree structure
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        assert_close(a, b, dtype=dtype, name="jit vs eager")


#: Mixers whose model-level tests (DecoderLM, generation) run in ``make test``: exact attention,
#: the ring-buffer window, the gated linear engine (vector gates) and the delta rule.  Every registered mixer runs the registry-wide
#: invariants (tests/nn/test_mixer_registry.py) in ``make test``; the model-level tests of the
#: others are marked ``slow`` (``make test-slow``).
MODEL_TEST_MIXERS = ("softmax", "sliding_window", "gla", "deltanet")


def mixer_params(names, core=MODEL_TEST_MIXERS) -> list:
    """pytest params over ``names``; those outside ``core`` carry the ``slow`` mark."""
    import pytest

    return [n if n in core else pytest.param(n, marks=pytest.mark.slow) for n in names]
