"""The token-mixer registry: models pick their sequence mixers by name.

    import attn_jax
    attn_jax.mixers.names()                    # ['sliding_window', 'softmax', ...]
    factory = attn_jax.mixers.get("softmax")
    mixer = factory(d_model, num_heads, rngs=nnx.Rngs(0), **mixer_kwargs)
    y, cache = mixer(x, positions=..., segment_ids=..., cache=..., deterministic=True)

A factory has the signature ``factory(d_model, num_heads, *, rngs, **mixer_kwargs) ->
nnx.Module`` and builds a module following the protocol of :mod:`attn_jax.nn.mixer`
(causal by default: registered mixers are decoder token mixers).  A new family adds
one ``register(...)`` line; the registry-wide tests (``tests/nn/test_mixer_registry.py``
and ``tests/models/``) then run every invariant over it.
"""

from __future__ import annotations

import difflib
from typing import Callable

__all__ = ["get", "names", "register"]

_REGISTRY: dict[str, Callable] = {}


def register(name: str, factory: Callable, *, overwrite: bool = False) -> Callable:
    """Register ``factory`` under ``name``; returns ``factory`` (usable as a decorator helper)."""
    if not isinstance(name, str) or not name or "," in name or name.strip() != name:
        raise ValueError(f"name: expected a non-empty string without commas or surrounding spaces, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"name: mixer {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory
    return factory


def names() -> list[str]:
    """Registered mixer names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Callable:
    """The factory registered under ``name``; unknown names raise ``ValueError`` listing the
    registered names and the closest match."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"mixer: unknown mixer {name!r}; registered mixers: {', '.join(names())}{hint}")


# ----------------------------------------------------------------------------- built-in entries
from attn_jax.nn.attention import MultiHeadAttention, sliding_window_attention  # noqa: E402

register("softmax", MultiHeadAttention)
register("sliding_window", sliding_window_attention)
from attn_jax.nn.mega import MegaMixer  # noqa: E402
register("mega", MegaMixer)

# Linear / recurrent attention (attn_jax.nn.linear_mixers): one generic layer, one spec per mechanism.
from attn_jax.nn.linear_mixers import make_factory as _linear_factory  # noqa: E402

register("linear", _linear_factory("linear"))
register("retnet", _linear_factory("retnet"))
register("lightning", _linear_factory("lightning"))
register("gla", _linear_factory("gla"))
register("ssd", _linear_factory("ssd"))
register("based", _linear_factory("based"))
register("deltanet", _linear_factory("deltanet"))
register("gated_deltanet", _linear_factory("gated_deltanet"))
