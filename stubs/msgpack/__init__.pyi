"""Types of the part of msgpack that engine uses (msgpack ships no types and no stub package exists).

Found through ``mypy_path`` in pyproject.toml. Keyword names and defaults follow msgpack 1.x's
``Packer``/``Unpacker``; add a name here when engine starts using it.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from typing_extensions import Buffer

class ExtType(NamedTuple):
    """An ext type value: ``code`` 0..127 and its raw ``data``."""

    code: int
    data: bytes

class UnpackException(Exception): ...
class BufferFull(UnpackException): ...
class OutOfData(UnpackException): ...
class FormatError(ValueError, UnpackException): ...
class StackError(ValueError, UnpackException): ...

class ExtraData(ValueError):
    """``unpackb`` found bytes after the first object."""

    unpacked: Any
    extra: bytes
    def __init__(self, unpacked: Any, extra: bytes) -> None: ...

class Packer:
    """A reusable packer: with ``autoreset`` (the default) ``pack`` returns each object's bytes."""

    def __init__(
        self,
        *,
        default: Callable[[Any], Any] | None = None,
        unicode_errors: str | None = None,
        use_single_float: bool = False,
        autoreset: bool = True,
        use_bin_type: bool = True,
        strict_types: bool = False,
        datetime: bool = False,
    ) -> None: ...
    def pack(self, obj: Any) -> bytes: ...

def packb(
    o: Any,
    *,
    default: Callable[[Any], Any] | None = None,
    unicode_errors: str | None = None,
    use_single_float: bool = False,
    autoreset: bool = True,
    use_bin_type: bool = True,
    strict_types: bool = False,
    datetime: bool = False,
    buf_size: int | None = None,
) -> bytes: ...
def unpackb(
    packed: Buffer,
    *,
    raw: bool = False,
    use_list: bool = True,
    timestamp: int = 0,
    strict_map_key: bool = True,
    object_hook: Callable[[dict[Any, Any]], Any] | None = None,
    object_pairs_hook: Callable[[list[tuple[Any, Any]]], Any] | None = None,
    list_hook: Callable[[list[Any]], Any] | None = None,
    unicode_errors: str | None = None,
    ext_hook: Callable[[int, bytes], Any] = ...,
    max_str_len: int = -1,
    max_bin_len: int = -1,
    max_array_len: int = -1,
    max_map_len: int = -1,
    max_ext_len: int = -1,
) -> Any: ...
