"""SMTP-time moderation (``smtp_moderation = moderate`` and ``greylist``) through the
real Exim daemon, contrib/exim/ unchanged, the real policyd and ``policyctl``.

The sending MTA is the test's SMTP client: a retry is the same message (same
Message-ID, same client network) sent again, as a sending MTA's queue run would.

``quick_greylist`` (also used by test_postfix_greylist.py) restarts policyd for one
module with ``[moderation] min_delay = 1`` and a metrics endpoint, and restores the
session's configuration afterwards.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import NONMEMBER, policyctl, write_policyd_config
from .harness import LIST_DOMAIN, Message, free_port, wait_delivered, wait_until
from .. import fresh_page

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


# --- greylist -----------------------------------------------------------------------------

GREYLIST = f"greytest@{LIST_DOMAIN}"


def greylisted_text(address: str) -> str:
    return (f"Greylisted: temporary deferral of a first post to {address}, "
            "please retry later")


class QuickGreylist:
    """The session's policyd, restarted with ``min_delay = 1`` and a metrics endpoint."""

    def __init__(self, policyd, metrics_port: int) -> None:
        self.policyd = policyd
        self.config = policyd.config
        self.metrics_port = metrics_port

    def add_list(self, address: str) -> str:
        """A list that holds nonmembers, with ``smtp_moderation = greylist``, once the
        daemon has it and its moderation state is loaded."""
        policyctl(self.config, "list", "add", address, "--default-nonmember-action", "hold")
        policyctl(self.config, "list", "set", address, "--smtp-moderation", "greylist")
        wait_until(lambda: (self.moderation(address).get("mode") == "greylist"
                            and self.moderation(address).get("usable")), 30,
                   f"the daemon to load {address} with greylist and its state",
                   interval=0.2)
        return address

    def moderation(self, address: str) -> dict:
        """What ``policyctl query`` says the daemon holds for NONMEMBER on ``address``."""
        answer = json.loads(policyctl(self.config, "query", "--json", address, NONMEMBER))
        return answer.get("moderation") or {}

    def wait_retry_passes(self, address: str) -> None:
        """Until min_delay has passed by the daemon's clock: the daemon says the entry
        of the first attempt passes at the next retry (no timing asserted)."""
        wait_until(lambda: any(e["state"] == "passes at the next retry"
                               for e in self.moderation(address).get("greylist", ())),
                   30, "min_delay to pass for the greylist entry", interval=0.2)

    def metrics(self) -> dict:
        """(name, labels as sorted tuples) -> value, from the daemon's endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        fresh_page()
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}


@pytest.fixture(scope="module")
def quick_greylist(policyd, layout):
    normal = policyd.config
    port = free_port()
    config = write_policyd_config(layout, "policyd-greylist.conf", "safe")
    with open(config, "a", encoding="utf-8") as out:
        out.write(f"\n[moderation]\nmin_delay = 1\nsync_interval = 0.5\n"
                  f"\n[metrics]\nlisten = tcp:{port}:interface=127.0.0.1\n")
    policyd.stop()
    policyd.start(config)
    try:
        yield QuickGreylist(policyd, port)
    finally:
        policyd.stop()
        policyd.start(normal)


def attempts(metrics: dict, mode: str, outcome: str, transition: str) -> float:
    key = ("policyd_moderation_attempts_total",
           tuple(sorted({"mode": mode, "outcome": outcome, "transition": transition}.items())))
    return metrics.get(key, 0.0)


def test_greylisted_at_data_then_the_retry_after_min_delay_is_accepted(exim, quick_greylist):
    """A nonmember's post to a ``greylist`` list is deferred 451 4.7.1 at DATA; once
    min_delay has passed the retry gets the list's normal outcome (hold: accepted, for
    Mailman to hold) and is delivered; the sender is then remembered, so its next post
    is accepted at once.  The metrics count the deferral and the passes."""
    address = quick_greylist.add_list(GREYLIST)
    message = Message(NONMEMBER, [address], [f"From: Eve <{NONMEMBER}>"])
    result = exim.send(message)
    assert result.rcpt == [(250, "Accepted")], result  # never deferred at RCPT
    assert result.data == (451, f"4.7.1 {greylisted_text(address)}"), result
    [entry] = quick_greylist.moderation(address)["greylist"]
    assert (entry["network"], entry["message_id"]) == ("127.0.0.0/24",
                                                       f"<{message.tag}@test>")
    quick_greylist.wait_retry_passes(address)
    result = exim.send(message)
    assert result.accepted, result
    wait_delivered(exim.maildir / "lists", message.tag)
    second = Message(NONMEMBER, [address], [f"From: Eve <{NONMEMBER}>"])
    assert exim.send(second).accepted  # remembered: no deferral for a new post
    wait_delivered(exim.maildir / "lists", second.tag)
    metrics = quick_greylist.metrics()
    assert attempts(metrics, "greylist", "deferred", "first-attempt") == 1
    assert attempts(metrics, "greylist", "passed", "retry-in-window") == 1
    assert attempts(metrics, "greylist", "passed", "remembered") == 1
    wait_until(lambda: f"policyd: DEFER 451 4.7.1 {greylisted_text(address)}"
               in exim.mainlog(), 10, "Exim to log the deferral")
