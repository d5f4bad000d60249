"""Several real daemons on one PostgreSQL: a change reaches them all through NOTIFY,
long before their polling interval; losing their connections (``pg_terminate_backend``)
keeps every daemon serving its last good snapshot, and each re-LISTENs by itself.

The polling interval is 30 s here, so an answer that changes within a few seconds can
only come from a notification.  Each test prints the time from the change's commit (seen
by a thread polling the database) to the first answer reflecting it, per daemon.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import LIST, NONMEMBER, PG, REFRESH, Run, exim_ask, exim_line, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ACCEPT = b"ACCEPT 250 2.1.5 accept"
INTERVAL = 30
# Well below INTERVAL: only a notification can be this quick.
QUICK = 5.0


def pg_url(database: str) -> str:
    return f"postgresql+psycopg2://postgres@{PG[0]}:{PG[1]}/{database}"


@pytest.fixture
def runs():
    """Three run directories (own sockets, own control socket, own config)."""
    made = [Run(Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))) for _ in range(3)]
    yield made
    for run in made:
        shutil.rmtree(run.path, ignore_errors=True)


def start_all(runs, daemons, url: str, listen: str = "on") -> list:
    for run in runs:
        run.write_config(url=url)
        run.config.write_text(run.config.read_text().replace(
            f"refresh_interval = {REFRESH}\n",
            f"refresh_interval = {INTERVAL}\nlisten_notify = {listen}\n"))
    runs[0].fill()
    started = [daemons(run) for run in runs]
    for daemon in started:
        daemon.wait_ready()
    return started


def listening(daemon) -> bool:
    return daemon.status()["store"]["listen"].get("listening") is True


def commit_to_answer(runs, url: str, change) -> list[float]:
    """Run ``change()``; seconds from its commit (first seen by a thread polling the
    database) to each daemon's first answer that reflects it (the nonmember accepted)."""
    import psycopg2

    seen: dict[str, float] = {}
    done = threading.Event()

    def watch_database():
        connection = psycopg2.connect(host=PG[0], port=PG[1], user="postgres",
                                      dbname=url.rsplit("/", 1)[1])
        connection.autocommit = True
        with connection.cursor() as cursor:
            while not done.is_set():
                cursor.execute("SELECT count(*) FROM addresses WHERE email = %s",
                               (NONMEMBER,))
                if cursor.fetchone()[0]:
                    seen["commit"] = time.monotonic()
                    break
                time.sleep(0.001)
        connection.close()

    def ask(index: int, run: Run):
        while not done.is_set():
            if exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == ACCEPT:
                seen[str(index)] = time.monotonic()
                return
            time.sleep(0.002)

    threads = [threading.Thread(target=watch_database)]
    threads += [threading.Thread(target=ask, args=(i, run)) for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    try:
        change()
        wait_until(lambda: len(seen) == len(runs) + 1, QUICK + 5,
                   "every daemon to answer with the change")
    finally:
        done.set()
        for thread in threads:
            thread.join(10)
    return [seen[str(i)] - seen["commit"] for i in range(len(runs))]


def report(what: str, latencies: list[float]) -> None:
    print(f"\n{what}: commit to first answer per daemon: "
          + ", ".join(f"{s * 1000:.0f} ms" for s in latencies)
          + f" (median {statistics.median(latencies) * 1000:.0f} ms)")


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_three_daemons_answer_a_change_through_notify(runs, daemons, pg_database):
    """A policyctl change on one PostgreSQL is answered by all three daemons within a few
    seconds, though they poll only every 30 s; status shows LISTEN active."""
    url = pg_url(pg_database)
    started = start_all(runs, daemons, url)
    for daemon in started:
        wait_until(lambda: listening(daemon), 10, "LISTEN in every daemon")
        assert exim_ask(daemon.run.exim_socket, exim_line(LIST, NONMEMBER)) != ACCEPT
    latencies = commit_to_answer(
        runs, url, lambda: runs[0].policyctl("member", "add", LIST, NONMEMBER))
    report("NOTIFY", latencies)
    assert max(latencies) < QUICK
    for daemon in started:
        listen = daemon.status()["store"]["listen"]
        assert listen["enabled"] and listen["notifications"] >= 1


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_losing_the_database_connections_serves_last_good_and_relistens(
        runs, daemons, pg_database):
    """pg_terminate_backend of every connection to the store's database (each daemon's
    LISTEN connection and pooled ones): every daemon keeps answering from its last good
    snapshot, logs the loss once, LISTENs again without a restart, and a later change
    is answered quickly again."""
    import psycopg2

    url = pg_url(pg_database)
    started = start_all(runs, daemons, url)
    pids = [daemon.proc.pid for daemon in started]
    for daemon in started:
        wait_until(lambda: listening(daemon), 10, "LISTEN in every daemon")
    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            # Only this test's database: no new sessions for 3 s (several failed
            # reconnections, still one incident), every session ended.
            cursor.execute(f'ALTER DATABASE "{pg_database}" ALLOW_CONNECTIONS false')
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM "
                           "pg_stat_activity WHERE datname = %s", (pg_database,))
            assert cursor.fetchone()[0] >= 3
            time.sleep(1.0)
            for daemon in started:
                assert not listening(daemon)
                answers = [exim_ask(daemon.run.exim_socket, exim_line(LIST, sender))
                           for sender in (NONMEMBER, "alice@example.com")]
                assert answers[0] != ACCEPT and answers[1] == ACCEPT, answers
            time.sleep(2.0)
            cursor.execute(f'ALTER DATABASE "{pg_database}" ALLOW_CONNECTIONS true')
    finally:
        admin.close()
    for daemon in started:
        wait_until(lambda: listening(daemon) and
                   daemon.status()["store"]["listen"]["incidents"] >= 1, 15,
                   "every daemon to LISTEN again")
    latencies = commit_to_answer(
        runs, url, lambda: runs[0].policyctl("member", "add", LIST, NONMEMBER))
    report("NOTIFY after pg_terminate_backend", latencies)
    assert max(latencies) < QUICK
    assert [daemon.proc.pid for daemon in started] == pids
    for daemon in started:
        # An info line: written with the next second's flush (a warning goes at once).
        wait_until(lambda: "listening again" in daemon.text(), 5,
                   "the 'listening again' line in the log")
        text = daemon.text()
        assert text.count("lost its LISTEN connection") == 1, text


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_a_notify_storm_causes_a_bounded_number_of_rebuilds(runs, daemons, pg_database):
    """10,000 committed changes in about a second (one UPDATE per transaction, each
    notifying) cost a daemon a bounded number of refreshes (coalesced: at most about one
    per NOTIFY_GAP), not 10,000; the last change is served."""
    import psycopg2

    from policyd.snapshot_service import SnapshotService

    url = pg_url(pg_database)
    daemon = start_all(runs[:1], daemons, url)[0]
    wait_until(lambda: listening(daemon), 10, "LISTEN")
    before = daemon.status()["store"]
    connection = psycopg2.connect(host=PG[0], port=PG[1], user="postgres",
                                  dbname=pg_database)
    connection.autocommit = True
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        for i in range(10_000):
            cursor.execute("UPDATE lists SET display_name = %s", (f"storm {i}",))
    seconds = time.monotonic() - started
    connection.close()

    wait_until(lambda: daemon.status()["store"]["listen"]["notifications"]
               > before["listen"]["notifications"], QUICK, "notifications")
    time.sleep(1.0)
    after = daemon.status()["store"]
    refreshes = after["checks"] - before["checks"]
    loads = after["loads"] - before["loads"]
    notified = after["listen"]["received"] - before["listen"]["received"]
    print(f"\nstorm: 10,000 commits in {seconds:.2f} s; {notified} notifications "
          f"received, {refreshes} refreshes, {loads} snapshots loaded")
    assert refreshes <= (seconds + 1.0) / SnapshotService.NOTIFY_GAP + 5
    assert loads <= refreshes
    # The last change is served: the daemon's snapshot is at the store's token.
    from policyd.store import NativeBackend

    backend = NativeBackend(url)
    try:
        token = backend.change_token()
    finally:
        backend.close()
    assert daemon.status()["snapshot"]["version"] == token
