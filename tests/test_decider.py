"""The Decider's memo: answers remembered per snapshot, bounded, identical on the wire."""

from __future__ import annotations

from policyd.chain import decide
from policyd.service import Decider
from policyd.smtp import ReplyPolicy
from policyd.verdict import Query

from .protocols.fakes import StaticSnapshots, sample_snapshot

LIST = "test@lists.example.com"


def counting_decide():
    calls = []

    def counted(snapshot, query):
        calls.append(query)
        return decide(snapshot, query)
    return counted, calls


def test_same_query_is_decided_once_per_snapshot():
    """A repeated query is answered from the memo with the very same reply; a new
    snapshot forgets everything."""
    counted, calls = counting_decide()
    snapshots = StaticSnapshots(sample_snapshot())
    decider = Decider(snapshots, ReplyPolicy(), log_decisions=False, decide=counted)
    query = Query(LIST, "stranger@example.net")
    first = decider.decide(query, "exim")
    second = decider.decide(Query(LIST, "stranger@example.net"), "exim")
    assert len(calls) == 1
    assert first[1:] == second[1:]
    assert second[0].rule == first[0].rule and second[0].verdict is first[0].verdict
    snapshots.current = sample_snapshot()
    decider.decide(query, "exim")
    assert len(calls) == 2
    assert decider.counters()["total"] == 3


def test_memo_is_bounded():
    counted, calls = counting_decide()
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), log_decisions=False,
                      decide=counted)
    decider.MEMO_SIZE = 3
    for i in range(5):
        decider.decide(Query(LIST, f"n{i}@example.net"), "postfix")
    assert len(decider._memo) <= 3
    decider.decide(Query(LIST, "n0@example.net"), "postfix")
    assert len(calls) == 6


def test_errors_are_not_remembered():
    """A decision that failed is tried again next time (and answered with a 4xx)."""
    calls = []

    def broken(snapshot, query):
        calls.append(query)
        raise RuntimeError("bug")
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), log_decisions=False,
                      decide=broken)
    for _ in range(2):
        decision, reply, _wire = decider.decide(Query(LIST, "a@example.net"), "exim")
        assert decision is None and reply.code == 451
    assert len(calls) == 2


def test_direct_decision_line_equals_the_event_line():
    """The daemon's direct path writes exactly the line the twisted.logger event gives,
    in both output styles (timestamped and journald)."""
    import io

    from twisted.logger import LogLevel

    from policyd.logging import LineWriter
    from policyd.service import DECISION_FORMAT

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


def test_decider_uses_the_configured_decision_log():
    lines = []
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy())
    decider.log_decision = lambda *fields: lines.append(fields)
    decider.decide(Query(LIST, "stranger@example.net"), "postfix", "Q1")
    assert len(lines) == 1 and lines[0][0] == "postfix" and lines[0][-1] == "Q1"
