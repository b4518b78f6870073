"""The catalogue of linear / recurrent mechanisms: a view of the declarations.

Every declaration of the ``"linear"`` family with a ``parity`` entry
(:class:`attn_jax.core.declaration.Parity`, written in the mechanism's own file) is one
:class:`Entry` here: what it computes, which forms it claims, which mixer wraps it.  The README's
linear-attention matrix and the catalogue-wide parity tests (``tests/linear/test_catalog.py``)
both read :data:`CATALOG`, so a form that is claimed is a form that is run against the reference.

An entry's ``call(impl, inputs, **kw)`` runs the mechanism on the standard inputs of
:func:`standard_inputs` (q, k, v, a vector gate, a scalar gate, beta, a state) with one ``impl``
and returns the output array; ``forms`` lists the ``impl`` names it claims besides
``"reference"``; ``causal`` / ``noncausal`` say which directions it defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from attn_jax.core import declaration
from attn_jax.linear.parity import standard_inputs

__all__ = ["Entry", "CATALOG", "entries", "standard_inputs", "get", "kernel_serves"]


@dataclass(frozen=True)
class Entry:
    """One catalogue row, derived from a :class:`~attn_jax.core.declaration.Declaration`."""

    name: str                  # the row title
    paper: str                 # short citations
    call: Callable             # (impl, inputs, *, causal, segment_ids, initial_state) -> o
    forms: tuple[str, ...]     # impls besides "reference"
    causal: bool
    noncausal: bool
    segments: bool
    initial_state: bool
    mixer: str | None          # the registered mixer wrapping it (the declaration's name when it has a layer)
    kernel_gate: str | None    # gate kind it hands the chunked Pallas kernel ("none"/"scalar"/"vector")
    notes: str
    declaration: declaration.Declaration


def _entry(d: declaration.Declaration) -> Entry:
    p = d.parity
    directions = p.directions or d.directions
    return Entry(d.title, d.cite(), p.call, d.forms, "causal" in directions, "bidirectional" in directions,
                 p.segments, p.initial_state, d.name if d.layer is not None else None, p.kernel_gate, p.notes, d)


def entries() -> list[Entry]:
    """Every linear declaration with a parity entry, by year of its first paper then title."""
    declaration.load("attn_jax.linear")
    found = [d for d in declaration.declarations("linear") if d.parity is not None]
    return [_entry(d) for d in sorted(found, key=lambda d: (d.papers[0].year if d.papers else 0, d.title))]


def __getattr__(name):
    # CATALOG is computed on access: the mechanism files import this package, so the declarations
    # are complete only once every module of attn_jax.linear has been imported (entries() loads them)
    if name == "CATALOG":
        return entries()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_serves(m: Entry, platform: str) -> bool:
    """Whether ``impl="auto"`` of the gated engine picks the Pallas kernel for ``m`` on ``platform``
    (a causal call without segments, B=2 T=256 H=4 D=64 float32)."""
    if m.kernel_gate is None:
        return False
    from attn_jax.linear.gated import explain_gated

    sds = jax.ShapeDtypeStruct
    x = sds((2, 256, 4, 64), jnp.float32)
    g = {"none": None, "scalar": sds((2, 256, 4), jnp.float32), "vector": x}[m.kernel_gate]
    return explain_gated(x, x, x, g, platform=platform).chosen[platform] == "pallas"


def get(name: str) -> Entry:
    """The entry whose row title is ``name``."""
    catalog = entries()
    for m in catalog:
        if m.name == name:
            return m
    raise ValueError(f"name: unknown mechanism {name!r}; known: {[m.name for m in catalog]}")
