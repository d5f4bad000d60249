"""SMTP-time moderation (``smtp_moderation = moderate``) through the real Exim daemon,
contrib/exim/ unchanged, the real policyd and ``policyctl``.

The sending MTA is the test's SMTP client: a retry is the same message (same
Message-ID, same client network) sent again, as a sending MTA's queue run would.
"""

from __future__ import annotations

import json
import re

import pytest

from .conftest import NONMEMBER, policyctl
from .harness import LIST_DOMAIN, Message, wait_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

MODLIST = f"modtest@{LIST_DOMAIN}"
TICKET = re.compile(r"Held for moderator approval, ticket ([A-Z0-9]{6})")


@pytest.fixture(scope="module")
def moderated_list(policyd):
    policyctl(policyd.config, "list", "add", MODLIST, "--default-nonmember-action", "hold")
    policyctl(policyd.config, "list", "set", MODLIST, "--smtp-moderation", "moderate")

    def mode():
        answer = json.loads(policyctl(policyd.config, "query", "--json", MODLIST,
                                      NONMEMBER))
        moderation = answer.get("moderation") or {}
        return moderation.get("mode") == "moderate" and moderation.get("usable")
    # The snapshot first, then the moderation state's first load (its next sync).
    wait_until(mode, 30, "the daemon to load smtp_moderation = moderate and its state",
               interval=0.2)
    return MODLIST


def held(exim, message: Message) -> str:
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 451, result
    match = TICKET.search(result.data[1])
    assert match, result
    return match.group(1)


def decided(policyd, ticket: str, decision: str) -> None:
    """Wait until the daemon has read the moderator's decision from the store."""
    def seen():
        answer = json.loads(policyctl(policyd.config, "query", "--json", MODLIST,
                                      NONMEMBER))
        return any(t["ticket"] == ticket and t["decision"] == decision
                   for t in (answer.get("moderation") or {}).get("tickets", ()))
    wait_until(seen, 30, f"the daemon to see {decision} of {ticket}", interval=0.5)


def test_held_with_a_ticket_then_approved_and_delivered(exim, policyd, moderated_list):
    """A nonmember's post is deferred with a ticket; ``policyctl pending`` lists it;
    after ``policyctl approve`` the retry is accepted and delivered."""
    message = Message(NONMEMBER, [moderated_list], [f"From: Eve <{NONMEMBER}>"])
    ticket = held(exim, message)
    assert held(exim, message) == ticket  # an early retry: the same ticket
    wait_until(lambda: ticket in policyctl(policyd.config, "pending", MODLIST), 30,
               "the ticket to reach the store", interval=0.5)
    pending = json.loads(policyctl(policyd.config, "pending", "--json"))
    [row] = [r for r in pending if r["ticket"] == ticket]
    assert (row["sender"], row["subject"], row["client"]) == (NONMEMBER, message.tag,
                                                              "127.0.0.1")
    policyctl(policyd.config, "approve", ticket)
    decided(policyd, ticket, "approve")
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 250, result
    wait_delivered(exim.maildir / "lists", message.tag)


def test_rejected_retry_gets_550_with_the_reason(exim, policyd, moderated_list):
    """After ``policyctl reject --reason``, the retry gets 550 5.7.1 with the reason:
    the sender's own MTA tells its user, policyd sends nothing."""
    message = Message(NONMEMBER, [moderated_list], [f"From: Eve <{NONMEMBER}>"])
    ticket = held(exim, message)
    wait_until(lambda: ticket in policyctl(policyd.config, "pending"), 30,
               "the ticket to reach the store", interval=0.5)
    policyctl(policyd.config, "reject", ticket, "--reason", "Off topic for this list")
    decided(policyd, ticket, "reject")
    result = exim.send(message)
    assert result.data == (550, "5.7.1 Off topic for this list"), result
