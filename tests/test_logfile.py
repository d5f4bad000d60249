"""The log's writer thread (``policyd.logfile.LogStream``): order, reopen, bounds, and a
reactor that never waits for a stuck log."""

from __future__ import annotations

import os
import threading
import time

import pytest

from policyd.logfile import LogStream
from policyd.logging import LogSetup, LineWriter, _open


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_lines_are_written_in_order_and_complete(tmp_path):
    path = tmp_path / "policyd.log"
    stream = _open(str(path))
    lines = [f"line {i} é\n" for i in range(20_000)]  # many CHUNKs, and the last partial
    for line in lines:
        stream.write(line)
    stream.close()
    assert path.read_text(encoding="utf-8") == "".join(lines)


def test_sync_waits_for_the_disk_and_flush_does_not(tmp_path):
    path = tmp_path / "policyd.log"
    stream = _open(str(path))
    stream.write("one\n")
    assert path.read_text() == ""  # pending until a flush, a CHUNK or a sync
    assert stream.sync()
    assert path.read_text() == "one\n"
    stream.close()


def test_reopen_keeps_each_line_in_the_file_it_was_written_for(tmp_path):
    path = tmp_path / "policyd.log"
    stream = _open(str(path))
    stream.write("before\n")
    stream.flush()
    stream.sync()
    path.rename(tmp_path / "policyd.log.1")
    stream.write("still before\n")  # written before the SIGHUP: the rotated file
    stream.reopen()
    stream.write("after\n")
    stream.close()
    assert (tmp_path / "policyd.log.1").read_text() == "before\nstill before\n"
    assert path.read_text() == "after\n"


def test_a_reopen_that_fails_keeps_the_file_and_says_why(tmp_path):
    path = tmp_path / "policyd.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def opener():
        raise PermissionError(13, "Permission denied")

    stream = LogStream(fd, opener=opener)
    stream.reopen()
    stream.write("kept\n")
    stream.sync()
    assert path.read_text() == "kept\n"
    count, error = stream.take_left_out()
    assert count == 0 and "cannot reopen the log file: Permission denied" in error
    stream.close()


def test_a_stuck_log_never_blocks_the_writer_and_the_backlog_is_bounded(monkeypatch):
    """Standard output to a pipe nobody reads (journald hung, a stopped pager): every
    ``write`` returns at once, at most MAX_PENDING waits, the rest is counted."""
    monkeypatch.setattr(LogStream, "MAX_PENDING", 256 * 1024)
    monkeypatch.setattr(LogStream, "CLOSE_WAIT", 0.2)
    read_end, write_end = os.pipe()
    stream = LogStream(write_end)  # not owned: like standard output
    line = "x" * 199 + "\n"
    count = 50_000  # 10 MB: far beyond the pipe and the backlog
    finished = threading.Event()

    def produce():
        for _ in range(count):
            stream.write(line)
        stream.flush()
        finished.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert finished.wait(30), "write() waited for the stuck pipe"
    assert stream.take_left_out() is None  # the backlog is still full: not yet
    os.set_blocking(read_end, False)
    deadline = time.monotonic() + 30
    got = b""
    while time.monotonic() < deadline:
        got += _read_all(read_end)
        if stream.sync(0.05):
            break
    got += _read_all(read_end)
    written = got.count(b"\n")
    left_out, error = stream.take_left_out()
    assert error is None
    assert written + left_out == count
    assert 0 < written <= (256 * 1024 + 65536) // len(line) + 1024  # bounded (+ the pipe)
    stream.close()
    os.close(read_end)
    os.close(write_end)


def test_a_failed_write_is_counted_with_its_error(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # EPIPE on every write
    stream = LogStream(write_end)
    for i in range(3):
        stream.write(f"line {i}\n")
    assert stream.sync()
    count, error = stream.take_left_out()
    assert count == 3 and "Broken pipe" in error
    assert stream.take_left_out() is None  # reported once
    stream.close()
    os.close(write_end)


def test_log_setup_reports_lines_left_out_once_the_backlog_clears(tmp_path, monkeypatch):
    from twisted.logger import globalLogPublisher

    path = tmp_path / "policyd.log"
    stream = _open(str(path))
    monkeypatch.setattr(stream, "MAX_PENDING", 10)
    writer = LineWriter(stream)
    logs = LogSetup(writer, str(path))
    stream.write("12345678\n")
    stream.write("more than fits\n")  # left out
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        stream.sync()
        logs.flush()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if e.get("log_namespace") == "policyd.log"]
    assert len(warnings) == 1 and warnings[0]["count"] == 1
    logs.close()
    assert path.read_text() == "12345678\n"


def test_close_gives_up_on_a_stuck_disk(monkeypatch):
    monkeypatch.setattr(LogStream, "CLOSE_WAIT", 0.2)
    read_end, write_end = os.pipe()
    stream = LogStream(write_end)
    stream.write("x" * 200_000)  # more than the pipe holds: the writer thread blocks
    stream.flush()
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 5
    os.close(read_end)  # the blocked write fails now; the thread ends
    stream._thread.join(5)
    assert not stream._thread.is_alive()
    os.close(write_end)


@pytest.mark.parametrize("closed", [False, True])
def test_writes_after_close_are_counted_not_queued(tmp_path, closed):
    stream = _open(str(tmp_path / "policyd.log"))
    if closed:
        stream.close()
        assert stream.write("late\n") == 0
    else:
        assert stream.write("early\n") == 6
        stream.close()
