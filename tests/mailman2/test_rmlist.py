"""A list removed from Mailman 2 (``bin/rmlist``: its ``lists/NAME`` directory gone) is
removed from the store by the next import of its ``lists`` directory, and by --watch;
nothing is removed when the import cannot tell that a directory is gone, nor a list it
did not import from there."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import update

from policyd.errors import BadInput
from policyd.store import queries as q
from policyd.store.mailman2 import import_path, watch
from policyd.store.models import MailingList
from policyd.core.verdict import Mode
from tests.mailman2 import test_import
from tests.mailman2.test_import import _policyctl, snapshot_of

# test_import's fixtures: a migrated SQLite store, a copy of the Mailman 2 fixture tree.
store = test_import.store
mailman_copy = test_import.mailman_copy

DISCUSS = "discuss@lists.example.org"
IMPORTED = {"announce@lists.example.org", DISCUSS, "fallback@lists.example.org",
            "legacy@old.example.net"}


def served(store) -> set[str]:
    return set(snapshot_of(store)[0].lists)


def rmlist(mailman: Path, name: str) -> None:
    shutil.rmtree(mailman / "lists" / name)


def test_an_rmlisted_list_is_removed_by_the_next_import(store, mailman_copy):
    """The report says which list went, with how many members, and why."""
    import_path(store, mailman_copy)
    assert served(store) == IMPORTED
    rmlist(mailman_copy, "discuss")
    result = import_path(store, mailman_copy)
    assert result.failures == []
    [report] = [r for r in result.reports if r.deleted]
    assert report.address == DISCUSS
    lists_dir = str((mailman_copy / "lists").resolve())
    assert report.line() == (f"{DISCUSS}: removed, with its {report.removed} members: "
                             f"{lists_dir}/discuss is gone (rmlist)")
    assert report.removed > 0
    assert served(store) == IMPORTED - {DISCUSS}
    again = import_path(store, mailman_copy)
    assert again.failures == [] and all(r.unchanged for r in again.reports)


def test_watch_removes_an_rmlisted_list(store, mailman_copy):
    """Removing a list directory changes --watch's fingerprint: the next round
    removes the list and reports it (and announce's ``@discuss`` entry goes, as
    Mailman 2 skips an entry naming no list)."""
    results = []

    def sleep(seconds):
        if len(results) == 1 and (mailman_copy / "lists" / "discuss").exists():
            rmlist(mailman_copy, "discuss")

    watch(store, mailman_copy, 5.0, results.append, sleep=sleep, rounds=3)
    assert len(results) == 2 and results[1].failures == []
    assert [r.address for r in results[1].reports if r.deleted] == [DISCUSS]
    assert served(store) == IMPORTED - {DISCUSS}


def test_policyctl_says_what_it_removed(store, mailman_copy):
    """--quiet still prints a removal: it is news."""
    assert _policyctl(["import-mailman2", str(mailman_copy)], store.url)[0] == 0
    rmlist(mailman_copy, "discuss")
    code, out, err = _policyctl(["import-mailman2", "--quiet", str(mailman_copy)],
                                store.url)
    assert code == 0, err
    assert out.startswith(f"{DISCUSS}: removed, with its ") and "(rmlist)" in out


def test_a_lists_dir_gone_or_empty_removes_nothing(store, mailman_copy):
    """An unmounted or emptied lists directory is an error for the whole import, not
    every list removed; --watch reports it and removes nothing either."""
    import_path(store, mailman_copy)
    lists = mailman_copy / "lists"
    hidden = mailman_copy.parent / "hidden"
    lists.rename(hidden)
    lists.mkdir()
    with pytest.raises(BadInput, match="no Mailman 2 list"):
        import_path(store, mailman_copy)
    with pytest.raises(BadInput, match="no Mailman 2 list"):
        import_path(store, lists)
    lists.rmdir()
    with pytest.raises(BadInput, match="no Mailman 2 list"):
        import_path(store, mailman_copy)
    results = []
    watch(store, mailman_copy, 5.0, results.append, sleep=lambda s: None, rounds=2)
    assert [r.failures for r in results if r.failures or r.reports] == [
        [f"{mailman_copy}: no Mailman 2 list (no */config.pck) found"]]
    assert served(store) == IMPORTED


def test_an_unreadable_lists_dir_removes_nothing(store, mailman_copy, monkeypatch):
    """A lists directory that cannot be listed is an error, not an empty directory
    (the tests run as root, for whom chmod does not deny: the listing is refused
    here instead)."""
    import_path(store, mailman_copy)
    lists = mailman_copy / "lists"
    iterdir = Path.iterdir

    def refused(self):
        if self == lists:
            raise PermissionError(errno.EACCES, "Permission denied")
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    with pytest.raises(BadInput, match="cannot list: Permission denied"):
        import_path(store, mailman_copy)
    results = []
    watch(store, mailman_copy, 5.0, results.append, sleep=lambda s: None, rounds=2)
    failures = [f for r in results for f in r.failures]
    assert len(failures) == 1 and "cannot list" in failures[0]
    assert not any(r.reports for r in results)
    assert served(store) == IMPORTED


def test_a_directory_that_cannot_be_checked_keeps_its_list(store, mailman_copy,
                                                           monkeypatch):
    """A list directory that stat cannot check (an I/O error, a stale NFS handle) is
    not taken for gone: the list stays, the failure says so."""
    import_path(store, mailman_copy)
    rmlist(mailman_copy, "discuss")
    target = str(mailman_copy.resolve() / "lists" / "discuss")
    lstat = os.lstat

    def failing(path, *args, **kwargs):
        if str(path) == target:
            raise OSError(errno.EIO, "Input/output error")
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", failing)
    result = import_path(store, mailman_copy)
    assert result.failures == [f"discuss: cannot check {target}: Input/output error; "
                               f"{DISCUSS} kept as it was"]
    assert not any(r.deleted for r in result.reports)
    assert served(store) == IMPORTED
    monkeypatch.setattr(os, "lstat", lstat)
    assert [r.address for r in import_path(store, mailman_copy).reports
            if r.deleted] == [DISCUSS]


def test_a_directory_without_config_pck_keeps_its_list(store, mailman_copy):
    """A list directory still there without its pickles (rmlist half way, a restore
    under way) keeps the list, reported."""
    import_path(store, mailman_copy)
    for name in ("config.pck", "config.pck.last"):
        (mailman_copy / "lists" / "discuss" / name).unlink(missing_ok=True)
    result = import_path(store, mailman_copy)
    directory = (mailman_copy / "lists").resolve() / "discuss"
    assert result.failures == [f"discuss: {directory} has no config.pck or "
                               f"config.pck.last; {DISCUSS} kept as it was"]
    assert served(store) == IMPORTED


def test_a_list_directory_that_cannot_be_searched_fails_closed(store, mailman_copy,
                                                               monkeypatch):
    """lists/NAME without search permission: the list is neither removed nor served
    from its old rows; it is a temporary failure until it can be read.  A directory
    that names no known list (lost+found) is passed over."""
    import_path(store, mailman_copy)
    (mailman_copy / "lists" / "lost+found").mkdir()
    closed = {mailman_copy / "lists" / "discuss" / "config.pck",
              mailman_copy / "lists" / "lost+found" / "config.pck"}
    exists = Path.exists

    def denied(self):
        if self in closed:
            raise PermissionError(errno.EACCES, "Permission denied")
        return exists(self)

    monkeypatch.setattr(Path, "exists", denied)
    result = import_path(store, mailman_copy)
    assert len(result.failures) == 1 and result.failures[0].startswith("discuss: ")
    assert "cannot look in it: Permission denied" in result.failures[0]
    snap, _ = snapshot_of(store)
    assert set(snap.lists) == IMPORTED and set(snap.broken) == {DISCUSS}


def test_lists_not_imported_from_there_are_untouched(store, mailman_copy):
    """Native lists (mailman3 mode), a mailman2-mode list made with policyctl list add
    (no recorded directory: noted, not removed) and a native list with the removed
    list's name at another host all stay."""
    import_path(store, mailman_copy)
    with store.write() as session:
        q.add_list(session, "discuss@native.example.org")
        q.add_list(session, "team@lists.example.org")
        q.add_list(session, "hand@lists.example.org", mode=Mode.MAILMAN2)
    rmlist(mailman_copy, "discuss")
    result = import_path(store, mailman_copy)
    assert [r.address for r in result.reports if r.deleted] == [DISCUSS]
    assert result.notes == [
        "hand@lists.example.org: a mailman2-mode list with no recorded Mailman 2 "
        "directory (imported before policyd recorded it, or made with policyctl list "
        f"add) and none in {(mailman_copy / 'lists').resolve()}: left as it is; if "
        "Mailman 2 no longer has it: policyctl list remove hand@lists.example.org"]
    assert served(store) == (IMPORTED - {DISCUSS}) | {
        "discuss@native.example.org", "team@lists.example.org", "hand@lists.example.org"}
    code, out, _ = _policyctl(["import-mailman2", "--quiet", str(mailman_copy)], store.url)
    assert (code, out) == (0, "")
    code, out, _ = _policyctl(["import-mailman2", str(mailman_copy)], store.url)
    assert code == 0 and "hand@lists.example.org: a mailman2-mode list" in out


def test_a_list_of_another_installation_is_untouched(store, mailman_copy, tmp_path):
    """Two Mailman 2 installations imported into one store: an import of one removes
    only what it imported itself."""
    other = tmp_path / "other"
    (other / "lists").mkdir(parents=True)
    shutil.copytree(mailman_copy / "lists" / "discuss", other / "lists" / "chat")
    shutil.copytree(mailman_copy / "lists" / "discuss", other / "lists" / "team")
    import_path(store, mailman_copy)
    import_path(store, other)
    both = IMPORTED | {"chat@lists.example.org", "team@lists.example.org"}
    assert served(store) == both
    shutil.rmtree(other / "lists" / "chat")
    result = import_path(store, mailman_copy)
    assert not any(r.deleted for r in result.reports) and result.notes == []
    assert served(store) == both
    result = import_path(store, other)
    assert [r.address for r in result.reports if r.deleted] == ["chat@lists.example.org"]
    assert served(store) == both - {"chat@lists.example.org"}


def test_one_list_imported_alone_removes_nothing(store, mailman_copy):
    """PATH naming one list's directory imports that list only: no reconciling."""
    import_path(store, mailman_copy)
    rmlist(mailman_copy, "discuss")
    result = import_path(store, mailman_copy / "lists" / "announce")
    assert [r.address for r in result.reports] == ["announce@lists.example.org"]
    assert served(store) == IMPORTED


def test_lists_imported_before_the_directory_was_recorded_are_claimed(store,
                                                                      mailman_copy):
    """A store imported by an older policyd (no ``mailman2_root``): the next import
    records the directory of each list it finds (reported), after which an rmlist
    removes it."""
    import_path(store, mailman_copy)
    with store.write() as session:
        session.execute(update(MailingList).values(mailman2_root=None))
    result = import_path(store, mailman_copy)
    lists_dir = str((mailman_copy / "lists").resolve())
    assert {r.root for r in result.reports} == {lists_dir}
    assert all(f"now recorded as from {lists_dir}" in r.line() for r in result.reports)
    rmlist(mailman_copy, "discuss")
    assert [r.address for r in import_path(store, mailman_copy).reports
            if r.deleted] == [DISCUSS]
