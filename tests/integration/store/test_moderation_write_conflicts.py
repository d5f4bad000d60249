"""Two daemons writing SMTP-time moderation state to one PostgreSQL or MariaDB store at
the same moment (the first attempt of a post reaches both MX hosts): neither write
fails.  Before, the second writer of a key got a unique violation (PostgreSQL) and any
two overlapping batches deadlocked on InnoDB's gap locks (MariaDB); the daemon then
called its state unusable and let mail through without moderation for a while."""

from __future__ import annotations

import threading
import time

import pytest

from policyd.core.moderation import Changes, Entry, Key
from policyd.store import Store
from policyd.store import moderation as store_moderation
from policyd.store.engine import make_engine

from .test_store_databases import mariadb_databases, postgres_databases  # noqa: F401

LIST = "discuss@lists.example.org"
NETWORK = "198.51.100.0/24"


def batch(senders, now: float) -> Changes:
    changes = Changes()
    for sender in senders:
        key = Key(LIST, sender, NETWORK, "")
        changes.entries[key] = Entry(key, now, now, 1)
    return changes


def race(url: str, rounds: int, same_keys: bool) -> list[str]:
    """``rounds`` times, two engines write a batch each at once; the failures."""
    Store(url).upgrade()
    engines = [make_engine(url), make_engine(url)]
    now = time.time()
    store_moderation.write_changes(engines[0], batch(
        [f"seed{i}@flood.example" for i in range(1000)], now))
    failures: list[str] = []
    try:
        for r in range(rounds):
            batches = [batch([f"{'same' if same_keys else f'd{d}'}-{r}-{i}@flood.example"
                              for i in range(150)], now) for d in range(2)]
            start = threading.Barrier(2)

            def write(d: int) -> None:
                start.wait()
                try:
                    store_moderation.write_changes(engines[d], batches[d])
                except Exception as error:  # what the daemon would call "unusable"
                    failures.append(f"{type(error).__name__}: {str(error)[:120]}")
            threads = [threading.Thread(target=write, args=(d,)) for d in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        for engine in engines:
            engine.dispose()
    return failures


@pytest.mark.integration
@pytest.mark.postgres
@pytest.mark.parametrize("same_keys", [True, False], ids=["same-keys", "other-keys"])
def test_two_writers_on_postgresql(postgres_databases, same_keys):  # noqa: F811
    assert race(postgres_databases(), 10, same_keys) == []


@pytest.mark.integration
@pytest.mark.mariadb
@pytest.mark.parametrize("same_keys", [True, False], ids=["same-keys", "other-keys"])
def test_two_writers_on_mariadb(mariadb_databases, same_keys):  # noqa: F811
    assert race(mariadb_databases(), 10, same_keys) == []


def test_a_conflict_is_tried_again_and_anything_else_is_not():
    """The classification, and the bounded retry (no database needed)."""
    from sqlalchemy.exc import OperationalError

    class Orig(Exception):
        def __init__(self, *args, sqlstate=None):
            super().__init__(*args)
            self.sqlstate = sqlstate

    deadlock_pg = OperationalError("x", {}, Orig(sqlstate="40P01"))
    duplicate_pg = OperationalError("x", {}, Orig(sqlstate="23505"))
    deadlock_my = OperationalError("x", {}, Orig(1213, "Deadlock found"))
    lock_wait = OperationalError("x", {}, Orig(1205, "Lock wait timeout exceeded"))
    gone = OperationalError("x", {}, Orig(sqlstate="08006"))
    for error in (deadlock_pg, duplicate_pg, deadlock_my):
        assert store_moderation.is_write_conflict(error)
    for error in (lock_wait, gone):
        assert not store_moderation.is_write_conflict(error)

    calls = []

    def flaky(engine, changes):
        calls.append(1)
        if len(calls) < 3:
            raise deadlock_my
    original = store_moderation._write_changes
    store_moderation._write_changes = flaky
    try:
        store_moderation.write_changes(None, Changes(), sleep=lambda s: None)
        assert len(calls) == 3
        calls.clear()

        def always(engine, changes):
            calls.append(1)
            raise deadlock_pg
        store_moderation._write_changes = always
        with pytest.raises(OperationalError):
            store_moderation.write_changes(None, Changes(), sleep=lambda s: None)
        assert len(calls) == store_moderation.WRITE_ATTEMPTS
        calls.clear()

        def stuck(engine, changes):
            calls.append(1)
            raise lock_wait
        store_moderation._write_changes = stuck
        with pytest.raises(OperationalError):
            store_moderation.write_changes(None, Changes(), sleep=lambda s: None)
        assert len(calls) == 1
    finally:
        store_moderation._write_changes = original
