"""Mailman 2.1 import: real Python 2.7 cPickle fixtures (tests/mailman2/make_fixtures.py)
into the native store, in Mailman 2 mode; idempotence, updates, removal, malicious
pickles, --watch and the policyctl command."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest

from policyd.core.chain import decide
from policyd.core.message import parse_message
from policyd.store import Store
from policyd.store.mailman2 import (
    find_lists,
    import_path,
    read_list,
    watch,
)
from policyd.store.native import NativeBackend
from policyd.store.safe_pickle import (
    MailmanPlaceholder,
    UnsafePickleError,
    load_mailman2_file,
    loads_mailman2,
)
from policyd.core.verdict import Action, Mode, Query, Verdict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAILMAN = FIXTURES / "mailman"
PWNED = Path("/tmp/policyd-mailman2-fixture-pwned")


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'policyd.sqlite'}"
    store = Store(url)
    store.upgrade()
    yield store
    store.close()


@pytest.fixture
def mailman_copy(tmp_path):
    target = tmp_path / "mailman"
    shutil.copytree(MAILMAN, target)
    return target


def snapshot_of(store):
    backend = NativeBackend(store.url)
    try:
        return backend.load_snapshot(), backend.change_token()
    finally:
        backend.close()


def verdict(snapshot, recipient, sender):
    return decide(snapshot, Query(recipient, sender, sender)).verdict


# --- the fixtures are what Python 2 wrote --------------------------------------------------


def test_fixtures_are_python2_pickles_of_both_protocols():
    """announce is protocol 1 (cPickle.dump(dict, fp, 1), no PROTO opcode, byte-string keys
    as SHORT_BINSTRING 'U'), discuss protocol 2; the _BounceInfo instance is an old-style
    OBJ of Mailman.Bouncer._BounceInfo."""
    announce = (MAILMAN / "lists" / "announce" / "config.pck").read_bytes()
    discuss = (MAILMAN / "lists" / "discuss" / "config.pck").read_bytes()
    assert announce[:3] == b"}q\x01" and b"\x80" not in announce[:1]
    assert discuss[:2] == b"\x80\x02"
    assert b"cMailman.Bouncer\n_BounceInfo\n" in announce
    assert b"U\x07membersq" in announce  # a Python 2 str key
    assert b"X!\x00\x00\x00Caf\xc3\xa9 announcements" in announce  # unicode: BINUNICODE


def test_restricted_unpickler_reads_python2_data():
    config = load_mailman2_file(MAILMAN / "lists" / "announce" / "config.pck")
    assert config["members"]["bob@example.org"] == "Bob@Example.ORG"
    assert config["user_options"]["bob@example.org"] == 132
    assert config["info"] == "Caf\u00e9 announcements \u2013 read only"
    # Python 2 byte strings: Latin-1 code points by default, bytes on request.
    assert config["nonmember_rejection_notice"].startswith("Membres seulement, d\xe9sol\xe9")
    raw = load_mailman2_file(MAILMAN / "lists" / "announce" / "config.pck", "bytes")
    assert raw[b"nonmember_rejection_notice"].startswith(b"Membres seulement, d\xe9sol\xe9")
    info = config["bounce_info"]["dave@example.net"]
    assert isinstance(info, MailmanPlaceholder)
    assert info.mailman_class == "Mailman.Bouncer._BounceInfo"
    assert (info.member, info.score, info.date, info.noticesleft) == (
        "dave@example.net", 1.0, (2024, 5, 1), 3)
    with pytest.raises(TypeError):
        pickle.dumps(info)
    discuss = load_mailman2_file(MAILMAN / "lists" / "discuss" / "config.pck")
    assert discuss["_policyd_fixture_set"] == {"a", "b"}
    assert discuss["emergency"] == 1 and discuss["description"] == "Discussion \u00fcber alles"
    assert "Mailman" not in __import__("sys").modules


@pytest.mark.parametrize("data, words", [
    (b"cos\nsystem\n(S'touch /tmp/policyd-mailman2-fixture-pwned'\ntR.", "os.system"),
    (b"(S'touch /tmp/policyd-mailman2-fixture-pwned'\nios\nsystem\n.", "os.system"),
    (b"c__builtin__\ngetattr\n(c__builtin__\nobject\nS'x'\ntR.", "__builtin__.getattr"),
    (b"ccopy_reg\n_reconstructor\n(c__builtin__\nobject\nc__builtin__\nobject\nNtR.",
     "_reconstructor"),
    (b"csubprocess\ncall\n(S'true'\ntR.", "subprocess.call"),
    (b"\x80\x02]q\x01.", "expected a dict"),
    (b"garbage", "not a readable pickle"),
])
def test_restricted_unpickler_refuses(data, words):
    PWNED.unlink(missing_ok=True)
    with pytest.raises(UnsafePickleError, match=words):
        loads_mailman2(data)
    assert not PWNED.exists()


# --- importing -------------------------------------------------------------------------------


def test_import_creates_mailman2_lists(store):
    """Every list under the prefix becomes a mode=mailman2 list with Mailman 2's members,
    Moderate bits, actions, patterns, emergency, notice and host."""
    result = import_path(store, MAILMAN)
    assert result.failures == []
    assert sorted(r.address for r in result.reports) == [
        "announce@lists.example.org", "discuss@lists.example.org",
        "fallback@lists.example.org", "legacy@old.example.net"]
    assert all(r.created for r in result.reports)
    warnings = [w for r in result.reports for w in r.warnings]
    assert any("config.pck.last" in w for w in warnings)           # fallback list
    assert any("@nosuchlist" in w for w in warnings)
    assert any("refers to the list itself" in w for w in warnings)
    assert any("^bad[regex" in w for w in warnings)

    snap, _ = snapshot_of(store)
    announce = snap.lists["announce@lists.example.org"]
    assert announce.mode is Mode.MAILMAN2
    assert set(announce.members) == {"alice@example.org", "bob@example.org", "carol@example.com",
                                "dave@example.net"}
    assert dict(announce.member_actions) == {"bob@example.org": Action.REJECT,
                                             "dave@example.net": Action.REJECT}
    assert announce.default_nonmember_action is Action.REJECT
    assert announce.rejection_notice == "Membres seulement, d\u00e9sol\u00e9. Voir la page."
    patterns = {action: [p.text for p in entries]
                for action, entries in announce.nonmember_patterns}
    assert patterns == {
        Action.ACCEPT: ["^.*@partner\\.example$", "friend@outside.example",
                        "@discuss@lists.example.org"],
        Action.HOLD: ["^hold-"], Action.REJECT: ["troll@outside.example"],
        Action.DISCARD: ["^spam.*@"]}
    discuss = snap.lists["discuss@lists.example.org"]
    assert discuss.emergency and discuss.default_nonmember_action is Action.HOLD
    assert dict(discuss.member_actions) == {"erin@example.org": Action.HOLD,
                                            "gina@example.com": Action.HOLD}
    assert "gina@example.com" in discuss.members  # digest member
    assert snap.lists["legacy@old.example.net"].default_nonmember_action is Action.DISCARD
    assert snap.lists["fallback@lists.example.org"].default_nonmember_action is Action.ACCEPT
    assert snap.domains["old.example.net"] == "old.example.net"


def test_imported_lists_decide_like_mailman2(store):
    import_path(store, MAILMAN)
    snap, _ = snapshot_of(store)
    a = "announce@lists.example.org"
    assert verdict(snap, a, "alice@example.org") is Verdict.ACCEPT
    assert verdict(snap, a, "BOB@example.org") is Verdict.REJECT        # Moderate bit
    assert verdict(snap, a, "x@partner.example") is Verdict.ACCEPT      # ^regex, search
    assert verdict(snap, a, "Friend@Outside.Example") is Verdict.ACCEPT
    assert verdict(snap, a, "frank@example.org") is Verdict.ACCEPT      # @discuss
    assert verdict(snap, a, "hold-me@x.example") is Verdict.HOLD
    assert verdict(snap, a, "troll@outside.example") is Verdict.REJECT
    assert verdict(snap, a, "spam42@x.example") is Verdict.DISCARD
    decision = decide(snap, Query(a, "stranger@x.example", "stranger@x.example"))
    assert decision.verdict is Verdict.REJECT
    assert decision.rejection_notice == "Membres seulement, d\u00e9sol\u00e9. Voir la page."
    d = "discuss@lists.example.org"
    assert verdict(snap, d, "erin@example.org") is Verdict.HOLD          # moderated: hold
    assert verdict(snap, d, "alice@example.org") is Verdict.HOLD         # emergency
    assert verdict(snap, d, "x@rejected.example") is Verdict.REJECT      # moderation first


def test_import_is_idempotent(store):
    """A second run finds nothing to change, writes nothing (the change token stays)."""
    import_path(store, MAILMAN)
    _, token = snapshot_of(store)
    again = import_path(store, MAILMAN)
    assert again.failures == [] and all(r.unchanged for r in again.reports)
    snap, token2 = snapshot_of(store)
    assert token2 == token
    assert len(snap.lists["announce@lists.example.org"].members) == 4


def test_import_updates_and_removes_members_that_left(store, mailman_copy):
    import_path(store, mailman_copy)
    shutil.copy(FIXTURES / "variants" / "discuss-v2.pck",
                mailman_copy / "lists" / "discuss" / "config.pck")
    result = import_path(store, mailman_copy)
    reports = {r.address: r for r in result.reports}
    discuss = reports.pop("discuss@lists.example.org")
    assert all(r.unchanged for r in reports.values())
    assert (discuss.added, discuss.removed, discuss.changed) == (1, 1, 2)
    assert discuss.settings == ["emergency"] and discuss.patterns
    snap, _ = snapshot_of(store)
    policy = snap.lists["discuss@lists.example.org"]
    assert set(policy.members) == {"alice@example.org", "erin@example.org", "harry@example.org",
                              "gina@example.com"}
    assert dict(policy.member_actions) == {"erin@example.org": Action.DISCARD}
    assert not policy.emergency
    patterns = {action: [p.text for p in entries]
                for action, entries in policy.nonmember_patterns}
    assert patterns[Action.HOLD] == ["^new-.*"] and patterns[Action.REJECT] == []
    assert import_path(store, mailman_copy).reports[1].unchanged


def test_malicious_config_pck_is_refused_and_others_imported(store):
    """A config.pck whose pickle would run os.system or eval is refused with the global it
    names; the code does not run; the other list is imported.  The refused lists are
    not served from nothing: each is a broken stand-in at the host the store knows for
    Mailman 2 lists (a temporary failure, not "no such list")."""
    PWNED.unlink(missing_ok=True)
    result = import_path(store, FIXTURES / "evil")
    assert [r.address for r in result.reports] == ["fine@old.example.net"]
    assert len(result.failures) == 2
    assert "refusing to load global posix.system" in result.failures[0]
    assert "refusing to load global __builtin__.eval" in result.failures[1]
    assert "temporary failure" in result.failures[0]
    assert not PWNED.exists()
    snap, _ = snapshot_of(store)
    assert set(snap.lists) == {"fine@old.example.net", "evil@old.example.net",
                               "evil2@old.example.net"}
    assert set(snap.broken) == {"evil@old.example.net", "evil2@old.example.net"}
    assert snap.lists["fine@old.example.net"].broken is None


def test_find_lists_accepts_prefix_lists_dir_or_one_list():
    prefix = find_lists(MAILMAN)
    assert [p.name for p in prefix] == ["announce", "discuss", "fallback", "legacy"]
    assert find_lists(MAILMAN / "lists") == prefix
    assert find_lists(MAILMAN / "lists" / "legacy") == [MAILMAN / "lists" / "legacy"]
    assert read_list(MAILMAN / "lists" / "legacy").source.name == "config.pck.last"


def test_watch_reimports_when_a_config_pck_changes(store, mailman_copy):
    """--watch imports at once, then only when a config.pck changed."""
    results = []
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            target = mailman_copy / "lists" / "discuss" / "config.pck"
            shutil.copy(FIXTURES / "variants" / "discuss-v2.pck", target)
            os.utime(target, ns=(1, 1))

    watch(store, mailman_copy, 7.0, results.append, sleep=sleep, rounds=4)
    assert sleeps == [7.0, 7.0, 7.0]
    assert len(results) == 2
    assert all(r.created for r in results[0].reports)
    changed = [r.address for r in results[1].reports if not r.unchanged]
    assert changed == ["discuss@lists.example.org"]


# --- policyctl import-mailman2 -------------------------------------------------------------


def _policyctl(argv, store_url):
    from policyd import ctl

    parser = ctl.build_parser()
    args = parser.parse_args(["--store", store_url] + argv)
    out, err = io.StringIO(), io.StringIO()
    code = ctl.run(args, out, err, environ={})
    return code, out.getvalue(), err.getvalue()


def test_policyctl_import_mailman2(store):
    code, out, err = _policyctl(["import-mailman2", str(MAILMAN)], store.url)
    assert code == 0, err
    assert "announce@lists.example.org: created, +4 members" in out
    assert "config.pck.last" in err
    code, out, err = _policyctl(["import-mailman2", "--quiet", str(MAILMAN)], store.url)
    assert (code, out) == (0, "")
    PWNED.unlink(missing_ok=True)
    code, out, err = _policyctl(["import-mailman2", str(FIXTURES / "evil")], store.url)
    assert code == 2
    assert "fine@old.example.net: created" in out
    assert "refusing to load global posix.system" in err and "2 list(s) not imported" in err
    assert not PWNED.exists()
    code, out, err = _policyctl(["import-mailman2", "/nonexistent/mailman"], store.url)
    assert code == 2 and "not a directory" in err


# --- the Hold handler's settings and header_filter_rules (issue 16) ----------------------


def test_hold_settings_are_read_as_mailman3s_importer_reads_them():
    """max_message_size (KB in both), max_num_recipients, require_explicit_destination,
    administrivia and bounce_matching_headers are copied; every acceptable alias becomes a
    ``^`` regex and ``^NAME@`` is added; header_filter_rules become header_matches one
    per line (defer -> jump_chain, approve and unparseable lines skipped, duplicates
    once), as ``mailman import21`` does."""
    mm2 = read_list(MAILMAN / "lists" / "announce")
    assert mm2.content == {
        "max_message_size": 0, "max_num_recipients": 5,
        "require_explicit_destination": True, "administrivia": False,
        "bounce_matching_headers": "X-Bounce: ^yes\n",
        "acceptable_aliases": ["^announce-alias@lists.example.org",
                               "^.*@announce\\.example\\.org$", "^news", "^announce@"],
        "header_matches": [
            ["x-spam-flag", "YES", "discard"],
            ["subject", "viagra", "reject"],
            ["x-mailer", "evil", "reject"],
            ["from", ".*@spam\\.example", None],
            ["subject", "buy now", "hold"],
            ["x-list-ok", ".*", "accept"],
        ]}
    warnings = " ".join(mm2.warnings)
    assert "'x-approve-me: yes' with the approve action" in warnings
    assert "'no colon here' names no header" in warnings
    assert "'x-bad: [unclosed': not a valid regular expression" in warnings
    defaults = read_list(MAILMAN / "lists" / "discuss").content
    assert (defaults["max_message_size"], defaults["max_num_recipients"]) == (40, 10)
    assert defaults["require_explicit_destination"] and defaults["administrivia"]
    assert defaults["acceptable_aliases"] == ["^discuss@"]
    assert defaults["header_matches"] == []
    assert "to: friend@public.com" in defaults["bounce_matching_headers"]


def test_an_old_list_without_the_settings_keeps_the_stores(store):
    legacy = read_list(MAILMAN / "lists" / "legacy")
    assert legacy.content == {}
    assert any("has no max_message_size, max_num_recipients" in w for w in legacy.warnings)


def test_hold_settings_reach_the_snapshot(store):
    """Imported into the native columns and built into the list's content policy."""
    import_path(store, MAILMAN)
    snap, _ = snapshot_of(store)
    content = snap.lists["announce@lists.example.org"].content
    assert (content.max_message_size, content.max_num_recipients) == (0, 5)
    assert content.require_explicit_destination and not content.administrivia
    assert content.acceptable_aliases == (
        "^announce-alias@lists.example.org", "^.*@announce\\.example\\.org$", "^news",
        "^announce@")
    assert [(m.header, m.pattern, m.action) for m in content.header_matches] == [
        ("x-spam-flag", "YES", Action.DISCARD), ("subject", "viagra", Action.REJECT),
        ("x-mailer", "evil", Action.REJECT), ("from", ".*@spam\\.example", None),
        ("subject", "buy now", Action.HOLD), ("x-list-ok", ".*", Action.ACCEPT)]
    assert [h for h, _ in content.bounce_matching_headers] == ["X-Bounce"]
    discuss = snap.lists["discuss@lists.example.org"].content
    assert (discuss.max_message_size, discuss.max_num_recipients) == (40, 10)
    assert [h for h, _ in discuss.bounce_matching_headers] == [
        "to", "message-id", "from", "from"]


def test_a_changed_hold_setting_is_updated_and_reported(store, mailman_copy):
    """Re-importing after Mailman 2 changed max_num_recipients updates the column and
    names the setting; nothing else is rewritten."""
    import_path(store, mailman_copy)
    path = mailman_copy / "lists" / "discuss" / "config.pck"
    data = loads_mailman2(path.read_bytes(), encoding="bytes")
    data[b"max_num_recipients"] = 7
    path.write_bytes(pickle.dumps(data, protocol=3))  # bytes as BINBYTES
    result = import_path(store, mailman_copy)
    reports = {r.address: r for r in result.reports}
    assert reports["discuss@lists.example.org"].settings == ["max_num_recipients"]
    assert all(r.unchanged for a, r in reports.items() if a != "discuss@lists.example.org")
    snap, _ = snapshot_of(store)
    assert snap.lists["discuss@lists.example.org"].content.max_num_recipients == 7


def test_a_nonmember_entry_with_a_trailing_dot_keeps_it():
    """Mailman 2.1 looks the lower-cased sender up among the entries as written: an entry
    ``dotted@outside.example.`` (as admindb's "add sender" writes a dotted sender) meets
    only the sender written with the dot.  The import normalised it away, so the dotted
    sender met nothing and the plain one met the entry (docs/mailman2.md)."""
    from types import SimpleNamespace

    from policyd.core.verdict import Action
    from policyd.store import mailman2 as importer
    from policyd.store import queries as q

    mm2 = SimpleNamespace(name="alpha", posting_address="alpha@lists.test",
                          patterns={Action.ACCEPT: ["Dotted@Outside.Example.",
                                                    "plain@outside.example"]})
    report = importer.ListReport("alpha@lists.test", "test")
    rows = importer._patterns_for(mm2, {}, report, q.check_pattern)
    assert [text for _, _, text in rows] == ["dotted@outside.example.",
                                             "plain@outside.example"]
    assert report.warnings == []


# --- a list whose config.pck cannot be read: fail closed, retried by --watch -------------


DISCUSS = "discuss@lists.example.org"


def _decision(store, recipient, sender):
    snap, _ = snapshot_of(store)
    return snap, decide(snap, Query(recipient, sender, sender))


def test_an_unreadable_config_pck_makes_the_list_a_temporary_failure(store, mailman_copy):
    """A list imported before whose config.pck is now corrupt (and has no
    config.pck.last) is not answered from its old rows: it is broken (``broken-list``,
    a temporary failure, in ``Snapshot.broken``), and the import says so.  Readable
    again, the next import clears it and reports that."""
    import_path(store, mailman_copy)
    before = _decision(store, DISCUSS, "alice@example.org")[1]
    assert before.rule != "broken-list"
    path = mailman_copy / "lists" / "discuss" / "config.pck"
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])  # truncated
    result = import_path(store, mailman_copy)
    assert len(result.failures) == 1 and result.failures[0].startswith("discuss: ")
    assert f"posts to {DISCUSS} get a temporary failure" in result.failures[0]
    snap, decision = _decision(store, DISCUSS, "alice@example.org")
    assert decision.verdict is Verdict.DEFER and decision.rule == "broken-list"
    assert "config.pck" in snap.broken[DISCUSS]
    assert _decision(store, "announce@lists.example.org",
                     "alice@example.org")[0].lists["announce@lists.example.org"].broken is None
    path.write_bytes(good)
    result = import_path(store, mailman_copy)
    assert result.failures == []
    report = {r.address: r for r in result.reports}[DISCUSS]
    assert report.recovered and "no longer a temporary failure" in report.line()
    snap, decision = _decision(store, DISCUSS, "alice@example.org")
    assert (decision.verdict, decision.rule) == (before.verdict, before.rule)
    assert not snap.broken


def test_a_new_list_with_an_unreadable_config_pck_is_a_temporary_failure(store,
                                                                      mailman_copy):
    """A list not in the store yet whose config.pck cannot be read gets a broken
    stand-in at the host of the other Mailman 2 lists: its posts are retried (4xx), not
    refused as "no such list" (5xx).  Once read, at another host, the stand-in goes."""
    path = mailman_copy / "lists" / "discuss" / "config.pck"
    good = path.read_bytes()
    path.write_bytes(b"\x80\x02}q\x01(U\x07members")  # cut short
    result = import_path(store, mailman_copy)
    assert any(f.startswith("discuss: ") and "temporary failure" in f
               for f in result.failures)
    snap, decision = _decision(store, DISCUSS, "alice@example.org")
    assert decision.verdict is Verdict.DEFER and decision.rule == "broken-list"
    assert DISCUSS in snap.broken
    data = loads_mailman2(good, encoding="bytes")
    data[b"host_name"] = b"other.example.org"
    path.write_bytes(pickle.dumps(data, protocol=3))
    result = import_path(store, mailman_copy)
    assert result.failures == []
    assert any("removed discuss@lists.example.org, the stand-in" in w
               for r in result.reports for w in r.warnings)
    snap, _ = snapshot_of(store)
    assert DISCUSS not in snap.lists and not snap.broken
    assert "discuss@other.example.org" in snap.lists


def test_watch_retries_a_failed_list_every_interval_and_reports_it_once(
        store, mailman_copy, monkeypatch):
    """A list that could not be read is retried at every interval, though no
    config.pck changed (a permission fixed by chmod changes neither mtime, size nor
    inode), and its failure is reported once, not at every retry."""
    target = mailman_copy / "lists" / "discuss" / "config.pck"
    denied = [True]
    read_bytes = Path.read_bytes

    def guarded(self):
        if self == target and denied[0]:
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", guarded)
    results = []

    def sleep(seconds):
        if len(results) and sleep.calls == 2:
            denied[0] = False  # the permission is fixed
        sleep.calls += 1

    sleep.calls = 0
    watch(store, mailman_copy, 7.0, results.append, sleep=sleep, rounds=5)
    failures = [f for r in results for f in r.failures]
    assert len(failures) == 1 and "Permission denied" in failures[0]
    # The rounds in between (retries that changed nothing) reported nothing.
    assert len(results) == 2
    assert [r.address for r in results[-1].reports] == [DISCUSS]
    assert results[-1].reports[0].recovered
    snap, decision = _decision(store, DISCUSS, "alice@example.org")
    assert decision.rule != "broken-list" and not snap.broken


def test_watch_notices_a_permission_change(mailman_copy):
    """``chmod`` alone (ctime and mode change, nothing else) changes the fingerprint."""
    from policyd.store.mailman2 import _fingerprint

    target = mailman_copy / "lists" / "discuss" / "config.pck"
    before = _fingerprint(mailman_copy)
    target.chmod(0o000)
    try:
        assert _fingerprint(mailman_copy) != before
    finally:
        target.chmod(0o644)


# --- Python 2's global inline flags anywhere in a pattern ---------------------------------


@pytest.mark.parametrize("pattern, anchored, expected", [
    ("^fred(?i)@example\\.com$", True, "^(?i:fred@example\\.com$)"),
    ("(?i)^x", False, "(?i)^x"),  # already at the front: as it is
    ("subject: (?i)buy", False, "(?i)subject: buy"),
    ("^a|b(?s)", True, "^(?s:.*?(?:^a|b))"),  # top-level | kept whole
    ("^x\\(?i\\)", True, "^x\\(?i\\)"),  # an escaped parenthesis: no flag group
    ("^[(?i)]x", True, "^[(?i)]x"),  # in a class: characters
    ("^a(?#(?i)b", True, "^a(?#(?i)b"),  # in a comment (it ends at the first ")")
    ("^a b(?x) # c", True, "^(?x:a b # c\n)"),  # verbose: the comment stays one
    ("^a(?x) # [ (?s)", True, "^(?x:a # [ (?s)\n)"),  # verbose from (?x): a comment
    ("^a(?P<n>b)(?m)c", True, "^(?m:a(?P<n>b)c)"),
])
def test_py2_regex_moves_global_flags_to_the_front(pattern, anchored, expected):
    """Python 2.7 applies ``(?i)`` (any of iLmsux) wherever it stands to the whole
    pattern; Python 3.11 refuses it past the start.  The translation keeps Python 2's
    meaning and compiles under Python 3.  (Each case's flags, and the refusals below,
    were checked against CPython 2.7.18's ``re.compile``.)"""
    import re

    from policyd.store.mailman2 import py2_regex

    translated, notes = py2_regex(pattern, anchored=anchored)
    assert translated == expected and notes == []
    re.compile(translated)


@pytest.mark.parametrize("pattern", ["^(?i:a)", "^a(?-i)b", "^a(?a)", "^a(?>b)", "^[a"])
def test_py2_regex_refuses_what_python2_refuses(pattern):
    from policyd.store.mailman2 import Py2RegexError, py2_regex

    with pytest.raises(Py2RegexError):
        py2_regex(pattern, anchored=True)


def test_a_mid_pattern_flag_is_imported_not_skipped(store, mailman_copy):
    """``^fred(?i)@...`` in hold_these_nonmembers and ``Subject: (?i)buy`` in
    header_filter_rules were skipped ("not a valid regular expression"): Mailman 2 uses
    them.  ``(?i:...)``, which Python 2 refuses, is still skipped with a warning."""
    path = mailman_copy / "lists" / "discuss" / "config.pck"
    data = loads_mailman2(path.read_bytes(), encoding="bytes")
    data[b"hold_these_nonmembers"] = [b"^fred(?i)@outside\\.example$", b"^(?i:bad)"]
    data[b"header_filter_rules"] = [(b"Subject: (?i)buy", 7, False)]
    path.write_bytes(pickle.dumps(data, protocol=3))
    mm2 = read_list(mailman_copy / "lists" / "discuss")
    assert mm2.patterns[Action.HOLD] == ["^(?i:fred@outside\\.example$)"]
    assert mm2.content["header_matches"] == [["subject", "(?i)buy", "hold"]]
    assert any("'^(?i:bad)'" in w and "skipped" in w for w in mm2.warnings)
    import_path(store, mailman_copy)
    _, decision = _decision(store, DISCUSS, "FRED@outside.example")
    assert decision.verdict is Verdict.HOLD


# --- dmarc_moderation_addresses (Mailman 2.1.34) ------------------------------------------


def test_dmarc_moderation_addresses_reject_at_smtp_time(store, mailman_copy):
    """Mailman 2.1.34's SpamDetect rejects (dmarc_moderation_action 3) a post whose
    From: address is in dmarc_moderation_addresses, before moderation; the import
    dropped both settings silently.  ``@list`` entries are ignored there by Mailman 2.1
    (skipped with a warning); the warning says what policyd applies where."""
    path = mailman_copy / "lists" / "discuss" / "config.pck"
    data = loads_mailman2(path.read_bytes(), encoding="bytes")
    data[b"dmarc_moderation_action"] = 3
    data[b"dmarc_moderation_addresses"] = [b"Boss@Corp.example",
                                           b"^.*@strict(?i)\\.example$", b"@announce"]
    path.write_bytes(pickle.dumps(data, protocol=3))
    mm2 = read_list(mailman_copy / "lists" / "discuss")
    assert mm2.content["dmarc_mitigate_action"] == 3
    assert mm2.content["dmarc_addresses"] == ["boss@corp.example",
                                              "^(?i:.*@strict\\.example$)"]
    assert any("'@announce'" in w for w in mm2.warnings)
    assert any("whose DMARC record says so" in w and "Postfix" in w for w in mm2.warnings)
    import_path(store, mailman_copy)
    snap, _ = snapshot_of(store)
    for sender in ("Big Boss <BOSS@corp.example>", "x@Strict.Example",
                   "boss@corp.example, alice@example.org"):
        decision = decide(snap, Query(DISCUSS, "bounce@else.example", sender))
        assert (decision.verdict, decision.rule) == (Verdict.REJECT, "dmarc-moderation"), \
            sender
    # parseaddr takes the first address only.
    for sender in ("boss@corp.example.other", "alice@example.org, boss@corp.example"):
        decision = decide(snap, Query(DISCUSS, "bounce@else.example", sender))
        assert decision.rule != "dmarc-moderation"
    # Discard (4) discards.
    data[b"dmarc_moderation_action"] = 4
    path.write_bytes(pickle.dumps(data, protocol=3))
    import_path(store, mailman_copy)
    snap, _ = snapshot_of(store)
    decision = decide(snap, Query(DISCUSS, "bounce@else.example", "boss@corp.example"))
    assert (decision.verdict, decision.rule) == (Verdict.DISCARD, "dmarc-moderation")


def test_dmarc_quarantine_moderation_action_is_imported(store, mailman_copy):
    """Mailman 2.1 counts a DMARC policy of quarantine only with
    dmarc_quarantine_moderation_action: imported into dmarc_quarantine (the store's
    default, yes, as Mailman 2.1's, where config.pck has none), and the DNS half of
    dmarc-moderation reads it."""
    from policyd.core.dmarc import DnsAnswer

    class Quarantined:
        from policyd.core.dmarc import PublicSuffixList
        suffixes = PublicSuffixList(["example"])

        def known(self, name):
            return DnsAnswer("ok", ((name + ".", "TXT", b"v=DMARC1; p=quarantine"),))

    path = mailman_copy / "lists" / "discuss" / "config.pck"
    data = loads_mailman2(path.read_bytes(), encoding="bytes")
    data[b"dmarc_moderation_action"] = 3
    data.pop(b"dmarc_quarantine_moderation_action", None)
    path.write_bytes(pickle.dumps(data, protocol=3))
    assert "dmarc_quarantine" not in read_list(mailman_copy / "lists" / "discuss").content
    headers = parse_message(b"From: Pat <pat@corp.example>\n")
    for flag, verdict in ((None, Verdict.REJECT), (0, Verdict.ACCEPT),
                          (1, Verdict.REJECT)):
        if flag is not None:
            data[b"dmarc_quarantine_moderation_action"] = flag
            path.write_bytes(pickle.dumps(data, protocol=3))
            assert read_list(mailman_copy / "lists" / "discuss").content[
                "dmarc_quarantine"] is bool(flag)
        import_path(store, mailman_copy)
        snap, _ = snapshot_of(store)
        assert snap.lists[DISCUSS].content.dmarc_quarantine is (flag is None or bool(flag))
        decision = decide(snap, Query(DISCUSS, "pat@corp.example", message=headers),
                          dmarc=Quarantined())
        if verdict is Verdict.REJECT:
            assert (decision.verdict, decision.rule) == (verdict, "dmarc-moderation"), \
                decision.trace
        else:
            assert decision.rule != "dmarc-moderation", decision.trace
