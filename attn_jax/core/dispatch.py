"""Implementation registry and dispatch decided by the lowering platform.

Each operation (``attention``, ``decode_attention``, ``linear.gla``, ...) owns a
:class:`Registry`.  Every implementation registers a function and an
``unsupported(platform, problem) -> list[str]`` that lists the reasons it
cannot serve a problem on a platform (empty list: it can).

``impl`` is a name or a sequence of names tried in order; ``"auto"`` is the
registry's own priority order.  For each platform JAX can lower for, the first
implementation with no reasons is chosen.  When the choice differs between
platforms, the call becomes a ``lax.platform_dependent`` switch, so the
decision is made by the platform the computation is *lowered* for (including
``jax.export`` to a platform this machine does not have), never by
``jax.devices()``.  A platform no requested implementation can serve gets a
branch that raises, at lowering time, a ``ValueError`` listing every reason; if
no platform can be served the error is raised immediately at trace time.
:meth:`Registry.explain` reports the choice and the reasons.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
from jax import lax
from jax._src import core as _jcore
from jax.extend.core import Primitive
import jax.numpy as jnp
from jax._src.interpreters import batching
from jax.interpreters import ad, mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

Unsupported = Callable[[str, Any], list]  # (platform, problem) -> reasons


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable
    unsupported: Unsupported
    auto: bool = True  # eligible for impl="auto"


# A primitive whose lowering raises: it stands in the platform_dependent branch of a
# platform that no requested implementation supports.
_unservable_p = Primitive("attn_jax_unservable")
_unservable_p.multiple_results = True
_unservable_p.def_abstract_eval(lambda *args, avals, message: avals)


def _unservable_lowering(ctx, *args, avals, message):
    raise ValueError(message)


def _unservable_impl(*args, avals, message):
    raise ValueError(message)  # eager evaluation on a platform nothing serves


def _unservable_jvp(primals, tangents, *, avals, message):
    # The tangent goes through the same primitive, so a gradient can never silently be zero:
    # whichever of the forward or backward pass survives dead-code elimination raises at lowering.
    out = _unservable_p.bind(*primals, avals=avals, message=message)
    tans = [ad.instantiate_zeros(t) for t in tangents]
    return out, _unservable_p.bind(*tans, avals=avals, message=message)


def _unservable_transpose(cts, *args, avals, message):
    cts = [ad.instantiate_zeros(c) for c in cts]
    in_avals = tuple(_jcore.ShapedArray(a.aval.shape if ad.is_undefined_primal(a) else jnp.shape(a),
                                        a.aval.dtype if ad.is_undefined_primal(a) else jnp.result_type(a))
                     for a in args)
    res = _unservable_p.bind(*cts, avals=in_avals, message=message)
    return [r if ad.is_undefined_primal(a) else None for r, a in zip(res, args)]


def _unservable_batch(args, dims, *, avals, message):
    mapped = [d is not None and not isinstance(d, batching.NotMapped) for d in dims]
    size = next(a.shape[d] for a, d, m in zip(args, dims, mapped) if m)
    args = [jnp.moveaxis(a, d, 0) if m else jnp.broadcast_to(a, (size, *a.shape))
            for a, d, m in zip(args, dims, mapped)]
    avals = tuple(_jcore.ShapedArray((size, *a.shape), a.dtype) for a in avals)
    return _unservable_p.bind(*args, avals=avals, message=message), [0] * len(avals)


_unservable_p.def_impl(_unservable_impl)
mlir.register_lowering(_unservable_p, _unservable_lowering)
ad.primitive_jvps[_unservable_p] = _unservable_jvp
ad.primitive_transposes[_unservable_p] = _unservable_transpose
batching.primitive_batchers[_unservable_p] = _unservable_batch


@dataclass
class Decision:
    op: str
    requested: tuple[str, ...]
    chosen: dict[str, str | None]                  # platform -> impl name (None: unservable)
    reasons: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # platform -> impl -> reasons

    def message(self, platform: str) -> str:
        lines = [f"{self.op}: no implementation in {list(self.requested)} can serve this call on '{platform}':"]
        for name, rs in self.reasons[platform].items():
            lines.append(f"  {name}: " + "; ".join(rs))
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [f"{self.op} (impl={list(self.requested)})"]
        for p, name in self.chosen.items():
            out.append(f"  {p}: {'-> ' + name if name else 'UNSERVABLE'}")
            for other, rs in self.reasons[p].items():
                if rs:
                    out.append(f"      {other} cannot serve: " + "; ".join(rs))
                elif other == name:
                    break
        return "\n".join(out)


class Registry:
    def __init__(self, op: str):
        self.op = op
        self._impls: dict[str, Implementation] = {}

    def register(self, name: str, fn: Callable, unsupported: Unsupported, *, auto: bool = True) -> None:
        self._impls[name] = Implementation(name, fn, unsupported, auto)

    def names(self) -> list[str]:
        return list(self._impls)

    def get(self, name: str) -> Implementation:
        return self._impls[name]

    def _requested(self, impl) -> tuple[str, ...]:
        if isinstance(impl, str):
            impl = (impl,)
        if not isinstance(impl, Sequence) or not impl:
            raise TypeError(f"impl: expected a name or a non-empty sequence of names, got {impl!r}")
        names: list[str] = []
        for n in impl:
            if n == "auto":
                names.extend(i.name for i in self._impls.values() if i.auto)
            elif n in self._impls:
                names.append(n)
            else:
                raise ValueError(f"impl: unknown implementation {n!r} for {self.op}; "
                                 f"choose from {['auto'] + self.names()}")
        return tuple(dict.fromkeys(names))

    def decide(self, impl, problem, platforms: Sequence[str] = PLATFORMS) -> Decision:
        names = self._requested(impl)
        requested = (impl,) if isinstance(impl, str) else tuple(impl)
        d = Decision(self.op, requested, {}, {})
        for p in platforms:
            d.reasons[p] = {}
            d.chosen[p] = None
            for n in names:
                rs = list(self._impls[n].unsupported(p, problem))
                d.reasons[p][n] = rs
                if not rs:
                    d.chosen[p] = n
                    break
        return d

    def explain(self, impl, problem, platform: str | None = None) -> Decision:
        return self.decide(impl, problem, PLATFORMS if platform is None else (platform,))

    def call(self, impl, problem, *args):
        """Run ``fn(problem, *args)`` of the implementation chosen per lowering platform."""
        d = self.decide(impl, problem)
        chosen = {p: n for p, n in d.chosen.items() if n is not None}
        if not chosen:
            raise ValueError("\n\n".join(d.message(p) for p in PLATFORMS))
        distinct = set(chosen.values())
        if len(distinct) == 1 and len(chosen) == len(PLATFORMS):
            return self._impls[distinct.pop()].fn(problem, *args)
        branches = {p: functools.partial(self._impls[n].fn, problem) for p, n in chosen.items()}
        out_shape = jax.eval_shape(branches[next(iter(chosen))], *args)
        leaves, treedef = jax.tree.flatten(out_shape)
        avals = tuple(_jcore.ShapedArray(l.shape, l.dtype) for l in leaves)
        for p in PLATFORMS:
            if p not in chosen:
                msg = d.message(p)

                def _raise(*a, _msg=msg):
                    flat = jax.tree.leaves(a)
                    return jax.tree.unflatten(treedef, _unservable_p.bind(*flat, avals=avals, message=_msg))

                branches[p] = _raise
        return lax.platform_dependent(*args, **branches)


# ----------------------------------------------------------------------------- one explain for every op
# Each public op that dispatches through a Registry registers how to explain one of its calls next
# to its definition (``register_explainer(op, explainer)``); ``attn_jax.explain(op, *args, **kw)``
# then answers for any of them with the same Decision report.

_EXPLAINERS: dict[Callable, Callable[..., Decision]] = {}


def register_explainer(op: Callable, explainer: Callable[..., Decision]) -> None:
    """``explainer(*args, platform=None, **kwargs) -> Decision`` takes the arguments of ``op``."""
    _EXPLAINERS[op] = explainer


def explainable_ops() -> list[str]:
    """Qualified names of the ops :func:`explain_call` can explain."""
    return sorted(f"{op.__module__}.{op.__qualname__}" for op in _EXPLAINERS)


def explain_call(op: Callable, *args, platform: str | None = None, **kwargs) -> Decision:
    """The dispatch decision (chosen implementation per platform, every reason) for ``op(*args, **kwargs)``."""
    if op not in _EXPLAINERS:
        name = getattr(op, "__qualname__", repr(op))
        raise ValueError(f"op: {name} has no dispatch to explain; explainable ops: {', '.join(explainable_ops())}")
    return _EXPLAINERS[op](*args, platform=platform, **kwargs)
