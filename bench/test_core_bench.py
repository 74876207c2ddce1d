"""Micro-benchmarks of each core function, compiled and pure side by side.

Every benchmark runs on both twins through the root ``core`` fixture and sets
``benchmark.group`` to the function name, so pytest-benchmark prints the pair together;
``python -m bench.core_ratios`` turns them into a ratio table.
"""

from __future__ import annotations

import pytest

ARGS = (12, "two", [3.0, 4.5], {"nested": True})
KWARGS = {"user_id": 991, "name": "x" * 24}
OPTIONS = {"time_limit": 30, "link": ["tasks.done"]}


def make_message(core, i=0):
    return core.TaskMessage(
        f"4b0e5c3a-7a5e-4e3b-9d7c-{i:012d}", "proj.tasks.resize_image", ARGS, KWARGS,
        retries=1, eta=1700000000.25, queue="images", reply_to="client-7",
        parent_id="parent-0001", root_id="root-0001", options=OPTIONS)


@pytest.fixture
def encoded(core):
    return core.encode_message(make_message(core))


def test_decode_message(benchmark, core, encoded):
    benchmark.group = "decode_message"
    msg = benchmark(core.decode_message, encoded)
    assert msg.task == "proj.tasks.resize_image"


def test_decode_message_no_options(benchmark, core):
    benchmark.group = "decode_message (no options)"
    msg = make_message(core)
    msg.options = None
    data = core.encode_message(msg)
    assert benchmark(core.decode_message, data).options == {}


def test_encode_message(benchmark, core):
    # The payload is packed once and cached, as when a supervisor forwards a message.
    benchmark.group = "encode_message"
    msg = make_message(core)
    assert benchmark(core.encode_message, msg)


def test_decode_batch_100(benchmark, core):
    benchmark.group = "decode_batch (100)"
    data = core.encode_batch([make_message(core, i) for i in range(100)])
    assert len(benchmark(core.decode_batch, data)) == 100


def test_split_batch_100(benchmark, core):
    benchmark.group = "split_batch (100)"
    data = core.encode_batch([make_message(core, i) for i in range(100)])
    assert len(benchmark(core.split_batch, data)) == 100


def test_encode_batch_100(benchmark, core):
    benchmark.group = "encode_batch (100)"
    messages = [make_message(core, i) for i in range(100)]
    assert benchmark(core.encode_batch, messages)


def test_registry_lookup(benchmark, core):
    benchmark.group = "TaskRegistry.lookup"
    reg = core.TaskRegistry()
    for i in range(200):
        reg.register(f"proj.tasks.t{i}", object())
    assert benchmark(reg.lookup, "proj.tasks.t150") is reg["proj.tasks.t150"]


def test_compute_backoff(benchmark, core):
    benchmark.group = "compute_backoff"
    assert benchmark(core.compute_backoff, 5, 0.5, 600.0, True, 0.25) == 4.0


def test_recorder_cycle(benchmark, core):
    # One record() per task (STARTED then SUCCESS for 256 tasks) plus one flush: 513 calls.
    benchmark.group = "StateRecorder 512 record + flush"
    ids = [f"task-{i}" for i in range(256)]
    recorder = core.StateRecorder(batch_size=512, max_entries=10_000)

    def cycle():
        record = recorder.record
        for task_id in ids:
            record(task_id, "STARTED")
        for task_id in ids:
            record(task_id, "SUCCESS", 42)
        out = recorder.flush()
        for task_id in ids:
            recorder.forget(task_id)
        return out

    assert len(benchmark(cycle)) == 256
