"""The runtime checker that tests/conftest.py hands to jaxtyping's import hook.

``install_import_hook("attn_jax", "tests.shapecheck.checker")`` wraps every function of attn_jax
in ``jaxtyping.jaxtyped(typechecker=checker)``: jaxtyping builds two stubs with the function's
signature -- one for the parameters (checked before the call) and one for parameters plus
return value (checked after it, sharing the dimension sizes) -- and decorates both with
:func:`checker`, which is beartype (``int`` accepted where ``float`` is annotated, PEP 484).

One deviation from plain beartype: for a function *with* a return annotation, a parameter
violation is held back until the function returns, and then raised by the return check.  The
library's own validation (``ValueError`` / ``TypeError`` naming the argument, DESIGN.md §2) thus
still answers bad inputs first, as the bad-input tests require, while any call that *succeeds*
with arguments outside the annotations fails the test run: either the annotation or the
validation is wrong.  The parameters of a function *without* a return annotation are not checked
(there is no point after the call at which to do so): every public op of the checked families
carries a return annotation.
"""

from __future__ import annotations

import re
import threading

from beartype import BeartypeConf, beartype

_CONF = BeartypeConf(is_pep484_tower=True)
_state = threading.local()
_last_full_has_return = [True]


def _pending() -> dict:
    if not hasattr(_state, "pending"):
        _state.pending = {}
    return _state.pending


def _key(stub, args, kwargs) -> tuple:
    return (stub.__qualname__, stub.__module__, tuple(map(id, args)),
            tuple((k, id(v)) for k, v in sorted(kwargs.items())))


def _output_name(stub) -> str | None:
    """The extra keyword-only argument (``ret0``, ...) of jaxtyping's full stub; None for a parameter stub."""
    code = stub.__code__
    if code.co_kwonlyargcount == 0:
        return None
    name = code.co_varnames[code.co_argcount + code.co_kwonlyargcount - 1]
    return name if re.fullmatch(r"ret\d+", name) else None


def checker(stub):
    """Typechecker for jaxtyping's stubs (see the module docstring)."""
    checked = beartype(conf=_CONF)(stub)
    out_name = _output_name(stub)
    if out_name is not None:
        # The full stub (parameters + return value), decorated just before the parameter stub of
        # the same function; it carries a return annotation iff the function has one.
        _last_full_has_return[0] = "return" in stub.__annotations__
        if not _last_full_has_return[0]:
            return checked

        def full(*args, **kwargs):
            err = _pending().pop(_key(stub, args, {k: v for k, v in kwargs.items() if k != out_name}), None)
            if err is not None:
                raise err
            return checked(*args, **kwargs)

        return full

    if not _last_full_has_return[0]:
        return _unchecked

    def params(*args, **kwargs):
        key = _key(stub, args, kwargs)
        try:
            checked(*args, **kwargs)
        except Exception as e:  # held back until the function returns (module docstring)
            _pending()[key] = e
        else:
            _pending().pop(key, None)

    return params


def _unchecked(*args, **kwargs):
    return None
