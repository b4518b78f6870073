"""Multi-dimensional damped EMA — the moving average of Mega.

Paper: Ma, Zhou, Kong, He, Gui, Neubig, May, Zettlemoyer, "Mega: Moving Average Equipped Gated
Attention", 2022 (ICLR 2023), arXiv:2209.10655, §3.1.  Every channel ``d`` of ``x: [B, T, D]`` is
expanded by ``beta [D, N]`` into ``N`` EMA dimensions, each with its own damped decay:

    u_t^{(d)} = alpha_d ⊙ beta_d x_{t,d} + (1 - alpha_d ⊙ delta_d) ⊙ u_{t-1}^{(d)}      (u_t^{(d)} ∈ R^N)
    y_{t,d}   = eta_d^T u_t^{(d)}

with ``alpha, delta ∈ (0, 1)`` (the layer obtains them through a sigmoid; this pure op takes
the values) and ``eta [D, N]`` the projection back (the official code folds a ``N^-1/2`` scale
into ``eta``; :class:`attn_jax.nn.mega.MegaMixer` does that, this op does not).  Unrolled, the
output is a causal convolution of each channel with the kernel (§3.1; the paper computes it by FFT)

    K_{j,d} = sum_n eta_{d,n} (alpha ⊙ beta)_{d,n} q_{d,n}^j,     q = 1 - alpha ⊙ delta.

Forms (``impl``), all equal up to rounding (tests check values and gradients in float64):

* ``"scan"`` — :func:`damped_ema_reference`: ``lax.scan`` over time, the spec.
* ``"parallel"`` — the linear recurrence ``u_t = a_t u_{t-1} + b_t`` as a
  ``lax.associative_scan`` over ``(a, b)`` pairs (``O(log T)`` depth; memory ``B T D N``).
  Handles segments and an initial state.
* ``"fft"`` — the convolution-kernel form the paper uses: ``y = K * x`` through a real FFT of
  length ``2T`` (memory ``B T D`` plus the ``[D, N, T]`` Vandermonde), plus the decayed
  initial state ``sum_n eta q^{t+1} u_0``; final state ``sum_j q^{T-1-j} alpha beta x_j + q^T u_0``.
  No ``segment_ids`` (a reset breaks the Toeplitz structure).
* ``"auto"`` — ``"fft"`` without ``segment_ids``, else ``"parallel"``.

Packed sequences follow the recurrent family (:mod:`attn_jax.linear.common`): ``segment_ids``
``[B, T]``, id 0 = padding.  Padding is transparent (no write, no decay, zero output); the state
resets to zero at the first token of every later document; ``initial_state`` belongs to the first
document of each row.  (Deviation from the official code, which zeroes padded inputs but keeps
decaying through them: transparency is what makes a ragged prefill equal each row alone.)

States are float32 ``[B, D, N]`` (float64 for float64 inputs); outputs are in ``x``'s dtype.
:func:`damped_ema_step` is the one-token decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attn_jax.core.validation import check_float_array, shape_str
from attn_jax.linear.common import check_segment_ids, segment_layout

__all__ = ["damped_ema", "damped_ema_reference", "damped_ema_parallel", "damped_ema_fft", "damped_ema_step",
           "damped_ema_kernel", "EMA_IMPLS"]

EMA_IMPLS = ("auto", "scan", "parallel", "fft")


def _cdt(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _validate(x, alpha, delta, beta, eta, segment_ids, initial_state):
    check_float_array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected [B, T, D], got {shape_str(x)}")
    B, T, D = x.shape
    if T == 0:
        raise ValueError("x: empty sequence (T = 0)")
    N = None
    for name, p in (("alpha", alpha), ("delta", delta), ("beta", beta), ("eta", eta)):
        check_float_array(name, p)
        if p.ndim != 2 or p.shape[0] != D or (N is not None and p.shape[1] != N):
            want = f"[D={D}, N]" if N is None else f"[D={D}, N={N}]"
            raise ValueError(f"{name}: expected {want}, got {shape_str(p)}")
        N = p.shape[1]
    check_segment_ids(segment_ids, B, T)
    if initial_state is not None:
        check_float_array("initial_state", initial_state)
        if initial_state.shape != (B, D, N):
            raise ValueError(f"initial_state: expected shape [B, D, N] = {[B, D, N]}, got {shape_str(initial_state)}")
    return B, T, D, N


def _coefficients(x, alpha, delta, beta, eta):
    cdt = _cdt(x.dtype)
    alpha, delta, beta, eta = (p.astype(cdt) for p in (alpha, delta, beta, eta))
    return alpha * beta, 1.0 - alpha * delta, eta, cdt          # write p = alpha*beta, decay q


def _gates(x, p, q, segment_ids, cdt):
    """Per-token ``(a_t, b_t)`` of ``u_t = a_t u_{t-1} + b_t`` and the valid mask."""
    B, T, _ = x.shape
    lay = segment_layout(segment_ids, B, T)
    xc = x.astype(cdt)
    valid = lay.valid[:, :, None, None]
    a = jnp.where(lay.reset[:, :, None, None], 0.0, jnp.where(valid, q[None, None], 1.0)).astype(cdt)
    b = jnp.where(valid, xc[..., None] * p[None, None], 0.0).astype(cdt)
    return a, b, lay.valid


def _finish(y, valid, x, final, return_final_state):
    y = jnp.where(valid[:, :, None], y, 0.0).astype(x.dtype)
    return y, (final if return_final_state else None)


def damped_ema_reference(x: Float[Array, "B T D"], alpha: Float[Array, "D N"], delta: Float[Array, "D N"],
                         beta: Float[Array, "D N"], eta: Float[Array, "D N"], *,
                         segment_ids: Int[Array, "B T"] | None = None, initial_state=None,
                         return_final_state: bool = False):
    """The spec: ``lax.scan`` of ``u_t = a_t u_{t-1} + b_t`` over time, ``y_t = eta^T u_t``."""
    B, T, D, N = _validate(x, alpha, delta, beta, eta, segment_ids, initial_state)
    p, q, eta_c, cdt = _coefficients(x, alpha, delta, beta, eta)
    a, b, valid = _gates(x, p, q, segment_ids, cdt)
    u0 = jnp.zeros((B, D, N), cdt) if initial_state is None else initial_state.astype(cdt)

    def body(u, ab):
        a_t, b_t = ab
        u = a_t * u + b_t
        return u, jnp.einsum("bdn,dn->bd", u, eta_c)

    final, y = lax.scan(body, u0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return _finish(jnp.moveaxis(y, 0, 1), valid, x, final, return_final_state)


def damped_ema_parallel(x, alpha, delta, beta, eta, *, segment_ids=None, initial_state=None,
                        return_final_state: bool = False):
    """``lax.associative_scan`` of the affine maps ``u -> a_t u + b_t`` (same contract as the reference)."""
    B, T, D, N = _validate(x, alpha, delta, beta, eta, segment_ids, initial_state)
    p, q, eta_c, cdt = _coefficients(x, alpha, delta, beta, eta)
    a, b, valid = _gates(x, p, q, segment_ids, cdt)
    if initial_state is not None:
        # Fold u_0 into the first write: u_1 = a_1 u_0 + b_1.
        b = b.at[:, 0].add(a[:, 0] * initial_state.astype(cdt))

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    _, u = lax.associative_scan(combine, (a, b), axis=1)
    y = jnp.einsum("btdn,dn->btd", u, eta_c)
    return _finish(y, valid, x, u[:, -1], return_final_state)


def damped_ema_kernel(alpha: Float[Array, "D N"], delta: Float[Array, "D N"], beta: Float[Array, "D N"],
                      eta: Float[Array, "D N"], length: int) -> Float[Array, "D L"]:
    """The convolution kernel ``K_{j,d} = sum_n eta (alpha beta) (1 - alpha delta)^j``, ``j < length``."""
    q = 1.0 - alpha * delta
    j = jnp.arange(length, dtype=q.dtype)
    vander = jnp.exp(j[None, None, :] * jnp.log(q)[..., None])                      # [D, N, L]
    return jnp.einsum("dnl,dn->dl", vander, eta * alpha * beta)


def damped_ema_fft(x, alpha, delta, beta, eta, *, segment_ids=None, initial_state=None,
                   return_final_state: bool = False):
    """The convolution form (FFT of length ``2T``); no ``segment_ids``."""
    if segment_ids is not None:
        raise ValueError("segment_ids: the FFT (convolution) form has no state resets; use impl='parallel' "
                         "or 'scan'")
    B, T, D, N = _validate(x, alpha, delta, beta, eta, segment_ids, initial_state)
    p, q, eta_c, cdt = _coefficients(x, alpha, delta, beta, eta)
    xc = x.astype(cdt)
    j = jnp.arange(T + 1, dtype=cdt)
    vander = jnp.exp(j[None, None, :] * jnp.log(q)[..., None])                      # q^j: [D, N, T+1]
    kernel = jnp.einsum("dnl,dn->dl", vander[..., :T], eta_c * p)                     # [D, T]
    n_fft = 2 * T
    xf = jnp.fft.rfft(jnp.moveaxis(xc, 1, 2), n=n_fft, axis=-1)                       # [B, D, F]
    kf = jnp.fft.rfft(kernel, n=n_fft, axis=-1)
    y = jnp.fft.irfft(xf * kf[None], n=n_fft, axis=-1)[..., :T]                      # [B, D, T]
    y = jnp.moveaxis(y, 2, 1).astype(cdt)
    # final state: sum_j q^{T-1-j} p x_j (+ q^T u_0)
    final = jnp.einsum("btd,dnt->bdn", xc, jnp.flip(vander[..., :T], axis=-1)) * p[None]
    if initial_state is not None:
        u0 = initial_state.astype(cdt)
        y = y + jnp.einsum("bdn,dnt->btd", u0, vander[..., 1:] * eta_c[..., None])
        final = final + vander[None, :, :, T] * u0
    valid = jnp.ones((B, T), bool)
    return _finish(y, valid, x, final, return_final_state)


def damped_ema_step(x_t: Float[Array, "B D"], state: Float[Array, "B D N"], alpha, delta, beta, eta, *,
                    valid: jax.Array | None = None):
    """One decode step: ``(y_t [B, D], new_state)``; rows with ``valid[b] == False`` keep their state
    and output zero (transparent padding)."""
    check_float_array("x_t", x_t)
    if x_t.ndim != 2 or state.ndim != 3 or state.shape[:2] != x_t.shape:
        raise ValueError(f"x_t/state: expected x_t [B, D] and state [B, D, N], got {shape_str(x_t)} and "
                         f"{shape_str(state)}")
    cdt = state.dtype
    p = (alpha * beta).astype(cdt)
    q = (1.0 - alpha * delta).astype(cdt)
    new = q[None] * state + x_t.astype(cdt)[..., None] * p[None]
    y = jnp.einsum("bdn,dn->bd", new, eta.astype(cdt))
    if valid is not None:
        new = jnp.where(valid[:, None, None], new, state)
        y = jnp.where(valid[:, None], y, 0.0)
    return y.astype(x_t.dtype), new


def damped_ema(x: Float[Array, "B T D"], alpha: Float[Array, "D N"], delta: Float[Array, "D N"],
               beta: Float[Array, "D N"], eta: Float[Array, "D N"], *,
               segment_ids: Int[Array, "B T"] | None = None, initial_state: Float[Array, "B D N"] | None = None,
               return_final_state: bool = False, impl: str = "auto"):
    """Mega's multi-dimensional damped EMA (module docstring); returns ``(y [B, T, D], final_state | None)``."""
    if impl not in EMA_IMPLS:
        raise ValueError(f"impl: expected one of {EMA_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "fft" if segment_ids is None else "parallel"
    fn = {"scan": damped_ema_reference, "parallel": damped_ema_parallel, "fft": damped_ema_fft}[impl]
    return fn(x, alpha, delta, beta, eta, segment_ids=segment_ids, initial_state=initial_state,
              return_final_state=return_final_state)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402


def _parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    """Mega's damped EMA on the values viewed as ``[B, T, K * Dv]`` channels, ``N = 3`` EMA dims,
    parameters derived deterministically from the inputs' shapes (the mixer learns them)."""
    v = x["v"]
    B, T, K, Dv = v.shape
    D, N = K * Dv, 3
    grid = jnp.linspace(0.0, 1.0, D * N, dtype=v.dtype).reshape(D, N)
    alpha, delta = 0.1 + 0.8 * grid, 0.9 - 0.7 * grid
    beta, eta = 1.0 - 2.0 * grid, jnp.cos(7.0 * grid)
    fn = damped_ema_reference if impl == "reference" else damped_ema_parallel
    return fn(v.reshape(B, T, D), alpha, delta, beta, eta, segment_ids=segment_ids)[0]


# The layer is the hand-written NNX module attn_jax.nn.mega.MegaMixer, named lazily: an op file
# never imports attn_jax.nn (which imports the op files).
DECLARATION = declare(Declaration(
    name="mega", family="linear", title="Mega: damped multi-dimensional EMA (+ chunked gated attention in the mixer)",
    papers=(Paper("Mega: Moving Average Equipped Gated Attention", 2022, "2209.10655", "Ma et al."),),
    summary="h_t = α ⊙ u_t + (1 - α ⊙ δ) ⊙ h_{t-1} per EMA dim (u = β x), y_t = η · h_t; the mixer adds "
            "single-head gated attention over chunks",
    op=damped_ema, forms=("parallel",), directions=("causal",),
    parity=Parity(_parity, initial_state=False,
                  notes="EMA forms: scan (reference), parallel (associative scan), fft (no segments; "
                        "tests/linear/test_mega.py)"),
    layer="attn_jax.nn.mega:MegaMixer"))
