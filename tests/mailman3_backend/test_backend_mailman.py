"""The mailman3 backend against databases the real Mailman 3.3.10 built (SQLite, and
PostgreSQL when reachable): what it reads, that it never writes, that it notices changes
made through Mailman, and that it refuses what it does not know."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import stat
import subprocess

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from policyd.core.chain import decide
from policyd.config import StoreConfig
from policyd.errors import StoreUnavailable
from policyd.store import open_backend
from policyd.store.mailman3 import (
    KNOWN_REVISIONS,
    Mailman3Backend,
    UnknownSchemaError,
)
from policyd.core.verdict import Action, Query, Verdict

pytestmark = pytest.mark.mailman

BASE = [
    {"op": "domain", "mail_host": "example.com", "alias_domain": "alias.example.com"},
    {"op": "domain", "mail_host": "other.org"},
    {"op": "list", "fqdn": "test@example.com", "settings": {
        "default_member_action": "defer", "default_nonmember_action": "hold",
        "accept_these_nonmembers": ["^acc.*@x\\.org", "ok@x.org", "@friends@example.com"],
        "hold_these_nonmembers": ["held@x.org"],
        "reject_these_nonmembers": ["rej@x.org"],
        "discard_these_nonmembers": ["^disc"],
        "nonmember_rejection_notice": "Members only, please."}},
    {"op": "list", "fqdn": "friends@example.com"},
    {"op": "list", "fqdn": "em@other.org", "settings": {
        "emergency": True, "default_nonmember_action": "reject"}},
    {"op": "user", "emails": ["anne@example.org", "anne.work@example.org"],
     "preferred": "anne@example.org"},
    {"op": "subscribe_user", "list": "test@example.com", "email": "anne@example.org"},
    {"op": "user", "emails": ["dora@a.org", "dora2@a.org", "dora3@a.org"],
     "preferred": "dora@a.org"},
    {"op": "subscribe", "list": "test@example.com", "email": "dora2@a.org", "action": "reject"},
    {"op": "subscribe_user", "list": "test@example.com", "email": "dora@a.org",
     "action": "hold"},
    {"op": "subscribe", "list": "test@example.com", "email": "Bob@Example.org", "action": "hold"},
    {"op": "subscribe", "list": "test@example.com", "email": "nm-reject@x.org",
     "role": "nonmember", "action": "reject"},
    {"op": "subscribe", "list": "test@example.com", "email": "nm-none@x.org",
     "role": "nonmember"},
    {"op": "subscribe", "list": "friends@example.com", "email": "f1@x.org"},
    {"op": "subscribe", "list": "em@other.org", "email": "anne.work@example.org"},
    {"op": "ban", "email": "^spam.*"},
    {"op": "ban", "email": "bad@x.org", "list": "test@example.com"},
]


def verdict(snapshot, recipient, sender, from_header=None):
    return decide(snapshot, Query(recipient, sender, from_header)).verdict


@pytest.fixture
def built(mailman_db):
    mailman_db.apply(*BASE)
    backend = Mailman3Backend(mailman_db.url)
    yield mailman_db, backend
    backend.close()


def test_reads_what_mailman_built(built):
    """Lists, alias domains, members by address and through a user, user aliases, nonmember
    rows, the four pickled nonmember lists, bans, emergency, defaults and notice."""
    builder, backend = built
    backend.check()
    snapshot = backend.load_snapshot()
    assert snapshot.version == backend.change_token()
    assert dict(snapshot.domains) == {"example.com": "example.com",
                                      "alias.example.com": "example.com",
                                      "other.org": "other.org"}
    assert set(snapshot.lists) == {"test@example.com", "friends@example.com", "em@other.org"}
    test = snapshot.lists["test@example.com"]
    assert test.list_id == "test.example.com"
    assert set(test.members) == {"anne@example.org", "dora@a.org", "dora2@a.org",
                            "bob@example.org"}
    assert dict(test.member_actions) == {"dora@a.org": Action.HOLD,
                                         "dora2@a.org": Action.REJECT,
                                         "bob@example.org": Action.HOLD}
    # dora3 is an address of the user subscribed as dora@a.org and directly as dora2@a.org:
    # Mailman walks the user's addresses in order and dora@a.org comes first.
    assert dict(test.member_aliases) == {"anne.work@example.org": "anne@example.org",
                                         "dora3@a.org": "dora@a.org"}
    assert dict(test.nonmembers) == {"nm-reject@x.org": Action.REJECT, "nm-none@x.org": None}
    patterns = {action: tuple(p.text for p in entries)
                for action, entries in test.nonmember_patterns}
    assert patterns == {Action.ACCEPT: ("^acc.*@x\\.org", "ok@x.org", "@friends@example.com"),
                        Action.HOLD: ("held@x.org",), Action.REJECT: ("rej@x.org",),
                        Action.DISCARD: ("^disc",)}
    assert test.default_member_action is Action.DEFER
    assert test.default_nonmember_action is Action.HOLD
    assert test.rejection_notice == "Members only, please."
    assert test.bans.exact == {"bad@x.org"}
    assert [p.text for p in snapshot.site_bans.patterns] == ["^spam.*"]
    em = snapshot.lists["em@other.org"]
    assert em.emergency and em.default_nonmember_action is Action.REJECT
    assert em.rejection_notice is None  # Mailman 3's style sets ''
    assert snapshot.problems == ()


def test_decisions_through_the_backend(built):
    """The Mailman semantics come through to decide()."""
    _, backend = built
    snap = backend.load_snapshot()
    rcpt = "test@alias.example.com"
    assert verdict(snap, rcpt, "anne.work@example.org") is Verdict.ACCEPT   # user alias
    assert verdict(snap, rcpt, "dora3@a.org") is Verdict.HOLD             # first address
    assert verdict(snap, rcpt, "dora2@a.org") is Verdict.REJECT           # direct wins
    assert verdict(snap, rcpt, "x@y.org", "Bob <BOB@example.org>") is Verdict.HOLD
    assert verdict(snap, rcpt, "nm-reject@x.org") is Verdict.REJECT
    assert verdict(snap, rcpt, "acc1@x.org") is Verdict.ACCEPT
    assert verdict(snap, rcpt, "f1@x.org") is Verdict.ACCEPT               # @friends
    assert verdict(snap, rcpt, "held@x.org") is Verdict.HOLD
    assert verdict(snap, rcpt, "rej@x.org") is Verdict.REJECT
    assert verdict(snap, rcpt, "disc@x.org") is Verdict.DISCARD
    assert verdict(snap, rcpt, "spammer@x.org") is Verdict.DISCARD         # site ban
    assert verdict(snap, rcpt, "bad@x.org") is Verdict.DISCARD             # list ban
    assert verdict(snap, rcpt, "who@x.org") is Verdict.HOLD
    assert verdict(snap, "em@other.org", "anne.work@example.org") is Verdict.HOLD
    decision = decide(snap, Query(rcpt, "rej@x.org"))
    assert decision.rejection_notice == "Members only, please."


def test_open_backend_dispatches_to_mailman3(built):
    """[store] backend = mailman3 opens this backend; describe() names the revision and
    hides the password."""
    builder, _ = built
    backend = open_backend(StoreConfig("mailman3", builder.url, 2.0))
    try:
        assert isinstance(backend, Mailman3Backend)
        backend.check()
        assert "8cc1f79f4459" in backend.describe()
        assert backend.describe().startswith("mailman3 ")
    finally:
        backend.close()
    described = Mailman3Backend("postgresql://policyd:s3cret@db.invalid/mailman").describe()
    assert "s3cret" not in described and "***" in described


def test_change_token_follows_mailman(built):
    """Every kind of change made through Mailman's API changes the token, and the next
    snapshot shows it."""
    builder, backend = built
    tokens = [backend.change_token()]
    assert backend.change_token() == tokens[0]

    def changed():
        token = backend.change_token()
        assert token not in tokens
        tokens.append(token)
        return backend.load_snapshot()

    builder.apply({"op": "subscribe", "list": "test@example.com", "email": "new@x.org"})
    assert "new@x.org" in changed().lists["test@example.com"].members
    builder.apply({"op": "set_action", "list": "test@example.com", "email": "new@x.org",
                   "action": "discard"})
    assert changed().lists["test@example.com"].member_actions["new@x.org"] is Action.DISCARD
    builder.apply({"op": "set_action", "list": "test@example.com", "email": "nm-none@x.org",
                   "role": "nonmember", "action": "accept"})
    assert changed().lists["test@example.com"].nonmembers["nm-none@x.org"] is Action.ACCEPT
    builder.apply({"op": "unsubscribe", "list": "test@example.com", "email": "new@x.org"})
    assert "new@x.org" not in changed().lists["test@example.com"].members
    builder.apply({"op": "set", "list": "friends@example.com", "settings": {
        "emergency": True}})
    assert changed().lists["friends@example.com"].emergency
    builder.apply({"op": "set", "list": "friends@example.com", "settings": {
        "reject_these_nonmembers": ["^x"]}})
    friends = changed().lists["friends@example.com"]
    assert [p.text for p in dict(friends.nonmember_patterns)[Action.REJECT]] == ["^x"]
    builder.apply({"op": "list", "fqdn": "brand-new@example.com"})
    assert "brand-new@example.com" in changed().lists
    builder.apply({"op": "ban", "email": "late@x.org"})
    assert changed().site_bans.match("late@x.org")
    builder.apply({"op": "user", "emails": ["f1@x.org", "f1.other@x.org"]})
    assert changed().lists["friends@example.com"].member_aliases == {
        "f1.other@x.org": "f1@x.org"}
    builder.apply({"op": "user", "emails": ["anne@example.org"],
                   "preferred": "anne.work@example.org"})
    test = changed().lists["test@example.com"]
    assert "anne.work@example.org" in test.members and "anne@example.org" not in test.members
    builder.apply({"op": "domain", "mail_host": "third.example", "alias_domain": "a3.example"})
    assert changed().domains["a3.example"] == "third.example"
    builder.apply({"op": "delete_list", "list": "brand-new@example.com"})
    assert "brand-new@example.com" not in changed().lists


def test_reused_row_id_is_noticed(built):
    """SQLite hands the id of a deleted last row to the next insert: unsubscribing the
    newest membership and subscribing the same address to another list keeps count, max
    and id sums; the list_id hash still changes the token."""
    builder, backend = built
    builder.apply({"op": "subscribe", "list": "test@example.com", "email": "mover@x.org"})
    before = backend.change_token()
    builder.apply({"op": "unsubscribe", "list": "test@example.com", "email": "mover@x.org"},
                  {"op": "subscribe", "list": "friends@example.com", "email": "mover@x.org"})
    assert backend.change_token() != before
    snap = backend.load_snapshot()
    assert "mover@x.org" in snap.lists["friends@example.com"].members
    assert "mover@x.org" not in snap.lists["test@example.com"].members


def test_never_writes(built):
    """A write through the backend's own engine fails; building snapshots leaves a SQLite
    file's bytes, mode and neighbours untouched."""
    builder, backend = built
    path = None
    if builder.url.startswith("sqlite:///"):
        path = builder.url[len("sqlite:///"):]
        before = (os.stat(path).st_mode, os.stat(path).st_mtime_ns, open(path, "rb").read())
        neighbours = sorted(os.listdir(os.path.dirname(path)))
    backend.load_snapshot()
    backend.change_token()
    with pytest.raises(SQLAlchemyError) as caught:
        with backend.engine.connect() as connection:
            connection.execute(text("UPDATE mailinglist SET emergency = :e"), {"e": True})
            connection.commit()
    assert "read" in str(caught.value).lower()  # "readonly database" / "read-only transaction"
    with pytest.raises(SQLAlchemyError):
        with backend.engine.connect() as connection:
            connection.execute(text("CREATE TABLE policyd_was_here (id INTEGER)"))
            connection.commit()
    assert not backend.load_snapshot().lists["test@example.com"].emergency
    if path is not None:
        after = (os.stat(path).st_mode, os.stat(path).st_mtime_ns, open(path, "rb").read())
        assert after == before
        assert stat.S_IMODE(after[0]) == stat.S_IMODE(before[0])
        assert sorted(os.listdir(os.path.dirname(path))) == neighbours


# --- SQLite-only checks on a copy of a real database ------------------------------------


@pytest.fixture
def sqlite_copy(mailman_python, tmp_path):
    from tests.mailman3_backend.conftest import MailmanBuilder

    var_dir = tmp_path / "var"
    var_dir.mkdir()
    original = tmp_path / "mailman.db"
    MailmanBuilder(mailman_python, f"sqlite:///{original}", var_dir).apply(*BASE)
    copy = tmp_path / "copy.db"
    shutil.copy(original, copy)
    return copy


def _moderate(path, email, action):
    """One write transaction, as a copy edited elsewhere would have: ``email``'s action on
    test@example.com."""
    with sqlite3.connect(path) as connection:
        connection.execute(
            "UPDATE member SET moderation_action = ? WHERE list_id = 'test.example.com' "
            "AND address_id = (SELECT id FROM address WHERE email = ?)", (action, email))
    connection.close()


def _change_counter(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(100)[24:28]


@pytest.mark.parametrize("how", ["cp over", "mv over"])
def test_a_diverged_copy_put_over_the_file_is_noticed_at_once(sqlite_copy, tmp_path, how):
    """Two copies of one Mailman database that diverged by one write each (bob's action
    reject in one, discard in the other) have the same SQLite change counter, so PRAGMA
    data_version on the backend's open connection does not move when one is copied over
    the other (``cp``, same inode) or moved over it (``mv``, the open connections still
    read the old file).  The next change check still computes the token from the file
    now at the path (its identity, size and modification time are part of the gate), and
    the next snapshot shows the copy (the old code served the old token for up to
    GATE_MAX_AGE, and after a ``mv`` read the replaced file)."""
    other = tmp_path / "other.db"
    shutil.copy(sqlite_copy, other)
    _moderate(sqlite_copy, "bob@example.org", int(Action.REJECT))
    _moderate(other, "bob@example.org", int(Action.DISCARD))
    assert _change_counter(sqlite_copy) == _change_counter(other)
    backend = Mailman3Backend(f"sqlite:///{sqlite_copy}")
    try:
        before = backend.load_snapshot()
        assert before.version == backend.change_token()
        assert before.lists["test@example.com"].member_actions["bob@example.org"] \
            is Action.REJECT
        if how == "cp over":
            inode = sqlite_copy.stat().st_ino
            shutil.copyfile(other, sqlite_copy)
            assert sqlite_copy.stat().st_ino == inode
        else:
            other.replace(sqlite_copy)
        token = backend.change_token()
        assert token != before.version
        for after in (backend.load_changes(before), backend.load_snapshot()):
            assert after.version == token
            assert after.lists["test@example.com"].member_actions["bob@example.org"] \
                is Action.DISCARD
    finally:
        backend.close()


def test_unknown_revision_is_refused(sqlite_copy):
    """A database at an Alembic revision policyd does not know is refused by check(),
    change_token() and load_snapshot(), naming the revision."""
    with sqlite3.connect(sqlite_copy) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff00001111'")
    backend = Mailman3Backend(f"sqlite:///{sqlite_copy}")
    for call in (backend.check, backend.change_token, backend.load_snapshot):
        with pytest.raises(UnknownSchemaError, match="ffff00001111"):
            call()
    assert isinstance(UnknownSchemaError("x"), StoreUnavailable)
    backend.close()


def test_not_a_mailman_database(tmp_path):
    """An empty SQLite file is not Mailman's; a missing file is not created."""
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(UnknownSchemaError, match="not a Mailman 3 core database"):
        Mailman3Backend(f"sqlite:///{empty}").check()
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreUnavailable):
        Mailman3Backend(f"sqlite:///{missing}").check()
    assert not missing.exists()


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Boom, _Eval])
def test_malicious_pickle_in_mailman_column(sqlite_copy, tmp_path, payload):
    """A pickle in mailinglist.hold_these_nonmembers that would run code is refused: that
    list alone is marked broken with a reason naming the column; the code does not run."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps(payload(marker), protocol=5)
    with sqlite3.connect(sqlite_copy) as connection:
        connection.execute("UPDATE mailinglist SET hold_these_nonmembers = ? "
                           "WHERE list_name = 'friends'", (evil,))
    backend = Mailman3Backend(f"sqlite:///{sqlite_copy}")
    snapshot = backend.load_snapshot()
    assert list(snapshot.broken) == ["friends@example.com"]
    message = snapshot.broken["friends@example.com"]
    assert "hold_these_nonmembers" in message and "refusing to load global" in message
    assert not marker.exists()
    backend.close()


def test_one_unreadable_list_is_deferred_alone(sqlite_copy):
    """Garbage in one list's pickled column: that list's posts get DEFER (broken-list,
    with the reason in the trace), every other list decides as before, the daemon's
    snapshot service logs one line naming the list and the reason and says so in status;
    once the column is repaired the list decides normally again."""
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel

    from policyd.snapshot_service import SnapshotService
    from tests.protocols.fakes import captured_events

    url = f"sqlite:///{sqlite_copy}"
    healthy = Mailman3Backend(url)
    before = healthy.load_snapshot()
    healthy.close()
    with sqlite3.connect(sqlite_copy) as connection:
        original = connection.execute(
            "SELECT accept_these_nonmembers FROM mailinglist WHERE list_name = 'test'"
        ).fetchone()[0]
        connection.execute("UPDATE mailinglist SET accept_these_nonmembers = ? "
                           "WHERE list_name = 'test'", (b"\x80\x05garbage, not a pickle",))
    backend = Mailman3Backend(url)
    clock = Clock()
    service = SnapshotService(backend, interval=2.0, clock=clock, monotonic=clock.seconds,
                              run_in_thread=lambda f, *a, **k: maybeDeferred(f, *a, **k))
    with captured_events() as events:
        service.startService()
        clock.advance(2.0)  # an unchanged refresh does not log it again
    try:
        snapshot = service.current
        assert snapshot is not None and set(snapshot.lists) == set(before.lists)
        decision = decide(snapshot, Query("test@example.com", "bob@example.org"))
        assert (decision.verdict, decision.rule) == (Verdict.DEFER, "broken-list")
        assert "accept_these_nonmembers" in decision.trace[-1].detail
        assert "not a readable pickle" in decision.trace[-1].detail
        # Every other list decides exactly as from the intact database.
        for recipient, sender in [("friends@example.com", "f1@x.org"),
                                  ("friends@example.com", "stranger@x.org"),
                                  ("em@other.org", "anne.work@example.org"),
                                  ("em@other.org", "stranger@x.org"),
                                  ("nolist@example.com", "a@x.org")]:
            query = Query(recipient, sender)
            assert decide(snapshot, query).verdict is decide(before, query).verdict
        # The list's administrative addresses and the null sender are unaffected.
        assert verdict(snapshot, "test-owner@example.com", "x@y.org") is Verdict.ACCEPT
        assert verdict(snapshot, "test@example.com", "") is Verdict.REJECT
        named = [e for e in events if "test@example.com" in str(e.get("list"))]
        assert len(named) == 1 and named[0]["log_level"] is LogLevel.error
        assert "not a readable pickle" in named[0]["reason"]
        status = service.status()
        assert list(status["snapshot"]["broken_lists"]) == ["test@example.com"]
        assert status["store"]["healthy"] is True  # the store itself answers

        with sqlite3.connect(sqlite_copy) as connection:
            connection.execute("UPDATE mailinglist SET accept_these_nonmembers = ? "
                               "WHERE list_name = 'test'", (original,))
        with captured_events() as events:
            clock.advance(2.0)
        assert verdict(service.current, "test@example.com", "bob@example.org") \
            is verdict(before, "test@example.com", "bob@example.org")
        assert dict(service.current.broken) == {}
        assert any(e.get("list") == "test@example.com" and "readable again"
                   in e["log_format"] for e in events)
    finally:
        service.stopService()


def test_known_revisions_match_installed_mailman(mailman_python):
    """KNOWN_REVISIONS is the 3.3.x part of the installed Mailman's revision chain, ending
    at its head."""
    script = (
        "import os, mailman.database.alembic as a;"
        "from alembic.script import ScriptDirectory;"
        "s = ScriptDirectory(os.path.dirname(a.__file__));"
        "print(s.get_current_head());"
        "print(' '.join(r.revision for r in s.walk_revisions()))"
    )
    out = subprocess.run([str(mailman_python), "-c", script], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    head, chain = out[0].strip(), out[1].split()
    assert head in KNOWN_REVISIONS
    assert chain[0] == head
    assert chain[: len(KNOWN_REVISIONS)] == list(reversed(list(KNOWN_REVISIONS)))


def test_policyctl_query_offline_reads_mailman(built, tmp_path):
    """`policyctl query --offline` with [store] backend = mailman3 decides from Mailman's
    database, with the list's rejection notice in the reply."""
    import io
    import json

    from policyd import ctl

    builder, _ = built
    config = tmp_path / "policyd.conf"
    config.write_text(f"[store]\nbackend = mailman3\nurl = {builder.url}\n")
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(["--config", str(config), "query", "--offline", "--json",
                     "test@alias.example.com", "rej@x.org", "--from", "Rej <rej@x.org>"],
                    out=out, err=err, environ={})
    assert code == 0, err.getvalue()
    result = json.loads(out.getvalue())
    assert result["decision"]["verdict"] == "reject"
    assert result["decision"]["rule"] == "nonmember-moderation"
    assert result["reply"]["text"] == "Members only, please."
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(["--config", str(config), "status", "--offline", "--json"],
                    out=out, err=err, environ={})
    assert code == 0, err.getvalue()
    assert json.loads(out.getvalue())["store"].startswith("mailman3 ")
