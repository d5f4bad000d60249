"""Fail closed with a temporary failure (issue 12, part 4): a snapshot that cannot be the
store's real state is never permission.

* an Exim request names a list explicitly, so a domain the snapshot does not manage is a
  configuration or data error: 4xx, logged once per incident (the first few domains
  named, the rest counted), not again for a new snapshot;
* a snapshot with no lists at all answers 4xx for list queries on both protocols;
* ``[daemon] fail_closed = off`` keeps the old answers.
"""

from __future__ import annotations

import base64

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from policyd.config import EximConfig, parse
from policyd.core.replies import ReplyPolicy
from policyd.core.snapshot import build
from policyd.decider import Decider, FixedSnapshot
from policyd.protocols.exim import EximFactory
from policyd.protocols.postfix import PostfixFactory, PostfixRequest

from .protocols.fakes import LIST, MEMBER, NONMEMBER, sample_snapshot

EXIM = EximConfig(listen=(), timeout=10.0, max_request=65536)


def exim_answer(snapshot, recipient, sender, *, fail_closed=True) -> bytes:
    decider = Decider(FixedSnapshot(snapshot), ReplyPolicy(), fail_closed=fail_closed)
    factory = EximFactory(decider, EXIM, Clock())
    line = (f"POLICYD/1 list={recipient} sender="
            f"{base64.b64encode(sender.encode()).decode()}").encode()
    return factory.answer(line, None)


def postfix_answer(snapshot, recipient, sender, *, fail_closed=True) -> bytes:
    decider = Decider(FixedSnapshot(snapshot), ReplyPolicy(), fail_closed=fail_closed)
    factory = PostfixFactory(decider, parse("[postfix]\nmode = envelope\n").postfix, Clock())
    return factory.answer(PostfixRequest({b"protocol_state": b"RCPT",
                                          b"recipient": recipient.encode(),
                                          b"sender": sender.encode()}))


def test_exim_request_for_an_unmanaged_domain_is_deferred():
    """Before: ``ACCEPT 250 2.0.0 not-managed`` and a nonmember's post was delivered."""
    answer = exim_answer(sample_snapshot(), "list@unknown.example", NONMEMBER)
    assert answer.startswith(b"DEFER 451 4.3.0"), answer


def test_exim_unmanaged_domain_is_logged_once_per_domain_not_per_snapshot():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        _log_once(events)
    finally:
        globalLogPublisher.removeObserver(events.append)


def _warned(events):
    return [e for e in events if "not a list domain" in (e.get("log_format") or "")]


def _log_once(events):
    clock = Clock()
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy(), clock=clock)
    factory = EximFactory(decider, EXIM, clock)
    for domain in ("a.example", "a.example", "b.example", "a.example"):
        factory.answer(f"POLICYD/1 list=l@{domain} sender=".encode(), None)
    assert [e["domain"] for e in _warned(events)] == ["a.example", "b.example"]
    # a store change is not a new incident (before: every domain was named again)
    decider.snapshots.current = sample_snapshot(version="v2")
    clock.advance(300)
    factory.answer(b"POLICYD/1 list=l@a.example sender=", None)
    assert len(_warned(events)) == 2
    # ten quiet minutes are: the domain is named again
    clock.advance(600)
    factory.answer(b"POLICYD/1 list=l@a.example sender=", None)
    assert [e["domain"] for e in _warned(events)] == ["a.example", "b.example", "a.example"]
    assert decider.counters()["by_protocol"]["exim"]["not-managed"] == 6


def test_policyctl_query_does_not_use_up_the_warning_for_a_domain():
    """``policyctl query`` decides as each MTA would, uncounted: it is no MTA asking, so
    it logs no warning (it said "None asked about ...") and the first Exim question about
    that domain afterwards is still named."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy(), clock=clock)
        from policyd.core.verdict import Query
        answer = decider.decide(Query("l@fresh.example", NONMEMBER), "exim",
                                names_a_list=True, counted=False)
        assert 400 <= answer.reply.code < 500
        assert _warned(events) == []
        factory = EximFactory(decider, EXIM, clock)
        factory.answer(b"POLICYD/1 list=l@fresh.example sender=", None)
        assert [(e["protocol"], e["domain"]) for e in _warned(events)] == [
            ("exim", "fresh.example")]
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_flood_of_unmanaged_domains_writes_a_bounded_number_of_lines():
    """Before: 1,000 warnings (one per domain) per snapshot version, and 1,000 more after
    every store change."""
    clock = Clock()
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy(), clock=clock)
    factory = EximFactory(decider, EXIM, clock)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for version in ("v1", "v2", "v3"):
            decider.snapshots.current = sample_snapshot(version=version)
            for n in range(1200):
                answer = factory.answer(f"POLICYD/1 list=l@d{n}.{version}.example "
                                        f"sender=".encode(), None)
                assert answer.startswith(b"DEFER 451 4.3.0"), answer
                clock.advance(0.05)  # 3,600 requests in three minutes
        clock.advance(60)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = _warned(events)
    assert warned[0]["domain"] == "d0.v1.example"  # the first is named at once
    assert len(warned) <= 5 * 4  # five per minute
    summaries = [e for e in events if "other non-list domains" in (e.get("log_format") or "")]
    assert 3 <= len(summaries) <= 4
    assert sum(e["count"] for e in summaries) == 3600 - len(warned)
    assert decider.counters()["by_protocol"]["exim"]["not-managed"] == 3600
    assert len(decider.unmanaged.logged) <= 20 and not decider.unmanaged.others


def test_postfix_outside_the_list_domains_is_still_none_of_our_business():
    assert postfix_answer(sample_snapshot(), "user@elsewhere.example", "") == \
        b"action=DUNNO\n\n"


def test_an_empty_snapshot_defers_list_queries_on_both_protocols():
    """Before: Exim got ACCEPT for everything, Postfix accepted even ``<>`` to a posting
    address, from a store that knew no domains."""
    empty = build([], version="empty", built_at=0.0)
    assert exim_answer(empty, LIST, "").startswith(b"DEFER 451 4.3.0")
    assert exim_answer(empty, LIST, MEMBER).startswith(b"DEFER 451 4.3.0")
    assert postfix_answer(empty, LIST, "").startswith(b"action=451 4.3.0")
    # domains known, no lists: list-domain queries defer, other domains pass
    domains_only = build([], domains=["lists.example.com"], version="d", built_at=0.0)
    assert postfix_answer(domains_only, LIST, "").startswith(b"action=451 4.3.0")
    assert postfix_answer(domains_only, "u@elsewhere.example", "") == b"action=DUNNO\n\n"


def test_fail_closed_off_keeps_the_old_answers():
    empty = build([], version="empty", built_at=0.0)
    assert exim_answer(empty, LIST, "", fail_closed=False).startswith(b"ACCEPT 250 2.0.0")
    assert exim_answer(sample_snapshot(), "l@unknown.example", NONMEMBER,
                       fail_closed=False).startswith(b"ACCEPT 250 2.0.0")
    assert postfix_answer(empty, LIST, "", fail_closed=False) == b"action=DUNNO\n\n"


def test_the_config_key_parses():
    assert parse("").daemon.fail_closed is True
    assert parse("[daemon]\nfail_closed = off\n").daemon.fail_closed is False
