"""The log's writes, made by a thread of their own: the reactor never waits for a disk.

A ``write()`` to a log file usually returns in microseconds, but now and then it waits
for the file system (its journal, dirty pages being written back, a rotation's truncate)
for tens of milliseconds.  Made on the reactor thread, with a line per decision, every
MTA connection waited too, and a daemon at three quarters of its capacity needed many
times that long to catch up: ``make bench``'s open-loop tail (bench/README.md, issue 14).

``LogStream`` is what ``policyd.logging.LineWriter`` writes to, for a log file and for
standard output (a pipe to journald can be slow too): ``write()`` appends the text to a
list; ``flush()`` (every second, and at once for a warning or an error) and every
``CHUNK`` characters hand what is pending to the writer thread, which encodes and writes
it in order.  ``reopen()`` (SIGHUP, after rotation) is queued in the same order, so each
line lands in the file it was written for.

Bounded: at most ``MAX_PENDING`` characters wait for the disk.  Beyond that lines are left
out and counted (``take_left_out()``; ``LogSetup.flush`` logs how many once the backlog
has cleared), never queued without end and never waited for.  A failed write (a full
disk) loses that batch, counted the same way with the error.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import deque
from typing import Callable

__all__ = ["LogStream"]

_REOPEN = object()


class LogStream:
    """A text stream over ``fd`` whose writes a thread makes (see the module's docstring).

    ``opener``: returns a new descriptor for ``reopen()`` (a file); ``None`` for a
    descriptor this stream does not own (standard output), which ``close()`` leaves open.
    """

    CHUNK = 64 * 1024
    MAX_PENDING = 16 * 1024 * 1024
    CLOSE_WAIT = 5.0

    def __init__(self, fd: int, opener: Callable[[], int] | None = None) -> None:
        self.fd = fd
        self.opener = opener
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[str] = []
        self._pending_size = 0
        self._queue: deque = deque()  # (texts, size), _REOPEN, or a threading.Event
        self._queued_size = 0
        self._left_out = 0
        self._lost = 0
        self._error: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="policyd-log-writer",
                                        daemon=True)
        self._thread.start()
        # Whatever path the process leaves by (a start-up failure included), what was
        # logged is written out first.
        atexit.register(self.close)

    # --- any thread (the reactor's, mostly) ------------------------------------------------

    def write(self, text: str) -> int:
        with self._lock:
            size = len(text)
            if self._closed or self._pending_size + self._queued_size + size > self.MAX_PENDING:
                self._left_out += 1
                return 0
            self._pending.append(text)
            self._pending_size += size
            if self._pending_size >= self.CHUNK:
                self._hand_over()
        return size

    def flush(self) -> None:
        with self._lock:
            self._hand_over()

    def reopen(self) -> None:
        """Write what came before to the current file, then write to a new one (the
        rotated file's successor); on failure keep the current one (``take_left_out``
        reports why)."""
        if self.opener is None:
            return
        with self._lock:
            self._hand_over()
            self._queue.append(_REOPEN)
            self._wake.notify()

    def sync(self, timeout: float = CLOSE_WAIT) -> bool:
        """Wait until everything written so far is written out (at most ``timeout``)."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return True
            self._hand_over()
            self._queue.append(done)
            self._wake.notify()
        return done.wait(timeout)

    def close(self) -> None:
        """Write out what is pending (waiting at most ``CLOSE_WAIT`` for a stuck disk),
        stop the thread, close the file."""
        with self._lock:
            if self._closed:
                return
            self._hand_over()
            self._closed = True
            self._wake.notify()
        atexit.unregister(self.close)
        self._thread.join(self.CLOSE_WAIT)
        if self.opener is not None and not self._thread.is_alive():
            try:
                os.close(self.fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def take_left_out(self) -> tuple[int, str | None] | None:
        """(lines left out or lost, the write error if any) since the last call, once the
        backlog is below half its limit; else ``None`` (nothing to say yet)."""
        with self._lock:
            count = self._left_out + self._lost
            if (not count and self._error is None) or self._pending_size + self._queued_size > self.MAX_PENDING // 2:
                return None
            error, self._error = self._error, None
            self._left_out = self._lost = 0
        return count, error

    def fileno(self) -> int:
        return self.fd

    def _hand_over(self) -> None:  # with the lock held
        if self._pending:
            self._queue.append((self._pending, self._pending_size))
            self._queued_size += self._pending_size
            self._pending = []
            self._pending_size = 0
            self._wake.notify()

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return  # closed, and everything written
                item = self._queue.popleft()
            if item is _REOPEN:
                self._reopen_now()
            elif isinstance(item, threading.Event):
                item.set()
            else:
                texts, size = item
                self._write_all("".join(texts).encode("utf-8", "backslashreplace"),
                                len(texts))
                with self._lock:
                    self._queued_size -= size

    def _write_all(self, data: bytes, lines: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as error:
            with self._lock:
                self._lost += lines
                self._error = f"{error.strerror or error}"

    def _reopen_now(self) -> None:
        try:
            fd = self.opener()
        except OSError as error:
            with self._lock:
                self._error = f"cannot reopen the log file: {error.strerror or error}"
            return
        old, self.fd = self.fd, fd
        try:
            os.close(old)
        except OSError:
            pass
