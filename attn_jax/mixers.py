"""The token-mixer registry: models pick their sequence mixers by name.

    import attn_jax
    attn_jax.mixers.names()                    # every registered mixer, sorted
    attn_jax.mixers.names(causal=True)         # decoder mixers (causal, with a decode cache)
    attn_jax.mixers.names(causal=False)        # mixers that accept causal=False (encoders)
    factory = attn_jax.mixers.get("softmax")
    mixer = factory(d_model, num_heads, rngs=nnx.Rngs(0), **mixer_kwargs)
    y, cache = mixer(x, positions=..., segment_ids=..., cache=..., deterministic=True)

A factory has the signature ``factory(d_model, num_heads, *, rngs, **mixer_kwargs) ->
nnx.Module`` and builds a module following the protocol of :mod:`attn_jax.nn.protocol`
(causal by default: registered mixers are decoder token mixers).  An encoder
(:class:`attn_jax.models.Encoder`) passes ``causal=False``; mixers that accept it claim the
``"bidirectional"`` feature.  Encoder-only mixers (``"efficient"``, ``"agent"``) claim
``"bidirectional"`` but not ``"causal"``, and their factories raise ``ValueError`` when built
without ``causal=False`` (so a decoder naming one fails at construction, naming the mixer).

Every mechanism declaration (:mod:`attn_jax.core.declaration`) with a ``layer`` is registered
under its name when this module is imported (nothing to add here); ``register`` remains for
mixers defined outside the library.  The registry-wide tests
(``tests/nn/test_mixer_registry.py`` over ``names(causal=True)``,
``tests/nn/test_encoder_mixers.py`` over ``names(causal=False)``, and ``tests/models/``) then
run every invariant over it.
"""

from __future__ import annotations

import difflib
from typing import Callable

__all__ = ["get", "names", "register", "features"]

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


def features(name: str) -> frozenset:
    """The feature keys (:data:`attn_jax.nn.protocol.FEATURE_KEYS`) the entry ``name`` claims: its
    factory's ``SUPPORTED_FEATURES``."""
    return frozenset(getattr(get(name), "SUPPORTED_FEATURES", frozenset()))


def _is_causal(name: str) -> bool:
    # a factory that declares no features at all follows the registry's default contract (a decoder mixer)
    feats = features(name)
    return "causal" in feats or not feats


def names(causal: bool | None = None) -> list[str]:
    """Registered mixer names, sorted.

    ``causal=None``: all of them; ``True``: the decoder mixers (those claiming ``"causal"``, or
    declaring no features at all); ``False``: those that accept ``causal=False`` (claiming
    ``"bidirectional"``).
    """
    if causal is not None and not isinstance(causal, bool):
        raise TypeError(f"causal: expected None or a bool, got {causal!r}")
    out = sorted(_REGISTRY)
    if causal is None:
        return out
    if causal:
        return [n for n in out if _is_causal(n)]
    return [n for n in out if "bidirectional" in features(n)]


def get(name: str) -> Callable:
    """The factory registered under ``name``; unknown names raise ``ValueError`` listing the
    registered names and the closest match."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    # Case-insensitive match first ("GLA" -> 'gla'), then the closest spelling, compared in lower case.
    lower = {n.lower(): n for n in _REGISTRY}
    key = str(name).lower()
    close = [lower[key]] if key in lower else [
        lower[c] for c in difflib.get_close_matches(key, list(lower), n=1, cutoff=0.0)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"mixer: unknown mixer {name!r}; registered mixers: {', '.join(names())}{hint}")


# ----------------------------------------------------------------------------- built-in entries
# Derived from the mechanism declarations (attn_jax.core.declaration): every declaration with a
# layer is a mixer under its name.  No list here: a new mechanism file registers itself.
from attn_jax.core import declaration as _declaration  # noqa: E402
from attn_jax.core.recipe import LinearLayer as _LinearLayer  # noqa: E402
from attn_jax.nn.linear_mixers import make_factory as _linear_factory  # noqa: E402

_declaration.load("attn_jax.linear", "attn_jax.positional", "attn_jax.variants", "attn_jax.sparse", "attn_jax.nn")


def _factory(d: _declaration.Declaration) -> Callable:
    """The registry factory of declaration ``d``: a typed recipe becomes a
    :class:`~attn_jax.nn.linear_mixers.LinearAttentionMixer` factory, a ``"module:attr"``
    reference is resolved, a callable is the factory itself."""
    if isinstance(d.layer, _LinearLayer):
        return _linear_factory(d.name)
    if isinstance(d.layer, str):
        return _declaration.resolve(d.layer)
    return d.layer


for _d in _declaration.declarations():
    if _d.layer is not None:
        register(_d.name, _factory(_d))
