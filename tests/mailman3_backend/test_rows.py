"""specs_from_rows: Mailman 3's membership semantics on hand-made rows (no database), and
the Mailman 3 restricted unpickler."""

from __future__ import annotations

import os
import pickle

import pytest

from policyd.core.snapshot import build
from policyd.store.mailman3 import specs_from_rows
from policyd.store.safe_pickle import UnsafePickleError, loads_mailman3_list
from policyd.core.verdict import Action

# What Mailman 3.3.10 (SQLAlchemy 2, MutableList.as_mutable(PickleType)) wrote for
# accept_these_nonmembers = ['^acc.*@x\\.org', 'ok@x.org'], copied from a database
# tests/mailman3_backend/mm3_build.py made.
MAILMAN_PICKLE = bytes.fromhex(
    "8005954D000000000000008C1673716C616C6368656D792E6578742E6D757461626C65948C0B4D75"
    "7461626C654C6973749493945D94288C0D5E6163632E2A40785C2E6F7267948C086F6B40782E6F72"
    "679465859452942E")
MAILMAN_EMPTY = bytes.fromhex(
    "80059530000000000000008C1673716C616C6368656D792E6578742E6D757461626C65948C0B4D75"
    "7461626C654C6973749493945D94859452942E")

LIST = ("test", "example.com", "test.example.com", "Test", 4, 0, False,
        None, None, None, None, "")


def specs(lists=(LIST,), addresses=(), users=(), members=(), bans=(), domains=()):
    return specs_from_rows(list(domains), list(lists), list(addresses), list(users),
                           list(members), list(bans))


def test_unpickles_what_mailman_writes():
    assert loads_mailman3_list(MAILMAN_PICKLE) == ["^acc.*@x\\.org", "ok@x.org"]
    assert loads_mailman3_list(MAILMAN_EMPTY) == []
    assert loads_mailman3_list(memoryview(MAILMAN_PICKLE)) == ["^acc.*@x\\.org", "ok@x.org"]
    assert loads_mailman3_list(None) == []
    for protocol in range(0, 6):
        assert loads_mailman3_list(pickle.dumps(["a@b", "c@d"], protocol)) == ["a@b", "c@d"]
    for protocol in range(3, 6):  # bytes need protocol 3 (below it: _codecs.encode, refused)
        assert loads_mailman3_list(pickle.dumps(["a@b", b"c@d"], protocol)) == ["a@b", "c@d"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/policyd-should-not-exist",))


@pytest.mark.parametrize("data, words", [
    (pickle.dumps(Evil()), "refusing to load global posix.system"),
    (pickle.dumps([Evil()], 2), "refusing to load global posix.system"),
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "refusing to load global builtins.eval"),
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "refusing to load global __builtin__.eval"),
    (pickle.dumps({"a": 1}), "expected a list"),
    (pickle.dumps([1, 2]), "expected a list of strings"),
    (b"\x80\x05not a pickle", "not a readable pickle"),
    (MAILMAN_PICKLE[:-5], "not a readable pickle"),
])
def test_refuses_anything_else(data, words):
    with pytest.raises(UnsafePickleError, match=words.replace(".", r"\.")):
        loads_mailman3_list(data)
    assert not os.path.exists("/tmp/policyd-should-not-exist")


def test_members_by_address_and_through_a_user():
    """A user membership is the user's preferred address; a direct membership of the same
    address wins; a user without a preferred address is unreachable; owners/moderators are
    not members."""
    addresses = [(1, "a@x", None), (2, "u@x", 10), (3, "u2@x", 10), (4, "v@x", 11),
                 (5, "w@x", 12)]
    users = [(10, 2)]  # user 11, 12: no preferred address
    members = [
        ("test.example.com", 1, None, 1, None),
        ("test.example.com", 1, 0, None, 10),       # through user 10 -> u@x, hold
        ("test.example.com", 1, 2, 2, None),        # u@x directly, discard: wins
        ("test.example.com", 1, 1, None, 11),       # no preferred address: unreachable
        ("test.example.com", 2, 3, 5, None),        # owner
        ("test.example.com", 3, 3, 5, None),        # moderator
        ("test.example.com", 4, 1, 4, None),        # nonmember v@x reject
        ("other.example.com", 1, None, 4, None),    # another list
    ]
    (spec,), _, _, problems = specs(addresses=addresses, users=users, members=members)
    assert {m.address: m.action for m in spec.members} == {"a@x": None,
                                                           "u@x": Action.DISCARD}
    assert spec.user_aliases == {"u2@x": "u@x"}
    assert {m.address: m.action for m in spec.nonmembers} == {"v@x": Action.REJECT}
    assert problems == []


def test_aliases_follow_the_users_address_order():
    """The first of the user's addresses (in database order) that is a member is the one
    the other addresses post as; member addresses are never aliases."""
    addresses = [(7, "late@x", 1), (3, "early@x", 1), (5, "plain@x", 1), (9, "solo@x", 2)]
    members = [("test.example.com", 1, 0, 3, None), ("test.example.com", 1, 1, 7, None),
               ("test.example.com", 1, None, 9, None)]
    (spec,), *_ = specs(addresses=addresses, members=members)
    assert spec.user_aliases == {"plain@x": "late@x"}
    snapshot = build([spec])
    assert snapshot.lists["test@example.com"].find_member("plain@x") == ("late@x",
                                                                        Action.REJECT)


def test_list_settings_domains_and_bans():
    lists = [("a", "example.com", "a.example.com", None, 0, 2, 1,
              pickle.dumps(["acc@x"]), None, MAILMAN_EMPTY, pickle.dumps(["^d"]), "Go away"),
             ("b", "example.com", "b.example.com", "B", None, None, None,
              None, None, None, None, None)]
    domains = [("example.com", "alias.example.com"), ("plain.org", None)]
    bans = [("^spam", None), ("x@y", "a.example.com"), ("z@y", "gone.example.com")]
    (a, b), domain_map, site_bans, problems = specs(lists=lists, domains=domains, bans=bans)
    assert domain_map == {"example.com": "example.com", "alias.example.com": "example.com",
                          "plain.org": "plain.org"}
    assert (a.default_member_action, a.default_nonmember_action, a.emergency) == (
        Action.HOLD, Action.DISCARD, True)
    assert a.accept_these_nonmembers == ("acc@x",)
    assert a.discard_these_nonmembers == ("^d",)
    assert a.rejection_notice == "Go away" and a.display_name == "a"
    assert a.bans == ("x@y",) and site_bans == ("^spam",)
    # NULL defaults: member -> defer (Mailman's rule has no opinion); nonmember -> hold,
    # reported, since Mailman itself would fail on it.
    assert (b.default_member_action, b.default_nonmember_action) == (Action.DEFER,
                                                                     Action.HOLD)
    assert b.rejection_notice is None and b.emergency is False
    assert len(problems) == 1 and "b@example.com" in problems[0]


OTHER = ("other", "example.com", "other.example.com", "Other", 4, 1, False,
         None, None, None, None, "")


@pytest.mark.parametrize("lists, members, words", [
    # An unknown action in one member row of the list.
    ([LIST, OTHER], [("test.example.com", 1, 9, 1, None)],
     "a member row: member.moderation_action: unknown Mailman action 9"),
    # A pickle that would run code, and one that is not a pickle at all.
    ([LIST[:7] + (pickle.dumps(Evil()),) + LIST[8:], OTHER], [],
     "mailinglist.accept_these_nonmembers holds a pickle policyd will not load: "
     "refusing to load global posix.system"),
    ([LIST[:9] + (b"\x80\x05garbage",) + LIST[10:], OTHER], [],
     "mailinglist.reject_these_nonmembers holds a pickle policyd will not load: "
     "not a readable pickle"),
    # An unknown default action in the list's own row.
    ([LIST[:4] + (17,) + LIST[5:], OTHER], [],
     "default_member_action: unknown Mailman action 17"),
])
def test_an_unreadable_list_is_broken_alone(lists, members, words):
    """A list whose rows cannot be interpreted comes back marked ``broken`` with the
    reason, and nothing else of it; the other lists are read as usual."""
    members = members + [("other.example.com", 1, None, 1, None)]
    (bad, other), _, _, problems = specs(lists=lists, addresses=[(1, "a@x", None)],
                                         members=members)
    assert bad.posting_address == "test@example.com" and bad.list_id == "test.example.com"
    assert words in bad.broken
    assert (bad.members, bad.accept_these_nonmembers, bad.bans) == ((), (), ())
    assert other.broken is None
    assert other.default_nonmember_action is Action.REJECT
    assert [m.address for m in other.members] == ["a@x"]
    assert problems == []
    snapshot = build([bad, other])
    assert dict(snapshot.broken) == {"test@example.com": bad.broken}
    assert snapshot.lists["test@example.com"].broken == bad.broken
    assert snapshot.lists["other@example.com"].broken is None
    assert not os.path.exists("/tmp/policyd-should-not-exist")


def test_sqlite_hash_sum_does_not_cancel_swapped_edits():
    """The SQLite change digest (``policyd_hash_sum``) of two rows whose last columns swap
    values (one user's preferred address cleared while another user gets it; one
    member's action up, another's down) differs from the old one.  CPython's tuple hash
    alone cancelled here for every pair of small ids, and the incremental refresh kept
    serving the old members."""
    from policyd.store.mailman3 import _HashSum

    def digest(rows):
        total = _HashSum()
        for row in rows:
            total.step(*row)
        return total.finalize()

    values = [None, 0, 1, 2, 3, 4, 99, "a0@x.org", "a1@x.org"]
    for first in range(1, 12):
        for second in range(first + 1, 12):
            for v in values:
                for w in values:
                    if v == w:
                        continue
                    before = digest([(first, v), (second, w)])
                    after = digest([(first, w), (second, v)])
                    assert before != after, (first, second, v, w)
                    assert digest([(first, v, 7), (second, w, 7)]) != digest(
                        [(first, w, 7), (second, v, 7)]), (first, second, v, w)
