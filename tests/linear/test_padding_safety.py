"""Padding in the linear family (issue 25): NaN at a padding token (segment id 0) reaches no output
or gradient in any form of ``linear_attention`` with a nonlinear feature map (the padding mask is
applied *before* the map), and segment ids follow ``masks.segments``: ids must be ``>= 0``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core import testing as tk
from attn_jax.linear.gla import gla
from attn_jax.linear.linear_attention import linear_attention, linear_attention_reference

SEG = np.array([[1, 1, 1, 0, 2, 2, 2, 2, 0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 0, 6],
                [0, 0, 4, 4, 4, 4, 4, 0, 5, 5, 5, 5, 5, 5, 5, 5, 5, 0, 0, 0]], np.int32)   # T = 20
PAD = SEG == 0


def _inputs():
    q, k, v = tk.random_qkv(jax.random.key(0), B=2, T=20, H=2, K=1, Dk=4, Dv=3)
    nan = lambda x: jnp.where(jnp.asarray(PAD)[:, :, None, None], jnp.nan, x)  # noqa: E731
    return (q, k, v), (nan(q), nan(k), nan(v))


def test_feature_maps_padding_nan_gives_finite_outputs_and_zero_padding_gradients():
    """taylor in every form (reference, chunk, parallel, recurrent) and elu (chunk; the catalogue
    runs its other forms with NaN padding), causal: with NaN at padding, outputs and dq/dk/dv are
    finite, equal the reference on clean padding, and the gradient at padding is exactly 0."""
    clean, dirty = _inputs()
    ct = jax.random.normal(jax.random.key(1), clean[2].shape[:2] + (2, 3))
    cases = [("taylor", impl) for impl in ("reference", "chunk", "parallel", "recurrent")] + [("elu", "chunk")]

    def one(fm, impl, q, k, v):
        if impl == "reference":
            f = lambda q, k, v: linear_attention_reference(  # noqa: E731
                q, k, v, feature_map=fm, segment_ids=jnp.asarray(SEG))[0]
        else:
            f = lambda q, k, v: linear_attention(  # noqa: E731
                q, k, v, feature_map=fm, segment_ids=jnp.asarray(SEG), impl=impl, chunk_size=16)[0]
        o, pull = jax.vjp(f, q, k, v)
        return o, pull(ct)

    @tk.fast_jit
    def run(clean, dirty):
        refs = {fm: one(fm, "reference", *clean) for fm in ("taylor", "elu")}
        return {f"{fm}/{impl}": (refs[fm], one(fm, impl, *dirty)) for fm, impl in cases}

    for name, ((o0, g0), (o1, g1)) in run(clean, dirty).items():
        tk.assert_close(o1, o0, name=f"{name} o with NaN padding")
        for n, a, b in zip("qkv", g1, g0):
            tk.assert_close(a, b, grad=True, name=f"{name} d{n} with NaN padding")
            assert not np.asarray(a)[PAD].any(), f"{name}: d{n} is non-zero at padding"


def test_negative_segment_ids_are_refused():
    """The linear family refuses negative ids as ``masks.segments`` does: ValueError for concrete ids,
    the opt-in check (``aj.checked``) for traced ones."""
    (q, k, v), _ = _inputs()
    bad = SEG.copy()
    bad[0, 0] = -1
    log_g = -jnp.ones(q.shape[:3])
    with pytest.raises(ValueError, match=r"segment_ids: segment ids must be >= 0.*smallest -1"):
        linear_attention(q, k, v, segment_ids=bad)
    with pytest.raises(ValueError, match=r"segment_ids: segment ids must be >= 0"):
        gla(q, k, v, log_g, segment_ids=bad)
    f = aj.checked(lambda ids: gla(q, k, v, log_g, segment_ids=ids, impl="chunk")[0], jit=True,
                   compiler_options=tk.FAST_COMPILE)
    with pytest.raises(ValueError, match=r"segment_ids: segment ids must be >= 0"):
        f(jnp.asarray(bad))
