"""The verdict-to-SMTP mapping: safe defaults, configurable hold/discard, never 5xx for
our own trouble."""

import pytest

from policyd.core.replies import Outcome, ReplyPolicy, clean_text
from policyd.core.verdict import Decision, Verdict

LIST = "test@lists.example.com"


def dec(verdict, rule="nonmember-moderation", notice=None, managed=True):
    return Decision(verdict, rule, "reason", list=LIST if managed else None,
                    rejection_notice=notice)


def test_defaults():
    """accept -> accept, hold -> accept, discard -> discard, reject -> 550 5.7.1 naming
    the list, defer -> 451 4.7.1."""
    p = ReplyPolicy()
    assert p.reply(dec(Verdict.ACCEPT)).outcome is Outcome.ACCEPT
    assert p.reply(dec(Verdict.HOLD)).outcome is Outcome.ACCEPT
    assert p.reply(dec(Verdict.DISCARD)).outcome is Outcome.DISCARD
    reject = p.reply(dec(Verdict.REJECT))
    assert (reject.outcome, reject.code, reject.status) == (Outcome.REJECT, 550, "5.7.1")
    assert LIST in reject.text
    defer = p.reply(dec(Verdict.DEFER))
    assert (defer.outcome, defer.code, defer.status) == (Outcome.DEFER, 451, "4.7.1")


def test_list_rejection_notice_used():
    reply = ReplyPolicy().reply(dec(Verdict.REJECT, notice="Members only.\nThanks"))
    assert reply.text == "Members only. Thanks"
    assert reply.line() == "550 5.7.1 Members only. Thanks"


def test_unknown_list_is_5_1_1():
    reply = ReplyPolicy().reply(Decision(Verdict.REJECT, "unknown-list", "r",
                                         list="nolist@lists.example.com"))
    assert (reply.code, reply.status) == (550, "5.1.1")
    assert "nolist@lists.example.com" in reply.text


def test_configurable_hold_and_discard():
    p = ReplyPolicy(hold=Outcome.HOLD, discard=Outcome.REJECT)
    assert p.reply(dec(Verdict.HOLD)).outcome is Outcome.HOLD
    reply = p.reply(dec(Verdict.DISCARD, rule="banned-address"))
    assert (reply.outcome, reply.code) == (Outcome.REJECT, 550)


@pytest.mark.parametrize("kwargs", [
    {"hold": Outcome.REJECT}, {"discard": Outcome.ACCEPT}, {"reject_code": 451},
    {"reject_status": "4.7.1"}, {"defer_code": 550}, {"error_code": 554},
    {"error_status": "5.3.0"},
])
def test_unsafe_mappings_refused(kwargs):
    """No configuration can turn our own trouble into a 5xx or a reject into a 4xx."""
    with pytest.raises(ValueError):
        ReplyPolicy(**kwargs)


def test_error_is_temporary():
    reply = ReplyPolicy().error()
    assert reply.outcome is Outcome.DEFER and 400 <= reply.code < 500
    assert reply.status.startswith("4.")


def test_clean_text_one_short_line():
    assert clean_text("a\r\nb\x00c") == "a b c"
    assert len(clean_text("x" * 5000)) <= 400
    assert clean_text("") == "-"


# --- replies made once: what each depends on is part of its key ------------------------

def _fresh(policy: ReplyPolicy, decision: Decision):
    """The reply a policy that never answered before gives."""
    import dataclasses

    return dataclasses.replace(policy).reply(decision)


@pytest.mark.parametrize("policy", [
    ReplyPolicy(),
    ReplyPolicy(reject_text="{sender} may not post to {list}",
                defer_text="Later, {sender.upper}", discard=Outcome.REJECT),
    ReplyPolicy(discard_reject_text="Not from {sender!r}", discard=Outcome.REJECT),
    ReplyPolicy(null_sender_text="{rule}: <{sender}> to {recipient}"),
])
def test_a_remembered_reply_is_the_one_made_afresh(policy):
    """Whatever order the decisions come in, each gets the reply a fresh policy makes
    for it: the list, its notice and (where a text names it) the sender are part of
    what is remembered."""
    decisions = [
        Decision(verdict, rule, "r", sender=sender, list=lst, rejection_notice=notice)
        for verdict in (Verdict.REJECT, Verdict.DEFER, Verdict.DISCARD, Verdict.HOLD)
        for rule in ("nonmember-moderation", "unknown-list", "null-sender")
        for sender in ("a@x.example", "b@y.example", None)
        for lst in (LIST, "other@lists.example.com", None)
        for notice in (None, "Members only")
    ]
    for decision in decisions + decisions[::-1]:
        assert policy.reply(decision) == _fresh(policy, decision), decision


def test_remembered_replies_are_bounded(monkeypatch):
    monkeypatch.setattr(ReplyPolicy, "BY_LIST_MAX", 50)
    policy = ReplyPolicy()
    for i in range(500):
        reply = policy.reply(Decision(Verdict.REJECT, "nonmember-moderation", "r",
                                      list=f"list{i}@lists.example.com"))
        assert f"list{i}@" in reply.text
    assert len(policy._by_list) <= 50


@pytest.mark.parametrize("policy, decision", [
    (ReplyPolicy(), lambda i: Decision(Verdict.REJECT, "unknown-list", "r",
                                       list=f"{'x' * 8000}{i}@lists.example.com")),
    (ReplyPolicy(reject_text="{sender} may not post to {list}"),
     lambda i: Decision(Verdict.REJECT, "nonmember-moderation", "r",
                        sender=f"{'x' * 8000}{i}@example.net", list="a@lists.example.com")),
])
def test_replies_for_long_recipients_or_senders_are_made_not_kept(policy, decision):
    """The recipient of an unknown list and a sender the text names are a client's
    words, kilobytes long if it likes: 4096 remembered replies keyed by them held a
    quarter of a gigabyte.  Such a reply is made each time, the same."""
    import tracemalloc

    assert policy.reply(decision(0)) == _fresh(policy, decision(0))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            policy.reply(decision(i))
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 100_000
