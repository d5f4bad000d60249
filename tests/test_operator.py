"""Operator items of issue 15: ``[rules] null_sender`` and the Postfix decision line's
client and queue fields."""

from __future__ import annotations

import io

import pytest
from twisted.internet.task import Clock

from policyd.config import ConfigError, parse
from policyd.core.chain import decide
from policyd.core.replies import ReplyPolicy
from policyd.core.verdict import Query, Verdict
from policyd.decider import Decider, FixedSnapshot
from policyd.logging import DecisionLog, LineWriter, log_fields
from policyd.protocols.postfix import PostfixFactory, PostfixRequest

from .protocols.fakes import LIST, MEMBER, NONMEMBER, sample_snapshot

REQUEST = "test-request@lists.example.com"


# --- [rules] null_sender ----------------------------------------------------------------


def test_null_sender_default_is_reject():
    assert parse("").rules.null_sender == "reject"
    decision = decide(sample_snapshot(), Query(LIST, "", from_header=MEMBER))
    assert (decision.verdict, decision.rule) == (Verdict.REJECT, "null-sender")


@pytest.mark.parametrize("recipient, from_header, verdict, rule", [
    (LIST, MEMBER, Verdict.ACCEPT, "accept"),             # Mailman takes it from From:
    (LIST, NONMEMBER, Verdict.REJECT, "nonmember-moderation"),
    # No sender seen and no message: Mailman decides from the From: not sent here.
    (LIST, None, Verdict.ACCEPT, "accept"),
    (REQUEST, None, Verdict.ACCEPT, "administrative-address"),
    ("nolist@lists.example.com", None, Verdict.REJECT, "unknown-list"),
])
def test_null_sender_mailman_leaves_the_post_to_the_list_chain(recipient, from_header,
                                                               verdict, rule):
    decision = decide(sample_snapshot(), Query(recipient, "", from_header=from_header),
                      null_sender="mailman")
    assert (decision.verdict, decision.rule) == (verdict, rule)
    assert all(step.rule != "null-sender" for step in decision.trace)


def test_null_sender_setting_reaches_the_daemons_decider():
    config = parse("[rules]\nnull_sender = mailman\n")
    assert config.rules.null_sender == "mailman"
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy(),
                      null_sender=config.rules.null_sender)
    answer = decider.decide(Query(LIST, "", from_header=MEMBER), "exim")
    assert answer.decision.rule == "accept"


def test_null_sender_bad_value_names_the_choices():
    with pytest.raises(ConfigError, match=r"\[rules\] null_sender = 'accept' is not valid "
                                          r"\(allowed: reject, mailman\)"):
        parse("[rules]\nnull_sender = accept\n")


# --- the Postfix decision line ------------------------------------------------------------


def postfix_line(attributes: dict) -> str:
    stream = io.StringIO()
    log = DecisionLog(writer=LineWriter(stream, journal=True))
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy())
    factory = PostfixFactory(decider, parse("").postfix, Clock(), log)
    request = {b"protocol_state": b"RCPT", b"recipient": LIST.encode(),
               b"sender": NONMEMBER.encode()}
    request.update(attributes)
    factory.answer(PostfixRequest(request))
    return stream.getvalue()


def test_postfix_line_carries_client_and_queue_fields():
    line = postfix_line({b"client_address": b"203.0.113.5", b"client_name": b"mx.example.org",
                         b"queue_id": b"4F2AbC1", b"sasl_username": b"alice",
                         b"instance": b"1a.2b"})
    assert line.rstrip("\n").endswith(
        " id=4F2AbC1 client_address=203.0.113.5 client_name=mx.example.org "
        "queue_id=4F2AbC1 sasl_username=alice")


def test_postfix_line_leaves_out_absent_and_empty_fields():
    line = postfix_line({b"client_address": b"192.0.2.1", b"queue_id": b""})
    assert line.rstrip("\n").endswith("ms client_address=192.0.2.1")


def test_postfix_fields_are_escaped():
    """A SASL user name with spaces, quotes or a newline cannot forge a field or a line."""
    line = postfix_line({b"sasl_username": b'a b" rule=accept\nx', b"client_address": b"::1"})
    assert line.count("\n") == 1
    assert line.endswith(' client_address=::1 sasl_username="a b\\" rule=accept\\nx"\n')


def test_log_fields_quoting():
    assert log_fields([("a", "plain-1.2@x"), ("b", None), ("c", ""), ("d", 'x\\y z')]) == \
        ' a=plain-1.2@x d="x\\\\y z"'


def test_trouble_lines_carry_the_fields_too():
    events = []
    log = DecisionLog()
    log.log.info = lambda fmt, **fields: events.append(fields)  # noqa: E731
    decider = Decider(FixedSnapshot(None), ReplyPolicy())
    decider.snapshots.unavailable_reason = "no snapshot"
    factory = PostfixFactory(decider, parse("").postfix, Clock(), log)
    factory.answer(PostfixRequest({b"protocol_state": b"RCPT", b"recipient": LIST.encode(),
                                   b"sender": b"", b"client_address": b"198.51.100.7"}))
    assert events and events[0]["request"] == " client_address=198.51.100.7"
