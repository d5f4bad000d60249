"""The store contract on SQLite (a file per test), plus what only SQLite has: a file that
must not be created by a reader."""

from __future__ import annotations

import uuid

import pytest

from policyd.errors import StoreUnavailable
from policyd.store import NativeBackend, Store

from .contract import StoreContract


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def fresh_database(self, tmp_path):
        def make() -> str:
            return f"sqlite:///{tmp_path / uuid.uuid4().hex}.sqlite"
        return make


def test_reading_a_missing_sqlite_store_does_not_create_it(tmp_path):
    """The backend and Store.read() refuse a missing file instead of creating an empty
    database that would then look like an empty store."""
    path = tmp_path / "missing" / "policyd.sqlite"
    backend = NativeBackend(f"sqlite:///{path}")
    for call in (backend.check, backend.change_token, backend.load_snapshot):
        with pytest.raises(StoreUnavailable, match="policyctl init"):
            call()
    store = Store(f"sqlite:///{path}")
    with pytest.raises(StoreUnavailable):
        with store.read():
            pass
    assert not path.exists()
    assert backend.describe().endswith("(schema rev unknown)")


def test_upgrade_creates_the_directory_and_uses_wal(tmp_path):
    """upgrade() creates the parent directory and switches the file to WAL, so the daemon
    can read while policyctl writes."""
    path = tmp_path / "deep" / "dir" / "policyd.sqlite"
    store = Store(f"sqlite:///{path}")
    try:
        store.upgrade()
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()
    assert path.exists()
