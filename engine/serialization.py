"""Results and exceptions as bytes: msgpack, never pickle unless the app opts in.

A task's return value is packed with msgpack (tuples arrive as lists). An
exception travels as its type's module and qualified name plus its ``.args``
(the Tasks guide's rule: exceptions keep their arguments in ``.args``). The
reader rebuilds an instance of the same class when that class is already
imported in the reading process and accepts those args; otherwise it gets a
:class:`~engine.exceptions.RemoteTaskError` carrying the original type name
and message. Modules named on the wire are never imported: importing runs
code, and the wire is not trusted.
"""

from __future__ import annotations

import builtins
import functools
import sys
from typing import Any, Callable

import msgpack

from engine.exceptions import EncodeError, RemoteTaskError

__all__ = ("dumps", "exception_from_wire", "exception_to_wire", "loader", "loads")

#: msgpack extension type code of an encoded exception.
EXC_EXT = 1
#: msgpack extension type code of a pickled value (only with ``accept_pickle``).
PICKLE_EXT = 2


def exception_to_wire(exc: BaseException) -> list:
    """Return ``[module, qualname, args, message]`` for ``exc``; args that do not pack become ``[str(exc)]``."""
    cls = type(exc)
    args: Any = list(exc.args)
    try:
        msgpack.packb(args, use_bin_type=True, default=_default)
    except (TypeError, ValueError, OverflowError):
        args = [str(exc)]
    return [cls.__module__, cls.__qualname__, args, str(exc)]


def exception_from_wire(data: list) -> BaseException:
    """Rebuild an exception from :func:`exception_to_wire` output (see the module docstring)."""
    module_name, qualname, args, message = data
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    cls: Any = module
    for part in str(qualname).split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(*args)
        except Exception:
            pass
    return RemoteTaskError(f"{module_name}.{qualname}", message)


def _default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return msgpack.ExtType(EXC_EXT, msgpack.packb(exception_to_wire(value), use_bin_type=True))
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"cannot serialize object of type {type(value).__module__}.{type(value).__qualname__}")


def _pickle_default(value: Any) -> Any:
    try:
        return _default(value)
    except TypeError:
        import pickle

        return msgpack.ExtType(PICKLE_EXT, pickle.dumps(value))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXC_EXT:
        return exception_from_wire(msgpack.unpackb(data, raw=False))
    if code == PICKLE_EXT:
        raise EncodeError("refusing a pickled value: set accept_pickle=True only on networks you trust")
    return msgpack.ExtType(code, data)


def _pickle_ext_hook(code: int, data: bytes) -> Any:
    if code == PICKLE_EXT:
        import pickle

        return pickle.loads(data)
    return _ext_hook(code, data)


#: Packers not in use, per pickle choice. A Packer is taken off its list while it packs (list
#: pop and append are atomic), so threads and nested calls never share one.
_free_packers: dict[bool, list[Any]] = {False: [], True: []}
#: A kept Packer keeps the largest buffer it ever grew to: after packing more than this it is let go.
PACKER_KEEP_BYTES = 1 << 20
#: Packers kept per list (one per thread that packs at once).
PACKERS_KEPT = 8


def dumps(value: Any, accept_pickle: bool = False) -> bytes:
    """Pack a value; raises :class:`EncodeError` naming the type msgpack cannot pack."""
    # msgpack.packb builds a Packer, and its buffer, per call: that costs more than packing a
    # task's small result or report, so Packers are kept. A call made while one packs (a
    # pickled value's __reduce__, a finalizer run by the collector) takes another one.
    free = _free_packers[accept_pickle]
    try:
        packer = free.pop()
    except IndexError:
        packer = msgpack.Packer(use_bin_type=True, default=_pickle_default if accept_pickle else _default,
                                autoreset=True)
    try:
        packed: bytes = packer.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"result cannot be serialized with msgpack: {exc}") from None
    if len(packed) <= PACKER_KEEP_BYTES and len(free) < PACKERS_KEPT:
        free.append(packer)
    return packed


#: How results are unpacked, by ``accept_pickle``: one call into msgpack each.
_loaders: dict[bool, Callable[[bytes], Any]] = {
    accept: functools.partial(msgpack.unpackb, raw=False, strict_map_key=False,
                              ext_hook=_pickle_ext_hook if accept else _ext_hook)
    for accept in (False, True)}


def loads(data: bytes, accept_pickle: bool = False) -> Any:
    """Unpack what :func:`dumps` packed."""
    return _loaders[bool(accept_pickle)](data)


def loader(accept_pickle: bool = False) -> Callable[[bytes], Any]:
    """:func:`loads` with ``accept_pickle`` bound (for loops over many results)."""
    return _loaders[bool(accept_pickle)]
