"""Pallas kernels for attn_jax (GPU via the Triton backend, TPU via Mosaic).

Kernels depend on JAX only, never on attn_jax: they take plain arrays and static
metadata (block maps, predicates, block sizes).  Each kernel folder holds
``gpu.py``, ``tpu.py`` and its own small reference.
"""
