"""The log's writes, made by a thread of their own: the reactor never waits for a disk.

A ``write()`` to a log file usually returns in microseconds, but now and then it waits
for the file system (its journal, dirty pages being written back, a rotation's truncate)
for tens of milliseconds.  Made on the reactor thread, with a line per decision, every
MTA connection waited too, and a daemon at three quarters of its capacity needed many
times that long to catch up: ``make bench``'s open-loop tail (bench/README.md, issue 14).

``LogStream`` is what ``policyd.logging.LineWriter`` writes to, for a log file and for
standard output (a pipe to journald can be slow too): ``write()`` appends the text to a
``deque``; ``flush()`` (every second, and at once for a warning or an error) and every
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

    The thread that made the stream (the reactor's, in the daemon) writes without taking
    a lock: it appends to a ``deque`` (one atomic operation) and counts what it wrote in
    counters only it changes: a lock taken per line cost a Postfix request a few per cent
    of its CPU in the daemon (bench/README.md).  Any other thread takes the lock; every
    thread's lines and markers (a reopen, a sync) go into the same ``deque``, in the order
    they were written.
    """

    CHUNK = 64 * 1024
    MAX_PENDING = 16 * 1024 * 1024
    CLOSE_WAIT = 5.0

    def __init__(self, fd: int, opener: Callable[[], int] | None = None) -> None:
        self.fd = fd
        self.opener = opener
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._items: deque = deque()  # lines (str), _REOPEN, or a threading.Event
        # Characters written by the owner (only it changes these two), by any other
        # thread (with the lock), and written out (only the writer thread changes it).
        self._owned = 0
        self._signalled = 0
        self._others = 0
        self._others_signalled = 0
        self._out = 0
        self._wanted = False  # with the lock: the writer thread has items to take
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

    def _backlog(self) -> int:
        """Characters written and not yet written out (``write`` spells it out)."""
        return self._owned + self._others - self._out

    def write(self, text: str) -> int:
        size = len(text)
        if self._closed or \
                self._owned + self._others - self._out + size > self.MAX_PENDING:
            with self._lock:
                self._left_out += 1
            return 0
        if threading.get_ident() == self._owner:
            self._items.append(text)
            self._owned += size
            if self._owned - self._signalled >= self.CHUNK:
                self._signalled = self._owned
                self._hand_over()
            return size
        with self._lock:
            self._items.append(text)
            self._others += size
            if self._others - self._others_signalled >= self.CHUNK:
                self._others_signalled = self._others
                self._wanted = True
                self._wake.notify()
        return size

    def flush(self) -> None:
        self._hand_over()

    def reopen(self) -> None:
        """Write what came before to the current file, then write to a new one (the
        rotated file's successor); on failure keep the current one (``take_left_out``
        reports why)."""
        if self.opener is None:
            return
        with self._lock:
            self._items.append(_REOPEN)
            self._wanted = True
            self._wake.notify()

    def sync(self, timeout: float = CLOSE_WAIT) -> bool:
        """Wait until everything written so far is written out (at most ``timeout``)."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return True
            self._items.append(done)
            self._wanted = True
            self._wake.notify()
        return done.wait(timeout)

    def close(self) -> None:
        """Write out what is pending (waiting at most ``CLOSE_WAIT`` for a stuck disk),
        stop the thread, close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wanted = True
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
            if (not count and self._error is None) or \
                    self._backlog() > self.MAX_PENDING // 2:
                return None
            error, self._error = self._error, None
            self._left_out = self._lost = 0
        return count, error

    def fileno(self) -> int:
        return self.fd

    def _hand_over(self) -> None:
        """Wake the writer thread: what is in the deque now is to be written."""
        with self._lock:
            self._wanted = True
            self._wake.notify()

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        items = self._items
        while True:
            with self._lock:
                while not self._wanted:
                    self._wake.wait()
                self._wanted = False
                closing = self._closed
            # What was handed over: everything in the deque now (more may come meanwhile;
            # it waits for the next hand-over, as it would in a list).
            texts: list[str] = []
            for _ in range(len(items)):
                item = items.popleft()
                if type(item) is str:
                    texts.append(item)
                    continue
                self._write_texts(texts)
                texts = []
                if item is _REOPEN:
                    self._reopen_now()
                else:
                    item.set()
            self._write_texts(texts)
            if closing:
                if not items:
                    return  # closed, and everything written
                with self._lock:
                    self._wanted = True

    def _write_texts(self, texts: list[str]) -> None:
        if texts:
            text = "".join(texts)
            self._write_all(text.encode("utf-8", "backslashreplace"), len(texts))
            self._out += len(text)

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
