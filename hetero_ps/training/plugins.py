"""Users' own code, named as ``package.module:attr`` (models, data sets, loss functions).

``--model my_pkg.nets:make_model`` means: import ``my_pkg.nets`` the way ``python`` would from the
current directory (``sys.path`` plus the working directory), then take its attribute ``make_model``
(dotted attributes such as ``module:Class.build`` are followed). Every node imports the same name,
so the module must be installed (or on ``PYTHONPATH``) on every node.
"""

from __future__ import annotations

import importlib
import os
import sys

from hetero_ps.errors import ConfigError


def is_plugin_name(name: str) -> bool:
    """True for ``module:attr`` names (built-in registry names never contain a colon)."""
    return ":" in name


def load_object(spec: str, what: str = "object"):
    """Import ``package.module:attr`` and return the attribute.

    ``what`` names the thing in error messages ("model factory", "loss function", ...).
    Raises ``ConfigError`` naming the module and the attribute when either is missing; an error
    raised *inside* the user's module while importing it is chained, not hidden.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{what} {spec!r} must look like package.module:attribute")
    mod_name, attr = spec.split(":")
    if not mod_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like package.module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # `python -m hetero_ps.server` puts the CWD on sys.path; an embedding program may not.
        sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and mod_name.startswith(exc.name):
            raise ConfigError(
                f"{what} {spec!r}: cannot import module {mod_name!r} ({exc}). Install it or put its "
                f"directory on PYTHONPATH on every node (searched: the working directory {cwd} and sys.path)"
            ) from exc
        raise ConfigError(f"{what} {spec!r}: importing module {mod_name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while being imported
        raise ConfigError(
            f"{what} {spec!r}: importing module {mod_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ConfigError(
                f"{what} {spec!r}: module {mod_name!r} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attr!r}; it has: {', '.join(public) or 'nothing public'}"
            ) from None
    return obj


def load_callable(spec: str, what: str = "factory"):
    """``load_object`` that also checks the result can be called."""
    obj = load_object(spec, what)
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is a {type(obj).__name__}, not something callable")
    return obj


def parse_value(v: str):
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` → bool, anything else stays a string."""
    low = v.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def parse_kv(items, flag: str = "--model-arg") -> dict:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}`` (values through ``parse_value``)."""
    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = parse_value(v)
    return out


def with_defaults(what: str, name: str, given: dict, defaults: dict) -> dict:
    """A built-in's arguments: ``defaults`` overridden by ``given``; a key it does not take is a ConfigError.

    ``what`` and ``name`` make the message: ``data set 'digits' does not take ['x']; it takes ...``.
    """
    extra = set(given) - set(defaults)
    if extra:
        raise ConfigError(
            f"{what} {name!r} does not take {sorted(extra)}; it takes "
            f"{', '.join(f'{k} (default {v})' for k, v in defaults.items()) or 'no arguments'}"
        )
    return {**defaults, **given}


def builtin(registry: dict, what: str, name: str):
    """``registry[name]``, or a ConfigError that lists the built-ins and the plugin form."""
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(
            f"unknown {what} {name!r}; choose one of {', '.join(registry)} or give package.module:factory"
        ) from None


def call_factory(fn, kwargs: dict, spec: str, what: str):
    """Call a user's factory with keyword arguments, turning a bad signature into a ConfigError."""
    try:
        return fn(**kwargs)
    except TypeError as exc:
        # A TypeError from the call itself (unexpected keyword) rather than deep inside the factory.
        import inspect

        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError:
            raise ConfigError(f"{what} {spec!r} does not accept the arguments {sorted(kwargs)}: {exc}") from exc
        except ValueError:
            pass
        raise
