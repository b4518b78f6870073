"""Array annotations for public signatures (jaxtyping shape strings over array-likes).

Public ops accept anything ``jnp.asarray`` turns into an array with a shape: JAX arrays
(tracers under ``jit`` / ``vmap`` / ``grad`` included) and NumPy arrays.  Annotate with
``Float[ArrayLike, "*batch T H Dk"]``, ``Int[ArrayLike, "B T"]`` (integer ids),
``Bool[ArrayLike, "..."]``.  The annotations are checked during the test run only
(``tests/conftest.py`` installs jaxtyping's import hook with beartype); outside tests they cost
nothing.
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np
from jaxtyping import Bool, Float, Int, Shaped

#: An array with a shape: a JAX array (or tracer) or a NumPy array.
ArrayLike = Union[jax.Array, np.ndarray]

__all__ = ["ArrayLike", "Bool", "Float", "Int", "Shaped"]

#: ``(o, final_state | None)`` of the recurrent / linear family: ``o [B, T, H, Dv]`` and a float32
#: state ``[B, H, *, *]`` (``[B, H, Dk, Dv]`` for the gated engine).
RecurrentOutput = tuple[Float[jax.Array, "B T H Dv"], Union[Float[jax.Array, "B H _ _"], None]]
#: The optional initial state of the recurrent / linear family.
InitialState = Union[Float[ArrayLike, "B H _ _"], None]
#: Packed-sequence ids ``[B, T]`` (0 = padding).
SegmentIds = Union[Int[ArrayLike, "B T"], None]

__all__ += ["RecurrentOutput", "InitialState", "SegmentIds"]
