"""``policyd.sqlite_watch``: a real SQLite file written by another connection, the
watcher's thread running; its calls to the reactor recorded.  The waits are bounded
(a few seconds at most), and nothing here asserts a duration."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from policyd.sqlite_watch import SqliteWatcher

INTERVAL = 0.02
PATIENCE = 5.0


class RecordingReactor:
    """``callFromThread`` recorded (the watcher never touches anything else)."""

    def __init__(self) -> None:
        self.calls: list = []
        self.lock = threading.Lock()

    def callFromThread(self, f, *args, **kwargs) -> None:
        with self.lock:
            self.calls.append((f, args, kwargs))


class Watched:
    def __init__(self, path, *, journal: str = "delete") -> None:
        self.path = str(path)
        self.reactor = RecordingReactor()
        self.changes = 0
        self.watcher = SqliteWatcher(self.reactor, self.path, self.on_change,
                                     interval=INTERVAL)
        self.watcher.RETRY = INTERVAL
        self.journal = journal

    def on_change(self) -> None:
        self.changes += 1

    def write(self, value: int = 1, path=None) -> None:
        """A commit by a connection of its own, closed after it (the last connection
        to close checkpoints a WAL database into its file)."""
        db = sqlite3.connect(path or self.path)
        try:
            with db:
                db.execute(f"PRAGMA journal_mode = {self.journal}")
                db.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
                db.execute("INSERT INTO t VALUES (?)", (value,))
        finally:
            db.close()

    def on_change_calls(self) -> int:
        with self.reactor.lock:
            return sum(1 for f, _, _ in self.reactor.calls if f == self.on_change)

    def log_calls(self, text: str) -> list:
        with self.reactor.lock:
            return [kw for f, args, kw in self.reactor.calls
                    if f != self.on_change and args and text in args[0]]

    def wait_for(self, predicate) -> bool:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(INTERVAL / 2)
        return False

    def settle(self) -> None:
        """Long enough for many reads (the watcher is given that many intervals)."""
        time.sleep(INTERVAL * 15)


@pytest.fixture(params=["delete", "wal"])
def watched(tmp_path, request):
    w = Watched(tmp_path / "store.sqlite", journal=request.param)
    w.write(0)
    w.watcher.startService()
    assert w.wait_for(lambda: w.watcher.listening)
    yield w
    w.watcher.stopService()


def test_a_commit_by_another_connection_is_reported(watched):
    """Nothing is reported while nobody writes; each commit elsewhere is reported, in
    rollback-journal and WAL mode alike: once, or twice when the watcher looked between
    the commit and the checkpoint its writer's closing connection made."""
    watched.settle()
    assert watched.on_change_calls() == 0
    watched.write(1)
    assert watched.wait_for(lambda: watched.on_change_calls() >= 1)
    watched.settle()
    first = watched.on_change_calls()
    assert first in (1, 2)
    watched.settle()
    assert watched.on_change_calls() == first
    watched.write(2)
    assert watched.wait_for(lambda: watched.on_change_calls() > first)
    watched.settle()
    assert watched.on_change_calls() - first in (1, 2)
    assert watched.watcher.status()["received"] == watched.on_change_calls()
    assert watched.watcher.status()["listening"] is True


def test_a_reader_opening_and_closing_the_store_is_not_a_change(watched):
    """The snapshot service's reads (a connection opened, read, closed; in WAL mode that
    makes and removes an empty ``-wal``) are not reported: a change-token check must not
    cause the next one."""
    for _ in range(20):
        db = sqlite3.connect(watched.path)
        db.execute("SELECT count(*) FROM t").fetchone()
        time.sleep(INTERVAL / 2)
        db.close()
    watched.settle()
    assert watched.on_change_calls() == 0


def test_a_store_moved_over_the_watched_one_keeps_its_own_contents(watched, tmp_path):
    """A restore while the daemon runs: the file moved over the store's name is read as it
    is, and stays as it is.  (A watcher holding a connection kept the old file's ``-wal``
    beside the name with frames a writer could not checkpoint; the next connection took
    that WAL for the restored file's and wrote the old pages into it.)"""
    watched.write(1)
    watched.write(2)
    other = tmp_path / "restored.sqlite"
    restored = sqlite3.connect(other)
    with restored:
        restored.execute("PRAGMA journal_mode = wal")
        restored.execute("CREATE TABLE t (v INTEGER)")
        restored.execute("CREATE TABLE restored (marker TEXT)")
        restored.execute("INSERT INTO t VALUES (42)")
        restored.execute("INSERT INTO restored VALUES ('yes')")
    restored.close()
    os.replace(other, watched.path)
    assert watched.wait_for(lambda: watched.on_change_calls() >= 1)
    db = sqlite3.connect(watched.path)
    try:
        assert db.execute("SELECT v FROM t").fetchall() == [(42,)]
        assert db.execute("SELECT marker FROM restored").fetchall() == [("yes",)]
    finally:
        db.close()
    watched.settle()
    db = sqlite3.connect(f"file:{watched.path}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT v FROM t").fetchall() == [(42,)]
    finally:
        db.close()


def test_a_file_replaced_under_its_name_is_reported_and_watched(watched, tmp_path):
    """A restore (another file moved over the store's name) is a change, and the new
    file's commits are seen afterwards."""
    other = tmp_path / "restored.sqlite"
    watched.write(5, path=other)
    os.replace(other, watched.path)
    assert watched.wait_for(lambda: watched.on_change_calls() >= 1)
    assert watched.wait_for(lambda: watched.watcher.listening)
    watched.settle()
    before = watched.on_change_calls()
    watched.write(6)
    assert watched.wait_for(lambda: watched.on_change_calls() > before)


def test_an_unreadable_file_is_logged_once_then_found_again(tmp_path):
    """No file: one warning for the incident however many attempts, the status says so;
    once the file is there, one line says it is read again and a change is reported
    (what happened meanwhile was not seen)."""
    w = Watched(tmp_path / "later.sqlite")
    w.watcher.startService()
    try:
        assert w.wait_for(lambda: w.watcher.status()["incidents"] == 1)
        w.settle()
        assert len(w.log_calls("cannot read")) == 1
        status = w.watcher.status()
        assert status["listening"] is False and "later.sqlite" in status["last_error"]
        w.write(1)
        assert w.wait_for(lambda: w.on_change_calls() >= 1)
        assert len(w.log_calls("again after")) == 1
        assert w.watcher.status()["listening"] is True
        assert w.watcher.status()["last_error"] is None
    finally:
        w.watcher.stopService()


def test_stopping_ends_the_thread(tmp_path):
    w = Watched(tmp_path / "store.sqlite")
    w.write(0)
    w.watcher.startService()
    assert w.wait_for(lambda: w.watcher.listening)
    w.watcher.stopService()
    assert w.wait_for(lambda: not any(t.name == "policyd-watch"
                                      for t in threading.enumerate()))
    w.write(1)
    w.settle()
    assert w.on_change_calls() == 0


def test_the_daemon_watches_a_native_sqlite_store_unless_told_not_to(tmp_path):
    """``[store] watch_interval``: the native store on SQLite gets a watcher that wakes
    the snapshot service, shown as ``store.listen`` in the status; 0 turns it off."""
    from twisted.internet.testing import MemoryReactorClock

    from policyd import tap
    from policyd.sqlite_watch import SqliteWatcher as Watcher
    from policyd.store import NativeBackend

    from .test_tap import options_for, write_config

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    for text, expected in (("", 0.25), ("watch_interval = 0.5\n", 0.5),
                           ("watch_interval = 0\n", None)):
        backend = NativeBackend(url)
        try:
            options = options_for(write_config(tmp_path, f"[store]\nurl = {url}\n{text}"))
            service = tap.makeService(options, reactor=MemoryReactorClock(),
                                      backend=backend)
            watcher = service.change_listener
            if expected is None:
                assert watcher is None
                assert service.snapshots.status()["store"]["listen"]["enabled"] is False
            else:
                assert isinstance(watcher, Watcher) and watcher.interval == expected
                assert watcher.path == str(tmp_path / "store.sqlite")
                listen = service.snapshots.status()["store"]["listen"]
                assert listen["enabled"] is True
                assert listen["channel"] == f"sqlite file changes every {expected:g} s"
        finally:
            backend.close()


def test_an_error_that_ends_the_watch_is_logged_and_shown(tmp_path, monkeypatch):
    """An interval past ``threading.TIMEOUT_MAX`` (``watch_interval = 1e10`` passed the
    configuration then) raised OverflowError in the thread, which ended silently (only
    ``threading.excepthook`` saw it) with ``status`` still saying listening.  Now any
    unexpected error is logged through the daemon's logger (``log.failure``, by the
    reactor) and kept as an incident: not listening, its error and the time lost shown."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    w = Watched(tmp_path / "store.sqlite")
    w.write(0)
    w.watcher.interval = 1e10
    w.watcher.startService()
    try:
        assert w.wait_for(lambda: w.watcher.status()["incidents"] == 1)
        assert w.wait_for(lambda: not any(t.name == "policyd-watch"
                                          for t in threading.enumerate()))
        status = w.watcher.status()
        assert status["listening"] is False and status["listening_for"] is None
        assert status["last_error"].startswith("OverflowError")
        assert status["lost_for"] is not None
        (logged,) = w.log_calls("failed")
        with w.reactor.lock:
            (call,) = [(f, args) for f, args, kw in w.reactor.calls if kw is logged]
        assert call[0].__name__ == "failure" and call[1][1].check(OverflowError)
        assert logged["error"] == status["last_error"] and escaped == []
    finally:
        w.watcher.stopService()
