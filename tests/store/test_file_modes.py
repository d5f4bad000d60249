"""Safe defaults (issue 13): the SQLite store and the log file policyd creates are mode
0640 whatever the umask, SQLite's -wal/-shm files follow the store's mode, an existing
file keeps its mode, and a store root creates belongs to its directory's owner."""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from policyd import ctl, demo
from policyd import logging as policyd_logging
from policyd.store import NativeBackend, Store
from policyd.store import engine as engine_module


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def init(path) -> None:
    err = io.StringIO()
    code = ctl.main(["--store", f"sqlite:///{path}", "init"], out=io.StringIO(), err=err,
                    environ={"POLICYD_CONFIG": "/nonexistent"})
    assert code == 0, err.getvalue()


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_policyctl_init_creates_the_store_0640(tmp_path, mask):
    """``policyctl init`` under a permissive, the usual and a strict umask: the new store
    is 0640 (not 0644 with umask 022, nor 0600 with 077)."""
    path = tmp_path / "policyd.sqlite"
    with umask(mask):
        init(path)
    assert mode(path) == 0o640


def test_wal_and_shm_follow_the_store_mode(tmp_path):
    """While a connection is open the WAL and its index exist beside the store; SQLite
    gives them the database file's mode (here 0640 under umask 022)."""
    path = tmp_path / "policyd.sqlite"
    with umask(0o022):
        init(path)
        store = Store(f"sqlite:///{path}")
        try:
            with store.engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM lists").all()
                wal = [tmp_path / "policyd.sqlite-wal", tmp_path / "policyd.sqlite-shm"]
                assert all(p.exists() for p in wal)
                assert [mode(p) for p in wal] == [0o640, 0o640]
        finally:
            store.close()


@pytest.mark.parametrize("existing", [0o600, 0o644])
def test_an_existing_store_keeps_its_mode(tmp_path, existing):
    """``policyctl init`` on a store that exists (migrating or not) leaves its mode."""
    path = tmp_path / "policyd.sqlite"
    init(path)
    os.chmod(path, existing)
    with umask(0o000):
        init(path)
    assert mode(path) == existing


def test_an_engine_creates_a_missing_store_0640(tmp_path):
    """Any engine ``make_engine`` makes (``Store``, policyctl's other commands) that
    opens a store file not there yet creates it 0640; the daemon's backend does not
    create one at all (it reports that there is no store)."""
    path = tmp_path / "policyd.sqlite"
    backend = NativeBackend(f"sqlite:///{path}")
    try:
        with pytest.raises(Exception, match="run `policyctl init`"):
            backend.load_snapshot()
    finally:
        backend.close()
    assert not path.exists()
    engine = engine_module.make_engine(f"sqlite:///{path}")
    try:
        with umask(0o022):
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1").all()
    finally:
        engine.dispose()
    assert mode(path) == 0o640


def test_the_demo_store_is_0640(tmp_path):
    """``python -m policyd.demo`` (``make run``) creates its store 0640."""
    state = tmp_path / "state"
    with umask(0o022):
        assert demo.run(str(state), io.StringIO()) == 0
    assert mode(state / "policyd.sqlite") == 0o640


def test_a_store_root_creates_belongs_to_its_directory(tmp_path, monkeypatch):
    """Run as root, the new store gets the owner and group of its directory (the
    daemon's ``/var/lib/policyd``, ``policyd:policyd``); not as root, nothing is
    changed hands."""
    calls = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: calls.append((uid, gid)))
    directory = os.stat(tmp_path)
    assert engine_module.create_store_file(tmp_path / "a.sqlite")
    assert calls == [(directory.st_uid, directory.st_gid)]
    assert not engine_module.create_store_file(tmp_path / "a.sqlite")  # exists: untouched
    assert len(calls) == 1
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert engine_module.create_store_file(tmp_path / "b.sqlite")
    assert len(calls) == 1


def test_create_store_file_leaves_errors_to_sqlite(tmp_path):
    """No directory: nothing created, no exception (SQLite then reports it)."""
    assert not engine_module.create_store_file(tmp_path / "missing" / "x.sqlite")


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_log_file_is_created_0640(tmp_path, mask):
    """``[daemon] log_file``: a new file is 0640 whatever the umask."""
    path = tmp_path / "policyd.log"
    with umask(mask):
        stream = policyd_logging._open(str(path))
    stream.close()
    assert mode(path) == 0o640


def test_an_existing_log_file_keeps_its_mode(tmp_path):
    """Reopening (SIGHUP after rotation) an existing log file leaves its mode and its
    content."""
    path = tmp_path / "policyd.log"
    path.write_text("old line\n")
    os.chmod(path, 0o600)
    stream = policyd_logging._open(str(path))
    stream.write("new line\n")
    stream.close()
    assert mode(path) == 0o600
    assert path.read_text() == "old line\nnew line\n"


def test_log_setup_creates_the_file_0640(tmp_path, monkeypatch):
    """Through ``setup`` (what the daemon calls), under a strict umask."""
    observers = []
    monkeypatch.setattr(policyd_logging, "globalLogPublisher",
                        SimpleNamespace(addObserver=observers.append))
    path = tmp_path / "logs" / "policyd.log"
    config = SimpleNamespace(log_file=path, log_level="info")
    with umask(0o077):
        logs = policyd_logging.setup(config, environ={}, primary=False)
    logs.writer.stream.close()
    assert len(observers) == 1
    assert mode(path) == 0o640
