"""SMTP-time moderation with ``smtp_moderation = greylist`` through the real Postfix:
greylisted at RCPT (``client_address``, no Message-ID), whatever ``[postfix] mode``
says, and the retry after ``min_delay`` passes to the list's normal answer.

The sending MTA is the test's SMTP client: a retry is the same message sent again from
the same client network, as a sending MTA's queue run would.  policyd runs with
``[moderation] min_delay = 1`` for this module (``quick_greylist``).
"""

from __future__ import annotations

import pytest

from .conftest import NONMEMBER
from .harness import LIST_DOMAIN, Message, wait_delivered, wait_until
from .test_exim_moderation import attempts, greylisted_text, quick_greylist  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.mta]

GREYLIST = f"greypf@{LIST_DOMAIN}"


def test_greylisted_at_rcpt_then_the_retry_after_min_delay_is_accepted(postfix,
                                                                        quick_greylist):
    """A nonmember's post to a ``greylist`` list gets 451 4.7.1 at RCPT (no DATA);
    once min_delay has passed the retry is accepted (``[postfix] mode = safe``: the
    hold is Mailman's) and delivered.  The metrics count the deferral and the pass."""
    address = quick_greylist.add_list(GREYLIST)
    message = Message(NONMEMBER, [address], [f"From: Eve <{NONMEMBER}>"])
    result = postfix.send(message)
    assert result.rcpt == [(451, f"4.7.1 <{address}>: Recipient address rejected: "
                                 f"{greylisted_text(address)}")], result
    assert result.data is None, result
    [entry] = quick_greylist.moderation(address)["greylist"]
    assert (entry["network"], entry["message_id"]) == ("127.0.0.0/24", "")
    quick_greylist.wait_retry_passes(address)
    result = postfix.send(message)
    assert result.rcpt == [(250, "2.1.5 Ok")] and result.accepted, result
    wait_delivered(postfix.maildir / "lists", message.tag)
    metrics = quick_greylist.metrics()
    assert attempts(metrics, "greylist", "deferred", "first-attempt") == 1
    assert attempts(metrics, "greylist", "passed", "retry-in-window") == 1
    wait_until(lambda: f"Recipient address rejected: {greylisted_text(address)}"
               in postfix.maillog(), 10, "Postfix to log the deferral")


def test_policyctl_query_shows_the_451_postfix_gets_and_starts_nothing(postfix, policyd,
                                                                         quick_greylist):
    """``policyctl query --json --client`` shows the action the daemon answers Postfix,
    greylisting included (it showed ``DUNNO`` for a sender Postfix got the 451 for),
    and a query is read-only: it begins no greylist entry, so the real first attempt is
    still the first (counted once), and the action it shows is the reply Postfix gave."""
    import json

    from .conftest import policyctl

    address = quick_greylist.add_list(f"greypfq@{LIST_DOMAIN}")

    def query() -> dict:
        return json.loads(policyctl(policyd.config, "query", "--json", "--client",
                                    "127.0.0.1", address, NONMEMBER))

    before = attempts(quick_greylist.metrics(), "greylist", "deferred", "first-attempt")
    answer = query()
    assert answer["postfix"] == f"451 4.7.1 {greylisted_text(address)}", answer
    assert answer["moderation"]["postfix"]["starts_entry"] is True, answer
    assert query()["moderation"]["greylist"] == []  # the queries began no entry
    message = Message(NONMEMBER, [address], [f"From: Eve <{NONMEMBER}>"])
    result = postfix.send(message)
    assert result.rcpt == [(451, f"4.7.1 <{address}>: Recipient address rejected: "
                                 f"{greylisted_text(address)}")], result
    assert attempts(quick_greylist.metrics(), "greylist", "deferred",
                    "first-attempt") == before + 1
    quick_greylist.wait_retry_passes(address)
    answer = query()
    assert answer["postfix"] == "DUNNO", answer
    assert answer["moderation"]["postfix"]["transition"] == "retry-in-window", answer
    result = postfix.send(message)
    assert result.rcpt == [(250, "2.1.5 Ok")] and result.accepted, result
    wait_delivered(postfix.maildir / "lists", message.tag)
