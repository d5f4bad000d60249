"""The Decider: the decision without its trace on the MTA path, the error policy, the line."""

from __future__ import annotations

from policyd.core.chain import decide
from policyd.decider import Decider
from policyd.core.replies import ReplyPolicy
from policyd.core.verdict import Query

from .protocols.fakes import MEMBER, StaticSnapshots, sample_snapshot

LIST = "test@lists.example.com"


def test_mta_path_decides_without_the_trace():
    """The Decider asks for no explanation (the MTAs never see it): no trace, no reason
    text; the verdict, rule, action, sender and reply are the ones the explained decision
    gives."""
    calls = []

    def recorded(snapshot, query, *, explain=True):
        calls.append(explain)
        return decide(snapshot, query, explain=explain)
    snapshot = sample_snapshot()
    decider = Decider(StaticSnapshots(snapshot), ReplyPolicy(), decide=recorded)
    for sender in ("stranger@example.net", "", MEMBER):
        query = Query(LIST, sender)
        decision, reply = decider.decide(query, "exim")[:2]
        traced = decide(snapshot, query)
        assert decision.trace == () and traced.trace
        assert decision._replace(trace=traced.trace, reason=traced.reason) == traced
        assert reply == ReplyPolicy().reply(traced)
    assert calls == [False, False, False]


def test_every_query_reads_the_current_snapshot():
    snapshots = StaticSnapshots(sample_snapshot())
    decider = Decider(snapshots, ReplyPolicy())
    query = Query(LIST, "stranger@example.net")
    assert decider.decide(query, "exim")[0].verdict.value == "reject"
    snapshots.current = sample_snapshot(extra_member="stranger@example.net")
    assert decider.decide(query, "exim")[0].verdict.value == "accept"
    assert decider.counters()["by_protocol"] == {"exim": {"reject": 1, "accept": 1}}


def test_errors_give_the_temporary_failure_every_time():
    """A decision that fails is tried again next time (and answered with a 4xx)."""
    calls = []

    def broken(snapshot, query, *, explain=True):
        calls.append(query)
        raise RuntimeError("bug")
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), decide=broken)
    for _ in range(2):
        decision, reply = decider.decide(Query(LIST, "a@example.net"), "exim")[:2]
        decider.count_answer("exim", reply.outcome.value)
        assert decision is None and reply.code == 451
    assert len(calls) == 2
    assert decider.counters()["by_protocol"] == {"exim": {"error": 2}}
    assert decider.counters()["answers"] == {"exim": {"DEFER": 2}}


def test_direct_decision_line_equals_the_event_line():
    """The daemon's direct path writes exactly the line the twisted.logger event gives,
    in both output styles (timestamped and journald)."""
    import io

    from twisted.logger import LogLevel

    from policyd.logging import LineWriter
    from policyd.logging import DECISION_FORMAT

    args = ("exim", "reject", LIST, "x@example.net", "x@example.net", "x@example.net",
            "nonmember-moderation", "REJECT 550 5.7.1 Members only", 0.0421, "1qX-0001")
    for journal in (False, True):
        direct, via_event = io.StringIO(), io.StringIO()
        LineWriter(direct, journal=journal).decision(*args)
        protocol, verdict, list_, sender, senders, decided_by, rule, reply, elapsed, rid = args
        LineWriter(via_event, journal=journal)({
            "log_format": DECISION_FORMAT, "log_level": LogLevel.info,
            "log_namespace": "policyd.decision", "log_time": None, "protocol": protocol,
            "verdict": verdict, "list": list_, "sender": sender, "senders": senders,
            "decided_by": decided_by, "rule": rule, "reply": reply, "elapsed": elapsed,
            "request": f" id={rid}", "request_id": rid})
        strip = (lambda line: line.split(" ", 1)[1]) if not journal else (lambda line: line)
        assert strip(direct.getvalue()) == strip(via_event.getvalue())
        assert "rule=nonmember-moderation reply='REJECT 550 5.7.1 Members only' 0.042ms " \
               "id=1qX-0001" in direct.getvalue()


def test_protocols_use_the_configured_decision_log():
    from twisted.internet.task import Clock

    from policyd.config import parse
    from policyd.logging import DecisionLog
    from policyd.protocols.postfix import PostfixFactory, PostfixRequest

    lines = []

    class Recorded(DecisionLog):
        def decision(self, *fields):
            lines.append(fields)
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy())
    factory = PostfixFactory(decider, parse("").postfix, Clock(), Recorded())
    factory.answer(PostfixRequest({b"protocol_state": b"RCPT", b"recipient": LIST.encode(),
                                   b"sender": b"stranger@example.net", b"queue_id": b"Q1"}))
    assert len(lines) == 1 and lines[0][0] == "postfix" and lines[0][9] == "Q1"
    assert lines[0][10] == " queue_id=Q1"  # the client and queue fields at the end
