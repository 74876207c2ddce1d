"""engine.serialization: results and reports packed with a Packer kept per thread."""

from __future__ import annotations

import threading

import pytest

from engine import serialization
from engine.exceptions import EncodeError
from engine.serialization import dumps, loads


def test_a_value_that_cannot_be_packed_leaves_the_next_one_whole():
    with pytest.raises(EncodeError, match="object"):
        dumps([1, 2, object()])  # fails half-way: the kept packer must not keep the half
    assert loads(dumps([3, 4])) == [3, 4]


def test_an_exception_packs_inside_a_value_and_comes_back_as_itself():
    value = loads(dumps({"error": ValueError("bad", 3), "n": 1}))
    assert value["n"] == 1 and isinstance(value["error"], ValueError) and value["error"].args == ("bad", 3)


def test_a_large_value_is_packed_whole_and_the_large_buffer_is_not_kept():
    big = b"x" * (serialization.PACKER_KEEP_BYTES + 10)
    dumps("warm")
    kept = list(serialization._free_packers[False])
    assert loads(dumps(big)) == big
    assert len(serialization._free_packers[False]) == len(kept) - 1  # the one that packed it is gone
    assert loads(dumps("small")) == "small"


def test_threads_packing_at_once_each_get_their_own_values():
    found: dict[int, list] = {}

    def pack(n: int) -> None:
        found[n] = [loads(dumps([n, i, "x" * n])) for i in range(2000)]

    threads = [threading.Thread(target=pack, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(found[n] == [[n, i, "x" * n] for i in range(2000)] for n in range(4))


def test_pickle_stays_off_unless_asked():
    with pytest.raises(EncodeError):
        dumps(complex(1, 2))
    assert loads(dumps(complex(1, 2), accept_pickle=True), accept_pickle=True) == complex(1, 2)
    with pytest.raises(EncodeError, match="pickled"):
        loads(dumps(complex(1, 2), accept_pickle=True))


def test_a_value_packed_while_another_is_being_packed_leaves_both_whole():
    # A pickled value's __reduce__ runs in the middle of the outer pack: it must get its own Packer.
    class Nested:
        def __reduce__(self):
            inner.append(loads(dumps(["inner", list(range(50))], accept_pickle=True), accept_pickle=True))
            return (list, ([7],))

    inner: list = []
    outer = loads(dumps(["before", Nested(), "after" * 20], accept_pickle=True), accept_pickle=True)
    assert outer == ["before", [7], "after" * 20]
    assert inner == [["inner", list(range(50))]]
