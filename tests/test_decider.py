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
