"""Instant propagation: a thread that LISTENs to the store's change notifications.

On PostgreSQL the native store's triggers ``NOTIFY policyd_changes`` (migration 0002)
once per transaction that changes anything a snapshot is built from.  ``ChangeListener``
owns one dedicated database connection in one small daemon thread: it connects, runs
``LISTEN``, then only waits in ``poll()`` on the connection's socket (and on a pipe
that wakes it for shutdown).  On a notification it drains every notification queued and
asks the reactor, once, to call ``on_change`` (``SnapshotService.changed``, which
coalesces further); it never runs a refresh itself, so a refresh never waits for it and
it never waits for a refresh.  Its own thread, not the store thread: the store thread
runs builds one after another, and a build must not delay noticing that the connection
is gone, nor a reconnection delay a build.

A lost connection (``pg_terminate_backend``, a server restart, a network cut seen by the
TCP keepalives of ``policyd.store.engine``) is logged once per incident; the thread
reconnects with a growing pause (``RETRY``), and calls ``on_change`` as soon as it has
reconnected (changes made while it was not listening are not notified); once the new
connection has lasted ``SETTLE`` seconds it logs that it is listening again.  A
connection that fails before that is the same incident, and the pauses keep growing.  Meanwhile, and always, the snapshot service's timer keeps polling.

Every log event and every call of ``on_change`` goes through ``callFromThread``: the
thread touches nothing of the reactor's.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger(namespace="policyd.store")


class StoreWatch(Service):
    """What a thread that wakes the snapshot service on a change keeps (``ChangeListener``
    here, ``policyd.sqlite_watch.SqliteWatcher``): its state for ``status()`` (``policyctl
    status``: ``store.listen``), its incidents, and the way to the reactor.  ``on_change()``
    is called on the reactor."""

    def __init__(self, reactor, on_change: Callable[[], None], *, channel: str,
                 store: str, name: str) -> None:
        self.reactor = reactor
        self.on_change = on_change
        self.channel = channel
        self.store = store
        self.thread_name = name
        self.listening = False
        self.listening_since: float | None = None
        self.lost_since: float | None = None
        self.last_error: str | None = None
        self.received = 0
        self.incidents = 0
        self._stop: threading.Event | None = None

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "channel": self.channel,
            "listening": self.listening,
            "listening_for": (None if self.listening_since is None
                              else round(now - self.listening_since, 3)),
            "lost_for": None if self.lost_since is None else round(now - self.lost_since, 3),
            "last_error": self.last_error,
            "received": self.received,
            "incidents": self.incidents,
        }

    def _call(self, f, *args, **kwargs) -> None:
        self.reactor.callFromThread(f, *args, **kwargs)

    def _incident(self, error: Exception) -> bool:
        """Note ``error`` (no longer listening): True for the first of an incident, the
        one to log."""
        self.listening = False
        self.listening_since = None
        lines = str(error).strip().splitlines()
        name = type(error).__name__
        self.last_error = f"{name}: {lines[0]}" if lines else name
        if self.lost_since is not None:
            return False
        self.lost_since = time.monotonic()
        self.incidents += 1
        return True


class ChangeListener(StoreWatch):
    """``connect()`` (blocking, called in the thread) returns ``(connection, close)``:
    a psycopg2 connection in autocommit mode that is already LISTENing, and a callable
    that closes it.  ``on_change()`` is called on the reactor."""

    # Seconds before each reconnection attempt of an incident (the last one repeats).
    RETRY = (0.5, 1.0, 2.0, 5.0, 10.0)
    # Seconds a wait lasts at most (then it polls the connection anyway).
    WAIT = 30.0
    # Seconds a new connection waits without failing before it counts as listening.
    SETTLE = 1.0

    def __init__(self, reactor, connect: Callable[[], tuple], on_change: Callable[[], None],
                 *, channel: str, store: str = "", name: str = "policyd-listen") -> None:
        super().__init__(reactor, on_change, channel=channel, store=store, name=name)
        self.connect = connect
        self._wake_w: int | None = None

    # --- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        stop = threading.Event()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self._stop, self._wake_w = stop, wake_w
        threading.Thread(target=self._loop, args=(stop, wake_r, wake_w),
                         name=self.thread_name, daemon=True).start()

    def stopService(self):
        super().stopService()
        stop, self._stop = self._stop, None
        if stop is not None:
            stop.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        # Not joined: a connect stuck on a dead network must not delay shutdown (the
        # thread is a daemon thread and ends at its next wake-up).

    # --- the thread ----------------------------------------------------------------------

    def _loop(self, stop: threading.Event, wake_r: int, wake_w: int) -> None:
        attempt = 0
        try:
            while not stop.is_set():
                try:
                    connection, close = self.connect()
                except Exception as error:
                    self._lost(error, "cannot LISTEN")
                    stop.wait(self.RETRY[min(attempt, len(self.RETRY) - 1)])
                    attempt += 1
                    continue
                settled = False
                try:
                    self._wait(connection, stop, wake_r)
                except Exception as error:
                    # Read before _lost(), which marks the connection not listening.
                    settled = self.listening
                    if not stop.is_set():
                        self._lost(error, "lost its LISTEN connection")
                finally:
                    self.listening = False
                    self.listening_since = None
                    try:
                        close()
                    except Exception:
                        pass
                if not stop.is_set():
                    # A connection that failed before it settled is the same incident
                    # going on (a server refusing sessions as soon as they start): its
                    # pauses keep growing.  One that had settled starts them again.
                    # Never at once: a server restart refuses connections for a moment.
                    if settled:
                        attempt = 0
                    stop.wait(self.RETRY[min(attempt, len(self.RETRY) - 1)])
                    attempt += 1
        finally:
            os.close(wake_r)
            os.close(wake_w)

    def _listening(self) -> None:
        self.listening = True
        self.listening_since = time.monotonic()
        if self.lost_since is not None:
            self._call(log.info, "store notifications: listening again on {channel} after "
                       "{duration:.1f} s", channel=self.channel,
                       duration=time.monotonic() - self.lost_since, store=self.store)
            self.lost_since = None
            self.last_error = None
        else:
            self._call(log.info, "store notifications: listening on {channel}",
                       channel=self.channel, store=self.store)

    def _lost(self, error: Exception, what: str) -> None:
        if not self._incident(error):
            return  # once per incident
        self._call(log.warn, "store notifications: the daemon {what} on {channel}: "
                   "{error}; polling the store meanwhile, reconnecting",
                   what=what, channel=self.channel, error=self.last_error, store=self.store)

    def _wait(self, connection, stop: threading.Event, wake_r: int) -> None:
        """Wait for notifications until the connection fails (raises) or ``stop``.  The
        connection counts as listening (``_listening``) once it has waited ``SETTLE``
        seconds, or read a notification, without failing."""
        fd = connection.fileno()
        # poll(), not select(): a daemon holding a thousand connections gets descriptors
        # beyond select()'s FD_SETSIZE for its reconnections.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        # What changed while nobody listened was not notified: look now.
        self._call(self.on_change)
        while not stop.is_set():
            wait = self.WAIT if self.listening else self.SETTLE
            events = dict(poller.poll(wait * 1000))
            if wake_r in events:
                return
            if events.get(fd, 0) & select.POLLNVAL:
                raise OSError(f"descriptor {fd} of the LISTEN connection is not open")
            if fd in events or self.listening:
                # poll() reads what arrived; a dead connection raises here.
                connection.poll()
            if not self.listening:
                self._listening()
            if connection.notifies:
                self.received += len(connection.notifies)
                connection.notifies.clear()
                self._call(self.on_change)
