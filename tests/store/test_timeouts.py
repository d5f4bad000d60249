"""Bounded waits: the connect, statement and lock timeouts every engine gets from
``[store]`` (``policyd.store.engine``), without a database server; the SQLite busy
timeout on a real locked file."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import event

from policyd.config import StoreTimeouts
from policyd.errors import StoreUnavailable
from policyd.store import Store
from policyd.store.engine import connect_args_for, first_line, make_engine, parse_url
from policyd.store.mailman3 import read_only_engine

T = StoreTimeouts(connect=3, statement=20, lock=1.5)


def test_postgresql_gets_connect_statement_and_lock_timeouts():
    args = connect_args_for(parse_url("postgresql://u@db/policyd"), T)
    assert args["connect_timeout"] == 3
    assert args["options"] == "-c statement_timeout=20000 -c lock_timeout=1500"
    assert args["keepalives"] == 1


def test_postgresql_url_settings_are_kept_and_win():
    """What the URL sets itself stays: its connect_timeout, and its options after ours
    (PostgreSQL takes the last -c of a name)."""
    args = connect_args_for(parse_url(
        "postgresql://u@db/p?connect_timeout=7&options=-c%20lock_timeout%3D99"), T,
        pg_options="-c default_transaction_read_only=on")
    assert "connect_timeout" not in args  # the URL's 7 is used
    assert args["options"] == ("-c default_transaction_read_only=on -c statement_timeout="
                               "20000 -c lock_timeout=1500 -c lock_timeout=99")


def test_mariadb_gets_connect_and_client_read_timeouts():
    args = connect_args_for(parse_url("mysql://root@db/policyd"), T)
    assert args == {"connect_timeout": 3, "read_timeout": 23, "write_timeout": 23}


def test_sqlite_busy_timeout_is_the_lock_timeout():
    assert connect_args_for(parse_url("sqlite:////tmp/x.sqlite"), T) == {"timeout": 1.5}


class _Stop(Exception):
    pass


def connect_parameters(engine) -> dict:
    """What ``engine`` would pass to the driver's ``connect()`` (nothing is opened)."""
    seen: dict = {}

    @event.listens_for(engine, "do_connect")
    def capture(dialect, record, cargs, cparams):
        seen.update(cparams)
        raise _Stop()

    with pytest.raises(_Stop):
        engine.connect()
    engine.dispose()
    return seen


@pytest.mark.parametrize("make", [lambda url: make_engine(url, timeouts=T),
                                  lambda url: read_only_engine(url, T)],
                         ids=["native", "mailman3"])
def test_every_engine_gets_them(make):
    """The native store's engine (daemon and policyctl) and the Mailman 3 reader's."""
    pg = connect_parameters(make("postgresql://u@db/p"))
    assert pg["connect_timeout"] == 3
    assert "-c statement_timeout=20000 -c lock_timeout=1500" in pg["options"]
    my = connect_parameters(make("mysql://root@db/p"))
    assert (my["connect_timeout"], my["read_timeout"]) == (3, 23)


@pytest.mark.parametrize("message, key", [
    ("canceling statement due to lock timeout", "lock_timeout"),
    ("canceling statement due to statement timeout", "statement_timeout"),
    ("(1205, 'Lock wait timeout exceeded; try restarting transaction')", "lock_timeout"),
    ("(1969, 'Query execution was interrupted (max_statement_time exceeded)')",
     "statement_timeout"),
    ("database is locked", "lock_timeout"),
    ("connection to server at \"10.0.0.1\", port 5432 failed: timeout expired",
     "connect_timeout"),
])
def test_a_timeout_error_names_the_key_to_tune(message, key):
    assert first_line(RuntimeError(message)).endswith(
        f"(the store did not answer within [store] {key})")


def test_plain_errors_are_left_alone():
    assert first_line(RuntimeError("no such table: lists\nmore")) == "no such table: lists"


def test_a_write_to_a_locked_sqlite_store_fails_within_lock_timeout(tmp_path):
    """policyctl's writer against a store another process holds locked: StoreUnavailable
    (exit 5) naming the key, after about lock_timeout, not a hang."""
    path = tmp_path / "policyd.sqlite"
    url = f"sqlite:///{path}"
    Store(url).upgrade()
    store = Store(url, StoreTimeouts(connect=1, statement=5, lock=0.3))
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            with store.write():
                pass
        elapsed = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert caught.value.exit_code == 5
    assert "[store] lock_timeout" in str(caught.value)
    assert 0.25 <= elapsed < 3
    with store.write():  # and it works again once the lock is gone
        pass
    store.close()
