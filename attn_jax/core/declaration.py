"""One declaration per mechanism: the record every view of the library is derived from.

A mechanism file (``attn_jax/linear/gla.py``, ``attn_jax/positional/rope.py``, ...) ends with
one :func:`declare` call::

    DECLARATION = declare(Declaration(
        name="gla", family="linear", title="GLA (vector gates, secondary chunking)",
        papers=(Paper("Gated Linear Attention Transformers with Hardware-Efficient Training", 2023,
                      "2312.06635", "Yang et al."),),
        summary="S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t;  o_t = scale q_t S_t",
        op=gla, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
        parity=Parity(call=..., kernel_gate="vector"),
        layer=LinearLayer(...)))

and the views read the registry of declarations instead of keeping lists of their own:

* the token-mixer registry :mod:`attn_jax.mixers` (every declaration with a ``layer``);
* the catalogue :mod:`attn_jax.linear.catalog` (every declaration with a ``parity`` entry),
  whose claimed forms ``tests/linear/test_catalog.py`` runs against each reference;
* the README matrices and the listing of :mod:`attn_jax.feature_matrix`.

The layer recipe is data: either a typed recipe of :mod:`attn_jax.core.recipe` (which
:mod:`attn_jax.nn` turns into NNX modules), a ``"module:attr"`` string naming a hand-written
NNX factory (resolved lazily by the mixer view, so an op file never imports :mod:`attn_jax.nn`),
or such a factory itself when the declaring file already lives in :mod:`attn_jax.nn`.

This module imports nothing from the families: :func:`load` takes the names of the packages to
scan from its caller (a view one layer up), so the import graph still points down.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

__all__ = ["Paper", "Parity", "Declaration", "DIRECTIONS", "declare", "get", "declarations", "load", "resolve"]

DIRECTIONS = ("causal", "bidirectional")


@dataclasses.dataclass(frozen=True)
class Paper:
    """A cited paper: ``Paper(title, year, arxiv, authors)``; ``authors`` is the short form
    ("Yang et al.") used in tables."""

    title: str
    year: int
    arxiv: str
    authors: str = ""

    def __post_init__(self):
        if not isinstance(self.year, int) or not 1950 <= self.year <= 2100:
            raise ValueError(f"year: expected a year as an int, got {self.year!r}")
        if not isinstance(self.arxiv, str) or not self.arxiv:
            raise ValueError(f"arxiv: expected an arXiv id such as '2312.06635', got {self.arxiv!r}")

    def cite(self) -> str:
        """``"Yang et al. 2023, arXiv:2312.06635"``."""
        who = f"{self.authors} " if self.authors else ""
        return f"{who}{self.year}, arXiv:{self.arxiv}"


@dataclasses.dataclass(frozen=True)
class Parity:
    """What the catalogue runs for a mechanism (its parity entry).

    ``call(impl, inputs, *, causal, segment_ids, initial_state) -> o`` runs the mechanism on the
    standard inputs of :func:`attn_jax.linear.parity.standard_inputs` with one ``impl``
    (``"reference"`` or one of the declaration's ``forms``).  ``directions`` defaults to the
    declaration's; ``segments`` / ``initial_state`` say whether the call takes packed segments
    and an initial state; ``kernel_gate`` is the gate kind handed to the chunked Pallas kernel
    (``"none"`` / ``"scalar"`` / ``"vector"``), None when the kernel never serves it.
    """

    call: Callable
    directions: tuple[str, ...] | None = None
    segments: bool = True
    initial_state: bool = True
    kernel_gate: str | None = None
    notes: str = ""

    def __post_init__(self):
        if not callable(self.call):
            raise TypeError(f"call: expected a callable, got {type(self.call).__name__}")
        if self.directions is not None:
            _check_directions(self.directions)
        if self.kernel_gate not in (None, "none", "scalar", "vector"):
            raise ValueError(f"kernel_gate: expected None, 'none', 'scalar' or 'vector', got {self.kernel_gate!r}")


def _check_directions(directions):
    if not isinstance(directions, tuple) or not directions or any(d not in DIRECTIONS for d in directions):
        raise ValueError(f"directions: expected a non-empty tuple of {DIRECTIONS}, got {directions!r}")


@dataclasses.dataclass(frozen=True)
class Declaration:
    """Everything the library says about one mechanism, in one place.

    Attributes:
      name: the registry name (``attn_jax.mixers.get(name)`` when it has a ``layer``).
      family: the package it belongs to (``"linear"``, ``"softmax"``, ``"positional"``, ...).
      title: a human title (the catalogue's and README's row name).
      papers: the cited papers, first the one that defines the mechanism.
      summary: the equation implemented, in one or two lines (deviations named in ``notes``).
      op: the public functional entry point (None for a layer-only declaration).
      forms: the ``impl`` names the op claims besides ``"reference"``.
      directions: ``("causal",)``, ``("bidirectional",)`` or both: the directions its layer
        (or, without a layer, its op) defines.
      features: the mixer feature keys (:data:`attn_jax.nn.protocol.FEATURE_KEYS`) a hand-written
        layer claims (a typed recipe derives its own).
      parity: the catalogue entry, or None.
      layer: the layer recipe (see the module docstring), or None.
      notes: deviations and caveats.
    """

    name: str
    family: str
    title: str
    papers: tuple[Paper, ...]
    summary: str = ""
    op: Callable | None = None
    forms: tuple[str, ...] = ()
    directions: tuple[str, ...] = ("causal",)
    features: frozenset = frozenset()
    parity: Parity | None = None
    layer: object = None
    notes: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "," in self.name or self.name.strip() != self.name:
            raise ValueError(f"name: expected a non-empty string without commas or surrounding spaces, got "
                             f"{self.name!r}")
        if not isinstance(self.papers, tuple) or not all(isinstance(p, Paper) for p in self.papers):
            raise TypeError(f"papers: expected a tuple of Paper, got {self.papers!r}")
        if not isinstance(self.forms, tuple):
            raise TypeError(f"forms: expected a tuple of impl names, got {self.forms!r}")
        _check_directions(self.directions)
        if not isinstance(self.features, frozenset):
            raise TypeError(f"features: expected a frozenset, got {type(self.features).__name__}")
        if isinstance(self.layer, str) and ":" not in self.layer:
            raise ValueError(f"layer: a string layer must be 'module:attr', got {self.layer!r}")

    @property
    def causal(self) -> bool:
        return "causal" in self.directions

    @property
    def bidirectional(self) -> bool:
        return "bidirectional" in self.directions

    def cite(self) -> str:
        """The papers' short citations, ``"; "``-joined."""
        return "; ".join(p.cite() for p in self.papers)


_REGISTRY: dict[str, Declaration] = {}


def declare(declaration: Declaration) -> Declaration:
    """Add ``declaration`` to the registry and return it.  A name is declared once: a second,
    different declaration under the same name raises ``ValueError`` (re-declaring an equal
    record, as a module reload does, is allowed)."""
    if not isinstance(declaration, Declaration):
        raise TypeError(f"declaration: expected a Declaration, got {type(declaration).__name__}")
    old = _REGISTRY.get(declaration.name)
    # (a module reload re-declares the same mechanism with new function objects: same family and title)
    if old is not None and (old.family, old.title) != (declaration.family, declaration.title):
        raise ValueError(f"name: mechanism {declaration.name!r} is already declared (family {old.family!r}, "
                         f"{old.title!r})")
    _REGISTRY[declaration.name] = declaration
    return declaration


def get(name: str) -> Declaration:
    """The declaration named ``name`` (after :func:`load`); unknown names raise ``ValueError``."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown mechanism {name!r}; declared: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def declarations(family: str | None = None) -> list[Declaration]:
    """The loaded declarations (of ``family`` when given), in declaration order."""
    return [d for d in _REGISTRY.values() if family is None or d.family == family]


_LOADED: set[str] = set()


def load(*packages: str) -> None:
    """Import every module of each package in ``packages`` (e.g. ``"attn_jax.linear"``), so that
    each mechanism file has declared itself.  Adding a mechanism file is enough: no list names
    it.  Idempotent and cheap after the first call."""
    for package in packages:
        if package in _LOADED:
            continue
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
        _LOADED.add(package)


def resolve(reference: str):
    """The object named by a ``"module:attr"`` reference (the lazy layer of a declaration)."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)
