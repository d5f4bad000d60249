"""Quick propagation on SQLite: a thread that watches the database's commit counter.

SQLite cannot notify.  What it tells cheaply is whether another connection committed:
``PRAGMA data_version`` read again on the same connection changes after every commit made
by any other connection (https://sqlite.org/pragma.html#pragma_data_version), and reading
it touches no table.  ``SqliteWatcher`` reads it every ``interval`` seconds (``[store]
watch_interval``) in a small daemon thread of its own (on a connection of its own), and when it moved asks the reactor,
once, to call ``on_change`` (``SnapshotService.changed``: a change-token check, and a
refresh if the token moved; several in a row are coalesced there).  So a change made with
``policyctl`` is answered within about ``interval`` plus its refresh instead of
``refresh_interval``.  The daemon's own writes (SMTP-time moderation state) move the
counter too and cost one change-token check each, which on the native store reads one row.

The native store only: a Mailman 3 database is written by Mailman's runners all day
(pending requests, workflows, bounce events), and each of those writes would cost a
change-token computation over Mailman's tables, a fraction of a second on a large site;
it keeps its polling every ``refresh_interval``.

A database file replaced under its name (a restore, a copy) is noticed by its inode: the
watcher opens the new file and calls ``on_change``.  A file it cannot open or read is
logged once per incident and retried every ``RETRY`` seconds; the snapshot service's
timer keeps polling meanwhile and always.  Like ``policyd.change_listener``, every log
event and every call of ``on_change`` goes through ``callFromThread``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Callable
from urllib.parse import quote

from twisted.logger import Logger

from .change_listener import StoreWatch

log = Logger(namespace="policyd.store")


class SqliteWatcher(StoreWatch):
    """Watches the SQLite database at ``path``; ``on_change()`` is called on the reactor
    after another connection committed."""

    # Seconds between attempts to open or read a file that failed.
    RETRY = 1.0
    # SQLite's busy timeout for the watcher's own reads (it never waits on the reactor).
    BUSY_TIMEOUT = 1.0

    def __init__(self, reactor, path: str, on_change: Callable[[], None], *,
                 interval: float, store: str = "", name: str = "policyd-watch") -> None:
        super().__init__(reactor, on_change, channel=f"sqlite data_version every "
                         f"{interval:g} s", store=store, name=name)
        self.path = path
        self.interval = interval

    # --- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        stop = threading.Event()
        self._stop = stop
        threading.Thread(target=self._loop, args=(stop,), name=self.thread_name,
                         daemon=True).start()

    def stopService(self):
        super().stopService()
        stop, self._stop = self._stop, None
        if stop is not None:
            stop.set()
        # Not joined: a read stuck on a locked file must not delay shutdown (the thread
        # is a daemon thread and ends at its next wake-up).

    # --- the thread ----------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, int]:
        """A connection to the file and the file's inode (the inode first: a file
        replaced in between is seen at the next read).  Read-write (never creating the
        file, and nothing is written through it): a read-only connection cannot open a
        database in WAL mode whose shared-memory file is not there yet, as after a
        restore, until another connection made it."""
        inode = os.stat(self.path).st_ino
        connection = sqlite3.connect(f"file:{quote(self.path)}?mode=rw", uri=True,
                                     timeout=self.BUSY_TIMEOUT, check_same_thread=False,
                                     isolation_level=None)
        return connection, inode

    def _loop(self, stop: threading.Event) -> None:
        connection: sqlite3.Connection | None = None
        inode = version = None
        try:
            while not stop.is_set():
                try:
                    if connection is None:
                        connection, inode = self._open()
                        version = _data_version(connection)
                        self._watching()
                    elif os.stat(self.path).st_ino != inode:
                        connection.close()
                        connection = None
                        self._call(self.on_change)  # a new file: look at it now
                        continue
                    else:
                        now = _data_version(connection)
                        if now != version:
                            version = now
                            self.received += 1
                            self._call(self.on_change)
                except (sqlite3.Error, OSError) as error:
                    if connection is not None:
                        connection.close()
                        connection = None
                    self._lost(error)
                    stop.wait(self.RETRY)
                    continue
                stop.wait(self.interval)
        finally:
            self.listening = False
            if connection is not None:
                connection.close()

    def _watching(self) -> None:
        self.listening = True
        self.listening_since = time.time()
        if self.lost_since is not None:
            self._call(log.info, "store watch: reading {path} again after {duration:.1f} s",
                       path=self.path, duration=time.time() - self.lost_since,
                       store=self.store)
            self.lost_since = None
            self.last_error = None
            # What changed while it could not read was not seen: look now.
            self._call(self.on_change)

    def _lost(self, error: Exception) -> None:
        if not self._incident(error):
            return  # once per incident
        self._call(log.warn, "store watch: cannot read {path}: {error}; polling the store "
                   "every refresh_interval meanwhile, retrying", path=self.path,
                   error=self.last_error, store=self.store)


def _data_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA data_version").fetchone()[0])
