"""Regressions found by the agreement suite against the real Mailman 3.3.10
(tests/mailman): each row is a case where the engine used to answer differently from
Mailman's posting chain, with Mailman's answer."""

import pytest

from policyd.core.addresses import mailman3_raw_valid, parse_header_mailman3
from policyd.core.chain import decide
from policyd.core.rules import senders_mailman3
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action, Query, Verdict

LIST = "l@lists.example.com"
FRIENDS = "friends@lists.example.com"


def _snapshot(**settings):
    spec = ListSpec(LIST, default_member_action=Action.ACCEPT,
                    default_nonmember_action=Action.REJECT,
                    members=(MemberSpec("pat@example.com"),
                             MemberSpec("idn@xn--bcher-kva.example")), **settings)
    friends = ListSpec(FRIENDS, members=(MemberSpec("friend@example.com"),))
    return build([spec, friends], site_bans=("SiteBan@Outside.Example",))


@pytest.mark.parametrize("settings, sender, verdict, rule", [
    # Exact bans are an SQL equality with the lower-cased sender in Mailman: an entry
    # with capitals bans nobody (list and site-wide); ^regex bans are IGNORECASE.
    ({"bans": ("Banned@Outside.Example",)}, "banned@outside.example", Verdict.REJECT,
     "nonmember-moderation"),
    ({"bans": ("banned@outside.example",)}, "Banned@Outside.Example", Verdict.DISCARD,
     "banned-address"),
    ({"bans": ("^BANNED@",)}, "banned@outside.example", Verdict.DISCARD, "banned-address"),
    ({}, "siteban@outside.example", Verdict.REJECT, "nonmember-moderation"),
    # @list entries count in accept_these_nonmembers only, and name the list exactly.
    ({"hold_these_nonmembers": (f"@{FRIENDS}",)}, "friend@example.com", Verdict.REJECT,
     "nonmember-moderation"),
    ({"discard_these_nonmembers": (f"@{FRIENDS}",)}, "friend@example.com", Verdict.REJECT,
     "nonmember-moderation"),
    ({"accept_these_nonmembers": (f"@{FRIENDS}",)}, "friend@example.com", Verdict.ACCEPT,
     "accept"),
    ({"accept_these_nonmembers": (f"@{FRIENDS.upper()}",)}, "friend@example.com",
     Verdict.REJECT, "nonmember-moderation"),
    # Exact *_these_nonmembers entries compare verbatim with the lower-cased sender.
    ({"discard_these_nonmembers": ("Disc@Outside.Example",)}, "disc@outside.example",
     Verdict.REJECT, "nonmember-moderation"),
    # ... and so do entries and bans with stray white space: they never match.
    ({"hold_these_nonmembers": (" hold@outside.example",)}, "hold@outside.example",
     Verdict.REJECT, "nonmember-moderation"),
    ({"hold_these_nonmembers": ("^hold@ ",)}, "hold@outside.example", Verdict.REJECT,
     "nonmember-moderation"),
    ({"bans": ("banned@outside.example ",)}, "banned@outside.example", Verdict.REJECT,
     "nonmember-moderation"),
    ({"bans": (" ^banned",)}, "banned@outside.example", Verdict.REJECT,
     "nonmember-moderation"),
    # Addresses Mailman's validator drops as written never reach the membership check.
    ({}, "idn@bücher.example", Verdict.REJECT, "nonmember-moderation"),
    ({}, "idn@xn--bcher-kva.example", Verdict.ACCEPT, "member-moderation"),
    ({}, "pat@example.com.", Verdict.REJECT, "nonmember-moderation"),
    ({}, "pat@x@example.com", Verdict.REJECT, "nonmember-moderation"),
    ({}, "<@relay.example:pat@example.com>", Verdict.ACCEPT, "member-moderation"),
])
def test_agreement_regressions(settings, sender, verdict, rule):
    """From: ``sender``, envelope a nonmember: the verdict Mailman 3.3.10 gives."""
    decision = decide(_snapshot(**settings),
                      Query(LIST, "stranger@outside.example", sender))
    assert (decision.verdict, decision.rule) == (verdict, rule), decision.trace


def test_ignored_at_list_entries_are_reported():
    """A @list entry outside accept_these_nonmembers is reported as ignored."""
    snapshot = _snapshot(hold_these_nonmembers=(f"@{FRIENDS}",))
    assert any("only in accept_these_nonmembers" in p for p in snapshot.problems)


@pytest.mark.parametrize("spec, valid", [
    ("pat@example.com", True),
    ("PAT@EXAMPLE.COM", True),
    ("@relay.example:pat@example.com", True),
    ('"a@b"@example.com', True),
    ("pat@example.com.", False),
    ("pät@example.com", False),
    ("idn@bücher.example", False),
    ("pat@x@example.com", False),
    ("no-at-sign", False),
])
def test_mailman3_raw_valid(spec, valid):
    """Mailman 3 validates the address as written, before any normalisation."""
    assert mailman3_raw_valid(spec) is valid


@pytest.mark.parametrize("envelope, expected", [
    ("pat@example.com", ("pat@example.com",)),
    ("idn@bücher.example", ()),
    ("pat@example.com.", ()),
    ("", ()),
])
def test_envelope_sender_validated_as_written(envelope, expected):
    """The envelope sender joins Mailman 3's senders only if valid as written."""
    assert senders_mailman3(Query(LIST, envelope)) == expected


def test_header_parse_for_mailman3_keeps_order_and_drops_invalid():
    """Valid mailboxes keep their order; the invalid ones drop out of the middle."""
    value = "a@example.com, b@bücher.example, c@example.com., d@example.com"
    assert parse_header_mailman3(value) == ("a@example.com", "d@example.com")
