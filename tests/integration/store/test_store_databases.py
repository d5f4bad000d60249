"""The native store contract on real PostgreSQL and MariaDB servers.

Each test gets a uniquely named database, created before and dropped after it.  Outside
CI a server that is not running skips its tests; in CI (``CI=true``) that is a failure.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.requirements import require
from tests.store.contract import LIST, StoreContract

PG = ("127.0.0.1", 5432)
MARIADB = ("127.0.0.1", 3306)


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


def _name() -> str:
    return f"policyd_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def postgres_databases():
    require(reachable(PG), f"PostgreSQL on {PG[0]}:{PG[1]} (see ../shared/services.md)")
    import psycopg2

    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    created = []

    def make() -> str:
        name = _name()
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg2://postgres:secret@{PG[0]}:{PG[1]}/{name}"

    yield make
    with admin.cursor() as cursor:
        for name in created:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def mariadb_databases():
    require(reachable(MARIADB), f"MariaDB on {MARIADB[0]}:{MARIADB[1]} "
                                "(see ../shared/services.md)")
    import pymysql

    admin = pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root", password="",
                            autocommit=True)
    created = []

    def make() -> str:
        name = _name()
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        created.append(name)
        return f"mysql+pymysql://root@{MARIADB[0]}:{MARIADB[1]}/{name}"

    yield make
    with admin.cursor() as cursor:
        for name in created:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresStore(StoreContract):
    @pytest.fixture
    def fresh_database(self, postgres_databases):
        return postgres_databases


@pytest.mark.integration
@pytest.mark.mariadb
class TestMariadbStore(StoreContract):
    @pytest.fixture
    def fresh_database(self, mariadb_databases):
        return mariadb_databases

    def test_a_read_only_user_who_sees_no_trigger_is_not_told_they_are_missing(
            self, store, two_lists):
        """MariaDB shows a table's triggers only to a user with more than SELECT on it:
        for a read-only store user none is visible.  That is not "missing" (which would
        make every refresh a full verification build and the store unhealthy for
        good): unknown, left to the periodic verification build."""
        import pymysql
        from sqlalchemy import create_engine

        from policyd.store import engine as engine_module

        database = store.engine.url.database
        user = f"pd_ro_{database[-12:]}"
        admin = pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root",
                                password="", autocommit=True)
        try:
            with admin.cursor() as cursor:
                cursor.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'ro'")
                cursor.execute(f"GRANT SELECT ON `{database}`.* TO '{user}'@'%'")
            reader = create_engine(f"mysql+pymysql://{user}:ro@{MARIADB[0]}:{MARIADB[1]}/"
                                   f"{database}")
            try:
                with reader.connect() as connection:
                    assert not engine_module._triggers_present(connection)
                    assert engine_module.trigger_problem(connection) is None
            finally:
                reader.dispose()
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")
            admin.close()

    def test_a_server_hiding_the_table_ids_is_still_read(self, store, backend, two_lists,
                                                         monkeypatch):
        """A database user without the PROCESS privilege cannot read the InnoDB table ids
        that show a TRUNCATE (here: the table is unknown, as it is to MySQL 8): the
        store is still read, incrementally too, and a full build says what is not
        noticed."""
        from sqlalchemy import column, table

        from policyd.store import native, queries as q

        monkeypatch.setattr(native, "INNODB_TABLES", table(
            "NO_SUCH_TABLE", column("NAME"), column("TABLE_ID"),
            schema="information_schema"))
        before = backend.load_snapshot()
        assert native.TRUNCATE_UNSEEN in before.problems
        self.add(store, ["x@example.com"], target=self.OTHER)
        after = backend.load_changes(before)
        assert after.built_how == "incremental: 1 list read again"
        assert "x@example.com" in after.lists[self.OTHER].members
        assert native.TRUNCATE_UNSEEN in after.problems
        with store.write() as session:
            q.add_domain(session, "lists.example.net")
        assert native.TRUNCATE_UNSEEN in backend.load_changes(after).problems


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresTriggerBypass:
    """Writes PostgreSQL lets bypass the native store's triggers."""

    @pytest.fixture
    def store(self, postgres_databases):
        from policyd.store import Store
        from policyd.store import queries as q
        from policyd.store.models import MemberRole

        store = Store(postgres_databases())
        store.upgrade()
        with store.write() as session:
            q.add_list(session, LIST)
            q.add_members(session, q.find_list(session, LIST),
                          q.entries_from(["alice@example.com", "bob@example.com"], None),
                          MemberRole.MEMBER)
        yield store
        store.close()

    @pytest.fixture
    def backend(self, store):
        from policyd.store import NativeBackend

        backend = NativeBackend(store.url)
        yield backend
        backend.close()

    def test_a_replica_session_write_is_caught_by_the_next_verification_build(
            self, store, backend):
        """A session with ``session_replication_role = replica`` (a logical replication
        subscriber's apply worker, ``pg_restore --disable-triggers``) fires no trigger:
        a member renamed there moves neither a revision nor the token, and the triggers
        all exist, so only the verification build can see it.  The next one (``[store]
        verify_interval``) serves what the store holds and logs the divergence; the
        store stays healthy (nothing is wrong with the triggers) and the refreshes after
        it read the token alone again."""
        from tests.protocols.fakes import captured_events

        service, clock = StoreContract.serve(backend)
        try:
            with store.engine.begin() as connection:
                connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
                StoreContract.rename_member(connection, "alice@example.com",
                                            "mallory@example.com")
            assert backend.change_token() == service.current.version
            backend.verifications.last_full -= 600
            with captured_events() as events:
                clock.advance(2)
            served = service.current.lists[LIST].members
            assert "mallory@example.com" in served and "alice@example.com" not in served
            assert (StoreContract.content(service.current)
                    == StoreContract.content(backend.load_snapshot()))
            [divergence] = StoreContract.logged(events, "the incremental snapshot differed")
            assert divergence["differences"] == LIST
            assert service.status()["store"]["healthy"] is True
            assert not backend.verification_due()
        finally:
            service.stopService()

    def test_a_disabled_trigger_is_reported(self, store, backend):
        """``ALTER TABLE ... DISABLE TRIGGER`` (and ``ENABLE REPLICA TRIGGER``, which
        fires only in replica sessions) leaves the trigger in place but silent:
        ``describe()`` and the daemon's status name it as disabled, and the write it
        missed is served after the next refresh."""
        backend.check()
        service, clock = StoreContract.serve(backend)
        try:
            with store.engine.begin() as connection:
                connection.exec_driver_sql(
                    "ALTER TABLE addresses DISABLE TRIGGER policyd_rev_addresses_au")
                connection.exec_driver_sql(
                    "ALTER TABLE memberships ENABLE REPLICA TRIGGER policyd_rev_memberships_ai")
            backend.check()
            assert ("disabled: policyd_rev_addresses_au on addresses, "
                    "policyd_rev_memberships_ai on memberships") in backend.describe()
            with store.engine.begin() as connection:
                StoreContract.rename_member(connection, "bob@example.com",
                                            "mallory@example.com")
            clock.advance(2)
            assert "mallory@example.com" in service.current.lists[LIST].members
            status = service.status()["store"]
            assert status["healthy"] is False
            assert "policyd_rev_addresses_au on addresses" in status["unhealthy_reason"]
        finally:
            service.stopService()
