"""A running daemon whose SQLite store is replaced by copying another store over the
file (``cp``: the same inode, possibly the same generation and row counts): the store
id in the copied file makes the next check a full build, so a list that exists only in
the copied store is served within the refresh interval, without a reload or restart."""

from __future__ import annotations

import shutil
import time

import pytest

from .conftest import LIST, MEMBER, REFRESH, exim_ask, exim_line, wait_until

pytestmark = pytest.mark.integration

OTHER = "other@lists.example.com"
ACCEPT = b"ACCEPT 250 2.1.5 accept"


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_another_store_copied_over_the_file_is_served(run, daemons):
    run.write_config()
    run.fill()
    other = run.path / "other.sqlite"
    url = f"sqlite:///{other}"
    run.policyctl("init", store=url)
    run.policyctl("list", "add", OTHER, "--default-nonmember-action", "reject", store=url)
    run.policyctl("member", "add", OTHER, MEMBER, store=url)
    daemon = daemons(run)
    daemon.wait_ready()
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) == ACCEPT
    assert exim_ask(run.exim_socket, exim_line(OTHER, MEMBER)) != ACCEPT
    store = run.path / "policyd.sqlite"
    inode = store.stat().st_ino
    copied = time.monotonic()
    shutil.copyfile(other, store)  # what `cp other.sqlite policyd.sqlite` does
    assert store.stat().st_ino == inode
    wait_until(lambda: exim_ask(run.exim_socket, exim_line(OTHER, MEMBER)) == ACCEPT,
               REFRESH + 5, "the copied store's list to be served")
    print(f"\ncp over the store: served after {time.monotonic() - copied:.2f} s "
          f"(refresh_interval {REFRESH} s)")
    assert exim_ask(run.exim_socket, exim_line(LIST, MEMBER)) != ACCEPT
    assert daemon.status()["snapshot"]["lists"] == 1
