"""attn_jax: attention mechanisms for JAX.

    import attn_jax as aj
    from attn_jax import masks
    o = aj.attention(q, k, v, mask=masks.causal())
"""

from attn_jax.core import masks
from attn_jax.softmax import attention, explain, merge_attention

__version__ = "0.1.0"
__all__ = ["attention", "explain", "merge_attention", "masks", "__version__"]
