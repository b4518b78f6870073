"""Config checks: every unknown key, mixer or task is reported with the valid choices and the
closest match (``did you mean 'steps'?``); the error names the offending field."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
import typing
from typing import Iterable

import ml_collections

__all__ = ["ConfigError", "did_you_mean", "load_config_file", "check_cli_overrides", "split_mixer_kwargs",
           "apply_mixer_kwargs", "validate", "make_task", "layer_pattern", "mixer_keywords", "check_mixer_kwargs",
           "config_fields_help"]

#: Sections whose keys are free-form (task kwargs are checked against the task's constructor,
#: mixer_kwargs against the mixer registry).
_FREE_FORM = {"task", "model.mixer_kwargs"}


class ConfigError(ValueError):
    """A bad config field; the message starts with the dotted path of the field."""


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.0) -> str:
    """``"valid choices: a, b, c; did you mean 'b'?"`` (no suggestion when none is ``cutoff``-similar)."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=cutoff)
    return f"valid choices: {', '.join(choices)}" + (f"; did you mean {close[0]!r}?" if close else "")


def _unknown_key(path: str, key: str, section) -> ConfigError:
    where = f"config.{path}" if path else "config"
    return ConfigError(f"{where}.{key}: unknown key {key!r} in {where}; {did_you_mean(key, section.keys())}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/cfg.py[:arg]`` -> ``get_config(arg)`` (as ``config_flags.DEFINE_config_file`` does).

    A config file documents its argument in a module-level ``ARG`` string (e.g. ``mqar.py``:
    ``"<seq_len>x<num_kv_pairs>"``); any error of ``get_config`` becomes a :class:`ConfigError`
    naming the spec and that expected ``:arg`` format."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config: {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 -- any failure of the config file is a bad --config value
        fmt = getattr(module, "ARG", None)
        expected = f"--config={path}:{fmt}" if fmt else f"--config={path}"
        raise ConfigError(f"config: {spec!r} is not a valid config ({str(e).removeprefix('config: ')}); "
                          f"expected {expected}") from None


def check_cli_overrides(argv: list[str]) -> None:
    """Check every ``--config.a.b=v`` of ``argv`` names an existing field of the ``--config`` file."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None:
        return
    config = load_config_file(spec)           # a malformed :arg is reported here, before absl parses it
    for dotted in overrides:
        node, path = config, ""
        for key in dotted.split("."):
            if path == "model.mixer_kwargs":      # new entries allowed: --config.model.mixer_kwargs.gla.chunk=64
                _check_mixer(key, "config.model.mixer_kwargs")
                break
            if not isinstance(node, (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config.{path}: is a {type(node).__name__}, it has no field {key!r}")
            if key not in node:
                raise _unknown_key(path, key, node)
            node, path = node[key], (f"{path}.{key}" if path else key)


def split_mixer_kwargs(argv: list[str]) -> tuple[list[str], dict]:
    """Take ``--config.model.mixer_kwargs.<mixer>.<kwarg>=<value>`` out of ``argv`` (ml_collections
    cannot create new nested keys); values are Python literals, else strings."""
    prefix, rest, extra = "--config.model.mixer_kwargs.", [], {}
    for a in argv:
        if not a.startswith(prefix):
            rest.append(a)
            continue
        path, _, value = a[len(prefix):].partition("=")
        mixer, _, kwarg = path.partition(".")
        _check_mixer(mixer, "config.model.mixer_kwargs")
        if not kwarg or "." in kwarg:
            raise ConfigError(f"config.model.mixer_kwargs.{path}: expected --config.model.mixer_kwargs.<mixer>.<kwarg>=v")
        check_mixer_kwargs(mixer, [kwarg])
        try:
            extra[(mixer, kwarg)] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[(mixer, kwarg)] = value
    return rest, extra


def apply_mixer_kwargs(config, extra: dict) -> None:
    for (mixer, kwarg), value in extra.items():
        kw = dict(config.model.mixer_kwargs.get(mixer, {}))
        kw[kwarg] = value
        config.model.mixer_kwargs[mixer] = kw


def mixer_keywords(name: str) -> list[str] | None:
    """The keyword arguments the factory of mixer ``name`` accepts (beyond ``d_model``,
    ``num_heads``, ``rngs``), following a factory's ``**kwargs`` into the class its return
    annotation names; ``None`` when they cannot be determined."""
    from attn_jax import mixers
    fn, names, seen = mixers.get(name), set(), set()
    while fn is not None and fn not in seen:
        seen.add(fn)
        try:
            params = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return sorted(names - {"self", "d_model", "num_heads", "rngs"})
        if inspect.isclass(fn):
            return None
        try:
            target = typing.get_type_hints(fn).get("return")
        except Exception:  # noqa: BLE001 -- an unresolvable annotation: the keywords are unknown
            return None
        fn = target if inspect.isclass(target) else None
    return None


def check_mixer_kwargs(mixer: str, kwargs: Iterable[str]) -> None:
    """Every name in ``kwargs`` is a keyword of mixer ``mixer``'s factory (when knowable); the error
    names the field and lists the valid keywords with the closest match."""
    valid = mixer_keywords(mixer)
    if valid is None:
        return
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"config.model.mixer_kwargs.{mixer}.{key}: mixer {mixer!r} has no keyword argument "
                              f"{key!r}; {did_you_mean(key, valid, cutoff=0.6)}")


def config_fields_help() -> str:
    """The overridable fields of the base config: ``"model: a, b, ...; optim: ...; ..."``."""
    from experiments.configs.base import get_base_config
    parts = []
    for section, node in get_base_config().items():
        extra = " + the task's own arguments" if section == "task" else ""
        parts.append(f"{section}: {', '.join(node.keys())}{extra}")
    return "; ".join(parts)


def _check_mixer(name: str, field: str) -> None:
    from attn_jax import mixers
    try:
        mixers.get(name)
    except ValueError as e:
        raise ConfigError(f"{field}: {str(e).removeprefix('mixer: ')}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Check ``config`` against the schema of ``experiments/configs/base.py`` (unknown keys anywhere
    but in free-form sections, unknown mixer names)."""
    from experiments.configs.base import get_base_config

    def walk(node, ref, path):
        for key in node.keys():
            if key not in ref:
                raise _unknown_key(path, key, ref)
            sub = f"{path}.{key}" if path else key
            if isinstance(ref[key], ml_collections.ConfigDict) and sub not in _FREE_FORM:
                if not isinstance(node[key], (dict, ml_collections.ConfigDict)):
                    raise ConfigError(f"config.{sub}: expected a section, got {node[key]!r}")
                walk(node[key], ref[key], sub)

    walk(config, get_base_config(), "")
    if not config.task.get("name"):
        raise ConfigError("config.task.name: a task name is required")
    layer_pattern(config)


def layer_pattern(config) -> str:
    """The per-layer mixer names (``model.mixer_pattern`` if set, else ``model.mixer``), checked."""
    field = "mixer_pattern" if config.model.get("mixer_pattern") else "mixer"
    pattern = config.model[field]
    for name in str(pattern).split(","):
        _check_mixer(name.strip(), f"config.model.{field}")
    for name, kwargs in config.model.mixer_kwargs.items():
        _check_mixer(name, "config.model.mixer_kwargs")
        if isinstance(kwargs, (dict, ml_collections.ConfigDict)):
            check_mixer_kwargs(name, kwargs.keys())
    return str(pattern)


def make_task(task_config):
    """The task of ``config.task`` (``name`` + constructor kwargs); errors list the valid names / fields."""
    import experiments.tasks  # noqa: F401  (the package imports every task module, registering it)
    from experiments.tasks import base
    kwargs = {k: v for k, v in dict(task_config).items() if k != "name"}
    name = task_config["name"]
    try:
        factory = base._REGISTRY[name]
    except KeyError:
        raise ConfigError(f"config.task.name: unknown task {name!r}; {did_you_mean(name, base.names())}") from None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                raise ConfigError(f"config.task.{key}: task {name!r} has no field {key!r}; "
                                  f"{did_you_mean(key, [p for p in params if p != 'self'])}")
    return base.make(name, **kwargs)
