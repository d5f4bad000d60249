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
