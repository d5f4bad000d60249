"""Bounded waits against real servers: a table another connection holds locked makes a
store read and a policyctl write fail within the configured timeout with
``StoreUnavailable`` (exit 5) instead of hanging; the daemon's snapshot service says
unhealthy with the reason while the last good snapshot keeps serving, and recovers once
the lock is released.

No test here measures time (a busy CI machine makes any bound flaky): each blocking call
runs under ``within()``, whose generous limit only keeps a regression from hanging the
suite, and the assertions are about behaviour: the error (exit 5) names ``lock_timeout``,
the key that bounded the wait, and the service reports the reason it is unhealthy.

The locks are taken in a database each test creates (ACCESS EXCLUSIVE on PostgreSQL,
``LOCK TABLES ... WRITE`` on MariaDB); the shared servers themselves are never touched.
"""

from __future__ import annotations

import io
import threading
import time
import uuid

import pytest
from sqlalchemy import text
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from policyd import ctl
from policyd.config import StoreTimeouts
from policyd.core.chain import decide
from policyd.core.verdict import Query, Verdict
from policyd.errors import StoreUnavailable
from policyd.snapshot_service import SnapshotService
from policyd.store import NativeBackend, Store
from tests.protocols.fakes import captured_events
from tests.requirements import require

from .test_store_databases import MARIADB, PG, reachable

pytestmark = pytest.mark.integration

LIST = "discuss@lists.example.org"
SHORT = StoreTimeouts(connect=5, statement=5, lock=0.5)


@pytest.fixture
def pg_store():
    """(URL, a function returning a new psycopg2 connection) of a fresh PostgreSQL
    database holding a native store with one list and one member."""
    require(reachable(PG), f"PostgreSQL on {PG[0]}:{PG[1]}")
    import psycopg2

    name = f"policyd_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg2://postgres@{PG[0]}:{PG[1]}/{name}"
    try:
        populate(url)
        yield url, lambda: psycopg2.connect(host=PG[0], port=PG[1], user="postgres",
                                            dbname=name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def mariadb_store():
    require(reachable(MARIADB), f"MariaDB on {MARIADB[0]}:{MARIADB[1]}")
    import pymysql

    name = f"policyd_test_{uuid.uuid4().hex[:12]}"
    admin = pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root", password="",
                            autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    url = f"mysql+pymysql://root@{MARIADB[0]}:{MARIADB[1]}/{name}"
    try:
        populate(url)
        yield url, lambda: pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root",
                                           password="", database=name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


HANG = 120.0  # seconds: only keeps a regression from hanging the suite; never a measurement


def within(f, *args, limit: float = HANG, **kwargs):
    """``f(*args, **kwargs)`` run in a thread; its result, or the exception it raised.  A
    call still running after ``limit`` seconds fails the test as hung (the timeouts under
    test are seconds; ``limit`` is far beyond any of them)."""
    box: dict = {}

    def work():
        try:
            box["result"] = f(*args, **kwargs)
        except BaseException as error:  # handed back to the test's thread
            box["error"] = error
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"{getattr(f, '__name__', f)} still waiting after {limit:.0f} s: "
                    "the wait is not bounded", pytrace=False)
    if "error" in box:
        raise box["error"]
    return box["result"]


def waiting_on_a_lock(connect, limit: float = HANG) -> bool:
    """Whether another session of the database waits on a lock (``pg_stat_activity``),
    polled until it does or ``limit`` seconds pass."""
    watcher = connect()
    watcher.autocommit = True
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            with watcher.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                               "current_database() AND wait_event_type = 'Lock'")
                if cursor.fetchone()[0]:
                    return True
            time.sleep(0.05)
        return False
    finally:
        watcher.close()


def policyctl(*argv: str, environ=None) -> tuple[int, str]:
    err = io.StringIO()
    code = ctl.main(list(argv), out=io.StringIO(), err=err,
                    environ=environ or {"POLICYD_CONFIG": "/nonexistent"})
    return code, err.getvalue()


def populate(url: str) -> None:
    for argv in (["init"], ["list", "add", LIST, "--default-nonmember-action", "reject"],
                 ["member", "add", LIST, "anne@example.org"]):
        code, err = policyctl("--store", url, *argv)
        assert code == 0, (argv, err)


def lock_postgresql(connect):
    """Another session holding ACCESS EXCLUSIVE on ``memberships`` until rollback."""
    locker = connect()
    with locker.cursor() as cursor:
        cursor.execute("LOCK TABLE memberships IN ACCESS EXCLUSIVE MODE")
    return locker


def lock_mariadb(connect):
    locker = connect()
    with locker.cursor() as cursor:
        cursor.execute("LOCK TABLES memberships WRITE")
    return locker


def release(locker) -> None:
    try:
        with locker.cursor() as cursor:
            cursor.execute("UNLOCK TABLES" if "pymysql" in type(locker).__module__
                           else "ROLLBACK")
    finally:
        locker.close()


@pytest.mark.parametrize("database", [
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
])
def test_a_locked_table_fails_reads_and_writes_within_the_timeout(request, database,
                                                                     tmp_path):
    """(a) With ``memberships`` locked by another connection: the daemon's full read and
    a policyctl write (through ``Store`` and through ``policyctl`` with the keys in its
    configuration file) fail with StoreUnavailable / exit 5 naming ``lock_timeout``, the
    key that ended the wait; (c) once the lock is released both work again."""
    fixture = "pg_store" if database == "postgresql" else "mariadb_store"
    url, connect = request.getfixturevalue(fixture)
    backend = NativeBackend(url, SHORT)
    store = Store(url, SHORT)
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nurl = {url}\nconnect_timeout = 5\nstatement_timeout = 5\n"
                      "lock_timeout = 0.5\n")
    assert backend.load_snapshot().lists[LIST].members
    locker = (lock_postgresql if database == "postgresql" else lock_mariadb)(connect)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            within(backend.load_snapshot)
        assert "lock_timeout" in str(caught.value)

        def write():
            with store.write() as session:
                session.execute(text("DELETE FROM memberships WHERE 1 = 0"))
        with pytest.raises(StoreUnavailable) as caught:
            within(write)
        assert caught.value.exit_code == 5 and "lock_timeout" in str(caught.value)

        code, err = within(policyctl, "member", "add", LIST, "bob@example.org",
                           environ={"POLICYD_CONFIG": str(config)})
        assert code == 5, err
        assert err.startswith("policyctl: error: ") and "lock_timeout" in err
    finally:
        release(locker)
    assert backend.load_snapshot().lists[LIST].members
    code, err = policyctl("member", "add", LIST, "bob@example.org",
                          environ={"POLICYD_CONFIG": str(config)})
    assert code == 0, err
    backend.close()
    store.close()


class Threads:
    """``run_in_thread`` in real threads whose results the test hands to the (fake)
    reactor when it chooses: a store call can really block on a lock while the Clock
    and the service's state are inspected."""

    def __init__(self) -> None:
        self.pending: list = []

    def run(self, f, *args, **kwargs) -> Deferred:
        d: Deferred = Deferred()
        box: dict = {}

        def work():
            try:
                box["result"] = f(*args, **kwargs)
            except BaseException:
                box["failure"] = Failure()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self.pending.append((thread, d, box))
        return d

    def settle(self, timeout: float = HANG) -> None:
        """Fire the Deferreds of the calls that have ended, waiting for them up to
        ``timeout`` seconds (a limit against hanging, not a measurement)."""
        deadline = time.monotonic() + timeout
        while self.pending:
            thread, d, box = self.pending[0]
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return
            self.pending.pop(0)
            if "failure" in box:
                d.errback(box["failure"])
            else:
                d.callback(box["result"])

    def busy(self) -> bool:
        return any(thread.is_alive() for thread, _, _ in self.pending)


@pytest.mark.postgres
def test_snapshot_service_on_a_locked_store(pg_store):
    """(b) A refresh stuck on a lock past refresh_timeout is logged once and makes status
    unhealthy with the reason; a refresh that hits lock_timeout makes it unhealthy with
    the store's error; the old snapshot answers meanwhile.  (c) Released, the next
    refresh loads and status is healthy again."""
    url, connect = pg_store
    query = Query(LIST, "anne@example.org")
    for timeouts, stuck in ((StoreTimeouts(connect=5, statement=60, lock=30), True),
                            (SHORT, False)):
        threads = Threads()
        clock = Clock()
        backend = NativeBackend(url, timeouts)
        service = SnapshotService(backend, interval=2.0, clock=clock,
                                  run_in_thread=threads.run, refresh_timeout=5.0,
                                  monotonic=clock.seconds)
        service.startService()
        threads.settle()
        first = service.current
        assert first is not None and service.status()["store"]["healthy"]
        locker = lock_postgresql(connect)
        try:
            with captured_events() as events:
                results = []
                service.reload().addCallback(results.append)  # a full build: reads members
                if stuck:
                    assert waiting_on_a_lock(connect)  # the build really waits on it
                    assert threads.busy()
                    clock.advance(6.0)
                    status = service.status()["store"]
                    assert status["healthy"] is False
                    assert "refresh_timeout = 5 s" in status["unhealthy_reason"]
                    assert len([e for e in events
                                if "refresh_timeout" in e["log_format"]]) == 1
                else:
                    threads.settle()
                    assert results == [False]
                    status = service.status()["store"]
                    assert status["healthy"] is False
                    assert "lock_timeout" in status["unhealthy_reason"]
                # The last good snapshot keeps answering.
                assert service.current is first
                assert decide(service.current, query).verdict is Verdict.ACCEPT
        finally:
            release(locker)
        if stuck:
            threads.settle()
            assert results == [True]
        else:
            # The next tick (the token did not change: a check), once the incident's
            # quiet interval has passed without a failure.
            clock.advance(service.quiet_interval)
            threads.settle()
            service.reload()
            threads.settle()
        status = service.status()["store"]
        assert status["healthy"] is True and status["unhealthy_reason"] is None
        assert decide(service.current, query).verdict is Verdict.ACCEPT
        service.stopService()
        threads.settle()
