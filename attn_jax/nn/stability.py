"""σReparam as an NNX linear layer ("Stabilizing Transformer Training by Preventing Attention
Entropy Collapse", Zhai et al., 2023, arXiv:2303.06296): ``y = x Ŵ (+ b)``, ``Ŵ = (γ / σ(W)) W``.

The math and the constants (exact SVD at init, one power step per training call, ``γ`` initialised
to ``σ(W_init)``) are :func:`attn_jax.variants.stability.sigma_reparam`.  The right singular
vector ``u`` is a :class:`PowerIterationState` variable (not a parameter): it advances only when
the layer is called with ``deterministic=False`` (training), as the authors' layer in train mode.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.nn.layers import check_positive_int, default_kernel_init, param
from attn_jax.variants.stability import sigma_reparam

__all__ = ["SigmaReparamLinear", "PowerIterationState"]


class PowerIterationState(nnx.Variable):
    """The persistent right singular vector of a σReparam weight (updated in training, not learned)."""


class SigmaReparamLinear(nnx.Module):
    """``y = x Ŵ + b`` with ``Ŵ = (γ / σ(W)) W``; ``W [in, out]``, learned scalar ``γ``.

    Args:
      in_features, out_features: sizes.  use_bias: add ``b [out]`` (zeros at init).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        self.kernel = param(rngs, default_kernel_init, (in_features, out_features), ("embed", "mlp"), param_dtype)
        _, s, vh = np.linalg.svd(np.asarray(self.kernel[...], np.float64), full_matrices=False)
        self.gamma = nnx.Param(jnp.asarray(s[0], param_dtype))
        self.u = PowerIterationState(jnp.asarray(vh[0], jnp.float32))
        self.bias = param(None, nnx.initializers.zeros, (out_features,), ("mlp",), param_dtype) if use_bias else None
        self.dtype = dtype

    def weight(self, *, update: bool = False):
        """The reparametrised ``Ŵ``; ``update=True`` also stores the advanced ``u``."""
        w, u = sigma_reparam(self.kernel[...], self.gamma[...], self.u[...])
        if update:
            self.u[...] = u
        return w

    def __call__(self, x, *, deterministic: bool = True):
        y = jnp.asarray(x).astype(self.dtype) @ self.weight(update=not deterministic).astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)
