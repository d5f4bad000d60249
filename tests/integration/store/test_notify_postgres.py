"""The native store on a real PostgreSQL: the triggers' NOTIFY (once per transaction,
whoever writes), the backend's LISTEN connection, the store id of a recreated database,
and libpq multi-host URLs accepted by the engine factory.

Outside CI a PostgreSQL that is not running skips these tests; in CI it fails them.
"""

from __future__ import annotations

import select

import pytest
from sqlalchemy import text

from policyd.store import NativeBackend, Store
from policyd.store import queries as q
from policyd.store.models import NOTIFY_CHANNEL

from .test_store_databases import PG, postgres_databases  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LIST = "discuss@lists.example.org"


def _store(url: str, posting: str = LIST) -> Store:
    store = Store(url)
    store.upgrade()
    with store.write() as session:
        q.add_list(session, posting)
    return store


def _notifications(connection, wait: float = 1.0) -> list:
    """Every notification that arrives within ``wait`` seconds of quiet."""
    got = []
    while select.select([connection], [], [], wait) != ([], [], []):
        connection.poll()
        got.extend(connection.notifies)
        connection.notifies.clear()
        wait = 0.3
    return got


@pytest.fixture
def listening(postgres_databases):  # noqa: F811
    url = postgres_databases()
    store = _store(url)
    backend = NativeBackend(url)
    connection, close = backend.listen()
    yield store, backend, connection
    close()
    backend.close()
    store.close()


def test_a_transaction_of_many_rows_notifies_once(listening):
    """Adding 500 members in one policyctl transaction (500 row triggers, 500 revision
    upserts, one generation bump) wakes a listener once; each further transaction once."""
    store, backend, connection = listening
    assert backend.notify_channel() == NOTIFY_CHANNEL
    with store.write() as session:
        mlist = q.find_list(session, LIST)
        q.add_members(session, mlist, q.entries_from(
            [f"u{i}@example.com" for i in range(500)], None), q.MemberRole.MEMBER, None)
    got = _notifications(connection)
    assert [n.channel for n in got] == [NOTIFY_CHANNEL]
    for i in range(3):
        with store.write() as session:
            q.add_list(session, f"more{i}@lists.example.org")
    assert len(_notifications(connection)) == 3


@pytest.mark.parametrize("statement", [
    "UPDATE memberships SET moderation_action = 1",
    "DELETE FROM lists",
    "TRUNCATE memberships",
    "UPDATE domains SET name = name",
])
def test_foreign_writers_notify_too(listening, statement):
    """An admin's SQL (no generation bump, no policyctl) notifies through the triggers,
    TRUNCATE included (it fires no row trigger)."""
    store, backend, connection = listening
    with store.write() as session:
        mlist = q.find_list(session, LIST)
        q.add_members(session, mlist, q.entries_from(["a@example.com"], None),
                      q.MemberRole.MEMBER, None)
    _notifications(connection, 0.5)
    with store.engine.begin() as sql:
        sql.execute(text(statement))
    assert len(_notifications(connection)) == 1


def test_the_listen_connection_is_named_and_separate(listening):
    """The LISTEN connection is its own (``application_name`` policyd-listen), apart from
    the pooled ones the snapshot is read with (policyd) and policyctl's (policyctl)."""
    store, backend, connection = listening
    backend.change_token()
    with store.engine.connect() as sql:
        names = set(sql.execute(text(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = current_database()")).scalars())
    assert {"policyd-listen", "policyd", "policyctl"} <= names


def test_a_recreated_database_is_a_full_build(postgres_databases):  # noqa: F811
    """A database dropped and created again under the same URL, with other lists but the
    same shape (generation, row counts): its new store id changes the token and the
    origin, so the refresh is a full build of the new store."""
    import psycopg2

    url = postgres_databases()
    name = url.rsplit("/", 1)[1]
    _store(url, "old@lists.example.org").close()
    backend = NativeBackend(url)
    try:
        before = backend.load_snapshot()
        backend.engine.dispose()
        admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
        admin.close()
        _store(url, "new@lists.example.org").close()
        token = backend.change_token()
        assert token != before.version
        assert token.split(".")[0] == before.version.split(".")[0]
        after = backend.load_changes(before)
        assert set(after.lists) == {"new@lists.example.org"}
        assert after.source_state.origin != before.source_state.origin
    finally:
        backend.close()


@pytest.mark.parametrize("spelling", [
    "postgresql://postgres@127.0.0.1,127.0.0.1/{db}?target_session_attrs=read-write",
    "postgresql://postgres@/{db}?host=127.0.0.1:5432&host=127.0.0.1:5432"
    "&target_session_attrs=read-write",
])
def test_multi_host_urls_are_accepted(postgres_databases, spelling):  # noqa: F811
    """libpq multi-host URLs (the README's two spellings: hosts in the authority without
    ports, or ``host=`` query parameters with ports) go through the engine factory and
    connect; ``target_session_attrs=read-write`` picks the primary."""
    db = postgres_databases().rsplit("/", 1)[1]
    url = spelling.format(db=db)
    _store(url).close()
    backend = NativeBackend(url)
    try:
        backend.check()
        assert set(backend.load_snapshot().lists) == {LIST}
        connection, close = backend.listen()
        close()
    finally:
        backend.close()
