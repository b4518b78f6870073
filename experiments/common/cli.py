"""absl flag helpers shared by the entry points (flags are defined on first use, so the
train / generate / evaluate modules can be imported together)."""

from __future__ import annotations

from absl import flags

__all__ = ["define"]


def define(kind: str, name: str, default, help_text: str):
    """``flags.DEFINE_<kind>(name, ...)`` unless a flag of that name exists; returns a getter."""
    if name not in flags.FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text)
    return lambda: flags.FLAGS[name].value


def quiet_orbax() -> None:
    """Drop orbax's INFO log lines (one per save / restore) from the absl handler on stderr."""
    import logging as pylogging
    from absl import logging
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
