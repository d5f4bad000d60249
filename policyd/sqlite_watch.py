"""Quick propagation on SQLite: a thread that watches the database's files change.

SQLite cannot notify.  What it shows cheaply is that its files changed: a commit appends
to the ``-wal`` file in WAL mode (the native store's mode) or rewrites pages of the
database file otherwise, and a checkpoint writes the database file.  ``SqliteWatcher``
``stat``s the database file and its ``-wal`` every ``interval`` seconds (``[store]
watch_interval``) in a small daemon thread of its own, and when their identity, size or
modification time moved asks the reactor, once, to call ``on_change``
(``SnapshotService.changed``: a change-token check, and a refresh if the token moved;
several in a row are coalesced there).  So a change made with ``policyctl`` is answered
within about ``interval`` plus its refresh instead of ``refresh_interval``.  The daemon's
own writes (SMTP-time moderation state) and the checkpoint after a commit cost one
change-token check each, which on the native store reads one row.

The watcher holds no SQLite connection and never opens the file.  A connection held open
keeps the database's ``-wal`` and ``-shm`` files beside its name: a store moved over that
name (a restore) would then be opened by the next connection with the old file's WAL,
whose pages SQLite would write into the restored file, and the daemon would serve, and
the file would then hold, the old store.  (The store itself closes each connection after
a read, so the last one to close checkpoints and removes the WAL: ``store.engine``.)  Nor
does it ``open()`` the file with the operating system: closing any descriptor of a file
drops every POSIX lock the process holds on it, SQLite's included.

The native store only: a Mailman 3 database is written by Mailman's runners all day
(pending requests, workflows, bounce events), and each of those writes would cost a
change-token computation over Mailman's tables, a fraction of a second on a large site;
it keeps its polling every ``refresh_interval``.

A database file replaced under its name is a change like any other (its inode moved).  A
file that is not there is logged once per incident and looked for every ``RETRY``
seconds; the snapshot service's timer keeps polling meanwhile and always, and says what
it cannot read.  Like ``policyd.change_listener``, every log event and every call of
``on_change`` goes through ``callFromThread``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .change_listener import StoreWatch

log = Logger(namespace="policyd.store")


class SqliteWatcher(StoreWatch):
    """Watches the SQLite database at ``path``; ``on_change()`` is called on the reactor
    after another connection committed."""

    # Seconds between attempts to open or read a file that failed.
    RETRY = 1.0

    def __init__(self, reactor, path: str, on_change: Callable[[], None], *,
                 interval: float, store: str = "", name: str = "policyd-watch") -> None:
        super().__init__(reactor, on_change, channel=f"sqlite file changes every "
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

    def _state(self) -> tuple:
        """What a commit, a checkpoint or a replaced file changes: the database file's
        identity, size and modification time, and the ``-wal``'s size and modification
        time while it holds frames (an empty one comes and goes with each reader's
        connection: it is not a change).  ``OSError`` when the file is not there."""
        db = os.stat(self.path)
        try:
            wal = os.stat(self.path + "-wal")
        except FileNotFoundError:
            wal_state = None
        else:
            wal_state = (wal.st_ino, wal.st_size, wal.st_mtime_ns) if wal.st_size else None
        return db.st_dev, db.st_ino, db.st_size, db.st_mtime_ns, wal_state

    def _loop(self, stop: threading.Event) -> None:
        try:
            self._watch(stop)
        except Exception as error:
            # Not an unreadable file (that is retried in ``_watch``): the watch cannot go
            # on.  Said through the daemon's logger (an exception left to the thread went
            # to stderr only) and kept as an incident, so ``status`` and the metrics show
            # the watch lost; the snapshot service's polling goes on.
            failure = Failure()
            self._incident(error)
            self._call(log.failure, "store watch: watching {path} failed: {error}; polling "
                       "the store every refresh_interval only", failure, LogLevel.error,
                       path=self.path, error=self.last_error, store=self.store)
        finally:
            self.listening = False
            self.listening_since = None

    def _watch(self, stop: threading.Event) -> None:
        state = None
        while not stop.is_set():
            try:
                now = self._state()
            except OSError as error:
                state = None
                self._lost(error)
                stop.wait(self.RETRY)
                continue
            if state is None:
                self._watching()
            elif now != state:
                self.received += 1
                self._call(self.on_change)
            state = now
            stop.wait(self.interval)

    def _watching(self) -> None:
        self.listening = True
        self.listening_since = time.monotonic()
        if self.lost_since is not None:
            self._call(log.info, "store watch: reading {path} again after {duration:.1f} s",
                       path=self.path, duration=time.monotonic() - self.lost_since,
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
