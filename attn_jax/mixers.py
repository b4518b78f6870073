"""The token-mixer registry: models pick their sequence mixers by name.

    import attn_jax
    attn_jax.mixers.names()                    # every registered mixer, sorted
    attn_jax.mixers.names(causal=True)         # decoder mixers (causal, with a decode cache)
    attn_jax.mixers.names(causal=False)        # mixers that accept causal=False (encoders)
    factory = attn_jax.mixers.get("softmax")
    mixer = factory(d_model, num_heads, rngs=nnx.Rngs(0), **mixer_kwargs)
    y, cache = mixer(x, positions=..., segment_ids=..., cache=..., deterministic=True)

A factory has the signature ``factory(d_model, num_heads, *, rngs, **mixer_kwargs) ->
nnx.Module`` and builds a module following the protocol of :mod:`attn_jax.nn.mixer`
(causal by default: registered mixers are decoder token mixers).  An encoder
(:class:`attn_jax.models.Encoder`) passes ``causal=False``; mixers that accept it claim the
``"bidirectional"`` feature.  Encoder-only mixers (``"efficient"``, ``"agent"``) claim
``"bidirectional"`` but not ``"causal"``, and their factories raise ``ValueError`` when built
without ``causal=False`` (so a decoder naming one fails at construction, naming the mixer).

A new family adds one ``register(...)`` line; the registry-wide tests
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
    """The feature keys (:data:`attn_jax.nn.mixer.FEATURE_KEYS`) the entry ``name`` claims: its
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
from attn_jax.nn.attention import MultiHeadAttention, sliding_window_attention  # noqa: E402

register("softmax", MultiHeadAttention)
register("sliding_window", sliding_window_attention)
from attn_jax.nn.mega import MegaMixer  # noqa: E402
register("mega", MegaMixer)   # causal only (no bidirectional EMA)

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
register("performer", _linear_factory("performer"))
register("dpfp", _linear_factory("dpfp"))
register("hedgehog", _linear_factory("hedgehog"))
register("cosformer", _linear_factory("cosformer"))
register("lln", _linear_factory("lln"))
register("flow", _linear_factory("flow"))
# Encoder-only (non-causal) mixers: build them with causal=False (attn_jax.models.Encoder does).
register("efficient", _linear_factory("efficient"))
register("agent", _linear_factory("agent"))
