"""Reuse built ``pallas_call`` callables across traces.

The dispatcher traces the cuda and tpu branches of every attention call, forward and
backward; keying the built callable on (config, kernel name, argument types) lets repeated
traces hit JAX's trace cache instead of re-tracing the kernel body.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
from jax.experimental import pallas as pl


class PallasCallCache:
    """An LRU of ``pallas_call`` callables; everything in ``**kw`` must be a function of ``config``
    and the argument types, since it is not part of the key."""

    def __init__(self, max_size: int = 256):
        self._calls: collections.OrderedDict = collections.OrderedDict()
        self.max_size = max_size

    def __call__(self, config, kernel, *, name: str, args, interpret, compiler_params, **kw):
        key = (config, name, tuple((a.shape, jnp.dtype(a.dtype)) for a in args))
        fn = self._calls.get(key)
        if fn is None:
            fn = pl.pallas_call(kernel, interpret=interpret, compiler_params=compiler_params, name=name, **kw)
            self._calls[key] = fn
            if len(self._calls) > self.max_size:
                self._calls.popitem(last=False)
        else:
            self._calls.move_to_end(key)
        return fn(*args)
