"""Resolving ``'module:attr'`` strings to objects (task classes, request classes, apps)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ("symbol_by_name",)


def symbol_by_name(name: Any, default_module: str | None = None) -> Any:
    """Return the object named by ``'pkg.module:Attr'`` or ``'pkg.module.Attr'``.

    Non-strings are returned as they are, so options accept a class or its name.
    Raises ImportError naming the string when the module or attribute is missing.
    """
    if not isinstance(name, str):
        return name
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    elif default_module:
        module_name, attr = default_module, name
    else:
        raise ImportError(f"cannot resolve {name!r}: expected 'module:attribute'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r} ({name!r})") from None
    return obj
