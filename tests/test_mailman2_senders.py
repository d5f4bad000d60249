"""policyd's Mailman 2 reading of a sender header, held to Python 2.7's own
``email.Utils.getaddresses`` and ``parseaddr`` (what Mailman 2.1's ``get_senders`` and
``get_sender`` call), recorded in tests/mailman2/fixtures/headers/getaddresses.json by
tests/mailman2/make_getaddresses.py under CPython 2.7.18: 2,000 header values, hand-picked
shapes first, then generated ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policyd.core.addresses import first_address_mailman2, normalise_mailman2, parse_header
from policyd.core.chain import decide
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action, Mode, Query, Verdict

FIXTURE = Path(__file__).parent / "mailman2" / "fixtures" / "headers" / "getaddresses.json"
ROWS = json.loads(FIXTURE.read_text(encoding="utf-8"))["rows"]


def _members_view(addresses) -> list[str]:
    """What a member lookup can see of Mailman 2's addresses: the ones that are
    addresses, normalised (policyd's member keys are normalised the same way)."""
    return [a for a in map(normalise_mailman2, addresses) if a is not None]


def test_the_fixture_was_written_by_python_2_7():
    assert json.loads(FIXTURE.read_text(encoding="utf-8"))["python"].startswith("2.7.")
    assert len(ROWS) == 2000


def test_every_header_yields_the_addresses_mailman_2_reads():
    differ = [(row["value"], parse_header(row["value"]), _members_view(row["getaddresses"]))
              for row in ROWS
              if list(parse_header(row["value"])) != _members_view(row["getaddresses"])]
    assert not differ, differ[:10]


def test_the_first_address_is_the_one_mailman_2_checks_the_nonmember_lists_with():
    differ = []
    for row in ROWS:
        expected = row["parseaddr"] or None
        if expected is not None:
            expected = normalise_mailman2(expected) or expected.lower()
        if first_address_mailman2(row["value"]) != expected:
            differ.append((row["value"], first_address_mailman2(row["value"]), expected))
    assert not differ, differ[:10]


LIST = "test@lists.example.com"


def _snapshot(**settings):
    spec = ListSpec(LIST, mode=Mode.MAILMAN2, members=(MemberSpec("pat@example.com"),),
                    **settings)
    return build([spec], domains={"lists.example.com": "lists.example.com"})


@pytest.mark.parametrize("from_header", [
    "pat@example.com <stranger@outside.example>",
    "<stranger@outside.example>pat@example.com",
    '"S" <stranger@outside.example> <pat@example.com>',
])
def test_a_member_address_anywhere_mailman_2_finds_it_makes_a_member_post(from_header):
    """Mailman 2.1 reads each of these From: values as two addresses, the member's among
    them: a member post, not a nonmember's refused with a 5xx."""
    snap = _snapshot(default_nonmember_action=Action.REJECT)
    decision = decide(snap, Query(LIST, "bounce@outside.example", from_header))
    assert decision.verdict is Verdict.ACCEPT, decision.trace


def test_the_nonmember_lists_see_the_first_address_even_when_it_is_no_address():
    """``get_sender()`` takes the first address ``getaddresses`` gives, whatever it is:
    ``John`` (from ``John Doe``) is checked against the nonmember entries, so a regex
    entry can match it and the next address is not looked at."""
    snap = _snapshot(default_nonmember_action=Action.HOLD,
                     discard_these_nonmembers=("^john$",),
                     reject_these_nonmembers=("x@outside.example",))
    decision = decide(snap, Query(LIST, "bounce@outside.example",
                                  "John Doe, x@outside.example"))
    assert (decision.verdict, decision.rule) == (Verdict.DISCARD, "nonmember-moderation")
