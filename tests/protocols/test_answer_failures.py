"""An exception after the decision (moderation, the decision line, the reply's text):
answered with the temporary failure, logged once per incident, the connection kept."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd.core.replies import Outcome, ReplyPolicy
from policyd.decider import Decider
from policyd.logging import DecisionLog
from policyd.protocols import exim, postfix
from policyd.protocols.exim import EximFactory
from policyd.protocols.postfix import PostfixFactory

from . import test_exim, test_postfix
from .fakes import HOLDING, MEMBER, StaticSnapshots, sample_snapshot

BOOM = "boom@example.net"
POSTFIX_TEMPFAIL = (b"action=451 4.3.0 List policy service temporarily unavailable, please "
                    b"try again later\n\n")
EXIM_TEMPFAIL = test_exim.TEMPFAIL


class BrokenLog(DecisionLog):
    """A decision log whose line for ``BOOM``'s requests raises."""

    def answered(self, protocol, query, answer, *args, **kwargs):
        if query.envelope_sender == BOOM:
            raise ValueError("broken decision line")
        return super().answered(protocol, query, answer, *args, **kwargs)


class BrokenModeration:
    """SMTP-time moderation that asks about every decision and raises for ``BOOM``."""

    def asks_about(self, decision) -> bool:
        return True

    def apply(self, answer, query, **kwargs):
        if query.envelope_sender == BOOM:
            raise KeyError("broken moderation")
        return answer, None


def break_in(where, factory, monkeypatch) -> None:
    """Make ``where`` raise for ``BOOM``'s requests (a nonmember: rejected on Exim)."""
    if where == "decision log":
        factory.decision_log = BrokenLog()
    elif where == "moderation":
        factory.moderation = BrokenModeration()
    elif isinstance(factory, PostfixFactory):
        real_action = postfix.postfix_action

        def action(decision, *args):
            if decision is not None and BOOM in decision.senders:
                raise UnicodeError("broken reply")
            return real_action(decision, *args)
        monkeypatch.setattr(postfix, "postfix_action", action)
    else:
        real_line = exim.reply_line

        def line(reply):
            if reply.outcome is Outcome.REJECT:
                raise UnicodeError("broken reply")
            return real_line(reply)
        monkeypatch.setattr(exim, "reply_line", line)


def failures(events) -> list:
    return [e for e in events if "log_failure" in e]


def decider() -> Decider:
    return Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), clock=Clock(),
                   per_list=True)


PLACES = ["decision log", "moderation", "reply"]


@pytest.mark.parametrize("where", PLACES)
def test_postfix_answer_path_exception_is_a_4xx_and_the_connection_goes_on(
        where, events, monkeypatch):
    """Postfix gets the 4xx for the request whose answering raised, the next request
    on the same connection is answered as usual, and a hundred such requests log one
    traceback, each counted as an error."""
    factory = PostfixFactory(decider(), test_postfix.CONFIG, Clock())
    break_in(where, factory, monkeypatch)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(test_postfix.request(sender=BOOM) + test_postfix.request(sender=MEMBER))
    assert transport.value() == POSTFIX_TEMPFAIL + b"action=DUNNO\n\n"
    assert not transport.disconnecting
    for _ in range(100):
        transport.clear()
        proto.dataReceived(test_postfix.request(sender=BOOM))
        assert transport.value() == POSTFIX_TEMPFAIL
    assert not transport.disconnecting
    assert len(failures(events)) == 1
    counters = factory.decider.counters()
    # Each request counted once, as the error it was answered with (not also as its
    # decision), and MEMBER's as the accept it was.
    assert counters["by_protocol"]["postfix"] == {"error": 101, "accept": 1}
    assert factory.decider.by_rule == {("postfix", "accept", "accept"): 1}
    assert set(factory.decider.by_list.values()) == {1}
    assert counters["answers"]["postfix"] == {"DEFER": 101, "DUNNO": 1}


@pytest.mark.parametrize("where", ["decision log", "moderation"])
def test_postfix_answer_path_exception_in_envelope_mode_is_never_an_accept(
        where, events, monkeypatch):
    """Whatever the decision was (here a reject), an exception answering it is the 4xx."""
    config = dataclasses.replace(test_postfix.CONFIG, mode="envelope")
    factory = PostfixFactory(decider(), config, Clock())
    break_in(where, factory, monkeypatch)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(test_postfix.request(sender=BOOM, recipient=HOLDING))
    assert transport.value() == POSTFIX_TEMPFAIL


@pytest.mark.parametrize("where", PLACES)
def test_exim_answer_path_exception_is_a_4xx(where, events, monkeypatch):
    """Exim gets ``DEFER 451`` for a request whose answering raised, not an empty
    answer; a hundred such connections log one traceback, each counted as an error,
    and another sender's request is answered as usual."""
    factory = EximFactory(decider(), test_exim.CONFIG, Clock())
    break_in(where, factory, monkeypatch)
    # With the header block, as Exim's DATA ACL asks: the request moderation sees.
    extra = "headers=" + test_exim.b64(f"From: {BOOM}\n")
    for _ in range(100):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(test_exim.line(sender=BOOM, extra=extra) + b"\n")
        assert transport.value() == EXIM_TEMPFAIL
        assert transport.disconnecting
    assert len(failures(events)) == 1
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(test_exim.line(sender=MEMBER) + b"\n")
    assert transport.value().startswith(b"ACCEPT 250")
    counters = factory.decider.counters()
    assert counters["by_protocol"]["exim"] == {"error": 100, "accept": 1}
    assert [key[2] for key in factory.decider.by_list] == ["accept"]
    assert counters["answers"]["exim"] == {"DEFER": 100, "ACCEPT": 1}


def test_exim_answer_path_exception_at_half_close_is_a_4xx(events):
    """A line ended by the half-close is answered the same way."""
    factory = EximFactory(decider(), test_exim.CONFIG, Clock(), BrokenLog())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(test_exim.line(sender=BOOM))
    proto.readConnectionLost()
    assert transport.value() == EXIM_TEMPFAIL


def test_exim_answer_at_accept_is_a_4xx(events):
    """``answer_first`` (the answer made as the connection is accepted,
    ``policyd.runtime.fastaccept``) is the 4xx too, not an exception."""
    factory = EximFactory(decider(), test_exim.CONFIG, Clock(), BrokenLog())
    for _ in range(10):
        assert factory.answer_first(test_exim.line(sender=BOOM) + b"\n", None) == \
            EXIM_TEMPFAIL
    assert len(failures(events)) == 1
