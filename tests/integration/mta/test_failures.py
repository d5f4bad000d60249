"""Failing safe: policyd stopped, or something answering on its sockets that policyd never
would (garbage, hang-ups, wrong reply classes, slowness).  Every such case must cost the
client a 4xx: never a 5xx, never silent acceptance.

policyd is stopped for this whole module and started again at its end.  The "something
else" is the StandIn socket server of harness.py, bound at policyd's socket paths; it also
records the requests, so the wire format the contrib ACLs send is checked here too.
"""

from __future__ import annotations

import base64
import time

import pytest

from .conftest import ANNOUNCE, MEMBER, NONMEMBER
from .harness import USER_DOMAIN, Message, StandIn, find_in_maildir, is_data_request, \
    wait_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

SOMEONE = f"someone@{USER_DOMAIN}"
UNAVAILABLE = (451, "4.3.0 List policy service unavailable, please try again later")
PF_UNAVAILABLE = (451, f"4.3.5 <{ANNOUNCE}>: Recipient address rejected: "
                       "List policy service unavailable, please try again later")


@pytest.fixture(scope="module")
def stopped(policyd, exim, postfix, layout):
    """policyd stopped (its sockets gone) for this module; started again afterwards."""
    policyd.stop()
    assert not layout.exim_socket.exists() and not layout.postfix_socket.exists()
    try:
        yield layout
    finally:
        policyd.start()


@pytest.fixture
def standin(stopped):
    with StandIn(stopped.exim_socket, stopped.postfix_socket) as server:
        yield server


def member_post(*extra_recipients: str) -> Message:
    return Message(MEMBER, [ANNOUNCE, *extra_recipients], [f"From: <{MEMBER}>"])


# --- policyd stopped -------------------------------------------------------------------------


def test_stopped_exim_bh_defers_list_recipient_only(exim, stopped):
    """No daemon: the list recipient gets 451 at RCPT; a non-list recipient of the same
    message is accepted (it never depends on policyd)."""
    result, _ = exim.bh(member_post(SOMEONE))
    assert result.rcpt == [UNAVAILABLE, (250, "Accepted")], result
    assert result.accepted, result


def test_stopped_exim_daemon(exim, stopped):
    message = member_post(SOMEONE)
    result = exim.send(message)
    assert result.rcpt[0] == UNAVAILABLE, result
    assert result.accepted, result
    wait_delivered(exim.maildir / "users", message.tag)


def test_stopped_postfix(postfix, stopped):
    """Postfix cannot reach policyd: default_action of the contrib lines, a 451."""
    result = postfix.send(member_post())
    assert result.rcpt == [PF_UNAVAILABLE], result
    assert result.data is None


# --- answers policyd never gives --------------------------------------------------------------


BAD_ANSWERS = {
    "garbage": b"\x00\xffWHAT?",
    "lower-case-keyword": b"accept 250 2.1.5 ok",
    "empty": b"",
    "hang-up-without-answer": None,
    "reject-with-a-4xx-code": b"REJECT 450 4.7.1 wrong class",
    "defer-with-a-5xx-code": b"DEFER 550 5.7.1 wrong class",
    "discard-with-a-5xx-code": b"DISCARD 550 5.7.1 wrong class",
    "accept-without-codes": b"ACCEPT",
    "two-lines": b"ACCEPT 250 2.1.5 ok\nREJECT 550 5.7.1 second line",
    "nul-cuts-the-answer": b"\x00ACCEPT 250 2.1.5 ok",
    "slower-than-POLICYD_TIMEOUT": 3.0,
}


@pytest.mark.parametrize("name", BAD_ANSWERS)
def test_unusable_answer_at_rcpt_is_451(exim, standin, name):
    answer = BAD_ANSWERS[name]
    standin.answer = lambda line: answer
    started = time.monotonic()
    result, _ = exim.bh(member_post(), "POLICYD_TIMEOUT=1s")
    assert result.rcpt == [UNAVAILABLE], result
    assert result.data is None
    if name.startswith("slower"):
        assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize("name", BAD_ANSWERS)
def test_unusable_answer_at_data_is_451(exim, standin, name):
    """The RCPT question gets a good answer, the DATA question a bad one: 451 after DATA."""
    answer = BAD_ANSWERS[name]
    standin.answer = lambda line: answer if is_data_request(line) else b"ACCEPT 250 2.1.5 ok"
    result, _ = exim.bh(member_post(), "POLICYD_TIMEOUT=1s")
    assert result.rcpt == [(250, "Accepted")], result
    assert result.data == UNAVAILABLE, result


def test_trailing_newline_is_tolerated(exim, standin):
    standin.answer = lambda line: (b"REJECT 554 5.7.1 tolerated\n" if is_data_request(line)
                                   else b"ACCEPT 250 2.1.5 ok\n")
    result, _ = exim.bh(member_post())
    assert result.data == (554, "5.7.1 tolerated"), result


def test_unusable_answers_in_the_exim_daemon(exim, standin):
    """The same through a real Exim daemon (it connects as Debian-exim): garbage at RCPT,
    a hang-up at DATA, a 5xx DEFER at DATA; nothing is delivered."""
    standin.answer = lambda line: b"garbage"
    assert exim.send(member_post()).rcpt == [UNAVAILABLE]
    for bad in (None, b"DEFER 550 5.7.1 wrong class"):
        standin.answer = lambda line: bad if is_data_request(line) else b"ACCEPT 250 2.1.5 ok"
        message = member_post()
        result = exim.send(message)
        assert result.data == UNAVAILABLE, result
        assert find_in_maildir(exim.maildir / "lists", message.tag) is None


def test_postfix_garbage_is_451(postfix, standin):
    standin.postfix_reply = b"this is not a policy reply\n\n"
    result = postfix.send(member_post())
    assert result.rcpt == [PF_UNAVAILABLE], result


def test_hold_freezes_the_message_in_exim(exim, standin):
    """POLICYD_HOLD = freeze (the default): a HOLD answer is accepted and frozen in Exim's
    queue, not delivered."""
    standin.answer = lambda line: (b"HOLD 250 2.6.0 held for the moderators"
                                   if is_data_request(line) else b"ACCEPT 250 2.1.5 ok")
    message = member_post()
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 250, result
    message_id = result.data[1].split("id=")[-1]
    try:
        queue = wait_until(lambda: (q := exim.queue()) and message_id in q and q, 10,
                           f"{message_id} in Exim's queue")
        assert any(message_id in line and "*** frozen ***" in line
                   for line in queue.splitlines()), queue
        assert find_in_maildir(exim.maildir / "lists", message.tag) is None
    finally:
        exim.remove_from_queue(message_id)


# --- what goes on the wire ---------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_requests_follow_the_wire_format(exim, standin):
    """RCPT: ``POLICYD/1 list=<rcpt> sender=<b64>``; DATA: list, sender, the whole header
    block, the visible start of the body and the size, in base64, the client and the id
    (the raw From:, Reply-To: and Sender: only with a block longer than
    POLICYD_MAX_HEADERS: ``test_a_cut_header_block_comes_with_the_address_fields``)."""
    standin.answer = lambda line: b"ACCEPT 250 2.1.5 ok"
    froms = [f"From: Eve <{NONMEMBER}>", f"From: =?utf-8?Q?Member=2C_Carol?= <{MEMBER}>"]
    message = Message(NONMEMBER, [ANNOUNCE],
                      froms + ["Reply-To: <reply@x.example>", "Sender: <sender@x.example>"])
    result, _ = exim.bh(message)
    assert result.accepted, result
    rcpt_line, data_line = standin.requests[-2:]
    assert rcpt_line == f"POLICYD/1 list={ANNOUNCE} sender={b64(NONMEMBER)}".encode()
    words = data_line.decode().split(" ")
    assert words[0] == "POLICYD/1"
    fields = dict(word.split("=", 1) for word in words[1:])
    assert set(fields) == {"list", "sender", "id", "headers", "body", "size", "client"}
    decode = lambda key: base64.b64decode(fields[key]).decode()  # noqa: E731
    assert fields["list"] == ANNOUNCE
    assert decode("sender") == NONMEMBER
    block = decode("headers")
    assert all(h in block for h in froms) and "Reply-To: <reply@x.example>" in block
    assert int(fields["size"]) > 0
    assert fields["id"]


def test_a_cut_header_block_comes_with_the_address_fields(exim, standin):
    """A header block longer than POLICYD_MAX_HEADERS: cut there, ``headers_cut=1``, and
    the raw From: (all of them, undecoded), Reply-To: and Sender: whole beside it."""
    standin.answer = lambda line: b"ACCEPT 250 2.1.5 ok"
    froms = [f"From: Eve <{NONMEMBER}>", f"From: =?utf-8?Q?Member=2C_Carol?= <{MEMBER}>"]
    trace = [f"X-Trace-{i}: {'t' * 200}" for i in range(200)]  # 40 KB above them
    message = Message(NONMEMBER, [ANNOUNCE],
                      trace + froms + ["Reply-To: <reply@x.example>", "Sender: <sender@x.example>"])
    result, _ = exim.bh(message)
    assert result.accepted, result
    words = standin.requests[-1].decode().split(" ")
    fields = dict(word.split("=", 1) for word in words[1:])
    assert set(fields) == {"list", "sender", "id", "headers", "headers_cut", "from",
                           "reply_to", "sender_header", "body", "size", "client"}
    decode = lambda key: base64.b64decode(fields[key]).decode()  # noqa: E731
    assert fields["headers_cut"] == "1"
    assert len(decode("headers")) == 32768 and "From:" not in decode("headers")
    assert decode("from") == "".join(" " + h.split(": ", 1)[1] + "\n" for h in froms)
    assert decode("reply_to") == " <reply@x.example>\n"
    assert decode("sender_header") == " <sender@x.example>\n"


def test_null_sender_is_an_empty_sender_value(exim, standin):
    standin.answer = lambda line: b"ACCEPT 250 2.1.5 ok"
    message = Message("", [ANNOUNCE], ["From: <mailer-daemon@x.example>"])
    result, _ = exim.bh(message)
    assert result.accepted, result
    assert standin.requests[-2].endswith(b" sender=")
    assert b" sender= headers=" in standin.requests[-1]
