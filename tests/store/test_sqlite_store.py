"""The store contract on SQLite (a file per test), plus what only SQLite has: a file that
must not be created by a reader."""

from __future__ import annotations

import shutil
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


def _store_with(path, posting):
    store = Store(f"sqlite:///{path}")
    store.upgrade()
    with store.write() as session:
        from policyd.store import queries as q

        q.add_list(session, posting)
    store.close()


@pytest.mark.parametrize("how", ["mv over", "rm and init"])
def test_a_replaced_store_file_is_noticed_and_reloaded(tmp_path, how):
    """Issue 12 part 3: after ``mv new.sqlite store.sqlite``, or ``rm`` + ``policyctl
    init``, the backend's open connections still read the deleted file; the next change
    check sees the new (device, inode), closes them, and the token moves, so the refresh
    is a full build of the new file (a list only in it is served; ``load_changes`` from
    the old snapshot is a full build too, as its state names the old file)."""
    path = tmp_path / "store.sqlite"
    _store_with(path, "old@lists.example.org")
    backend = NativeBackend(f"sqlite:///{path}")
    try:
        before = backend.load_snapshot()
        assert before.version == backend.change_token()
        if how == "mv over":
            _store_with(tmp_path / "new.sqlite", "new@lists.example.org")
            (tmp_path / "new.sqlite").replace(path)
        else:
            path.unlink()
            for suffix in ("-wal", "-shm"):
                (tmp_path / f"store.sqlite{suffix}").unlink(missing_ok=True)
            _store_with(path, "new@lists.example.org")
        token = backend.change_token()
        assert token != before.version
        for after in (backend.load_changes(before), backend.load_snapshot()):
            assert set(after.lists) == {"new@lists.example.org"}
            assert after.version == token
    finally:
        backend.close()


def test_another_store_copied_over_the_file_is_noticed(tmp_path):
    """Issue 12: ``cp other.sqlite store.sqlite`` keeps the file's (device, inode), and the
    copy may even have the same generation and row counts; its store id differs, so the
    change token moves and the refresh is a full build of the copied store (no
    incremental step from the old store's revisions)."""
    path = tmp_path / "store.sqlite"
    _store_with(path, "old@lists.example.org")
    _store_with(tmp_path / "other.sqlite", "new@lists.example.org")
    backend = NativeBackend(f"sqlite:///{path}")
    try:
        before = backend.load_snapshot()
        inode = path.stat().st_ino
        shutil.copyfile(tmp_path / "other.sqlite", path)
        assert path.stat().st_ino == inode
        token = backend.change_token()
        assert token != before.version
        # Same shape, other store: only the store id tells them apart.
        assert token.split(".")[0] == before.version.split(".")[0]
        after = backend.load_changes(before)
        assert set(after.lists) == {"new@lists.example.org"}
        assert after.version == token
        assert after.source_state.origin != before.source_state.origin
    finally:
        backend.close()


def _diverged_copies(path, backup, posting):
    """Two copies of one store that diverged with the same number of changes: alice
    subscribed to both, then bob to ``path`` and carol to ``backup`` (the same store id,
    generation, list revisions, row counts and highest ids)."""
    from policyd.store import queries as q
    from policyd.store.models import MemberRole

    def subscribe(where, address):
        store = Store(f"sqlite:///{where}")
        with store.write() as session:
            q.add_members(session, q.find_list(session, posting),
                          q.entries_from([address], None), MemberRole.MEMBER)
        store.close()

    _store_with(path, posting)
    subscribe(path, "alice@example.com")
    shutil.copyfile(path, backup)
    subscribe(path, "bob@example.com")
    subscribe(backup, "carol@example.com")


def test_a_diverged_copy_with_the_same_counts_copied_over_the_file_is_noticed(tmp_path):
    """A backup of the same store that diverged from it (``cp store.sqlite backup.sqlite``,
    then bob subscribed to the store and carol to the backup) has the same store id,
    generation, list revisions and row counts; ``cp backup.sqlite store.sqlite`` keeps the
    inode too.  The change token still moves (the revisions' nonces differ), and the
    refresh serves the copy: bob is no longer a member, carol is (the old code kept
    answering from the old snapshot: same token)."""
    from policyd.core.chain import decide
    from policyd.core.verdict import Query, Verdict

    posting = "discuss@lists.example.org"
    path, backup = tmp_path / "store.sqlite", tmp_path / "backup.sqlite"
    _diverged_copies(path, backup, posting)

    def accepted(snapshot, sender):
        query = Query(posting, sender, from_header=sender)
        return decide(snapshot, query).verdict is Verdict.ACCEPT

    backend = NativeBackend(f"sqlite:///{path}")
    try:
        before = backend.load_snapshot()
        assert accepted(before, "bob@example.com")
        assert not accepted(before, "carol@example.com")
        inode = path.stat().st_ino
        shutil.copyfile(backup, path)
        assert path.stat().st_ino == inode
        token = backend.change_token()
        assert token != before.version
        # The same shape: only the content differs.
        assert token.split(".")[0] == before.version.split(".")[0]
        for after in (backend.load_changes(before), backend.load_snapshot()):
            assert after.version == token
            assert not accepted(after, "bob@example.com")
            assert accepted(after, "carol@example.com")
    finally:
        backend.close()


def test_a_diverged_copy_copied_over_the_file_under_a_running_snapshot_service(tmp_path):
    """The same copy under a running ``SnapshotService`` (real SQLite, the store thread
    run inline, a ``Clock``): at its next refresh it serves the copied store, and bob's
    post is no longer accepted (the old code kept accepting it: same token)."""
    from twisted.internet.task import Clock

    from policyd.core.chain import decide
    from policyd.core.verdict import Query, Verdict
    from policyd.snapshot_service import SnapshotService
    from tests.protocols.fakes import run_now

    posting = "discuss@lists.example.org"
    path, backup = tmp_path / "store.sqlite", tmp_path / "backup.sqlite"
    _diverged_copies(path, backup, posting)
    bob = Query(posting, "bob@example.com", from_header="bob@example.com")

    clock = Clock()
    backend = NativeBackend(f"sqlite:///{path}")
    service = SnapshotService(backend, interval=2.0, clock=clock, run_in_thread=run_now,
                              monotonic=clock.seconds)
    service.startService()
    try:
        assert decide(service.current, bob).verdict is Verdict.ACCEPT
        shutil.copyfile(backup, path)
        clock.advance(2.0)
        assert decide(service.current, bob).verdict is not Verdict.ACCEPT
        assert "carol@example.com" in service.current.lists[posting].members
    finally:
        service.stopService()
        backend.close()


def test_a_store_state_row_recreated_by_hand_gets_a_new_store_id(tmp_path):
    """A writer that re-creates a deleted ``store_state`` row gives it a fresh id (the
    daemon then rebuilds in full), and every store gets its own id at creation."""
    from sqlalchemy import delete, select

    from policyd.store.models import StoreState

    ids = []
    for name in ("a.sqlite", "b.sqlite"):
        _store_with(tmp_path / name, "x@lists.example.org")
        store = Store(f"sqlite:///{tmp_path / name}")
        with store.read() as session:
            ids.append(session.execute(select(StoreState.store_id)).scalar_one())
        store.close()
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]
    store = Store(f"sqlite:///{tmp_path / 'a.sqlite'}")
    try:
        with store.engine.begin() as connection:
            connection.execute(delete(StoreState.__table__))
        with store.write():
            pass
        with store.read() as session:
            again = session.execute(select(StoreState.store_id)).scalar_one()
        assert again and again != ids[0]
    finally:
        store.close()


def test_a_removed_store_file_fails_and_a_new_one_is_read(tmp_path):
    """A store file removed under the daemon is a store failure (the last good snapshot
    keeps serving), not a snapshot of the deleted file; once ``policyctl init`` makes a
    new one, it is read."""
    path = tmp_path / "store.sqlite"
    _store_with(path, "old@lists.example.org")
    backend = NativeBackend(f"sqlite:///{path}")
    try:
        backend.load_snapshot()
        for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        with pytest.raises(StoreUnavailable, match="policyctl init"):
            backend.change_token()
        _store_with(path, "new@lists.example.org")
        assert set(backend.load_snapshot().lists) == {"new@lists.example.org"}
    finally:
        backend.close()
