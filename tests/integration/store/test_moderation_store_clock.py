"""``store.moderation.store_clock`` on SQLite, PostgreSQL and MariaDB: the database's
own clock as Unix seconds (a float, whatever the driver answers), the time now and not
a transaction's start; and ``prune_rows`` without a ``now`` expires by it.  The daemons
sharing a store compare their wall clocks with it (``ModerationService``)."""

from __future__ import annotations

import time

import pytest

from policyd.core.moderation import Changes, Entry, Key, Settings
from policyd.store import Store
from policyd.store import moderation as store_moderation
from policyd.store.engine import make_engine

from .test_store_databases import mariadb_databases, postgres_databases  # noqa: F401

LIST = "discuss@lists.example.org"


def check_store_clock(url: str) -> None:
    Store(url).upgrade()
    engine = make_engine(url)
    try:
        before = time.time()
        now = store_moderation.store_clock(engine)
        after = time.time()
        # The same host's clock: within a second (and the query's time).
        assert type(now) is float
        assert before - 1.0 <= now <= after + 1.0
        with engine.begin() as connection:
            first = store_moderation.store_clock(connection)
            time.sleep(0.05)
            second = store_moderation.store_clock(connection)
        assert second - first >= 0.04  # the time now, not the transaction's start

        # A row expired by the store's clock goes, a fresh one stays.
        changes = Changes()
        for sender, seen in (("old@example.org", now - 2 * 86400),
                             ("new@example.org", now)):
            key = Key(LIST, sender, "192.0.2.0/24")
            changes.entries[key] = Entry(key, seen, seen)
        store_moderation.write_changes(engine, changes)
        assert store_moderation.prune_rows(engine, Settings()) == 1
        with engine.connect() as connection:
            assert [row.sender for row in connection.execute(
                store_moderation.G.select())] == ["new@example.org"]
    finally:
        engine.dispose()


@pytest.mark.integration
def test_store_clock_on_sqlite(tmp_path):
    check_store_clock(f"sqlite:///{tmp_path / 'store.sqlite'}")


@pytest.mark.integration
@pytest.mark.postgres
def test_store_clock_on_postgresql(postgres_databases):  # noqa: F811
    check_store_clock(postgres_databases())


@pytest.mark.integration
@pytest.mark.mariadb
def test_store_clock_on_mariadb(mariadb_databases):  # noqa: F811
    check_store_clock(mariadb_databases())
