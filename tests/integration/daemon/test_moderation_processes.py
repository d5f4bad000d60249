"""SMTP-time moderation shared by two real daemon processes on one PostgreSQL database,
as two MX hosts sharing the native store: the first attempt at daemon A, the retry at
daemon B.  A runs under ``policyd``, B under ``twist policyd``.

Each daemon has its own run directory, sockets and configuration (``[moderation]
min_delay = 1``, ``sync_interval = 0.5``); ``policyctl`` writes the lists and the
moderator's decision to the database directly.  The questions are what the shipped Exim
DATA ACL sends: the header block (``headers=``, with the Message-ID) and ``client=``.
Every wait polls what a daemon says it holds (``policyctl query`` through its control
socket); no timing is asserted.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Run, b64, exim_ask, free_port, wait_until
from .test_postgres import pg_url
from .. import fresh_page

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

GREY = "grey@lists.example.com"
MODERATED = "moderated@lists.example.com"
MEMBER = "alice@example.com"
NONMEMBER = "bob@example.net"
TICKET = re.compile(rb"^DEFER 451 4\.7\.1 Held for moderator approval, ticket ([A-Z0-9]{6})$")
GREYLISTED = (b"DEFER 451 4.7.1 Greylisted: temporary deferral of a first post to "
              + GREY.encode() + b", please retry later")
MODERATION = "[moderation]\nmin_delay = 1\nsync_interval = 0.5\n"


def data_question(address: str, client: str, message_id: str) -> bytes:
    """The Exim DATA ACL's question for a nonmember's post (policyd-data.acl)."""
    headers = (f"From: Bob <{NONMEMBER}>\nSubject: a question\n"
               f"Message-ID: {message_id}\n")
    return (f"POLICYD/1 list={address} sender={b64(NONMEMBER)} headers={b64(headers)} "
            f"client={client} id=1").encode()


def held_for_moderation(run: Run, address: str) -> dict:
    """What the daemon of ``run`` holds for NONMEMBER on ``address``."""
    done = run.policyctl("query", "--json", address, NONMEMBER)
    return json.loads(done.stdout).get("moderation") or {}


def attempts(port: int) -> dict:
    """(mode, outcome, transition) -> count, from the daemon's metrics endpoint."""
    fresh_page()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {(s.labels["mode"], s.labels["outcome"], s.labels["transition"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "policyd_moderation_attempts_total"}


@pytest.fixture
def second_run():
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))  # short: socket paths
    yield Run(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def two_daemons(run, second_run, daemons, pg_database):
    """Daemons A and B on one fresh PostgreSQL database with a ``greylist`` and a
    ``moderate`` list (both hold nonmembers), each with its moderation state loaded.
    B serves metrics; yields (A's run, B's run, B's metrics port)."""
    url = pg_url(pg_database)
    port = free_port()
    run.write_config(url=url, extra=MODERATION)
    second_run.write_config(url=url, extra=MODERATION
                            + f"[metrics]\nlisten = tcp:{port}:interface=127.0.0.1\n")
    run.policyctl("init")
    for address, mode in ((GREY, "greylist"), (MODERATED, "moderate")):
        run.policyctl("list", "add", address, "--default-nonmember-action", "hold")
        run.policyctl("member", "add", address, MEMBER)
        run.policyctl("list", "set", address, "--smtp-moderation", mode)
    a = daemons(run, launcher="policyd")
    b = daemons(second_run, launcher="twist")
    for daemon, where in ((a, run), (b, second_run)):
        daemon.wait_ready()
        wait_until(lambda: all(held_for_moderation(where, address).get("usable")
                               for address in (GREY, MODERATED)),
                   30, "the daemon's moderation state to load", interval=0.2)
    yield run, second_run, port
    for daemon in (a, b):
        assert daemon.terminate() == 0


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_greylisted_at_a_retry_at_b_after_min_delay_passes(two_daemons):
    """A defers the first attempt (451 4.7.1); B, once it has read A's entry and
    min_delay has passed, lets the retry from another host of the sender's /24
    through to the list's normal outcome (accepted, for Mailman to hold)."""
    a, b, port = two_daemons
    message_id = "<greylist-1@example.net>"
    assert exim_ask(a.exim_socket, data_question(GREY, "192.0.2.10", message_id)) \
        == GREYLISTED
    wait_until(lambda: any(entry["state"] == "passes at the next retry"
                           for entry in held_for_moderation(b, GREY).get("greylist", ())),
               30, "B to read A's greylist entry, min_delay past", interval=0.2)
    answer = exim_ask(b.exim_socket, data_question(GREY, "192.0.2.99", message_id))
    assert answer.startswith(b"ACCEPT 250 "), answer
    assert attempts(port) == {("greylist", "passed", "retry-in-window"): 1}


@pytest.mark.parametrize("daemons", ["policyd"], indirect=True)
def test_ticket_at_a_approved_in_the_store_retry_at_b_accepted(two_daemons):
    """A holds the post with a ticket; ``policyctl pending`` finds it in the store and
    ``policyctl approve`` decides it there; B, once it has read the decision, accepts
    the retry as approved."""
    a, b, port = two_daemons
    message_id = "<moderate-1@example.net>"
    answer = exim_ask(a.exim_socket, data_question(MODERATED, "2001:db8::5", message_id))
    match = TICKET.match(answer)
    assert match, answer
    ticket = match.group(1).decode()
    wait_until(lambda: ticket in a.policyctl("pending", MODERATED).stdout, 30,
               "A to write the ticket to the store", interval=0.2)
    [row] = json.loads(a.policyctl("pending", "--json").stdout)
    assert (row["ticket"], row["sender"], row["message_id"], row["client"]) == (
        ticket, NONMEMBER, message_id, "2001:db8::5")
    b.policyctl("approve", ticket)
    wait_until(lambda: any(t["ticket"] == ticket and t["decision"] == "approve"
                           for t in held_for_moderation(b, MODERATED).get("tickets", ())),
               30, "B to read the approval", interval=0.2)
    answer = exim_ask(b.exim_socket, data_question(MODERATED, "2001:db8::77", message_id))
    assert answer == f"ACCEPT 250 2.1.5 approved by a moderator, ticket {ticket}".encode()
    assert attempts(port) == {("moderate", "approved", "approved"): 1}
