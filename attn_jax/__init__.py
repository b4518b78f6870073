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


def __getattr__(name):
    # aj.parallel (meshes, ring / Ulysses attention) is imported on first use: most users never shard.
    if name == "parallel":
        import importlib
        return importlib.import_module("attn_jax.parallel")
    raise AttributeError(f"module 'attn_jax' has no attribute {name!r}")


__all__ = ["attention", "dot_product_attention", "explain", "merge_attention", "linear", "local", "masks", "mixers", "flax",
           "models", "nn", "positional", "sparse", "variants", "analysis", "parallel", "checked", "checks", "__version__"]
