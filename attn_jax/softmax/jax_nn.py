"""``jax.nn.dot_product_attention``'s signature and semantics, served by :func:`attn_jax.attention`.

Swapping is a one-line import change::

    from jax.nn import dot_product_attention        # before
    from attn_jax import dot_product_attention      # after

The arguments mean what ``jax.nn`` documents (JAX 0.10):

* ``is_causal``: key ``j`` visible to query ``i`` iff ``j <= i``, *top-left* aligned when
  ``T != S`` (``masks.causal(offset=0)``; :func:`attn_jax.masks.causal` alone aligns
  bottom-right, as decoding needs).
* ``local_window_size=(left, right)`` (an int ``w`` means ``(w, w)``): ``i - left <= j <= i + right``,
  top-left aligned (``masks.sliding_window(left, right, offset=0)``).
* ``query_seq_lengths`` / ``key_value_seq_lengths`` (``[B]`` integers): keys at or past
  ``key_value_seq_lengths[b]`` are hidden, and query rows at or past ``query_seq_lengths[b]``
  output zeros.  Both become one ``masks.segments`` mask (id 1 = valid, 0 = padding), so no
  ``T x S`` array is built.
* ``mask``: True = attend (numeric masks: nonzero = attend); ``bias``: added to the
  scaled logits.  Both broadcastable to ``[B, N, T, S]`` (``[N, T, S]`` for rank-3 inputs);
  lower ranks get leading axes of 1, as in ``jax.nn``.

Differences, none silent: ``implementation`` accepts ``None`` (our ``impl="auto"``, which may
pick a Pallas or cuDNN kernel on accelerators, or the tiled XLA path), ``"xla"`` and
``"cudnn"``; anything else raises.  Fully masked query rows give zeros (jax.nn's XLA path gives
``mean(V)`` unless the row is cut by ``query_seq_lengths``).  With ``return_residual=True``
the log-sum-exp of a fully masked row is ``-inf`` (jax.nn: a large negative number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import masks as M
from attn_jax.softmax.api import attention

#: jax.nn's ``implementation`` names and the attn_jax ``impl`` each maps to.
IMPLEMENTATIONS = {None: "auto", "xla": "xla", "cudnn": "cudnn"}


def _ensure_4d(name: str, x):
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name}: expected rank <= 4 (broadcastable to [B, N, T, S]), got shape {list(x.shape)}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _lengths(name: str, x, B: int):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array of shape [B] = [{B}], got dtype {x.dtype}")
    if x.shape != (B,):
        raise ValueError(f"{name}: expected shape [B] = [{B}], got {list(x.shape)}")
    return x


def dot_product_attention(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"],
                          value: Float[Array, "B S K H"], bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size: int | tuple[int, int] | None = None, implementation=None,
                          return_residual: bool = False):
    """Drop-in for :func:`jax.nn.dot_product_attention` (same arguments, same results).

    Args:
      query, key, value: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, H]`` or rank 3
        without ``B``; ``N % K == 0`` (GQA/MQA).
      bias: added to the logits, broadcastable to ``[B, N, T, S]``.
      mask: True (nonzero) = attend, broadcastable to ``[B, N, T, S]``.
      scale: logit scale, default ``H ** -0.5``.
      is_causal: top-left aligned causal mask (``j <= i``).
      query_seq_lengths, key_value_seq_lengths: integer ``[B]`` valid lengths.
      local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``: ``i - left <= j <= i + right``.
      implementation: ``None`` (attn_jax's ``impl="auto"``), ``"xla"`` or ``"cudnn"``.
      return_residual: also return the log-sum-exp ``[B, T, N]`` in the dtype of ``query``
        (without gradient, as jax.nn).

    Returns:
      The output, shaped like ``query`` (and the residual when requested).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {list(IMPLEMENTATIONS)} (None = attn_jax's "
                         f"impl='auto'), got {implementation!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    out_shape = q.shape[:-1] + v.shape[-1:]
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"query, key, value: expected rank 4 [B, T, N, H] / [B, S, K, H] (or rank 3 without B), "
                         f"got shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.ndim == 3:
        q, k, v = q[None], k[None], v[None]
    B, T, S = q.shape[0], q.shape[1], k.shape[1]

    parts = []
    if mask is not None:
        parts.append(M.dense(_ensure_4d("mask", mask)))
    if is_causal:
        parts.append(M.causal(offset=0))
    if local_window_size is not None:
        if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
            local_window_size = (local_window_size, local_window_size)
        if not (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2):
            raise TypeError(f"local_window_size: expected an int or a (left, right) pair, got {local_window_size!r}")
        parts.append(M.sliding_window(*local_window_size, offset=0))
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        q_ids = jnp.ones((B, T), jnp.int32)
        kv_ids = jnp.ones((B, S), jnp.int32)
        if query_seq_lengths is not None:
            n = _lengths("query_seq_lengths", query_seq_lengths, B)
            q_ids = (jnp.arange(T)[None, :] < n[:, None]).astype(jnp.int32)
        if key_value_seq_lengths is not None:
            n = _lengths("key_value_seq_lengths", key_value_seq_lengths, B)
            kv_ids = (jnp.arange(S)[None, :] < n[:, None]).astype(jnp.int32)
        parts.append(M.segments(q_ids, kv_ids))
    combined = None
    for p in parts:
        combined = p if combined is None else combined & p

    b = None if bias is None else _ensure_4d("bias", bias)
    out = attention(q, k, v, b, combined, scale=scale, return_lse=return_residual,
                    impl=IMPLEMENTATIONS[implementation])
    if not return_residual:
        return out.reshape(out_shape)
    o, lse = out
    # jax.nn's residual carries no gradient (stop_gradient); aj.attention(return_lse=True) has one.
    return o.reshape(out_shape), jax.lax.stop_gradient(lse.astype(o.dtype).reshape(out_shape[:-1]))
