"""Propagation to many daemons on one PostgreSQL (issue 12): commit-to-answer times and
the polling load of idle daemons.

    python -m bench.propagation [--daemons 3] [--changes 20] [--mode both]
        [--interval 2] [--idle 20] [--pg-host 127.0.0.1] [--pg-port 5432]
        [--pg-user postgres] [--json]

Creates a scratch database (dropped at the end), fills it with one list and one
member, starts ``--daemons`` real ``policyd`` processes on it, each with its own run
directory and sockets, then per mode:

* ``notify``: ``[store] listen_notify = on``, ``refresh_interval = 30``: only NOTIFY can
  propagate a change in time;
* ``poll``: ``listen_notify = off``, ``refresh_interval = --interval``.

``--changes`` times, it commits a change (a nonmember added, then removed again) in this
process and notes when the commit returned; a thread per daemon asks that daemon's Exim
socket every millisecond until the answer reflects the change.  It prints, per daemon,
the median (and worst) commit-to-answer time.  Then, the daemons idle for ``--idle``
seconds and it prints the database's load per idle daemon: statements/s from
``pg_stat_statements`` when that extension is loaded and installed in the scratch
database, else transactions/s from ``pg_stat_database`` (``xact_commit`` +
``xact_rollback``; every token check is one transaction).

``python -m bench`` (``make bench``) calls ``bench_figures``: NOTIFY propagation to 3
daemons, then the idle load of 3 polling ones.

Needs the policyd package importable and its ``policyd`` console script beside the Python
running this (a virtualenv's ``bin``).  Exits 1 if a change was not answered by every
daemon within 30 s.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/propagation.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import base64  # noqa: E402

LIST = "bench@lists.example.com"
MEMBER = "alice@example.com"
NONMEMBER = "bob@example.net"
BIN = Path(sys.executable).parent


def _exim_line(sender: str) -> bytes:
    return f"POLICYD/1 list={LIST} sender={base64.b64encode(sender.encode()).decode()}".encode()


def _ask(path: Path, sender: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(_exim_line(sender))
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


class Daemon:
    def __init__(self, base: Path, index: int, url: str, interval: float,
                 listen: bool) -> None:
        self.path = base / f"d{index}"
        self.path.mkdir()
        self.exim = self.path / "exim.sock"
        self.control = self.path / "control.sock"
        self.config = self.path / "policyd.conf"
        self.config.write_text(
            "[store]\n"
            f"url = {url}\n"
            f"refresh_interval = {interval:g}\n"
            f"listen_notify = {'on' if listen else 'off'}\n"
            "[daemon]\n"
            f"state_dir = {self.path}\n"
            f"control_socket = {self.control}\n"
            "control_socket_mode = 0600\n"
            "log_level = warn\n"
            "[exim]\n"
            f"listen = unix:{self.exim}:mode=600\n"
            "[postfix]\n"
            f"listen = unix:{self.path / 'postfix.sock'}:mode=600\n")
        self.output = open(self.path / "policyd.out", "wb")
        self.proc = subprocess.Popen([str(BIN / "policyd"), "--config", str(self.config)],
                                     stdout=self.output, stderr=subprocess.STDOUT,
                                     cwd=self.path)

    def status(self) -> dict:
        from policyd import control_client

        return control_client.status(self.control, timeout=2.0)

    def wait_ready(self, listen: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"policyd exited: {(self.path / 'policyd.out').read_text()}")
            try:
                status = self.status()
                if status.get("snapshot") and (
                        not listen or status["store"]["listen"].get("listening")):
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise SystemExit(f"policyd not ready: {(self.path / 'policyd.out').read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.output.close()


def _change(store, add: bool) -> float:
    """Commit one change; the time the commit returned."""
    from policyd.store import queries as q
    from policyd.store.models import MemberRole

    with store.write() as session:
        mlist = q.find_list(session, LIST)
        if add:
            q.add_members(session, mlist, q.entries_from([NONMEMBER], None),
                          MemberRole.MEMBER, None)
        else:
            q.remove_members(session, mlist, q.entries_from([NONMEMBER], None))
    return time.monotonic()


def _propagation(store, daemons: list[Daemon], changes: int, spread: float
                 ) -> list[list[float]]:
    """Per daemon, the seconds from each commit to its first answer reflecting it."""
    times: list[list[float]] = [[] for _ in daemons]
    for n in range(changes):
        add = n % 2 == 0
        want = b"ACCEPT" if add else b"REJECT"
        seen: list[float | None] = [None] * len(daemons)
        go = threading.Event()

        def watch(i: int, daemon: Daemon) -> None:
            go.wait()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if _ask(daemon.exim, NONMEMBER).startswith(want):
                    seen[i] = time.monotonic()
                    return
                time.sleep(0.001)

        threads = [threading.Thread(target=watch, args=(i, d)) for i, d in enumerate(daemons)]
        for thread in threads:
            thread.start()
        go.set()
        committed = _change(store, add)
        for thread in threads:
            thread.join()
        if any(s is None for s in seen):
            raise SystemExit(f"change {n} not answered by every daemon within 30 s")
        for i, s in enumerate(seen):
            times[i].append(max(0.0, s - committed))
        # A random pause: a change committed right after the answers (right after a
        # polling tick) would always wait almost a whole interval.
        time.sleep(random.uniform(0.1, spread))
    return times


def _idle_load(admin, database: str, daemons: int, seconds: float,
               settle: float = 11.0) -> dict:
    """Queries (or transactions) per second per idle daemon over ``seconds``, after
    ``settle`` seconds for the statistics of earlier work to land."""
    import psycopg2

    statements = probe = None
    try:
        probe = psycopg2.connect(dbname=database, **admin)
        probe.autocommit = True
        with probe.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cursor.execute("SELECT sum(calls) FROM pg_stat_statements s JOIN pg_database d "
                           "ON d.oid = s.dbid WHERE d.datname = %s", (database,))
            statements = probe
    except psycopg2.Error:
        if probe is not None:
            probe.close()
        statements = None

    def sample() -> tuple[float, float]:
        """(the count, the rollbacks among the transactions: 0 for statements)"""
        if statements is not None:
            with statements.cursor() as cursor:
                cursor.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
                               "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s "
                               "AND s.query NOT ILIKE '%%pg_stat_statements%%'", (database,))
                return float(cursor.fetchone()[0]), 0.0
        connection = psycopg2.connect(dbname="postgres", **admin)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute("SELECT xact_commit + xact_rollback, xact_rollback "
                               "FROM pg_stat_database WHERE datname = %s", (database,))
                total, rollbacks = cursor.fetchone()
                return float(total), float(rollbacks)
        finally:
            connection.close()

    # An idle backend flushes its statistics up to 10 s late (PostgreSQL 15's
    # PGSTAT_IDLE_INTERVAL): let those of the changes above land first.  (A polling
    # daemon's backend flushes at its next transaction, a closed one at once.)
    time.sleep(settle)
    before, started = sample(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = sample(), time.monotonic() - started
    if statements is not None:
        statements.close()
    rate = (after[0] - before[0]) / elapsed / daemons
    rollbacks = (after[1] - before[1]) / elapsed / daemons
    return {"per_daemon_per_s": round(rate, 3), "seconds": round(elapsed, 1),
            "rollbacks_per_daemon_per_s": round(rollbacks, 3),
            "source": "pg_stat_statements calls" if statements is not None
            else "pg_stat_database xact_commit+xact_rollback"}


def run_mode(mode: str, args, url: str, admin: dict, database: str, base: Path, *,
             settle: float = 11.0, spread: float | None = None) -> dict:
    """``args.daemons`` daemons in ``mode``; ``args.changes`` changes propagated (none:
    no propagation figure), then ``args.idle`` seconds of idle load (0: none)."""
    from policyd.store import Store

    listen = mode == "notify"
    interval = 30.0 if listen else args.interval
    daemons = []
    store = Store(url)
    try:
        for i in range(args.daemons):
            daemons.append(Daemon(base / mode, i, url, interval, listen))
        for daemon in daemons:
            daemon.wait_ready(listen)
        times = _propagation(store, daemons, args.changes,
                             spread if spread is not None else max(0.2, args.interval))
        store.close()  # its backend's statistics land now, not in the idle window
        load = _idle_load(admin, database, len(daemons), args.idle, settle) \
            if args.idle > 0 else None
    finally:
        store.close()
        for daemon in daemons:
            daemon.stop()
    return {
        "mode": mode, "refresh_interval": interval, "daemons": len(daemons),
        "changes": args.changes,
        "median_ms": [round(statistics.median(t) * 1000, 1) for t in times if t],
        "max_ms": [round(max(t) * 1000, 1) for t in times if t],
        "all_ms": [[round(x * 1000, 1) for x in t] for t in times],
        "idle_load": load,
    }


@contextmanager
def scratch_database(admin: dict):
    """A new PostgreSQL database with the store's schema and one list (``LIST``, rejects
    nonmembers; ``MEMBER`` its member), dropped (forcibly) at the end: (url, name)."""
    import psycopg2

    from policyd.core.verdict import Action
    from policyd.store import Store
    from policyd.store import queries as q
    from policyd.store.models import MemberRole

    database = f"policyd_bench_{uuid.uuid4().hex[:10]}"
    connection = psycopg2.connect(dbname="postgres", **admin)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{database}"')
        url = (f"postgresql+psycopg2://{admin['user']}@{admin['host']}:{admin['port']}/"
               f"{database}")
        try:
            store = Store(url)
            store.upgrade()
            with store.write() as session:
                mlist, _ = q.add_list(session, LIST, default_nonmember_action=Action.REJECT)
                q.add_members(session, mlist, q.entries_from([MEMBER], None),
                              MemberRole.MEMBER, None)
            store.close()
            yield url, database
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        connection.close()


def bench_figures(*, daemons: int = 3, changes: int = 10, idle: float = 20.0,
                  interval: float = 2.0, settle: float = 4.0, pg_host: str = "127.0.0.1",
                  pg_port: int = 5432, pg_user: str = "postgres") -> dict:
    """What ``python -m bench`` reports (issue 12): ``changes`` changes propagated by
    NOTIFY to ``daemons`` daemons (``refresh_interval`` 30 s: only NOTIFY is in time;
    random pauses of 0.1-0.5 s between changes), then as many daemons polling
    (``listen_notify = off``, ``refresh_interval`` ``interval``) idle for ``idle``
    seconds: the database's load per daemon.  Raises on a PostgreSQL that cannot be
    reached (psycopg2.OperationalError) and on a change not answered in 30 s."""
    admin = {"host": pg_host, "port": pg_port, "user": pg_user}
    notify = argparse.Namespace(daemons=daemons, changes=changes, interval=interval, idle=0)
    poll = argparse.Namespace(daemons=daemons, changes=0, interval=interval, idle=idle)
    base = Path(tempfile.mkdtemp(prefix="pdb-", dir="/tmp"))
    try:
        with scratch_database(admin) as (url, database):
            out = {}
            for mode, args in (("notify", notify), ("poll", poll)):
                (base / mode).mkdir()
                out[mode] = run_mode(mode, args, url, admin, database, base, settle=settle,
                                     spread=0.5)
            return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--mode", choices=("notify", "poll", "both"), default="both")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="refresh_interval of the poll mode (seconds)")
    parser.add_argument("--idle", type=float, default=20.0,
                        help="seconds the idle load is measured over")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    admin = {"host": args.pg_host, "port": args.pg_port, "user": args.pg_user}
    base = Path(tempfile.mkdtemp(prefix="pdb-", dir="/tmp"))
    results = []
    try:
        with scratch_database(admin) as (url, database):
            modes = ("notify", "poll") if args.mode == "both" else (args.mode,)
            for mode in modes:
                (base / mode).mkdir()
                results.append(run_mode(mode, args, url, admin, database, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['mode']}: {r['daemons']} daemons, refresh_interval {r['refresh_interval']:g} s,"
              f" {r['changes']} changes")
        for i, (median, worst) in enumerate(zip(r["median_ms"], r["max_ms"])):
            print(f"  daemon {i}: commit to first answer median {median:.1f} ms, "
                  f"max {worst:.1f} ms")
        load = r["idle_load"]
        if load is not None:
            print(f"  idle load: {load['per_daemon_per_s']:.2f}/s per daemon "
                  f"({load['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
