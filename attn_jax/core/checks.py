"""Opt-in value checks: errors that depend on array values, raised only when asked for.

Shapes, dtypes and static sizes are validated at trace time by every op (``ValueError`` /
``TypeError``).  Some mistakes depend on the *values* of traced arrays — a log forget gate
above zero, a token id outside the vocabulary, NaN in a query, a decode step past a cache's
capacity — and give wrong numbers (inf, NaN, silently dropped keys) rather than an error.  The
library marks each of them with :func:`check`, a ``jax.experimental.checkify.debug_check``:

* **off** (the default): a ``debug_check`` lowers to nothing and XLA removes the predicate, so
  compiled programs are unchanged and cost nothing extra.  There is no global flag: whether
  checks run is decided by how *you* call the function.
* **on**: wrap the function with :func:`checked` (``attn_jax.checked``); it runs the function
  under ``checkify.checkify`` and raises :class:`jax.experimental.checkify.JaxRuntimeError` (a
  ``ValueError``) whose message starts with the name of the offending argument::

      import attn_jax as aj
      o, _ = aj.checked(aj.linear.gla)(q, k, v, log_g)          # raises if any log_g > 0
      step = aj.checked(jax.jit(train_step))                      # compiled once, checks inside
      step = aj.checked(train_step, jit=True, donate_argnums=0)   # or: the checked function jitted

  For a check inside your own ``jit`` boundary use checkify directly::

      err, out = jax.jit(checkify.checkify(f, errors=aj.checks.ERRORS))(x)
      err.throw()

What is checked (each ignores padding, where any value is allowed):

* ``log_g``: log forget gates ``<= 0`` in the gated linear engine
  (:func:`attn_jax.linear.gated_linear_attention` and every mechanism built on it, named by the
  mechanism's gate argument) and the gated delta rule, outside padding (``segment_ids == 0``);
  ``g_t`` / ``log_g_t`` in the decode steps.
* ``tokens`` (``src`` / ``tgt``): token ids in ``[0, vocab_size)`` in the models' embeddings,
  outside padding (``segment_ids == 0`` or ``padding_mask == False``).
* ``q`` / ``k`` / ``v`` of :func:`attn_jax.attention`: no NaN at a position the mask uses — a
  query row that sees at least one key, a key seen by at least one query.  Fully masked rows and
  keys (padding) may hold NaN: by design their values never reach an output.  Visibility is
  decided by the mask alone (a ``-inf`` bias does not hide a NaN); with checks on, the mask
  predicate is evaluated ``256`` query rows at a time (``T x S`` work, ``256 x S`` memory).
* ``segment_ids`` (``q_segment_ids`` / ``kv_segment_ids`` of :func:`attn_jax.masks.segments`, the
  ``segment_ids`` of the linear family): ids ``>= 0`` (0 is padding, positive ids are documents).
  Concrete (non-traced) ids are checked always, at trace time, with a ``ValueError``
  (:func:`check_segment_ids`); traced ids only under :func:`checked`.
* ``k_new`` of a cache append (:class:`attn_jax.softmax.kv_cache.KVCache`,
  :class:`~attn_jax.softmax.kv_cache.PagedKVCache`): ``lengths + n_new <= max_len`` and, for a
  paged cache, every written position on an allocated page; otherwise the tokens would be
  dropped.  (Chunks longer than the capacity are refused at trace time.)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, Bool, Float, Int

__all__ = ["ERRORS", "check", "checked", "check_log_gates", "check_token_ids", "check_attention_inputs",
           "check_capacity", "check_segment_ids"]

#: The checkify error set :func:`checked` enables by default: the library's checks (and any
#: ``checkify.check`` of your own).  Pass ``errors=checkify.all_checks`` to add checkify's automatic
#: NaN / division / indexing checks.
ERRORS = checkify.user_checks

#: Query rows per block when the attention NaN check evaluates the mask (memory ``block * S``).
_MASK_BLOCK = 256


def check(pred, msg: str, *fmt_args) -> None:
    """Record the value check ``all(pred)``: a no-op unless the caller runs under :func:`checked`
    (or ``checkify.checkify``).  ``msg`` is formatted with ``fmt_args`` (arrays) as ``str.format``;
    it should start with the argument's name."""
    checkify.debug_check(jnp.all(jnp.asarray(pred)), msg, *fmt_args)


def checked(fn: Callable, *, errors=ERRORS, jit: bool = False, **jit_kwargs) -> Callable:
    """``fn`` with its value checks enabled: same arguments, same result; raises
    ``checkify.JaxRuntimeError`` (a ``ValueError``) naming the argument when a check fails.

    ``jit=False`` (default): arguments are closed over, not traced, so Python ints and modules may
    be passed; wrap a jitted function (``checked(jax.jit(f))``) to compile the checked program
    once.  ``jit=True``: the checked function itself is the outermost ``jax.jit`` (with
    ``jit_kwargs``, e.g. ``static_argnames``, ``donate_argnums``, ``compiler_options``, which
    XLA accepts only on the outermost jit).
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if jit_kwargs and not jit:
        raise TypeError(f"jit_kwargs: {sorted(jit_kwargs)} are jax.jit arguments; pass jit=True with them")
    run = checkify.checkify(fn, errors=errors)
    if jit:
        run = jax.jit(run, **jit_kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        err, out = run(*args, **kwargs)
        err.throw()
        return out

    return wrapper


def _valid_mask(segment_ids, shape):
    """``bool`` broadcastable to ``shape[:2]`` + trailing ones: True outside padding (id != 0)."""
    if segment_ids is None:
        return None
    valid = jnp.asarray(segment_ids) != 0
    return valid.reshape(valid.shape + (1,) * (len(shape) - valid.ndim))


def check_log_gates(name: str, log_g: Float[Array, "B T ..."] | None,
                    segment_ids: Int[Array, "B T"] | None = None) -> None:
    """``log_g <= 0`` (a gate ``exp(log_g) > 1`` makes the state grow without bound: inf outputs),
    ignoring padding (``segment_ids == 0``; ``log_g: [B, T, ...]``).  NaN gates fail too."""
    if log_g is None:
        return
    g = jnp.asarray(log_g)
    ok = g <= 0
    valid = _valid_mask(segment_ids, g.shape)
    if valid is not None:
        ok = ok | ~valid
    worst = jnp.max(jnp.where(ok, -jnp.inf, jnp.nan_to_num(g.astype(jnp.float32), nan=jnp.inf)))
    check(ok, f"{name}: log gates must be <= 0 (gates exp({name}) <= 1) outside padding; got {{}} "
              f"positions with {name} > 0 or NaN (largest {{}})", jnp.sum(~ok), worst)


def check_token_ids(name: str, tokens: Int[Array, "*batch"], vocab_size: int,
                    valid: Bool[Array, "*batch"] | None = None) -> None:
    """Token ids in ``[0, vocab_size)`` where ``valid`` (bool, broadcastable; default everywhere)."""
    t = jnp.asarray(tokens)
    ok = (t >= 0) & (t < vocab_size)
    if valid is not None:
        ok = ok | ~jnp.asarray(valid, bool)
    ids = t.astype(jnp.int32)
    check(ok, f"{name}: token ids must lie in [0, vocab_size={vocab_size}); got {{}} out-of-range ids "
              f"(smallest {{}}, largest {{}})", jnp.sum(~ok),
          jnp.min(jnp.where(ok, jnp.iinfo(jnp.int32).max, ids)), jnp.max(jnp.where(ok, jnp.iinfo(jnp.int32).min, ids)))


def _mask_visibility(mask, T: int, S: int):
    """``rows [B|1, H|1, T]`` (query sees a key) and ``cols [B|1, H|1, S]`` (key seen by a query),
    evaluating the mask predicate ``_MASK_BLOCK`` query rows at a time (never ``T x S`` at once)."""
    bq = min(T, _MASK_BLOCK)
    n_blocks = -(-T // bq)
    k_idx = jnp.arange(S, dtype=jnp.int32)

    def block(n):
        q_idx = jnp.minimum(n * bq + jnp.arange(bq, dtype=jnp.int32), T - 1)   # the last block repeats row T-1
        vis = jnp.asarray(mask.predicate(q_idx, k_idx, T, S), bool)
        return vis.any(axis=3), vis.any(axis=2)

    if n_blocks == 1:
        rows, cols = block(0)
        return rows[..., :T], cols
    shape = jax.eval_shape(block, 0)[1].shape

    def step(cols, n):
        rows, c = block(n)
        return cols | c, rows

    cols, rows = jax.lax.scan(step, jnp.zeros(shape, bool), jnp.arange(n_blocks))
    rows = jnp.moveaxis(rows, 0, 2)                                   # [B|1, H|1, n_blocks, bq]
    return rows.reshape(rows.shape[:2] + (n_blocks * bq,))[..., :T], cols


def check_attention_inputs(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"],
                           mask=None) -> None:
    """No NaN in ``q [B, T, H, D]`` at a query that sees a key, nor in ``k`` / ``v [B, S, K, D]`` at
    a key some query sees (``mask``: an :class:`attn_jax.core.masks.Mask` or None = all visible)."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if not all(jnp.issubdtype(x.dtype, jnp.inexact) for x in (q, k, v)):
        return
    T, H, S = q.shape[1], q.shape[2], k.shape[1]
    q_nan = jnp.isnan(q).any(axis=-1)                                 # [B, T, H]
    k_nan, v_nan = jnp.isnan(k).any(axis=-1), jnp.isnan(v).any(axis=-1)   # [B, S, K]
    what = "(NaN is allowed only where the mask hides the position: padding, fully masked rows)"
    if mask is None:
        bad_q, bad_k, bad_v = q_nan, k_nan, v_nan
    else:
        rows, cols = _mask_visibility(mask, T, S)
        rows = jnp.broadcast_to(jnp.swapaxes(rows, 1, 2), rows.shape[:1] + (T, rows.shape[1]))   # [B|1, T, H|1]
        bad_q = q_nan & rows
        K = k.shape[2]
        if cols.shape[1] == 1:
            seen = cols[:, 0, :, None]                                # [B|1, S, 1]
        else:                                                         # kv head kh serves query heads of group kh
            seen = jnp.swapaxes(cols.reshape(cols.shape[0], K, H // K, S).any(axis=2), 1, 2)   # [B|1, S, K]
        bad_k, bad_v = k_nan & seen, v_nan & seen
    check(~bad_q, f"q: NaN at {{}} (batch, query, head) positions that attend to keys {what}", jnp.sum(bad_q))
    for name, bad in (("k", bad_k), ("v", bad_v)):
        check(~bad, f"{name}: NaN at {{}} (batch, key, kv head) positions that some query attends to {what}",
              jnp.sum(bad))


def check_capacity(name: str, lengths: Int[Array, "B"], n_new: Int[Array, "B"], capacity: int) -> None:
    """``lengths + n_new <= capacity`` per row: appending past a cache's ``max_len`` drops tokens."""
    lengths, n_new = jnp.broadcast_arrays(jnp.asarray(lengths, jnp.int32), jnp.asarray(n_new, jnp.int32))
    total = lengths + n_new
    worst = jnp.argmax(total)
    check(total <= capacity, f"{name}: appending past the cache capacity max_len={capacity}: a row holding {{}} "
                             f"tokens receives {{}} more (the extra tokens would be dropped); size the cache "
                             f"for the longest sequence", lengths.reshape(-1)[worst], n_new.reshape(-1)[worst])


def check_segment_ids(name: str, segment_ids: Int[Array, "*batch"]) -> None:
    """Segment ids must be ``>= 0``: 0 is padding, every positive id a document.

    One meaning everywhere (the reference, xla, Pallas, decode and the linear family): negative ids
    are refused.  Concrete ids (NumPy, or JAX arrays outside ``jit``) are checked now and raise
    ``ValueError`` naming ``name``; traced ids are checked by the opt-in value check
    (:func:`checked`), which is free when checks are off.
    """
    if isinstance(segment_ids, jax.core.Tracer):
        ids = jnp.asarray(segment_ids)
        check(ids >= 0, f"{name}: segment ids must be >= 0 (0 = padding, 1, 2, ... = documents); got {{}} "
                        f"negative ids (smallest {{}})", jnp.sum(ids < 0), jnp.min(ids))
        return
    ids = np.asarray(segment_ids)
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name}: segment ids must be >= 0 (0 = padding, 1, 2, ... = documents); got "
                         f"{int((ids < 0).sum())} negative ids (smallest {int(ids.min())})")
