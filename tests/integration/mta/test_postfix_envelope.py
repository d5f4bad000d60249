"""policyd's ``[postfix] mode = envelope``: the full decision on the envelope sender alone.

This is the documented trade-off of contrib/postfix/README.md: nonmembers are refused at
RCPT time with the list's notice, but so is a member's post that arrives with a
nonmember envelope sender (forwarders, SRS, VERP), which Mailman would accept.  policyd
runs with an envelope-mode configuration (same store, same sockets) for this module.
"""

from __future__ import annotations

import pytest

from .conftest import ANNOUNCE, MEMBER, MODERATED, NONMEMBER, NOTICE, QUIET, write_policyd_config
from .harness import LIST_DOMAIN, Message, find_in_maildir, wait_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

REFUSED = (550, f"5.7.1 <{ANNOUNCE}>: Recipient address rejected: {NOTICE}")


@pytest.fixture(scope="module")
def envelope_mode(policyd, postfix, layout):
    normal = policyd.config
    policyd.stop()
    policyd.start(write_policyd_config(layout, "policyd-envelope.conf", "envelope"))
    try:
        yield postfix
    finally:
        policyd.stop()
        policyd.start(normal)


def test_member_accepted(envelope_mode):
    message = Message(MEMBER, [ANNOUNCE], [f"From: <{MEMBER}>"])
    assert envelope_mode.send(message).accepted
    wait_delivered(envelope_mode.maildir / "lists", message.tag)


def test_moderated_member_accepted_for_mailman_to_hold(envelope_mode):
    assert envelope_mode.send(Message(MODERATED, [ANNOUNCE], [])).accepted


def test_nonmember_refused_at_rcpt_with_the_lists_notice(envelope_mode):
    result = envelope_mode.send(Message(NONMEMBER, [ANNOUNCE], [f"From: <{NONMEMBER}>"]))
    assert result.rcpt == [REFUSED], result


def test_member_from_with_nonmember_envelope_refused(envelope_mode):
    """The price of envelope mode: Postfix never sees the member's From:."""
    result = envelope_mode.send(Message(NONMEMBER, [ANNOUNCE], [f"From: Carol <{MEMBER}>"]))
    assert result.rcpt == [REFUSED], result


def test_discard_list_discarded_by_postfix(envelope_mode):
    message = Message(NONMEMBER, [QUIET], [f"From: <{NONMEMBER}>"])
    result = envelope_mode.send(message)
    assert result.accepted, result
    wait_until(lambda: f"discard: RCPT from unknown[127.0.0.1]: <{QUIET}>: Recipient address "
               "discarded by nonmember-moderation" in envelope_mode.maillog(),
               10, "Postfix to log the DISCARD")
    assert find_in_maildir(envelope_mode.maildir / "lists", message.tag) is None


def test_administrative_address_not_a_post(envelope_mode):
    message = Message(NONMEMBER, [f"announce-owner@{LIST_DOMAIN}"], [])
    assert envelope_mode.send(message).accepted
    wait_delivered(envelope_mode.maildir / "lists", message.tag)
