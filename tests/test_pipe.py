"""Framing over the supervisor/child pipes, on real ``os.pipe()``s in this process (no children)."""

from __future__ import annotations

import os

import pytest

from engine.worker import pipe
from engine.worker.pipe import HEADER, MAX_FRAME, FrameReader, FrameWriter


@pytest.fixture
def fds():
    """A plain pipe (default size, so a large frame fills it); both ends closed afterwards."""
    read_fd, write_fd = os.pipe()
    ends = [read_fd, write_fd]
    yield ends
    for fd in ends:
        try:
            os.close(fd)
        except OSError:
            pass


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def test_a_frame_round_trips_through_writer_and_reader(fds):
    reader, writer = FrameReader(fds[0]), FrameWriter(fds[1], blocking=True)
    writer.add(pipe.TASK, b"hello")
    writer.add(pipe.STOP, b"")
    assert writer.pending == 2 * HEADER.size + 5
    assert writer.flush() is True
    assert writer.pending == 0
    assert reader.read() == [(pipe.TASK, b"hello"), (pipe.STOP, b"")]


def test_a_header_split_across_reads_waits_for_the_rest(fds):
    reader = FrameReader(fds[0])
    data = frame(pipe.DONE, b"payload")
    os.write(fds[1], data[:3])  # not even a whole header
    assert reader.read() == []
    os.write(fds[1], data[3:])
    assert reader.read() == [(pipe.DONE, b"payload")]
    assert not reader.buffer


def test_a_payload_split_across_reads_waits_for_the_rest(fds):
    reader = FrameReader(fds[0])
    data = frame(pipe.RECORD, b"x" * 1000)
    os.write(fds[1], data[:HEADER.size + 10])
    assert reader.read() == []
    os.write(fds[1], data[HEADER.size + 10:-1])
    assert reader.read() == []
    os.write(fds[1], data[-1:])
    assert reader.read() == [(pipe.RECORD, b"x" * 1000)]


def test_many_frames_in_one_read_come_out_in_order_and_a_trailing_part_is_kept(fds):
    reader = FrameReader(fds[0])
    frames = [(pipe.DONE, str(i).encode() * i) for i in range(50)]
    tail = frame(pipe.SEND, b"later")
    os.write(fds[1], b"".join(frame(k, p) for k, p in frames) + tail[:-2])
    assert reader.read() == frames
    os.write(fds[1], tail[-2:])
    assert reader.read() == [(pipe.SEND, b"later")]


def test_an_oversize_length_header_means_a_corrupt_stream(fds):
    reader = FrameReader(fds[0])
    os.write(fds[1], HEADER.pack(MAX_FRAME + 1, pipe.DONE) + b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        reader.read()


def test_an_empty_non_blocking_pipe_is_not_eof(fds):
    reader = FrameReader(fds[0])
    assert reader.read() == []
    assert reader.eof is False


def test_eof_is_noted_when_the_writer_closes(fds):
    reader = FrameReader(fds[0])
    os.write(fds[1], frame(pipe.DONE, b"last"))
    os.close(fds[1])
    assert reader.read() == [(pipe.DONE, b"last")]
    assert reader.eof is False  # the data came first
    assert reader.read() == []
    assert reader.eof is True


def test_a_non_blocking_writer_keeps_what_a_full_pipe_did_not_take(fds):
    big = os.urandom(1 << 20)  # far more than a default pipe holds
    reader, writer = FrameReader(fds[0]), FrameWriter(fds[1], blocking=False)
    writer.add(pipe.TASK, big)
    writer.add(pipe.TASK, b"after")
    assert writer.flush() is False  # did not block
    assert 0 < writer.pending < len(big)
    got = []
    for _ in range(10_000):  # bounded: each turn drains the pipe, then refills it
        got += reader.read()
        if len(got) == 2:
            break
        writer.flush()
    assert got == [(pipe.TASK, big), (pipe.TASK, b"after")]
    assert writer.pending == 0


def test_writing_to_a_pipe_whose_reader_is_gone_raises(fds):
    writer = FrameWriter(fds[1], blocking=False)
    os.close(fds[0])
    writer.add(pipe.TASK, b"lost")
    with pytest.raises(OSError):  # EPIPE (Python ignores SIGPIPE)
        writer.flush()
    assert writer.pending == HEADER.size + 4  # nothing was taken off the buffer
