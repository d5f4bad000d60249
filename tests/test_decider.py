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


# --- trouble is logged once per incident, never once per request (D3) ------------------

import base64  # noqa: E402
import io  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

from policyd.logging import make_observer  # noqa: E402


@contextmanager
def log_lines():
    """The lines the daemon's own writer (level filter, rate limit, line writer) writes
    for what is logged inside the block: a list, filled when the block ends."""
    out = io.StringIO()
    _, observer = make_observer("debug", out)
    globalLogPublisher.addObserver(observer)
    lines: list[str] = []
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observer)
        lines.extend(out.getvalue().splitlines())


def test_a_flood_of_decision_errors_logs_one_traceback_and_a_summary_per_interval():
    """Before: every failed decision wrote a critical line and its traceback."""
    def broken(snapshot, query, *, explain=True):
        raise RuntimeError("bug")
    clock = Clock()
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), decide=broken,
                      clock=clock)
    with log_lines() as lines:
        for _ in range(600):  # five requests a second for two minutes
            assert decider.decide(Query(LIST, "a@example.net"), "exim").reply.code == 451
            clock.advance(0.2)
        clock.advance(60)
    assert sum("Traceback (most recent call last)" in line for line in lines) == 1
    assert sum("the decision failed for exim" in line for line in lines) == 1
    summaries = [line for line in lines if "the decision failed" in line and "more times"
                 in line]
    assert 1 <= len(summaries) <= 3
    assert all("RuntimeError at test_decider.py:" in line for line in summaries)
    assert sum(int(line.split("failed ")[1].split(" ")[0]) for line in summaries) == 599
    assert len(lines) < 40, lines
    assert decider.counters()["by_protocol"] == {"exim": {"error": 600}}
    assert decider.failures.total_left_out == 599
    # quiet for ten minutes: the next one is a new incident, logged with its traceback
    clock.advance(600)
    with log_lines() as lines:
        decider.decide(Query(LIST, "a@example.net"), "exim")
    assert sum("Traceback (most recent call last)" in line for line in lines) == 1


def test_a_from_header_that_recurses_too_deep_is_a_4xx_and_a_bounded_log():
    """A From: of repeated group syntax (``a:a:a:...``) made the stdlib's address parser
    raise RecursionError in the decision: each such request wrote a critical line and
    about 2,000 lines of traceback (20 requests, 39,552 lines).  Now such a field is over
    the bound of what is read at SMTP time (``rules.address_headers_doubt``): the 4xx
    before any parse, and not a line of trouble in the log."""
    from policyd.config import EximConfig
    from policyd.protocols.exim import EximFactory

    clock = Clock()
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), clock=clock)
    factory = EximFactory(decider, EximConfig(listen=(), timeout=10.0, max_request=65536),
                          clock)
    hostile = base64.b64encode(("a:" * 1100).encode()).decode()
    sender = base64.b64encode(MEMBER.encode()).decode()
    requests = [f"POLICYD/1 list={LIST} sender={sender} from={hostile}",
                f"POLICYD/1 list={LIST} sender={sender} reply_to={hostile}",
                "POLICYD/1 list={} sender={} headers={}".format(LIST, sender, base64.b64encode(
                    ("From: " + "a:" * 1100 + "\n").encode()).decode())]
    with log_lines() as lines:
        for _ in range(10):
            for request in requests:
                assert factory.answer(request.encode(), None).startswith(b"DEFER 451 4.")
        clock.advance(61)
    assert all(" rule=address-headers " in line for line in lines), lines
    assert len(lines) == 30
    assert "error" not in decider.counters()["by_protocol"]["exim"]


def test_a_recursion_error_in_the_email_package_is_a_warning_without_traceback():
    """Should a field still make the standard library's parser recurse too deep (a
    header the bounds do not cover), that is no bug of policyd's: one warning naming the
    parser, no traceback, the rest summed up; every query answered 4xx."""
    from email._parseaddr import AddressList

    def recursing(snapshot, query, *, explain=True):
        return AddressList("a:" * 1100).addresslist

    clock = Clock()
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), decide=recursing,
                      clock=clock)
    with log_lines() as lines:
        for _ in range(30):
            assert decider.decide(Query(LIST, MEMBER), "exim").reply.code == 451
        clock.advance(61)
    assert not any("Traceback" in line for line in lines)
    named = [line for line in lines if "too deeply nested for Python's email parser "
             "(RecursionError at _parseaddr.py:" in line]
    assert len(named) == 1 and " warn " in named[0]
    summaries = [line for line in lines if "more times" in line]
    assert len(summaries) == 1 and "29 more times" in summaries[0]
    assert len(lines) == 2, lines
    assert decider.counters()["by_protocol"]["exim"]["error"] == 30


def test_incidents_keep_memory_bounded_under_a_flood_of_distinct_keys():
    from policyd.decider import Incidents

    summaries = []
    clock = Clock()
    incidents = Incidents(lambda *args: summaries.append(args), burst=3, interval=60,
                          quiet=600, max_keys=10, clock=clock)
    logged = [key for key in range(10_000) if incidents.first(key)]
    assert logged == [0, 1, 2]
    assert len(incidents.others) <= 10 and len(incidents.left_out) <= 11
    clock.advance(60)
    (left_out, new, others, more, interval), = summaries
    assert (sum(left_out.values()), new, others, more) == (9997, 9997, 10, True)
    assert len(incidents.logged) <= 10
    # a key logged before stays quiet while it keeps coming, and is logged again once
    # it has been quiet for ``quiet`` seconds
    assert not incidents.first(0)
    clock.advance(599)
    assert not incidents.first(0)
    clock.advance(600)
    assert incidents.first(0)


def test_decision_errors_write_one_warning_per_incident_not_one_per_request():
    """The decision line of a failed decision (``error``) was a warning, one per request:
    a warn-level log got a line for each of a sender's repeated headers that break the
    parser.  The incident's warning is written once; the per-request line is info."""
    from email._parseaddr import AddressList

    from policyd.config import EximConfig
    from policyd.protocols.exim import EximFactory

    def recursing(snapshot, query, *, explain=True):
        return AddressList("a:" * 1100).addresslist

    clock = Clock()
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), decide=recursing,
                      clock=clock)
    factory = EximFactory(decider, EximConfig(listen=(), timeout=10.0, max_request=65536),
                          clock)
    sender = base64.b64encode(MEMBER.encode()).decode()
    out = io.StringIO()
    _, observer = make_observer("warn", out)
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(20):
            assert factory.answer(f"POLICYD/1 list={LIST} sender={sender}".encode(),
                                  None).startswith(b"DEFER 451 4.")
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "too deeply nested" in lines[0], lines


def test_a_snapshot_stale_past_max_stale_gets_the_temporary_failure_until_a_check_works():
    """A stuck store (a refresh hanging in it): the last good snapshot answers until
    ``[store] max_stale`` seconds without a confirmation, then every query gets the
    configured 4xx counted as ``unavailable``, as without a snapshot, for the list
    domains (and for any query from Exim's DATA ACL, which only asks about lists); mail
    to a domain the snapshot does not manage keeps its answer (the host's other mail is
    not the list store's); the first refresh that works answers from it again."""
    from policyd.protocols.postfix import postfix_action
    from policyd.snapshot_service import SnapshotService

    from .protocols.fakes import FakeBackend, ManualThread

    thread = ManualThread()
    clock = Clock()
    snapshots = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                                run_in_thread=thread.run, refresh_timeout=30.0,
                                max_stale=900.0, monotonic=clock.seconds)
    snapshots.startService()
    thread.step()
    decider = Decider(snapshots, ReplyPolicy())
    post, elsewhere = Query(LIST, "stranger@example.net"), Query("a@example.org", MEMBER)
    clock.advance(2)  # this refresh hangs in the store
    clock.advance(897)
    assert decider.decide(post, "exim").decision.verdict.value == "reject"
    assert postfix_action(*decider.decide(elsewhere, "postfix")[:2], "safe", "dunno") \
        == "DUNNO"
    clock.advance(1)
    answer = decider.decide(post, "exim")
    assert answer.decision is None and answer.reply.code == 451
    assert answer.trouble == "unavailable"
    assert "[store] max_stale = 900 s" in answer.reason
    assert "a store refresh has been running for 898.0 s" in answer.reason
    assert postfix_action(*decider.decide(elsewhere, "postfix")[:2], "safe", "dunno") \
        == "DUNNO"
    action = postfix_action(*decider.decide(post, "postfix")[:2], "safe", "dunno")
    assert action == ReplyPolicy().error().line()
    named = decider.decide(elsewhere, "exim", names_a_list=True)
    assert named.decision is None and named.trouble == "unavailable"
    assert decider.counters()["by_protocol"] == {
        "exim": {"reject": 1, "unavailable": 2}, "postfix": {"accept": 2, "unavailable": 1}}
    thread.step()  # it ends, having begun 898 s ago: the snapshot is confirmed
    assert decider.decide(post, "exim").decision.verdict.value == "reject"


def _logged_lines(run) -> list[str]:
    from twisted.logger import formatEvent, globalLogPublisher

    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(event) for event in events if event.get("log_namespace")
            == "policyd.decision"]


def test_a_failure_and_an_unmanaged_domain_log_bounded_lines():
    """A 60 KB address (a client's recipient or sender) was written whole in the failure
    line and the ``not a list domain`` warning: a line of ~64 KB.  Both now cut the
    recipient, the sender and the domain like the decision line's fields (``capped``)."""
    from policyd.logging import FIELD_MAX

    huge = "x" * 60_000
    bound = 6 * FIELD_MAX + 1000

    def broken(snapshot, query, *, explain=True):
        raise RuntimeError("bug")
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(), decide=broken)
    lines = _logged_lines(lambda: decider.decide(
        Query(f"{huge}@lists.example.com", f"{huge}@example.net"), "exim"))
    failed = [line for line in lines if "the decision failed" in line]
    assert len(failed) == 1 and len(failed[0]) < bound, len(failed[0])
    assert "recipient='xxxx" in failed[0] and "...(+" in failed[0]

    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy())
    lines = _logged_lines(lambda: decider.decide(
        Query(f"list@{huge}.example", "a@example.net"), "exim", names_a_list=True))
    warned = [line for line in lines if "not a list domain" in line]
    assert len(warned) == 1 and len(warned[0]) < bound, len(warned[0])
    assert "...(+" in warned[0]
