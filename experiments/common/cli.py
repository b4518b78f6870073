"""absl flag helpers shared by the entry points (flags are defined on first use, so the
train / generate / evaluate modules can be imported together)."""

from __future__ import annotations

import sys

from absl import flags

__all__ = ["define", "adopt_key_flags", "quiet_orbax"]

_DEFINED: list[str] = []


def define(kind: str, name: str, default, help_text: str):
    """``flags.DEFINE_<kind>(name, ...)`` unless a flag of that name exists; returns a getter."""
    if name not in flags.FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text)
        _DEFINED.append(name)
    return lambda: flags.FLAGS[name].value


def adopt_key_flags(*names: str) -> None:
    """Show the flags made by :func:`define` (and ``names``) in the running script's ``--help``
    (absl lists only the key flags of the main module, and these are defined in this module)."""
    for name in [*_DEFINED, *names]:
        if name in flags.FLAGS:
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def quiet_orbax() -> None:
    """Drop orbax's INFO log lines (one per save / restore) from the absl handler on stderr."""
    import logging as pylogging
    from absl import logging
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
