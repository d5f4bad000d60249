"""What goes on the wire for one decision: the exact Exim line, the Postfix action, and
``policyctl query``'s result that shows both."""

from __future__ import annotations


import pytest

from policyd.core.chain import decide
from policyd.core.replies import Outcome, ReplyPolicy, SmtpReply
from policyd.core.verdict import Query
from policyd.decider import Decider, FixedSnapshot
from policyd.protocols.control import query_result as _query_result
from policyd.protocols.exim import aggregate, reply_line as exim_reply_line
from policyd.protocols.postfix import postfix_action

from .fakes import HOLDING, LIST, MEMBER, NONMEMBER, OPEN, sample_snapshot

SNAP = sample_snapshot()
POLICY = ReplyPolicy()
HOLD_POLICY = ReplyPolicy(hold=Outcome.HOLD, discard=Outcome.DISCARD)
NOT_MEMBERS = ("Posting to test@lists.example.com is restricted to its members; your "
               "message was not accepted")


def answer(recipient, sender, mode, accept="dunno", policy=POLICY):
    decision = decide(SNAP, Query(recipient, sender))
    return postfix_action(decision, policy.reply(decision), mode, accept)


def query_result(snapshot, query, policy, *, postfix_mode, accept_action, decide,
                 now=None, loaded_at=None):
    return _query_result(Decider(FixedSnapshot(snapshot), policy, decide=decide), query,
                         postfix_mode=postfix_mode, accept_action=accept_action, now=now,
                         loaded_at=loaded_at)


def test_exim_reply_line_has_no_newline():
    reply = SmtpReply(Outcome.REJECT, 550, "5.7.1", "no")
    assert exim_reply_line(reply) == "REJECT 550 5.7.1 no"


@pytest.mark.parametrize("recipient, sender, mode, accept, expected", [
    # not a list domain: no opinion in every mode
    ("x@elsewhere.example", "", "safe", "dunno", "DUNNO"),
    ("x@elsewhere.example", "", "envelope", "ok", "DUNNO"),
    # the envelope-only SMTP rules act in both modes
    ("nosuch@lists.example.com", MEMBER, "safe", "dunno",
     "550 5.1.1 No such list: nosuch@lists.example.com"),
    ("nosuch@lists.example.com", MEMBER, "envelope", "ok",
     "550 5.1.1 No such list: nosuch@lists.example.com"),
    (LIST, "", "safe", "dunno",
     "550 5.7.1 The null sender may not write to test@lists.example.com"),
    # administrative addresses: no opinion, even with accept_action = ok
    ("test-request@lists.example.com", NONMEMBER, "safe", "ok", "DUNNO"),
    ("test-request@lists.example.com", NONMEMBER, "envelope", "ok", "DUNNO"),
    # posting rules: DUNNO in safe mode, full decision in envelope mode
    (LIST, NONMEMBER, "safe", "ok", "DUNNO"),
    (LIST, NONMEMBER, "envelope", "dunno", f"550 5.7.1 {NOT_MEMBERS}"),
    (LIST, MEMBER, "safe", "ok", "DUNNO"),
    (LIST, MEMBER, "envelope", "dunno", "DUNNO"),
    (LIST, MEMBER, "envelope", "ok", "OK"),
    # hold mapped to accept by default
    (HOLDING, NONMEMBER, "envelope", "dunno", "DUNNO"),
])
def test_postfix_action_table(recipient, sender, mode, accept, expected):
    assert answer(recipient, sender, mode, accept) == expected


def test_postfix_hold_and_discard_words():
    assert answer(HOLDING, NONMEMBER, "envelope", policy=HOLD_POLICY) == \
        "HOLD accepted for moderation by nonmember-moderation"
    reply = SmtpReply(Outcome.DISCARD, 250, "2.7.0", "discarded by banned-address")
    decision = decide(SNAP, Query(LIST, NONMEMBER))
    decision = decision._replace(rule="banned-address")
    assert postfix_action(decision, reply, "envelope", "dunno") == \
        "DISCARD discarded by banned-address"


def test_postfix_action_without_decision_sends_the_reply_code():
    reply = POLICY.error()
    assert postfix_action(None, reply, "safe", "dunno") == \
        "451 4.3.0 List policy service temporarily unavailable, please try again later"


def test_aggregate_severity_and_ties():
    a = SmtpReply(Outcome.ACCEPT, 250, "2.1.5", "a")
    h = SmtpReply(Outcome.HOLD, 250, "2.6.0", "h")
    d = SmtpReply(Outcome.DISCARD, 250, "2.7.0", "d")
    r1 = SmtpReply(Outcome.REJECT, 550, "5.7.1", "r1")
    r2 = SmtpReply(Outcome.REJECT, 550, "5.1.1", "r2")
    t = SmtpReply(Outcome.DEFER, 451, "4.7.1", "t")
    assert aggregate([a, h]) is h
    assert aggregate([h, d, a]) is d
    assert aggregate([d, r1, r2]) is r1
    assert aggregate([r2, r1]) is r2
    assert aggregate([r1, t, a]) is t
    assert aggregate([a]) is a
    with pytest.raises(ValueError):
        aggregate([])


def test_query_result_shape_and_postfix_from_envelope_only():
    """The Exim line uses the headers; the Postfix action is what Postfix, which never
    sends headers, would get for the same envelope."""
    query = Query(LIST, NONMEMBER, from_header=f"Alice <{MEMBER}>")
    result = query_result(SNAP, query, POLICY, postfix_mode="envelope",
                          accept_action="dunno", decide=decide, now=100.0, loaded_at=90.0)
    assert set(result) == {"decision", "reply", "exim", "postfix", "snapshot"}
    assert result["exim"] == "ACCEPT 250 2.1.5 accept"
    assert result["reply"] == {"outcome": "ACCEPT", "code": 250, "status": "2.1.5",
                               "text": "accept"}
    assert result["postfix"] == f"550 5.7.1 {NOT_MEMBERS}"
    assert result["decision"]["verdict"] == "accept"
    assert result["decision"]["trace"]
    assert result["snapshot"] == {"version": "v1", "age": 10.0}


def test_query_result_open_list():
    result = query_result(SNAP, Query(OPEN, NONMEMBER), POLICY, postfix_mode="safe",
                          accept_action="dunno", decide=decide, now=5.0)
    assert result["postfix"] == "DUNNO"
    assert result["exim"].startswith("ACCEPT 250")
