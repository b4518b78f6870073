"""attn_jax: attention mechanisms for JAX.

    import attn_jax as aj
    from attn_jax import masks
    o = aj.attention(q, k, v, mask=masks.causal())
"""

from attn_jax.core import checks, masks
from attn_jax.core.checks import checked
from attn_jax.softmax import attention, dot_product_attention, explain, merge_attention
from attn_jax import linear, local, mixers, models, nn, positional, sparse, variants  # noqa: E402  (nn/models build on the ops above)
from attn_jax import flax  # noqa: E402  (Flax adapters: attention_fn, linen_mixer)
from attn_jax import analysis  # noqa: E402  (light: its submodules load on first use)

__version__ = "0.1.0"
__all__ = ["attention", "dot_product_attention", "explain", "merge_attention", "linear", "local", "masks", "mixers", "flax",
           "models", "nn", "positional", "sparse", "variants", "analysis", "checked", "checks", "__version__"]
