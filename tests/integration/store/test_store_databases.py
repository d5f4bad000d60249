"""The native store contract on real PostgreSQL and MariaDB servers.

Each test gets a uniquely named database, created before and dropped after it.  Outside
CI a server that is not running skips its tests; in CI (``CI=true``) that is a failure.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.requirements import require
from tests.store.contract import StoreContract

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
