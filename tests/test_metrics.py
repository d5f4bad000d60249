"""The metrics (issue 15): per-rule and per-list counts in the Decider, latency histograms
filled by the protocols, and the collector that reads them with the snapshot and listener
state at scrape time, on a MemoryReactor (no socket)."""

from __future__ import annotations

import base64

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import StringTransport

from policyd.core.replies import ReplyPolicy
from policyd.core.verdict import Query
from policyd.decider import Decider, FixedSnapshot, LatencyHistogram
from policyd.metrics import MetricsFactory, MetricsPage
from policyd.protocols.postfix import PostfixRequest

from .protocols.fakes import LIST, MEMBER, NONMEMBER, sample_snapshot
from .test_tap import build

METRICS = "[metrics]\nlisten = tcp:9163:interface=127.0.0.1\n"


def scrape(service) -> dict:
    """name -> list of (labels, value) for every sample of the service's endpoint."""
    site = next(l.factory for l in service.listeners if l.kind == "metrics")
    assert isinstance(site, MetricsFactory)
    page = site.page
    assert isinstance(page, MetricsPage)
    body = page.render()
    samples: dict = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels):
    for sample_labels, sample_value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return sample_value
    return None


def test_decider_counts_protocol_verdict_and_rule():
    """Every counted decision is counted by (protocol, verdict, rule); a second look
    (``counted=False``) is not."""
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy())
    decider.decide(Query(LIST, NONMEMBER), "exim")
    decider.decide(Query(LIST, NONMEMBER), "exim")
    decider.decide(Query(LIST, MEMBER), "postfix")
    decider.decide(Query(LIST, MEMBER), "postfix", counted=False)
    assert decider.by_rule == {("exim", "reject", "nonmember-moderation"): 2,
                               ("postfix", "accept", "accept"): 1}
    assert not decider.by_list  # per-list counts only when asked


def test_per_list_counts_only_lists_of_the_snapshot():
    """With per_list the lists of the snapshot are counted; a recipient that is no list
    (whatever a client typed) never becomes a label."""
    decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy(), per_list=True)
    decider.decide(Query(LIST, NONMEMBER), "exim")
    decider.decide(Query("nolist-x1@lists.example.com", NONMEMBER), "exim")
    assert decider.by_list == {("exim", LIST, "reject"): 1}


def test_latency_histogram_buckets_are_cumulative():
    histogram = LatencyHistogram()
    histogram.counts[0] = 2       # <= 100 us
    histogram.counts[3] = 1       # <= 1 ms
    histogram.counts[-1] = 1      # above 1 s
    buckets = dict(histogram.buckets())
    assert buckets["0.0001"] == 2 and buckets["0.001"] == 3 and buckets["+Inf"] == 4
    assert list(buckets)[-1] == "+Inf"


def test_no_metrics_endpoint_and_no_latency_work_by_default(tmp_path):
    """Off by default: no listener, and the protocols observe nothing."""
    service, reactor, _ = build(tmp_path)
    assert [l.kind for l in service.listeners if l.kind == "metrics"] == []
    assert service.decider.latency == {}
    assert service.factory("postfix").latency is None
    assert service.factory("exim").latency is None


def test_scrape_reads_counters_snapshot_store_and_listeners(tmp_path):
    """One scrape after a few answers: decisions by rule, answers, latency per protocol,
    the snapshot and store state, the listeners' connections; Prometheus names."""
    service, reactor, backend = build(tmp_path, text=METRICS + "per_list = on\n")
    service.startService()
    try:
        exim = service.factory("exim")
        postfix = service.factory("postfix")
        for sender in (NONMEMBER, MEMBER):
            line = f"POLICYD/1 list={LIST} sender=".encode()
            exim.answer(line + base64.b64encode(sender.encode()), StringTransport())
        postfix.answer(PostfixRequest({b"protocol_state": b"RCPT", b"sender": b"",
                                       b"recipient": LIST.encode()}))
        reactor.advance(1.5)
        samples = scrape(service)
    finally:
        service.stopService()
    assert value(samples, "policyd_decisions_total", protocol="exim", verdict="reject",
                 rule="nonmember-moderation") == 1
    assert value(samples, "policyd_decisions_total", protocol="exim", verdict="accept",
                 rule="accept") == 1
    assert value(samples, "policyd_decisions_total", protocol="postfix", verdict="reject",
                 rule="null-sender") == 1
    assert value(samples, "policyd_answers_total", protocol="exim", answer="REJECT") == 1
    assert value(samples, "policyd_list_decisions_total", protocol="exim", list=LIST,
                 verdict="accept") == 1
    assert value(samples, "policyd_decision_duration_seconds_count", protocol="exim") == 2
    assert value(samples, "policyd_decision_duration_seconds_count", protocol="postfix") == 1
    assert value(samples, "policyd_decision_duration_seconds_bucket", protocol="exim",
                 le="+Inf") == 2
    assert value(samples, "policyd_snapshot_info", version=backend.token) == 1
    assert value(samples, "policyd_snapshot_loaded") == 1
    assert value(samples, "policyd_snapshot_lists") == 3
    assert value(samples, "policyd_snapshot_memberships") == 3
    assert value(samples, "policyd_snapshot_age_seconds") == 1.5
    assert value(samples, "policyd_snapshot_build_duration_seconds") is not None
    assert value(samples, "policyd_snapshot_loads_total") == 1
    assert value(samples, "policyd_store_refresh_failures_total") == 0
    assert value(samples, "policyd_store_healthy") == 1
    assert value(samples, "policyd_listener_connections", kind="exim",
                 endpoint="tcp:10031:interface=127.0.0.1") == 0
    assert value(samples, "policyd_listener_refused_connections_total", kind="postfix") == 0
    assert [labels["version"] for labels, _ in samples["policyd_build_info"]]
    assert all(name.startswith(("policyd_", "process_")) for name in samples)


def test_store_failure_shows_in_the_metrics(tmp_path):
    """A failing store: healthy 0, failures counted (and still counted once it is back,
    unlike the per-incident count); healthy 0 and failing_seconds going on until the
    incident ends, ``quiet_interval`` seconds without a failure, not at the first good
    refresh (an alert ``for: 5m`` on a store failing every other refresh fires)."""
    service, reactor, backend = build(tmp_path, text=METRICS)
    service.startService()
    try:
        backend.fail = ConnectionError("refused")
        reactor.advance(service.config.store.refresh_interval)
        reactor.advance(service.config.store.refresh_interval)
        samples = scrape(service)
        assert value(samples, "policyd_store_healthy") == 0
        assert value(samples, "policyd_store_refresh_failures_total") == 2
        assert value(samples, "policyd_store_failing_seconds") >= 0
        backend.fail = None
        reactor.advance(service.config.store.refresh_interval)
        samples = scrape(service)
        assert value(samples, "policyd_store_healthy") == 0
        assert value(samples, "policyd_store_failing_seconds") > 0
        reactor.advance(service.snapshots.quiet_interval)
        samples = scrape(service)
        assert value(samples, "policyd_store_healthy") == 1
        assert value(samples, "policyd_store_failing_seconds") == 0
        assert value(samples, "policyd_store_refresh_failures_total") == 2
    finally:
        service.stopService()


def test_confirmed_age_is_since_the_store_last_confirmed_the_snapshot(tmp_path):
    """``policyd_snapshot_age_seconds`` counts from the load, so a quiet healthy store
    looks old; ``policyd_snapshot_confirmed_age_seconds`` counts from the last refresh
    that found the snapshot current, and only grows while the store cannot say so."""
    service, reactor, backend = build(tmp_path, text=METRICS)
    interval = service.config.store.refresh_interval
    service.startService()
    try:
        for _ in range(10):
            reactor.advance(interval)
        reactor.advance(0.5)
        samples = scrape(service)
        assert value(samples, "policyd_snapshot_age_seconds") == 10 * interval + 0.5
        assert value(samples, "policyd_snapshot_confirmed_age_seconds") == 0.5
        backend.fail = ConnectionError("refused")
        for _ in range(10):
            reactor.advance(interval)
        samples = scrape(service)
        assert value(samples, "policyd_snapshot_confirmed_age_seconds") == 10 * interval + 0.5
    finally:
        service.stopService()


class LostListener:
    """A store-notification listener whose connection has been lost for an hour."""

    def __init__(self) -> None:
        self.state = {"channel": "policyd_changes", "listening": False,
                      "listening_for": None, "lost_for": 3600.0,
                      "last_error": "OperationalError: server closed the connection",
                      "received": 7, "incidents": 1}

    def status(self) -> dict:
        return dict(self.state)


def test_store_notification_listener_shows_in_the_metrics(tmp_path):
    """The store-notification listener's state reaches the metrics as it reaches
    ``policyctl status``: listening 1/0, how long it has been lost, the notifications;
    without a listener (polling only) none of these families is there."""
    service, reactor, backend = build(tmp_path, text=METRICS)
    service.startService()
    try:
        samples = scrape(service)
        assert not [name for name in samples if "notification" in name]
        listener = LostListener()
        service.snapshots.change_listener = listener
        service.snapshots.changed()
        reactor.advance(1.5)  # past the page's one-second cache
        samples = scrape(service)
        assert service.snapshots.status()["store"]["listen"]["listening"] is False
        assert value(samples, "policyd_store_notifications_listening") == 0
        assert value(samples, "policyd_store_notifications_lost_seconds") == 3600.0
        assert value(samples, "policyd_store_notifications_total") == 1
        listener.state.update(listening=True, listening_for=5.0, lost_for=None)
        reactor.advance(1.5)
        samples = scrape(service)
        assert value(samples, "policyd_store_notifications_listening") == 1
        assert value(samples, "policyd_store_notifications_lost_seconds") == 0
    finally:
        service.stopService()


def test_metrics_listener_is_not_held_until_the_first_load(tmp_path):
    """The MTA listeners wait for the first snapshot; the metrics endpoint answers at once
    (a scrape during a slow first load shows why)."""
    from .test_tap import _ManualThread, _PortReactor

    service, reactor, backend = build(tmp_path, reactor=_PortReactor(), text=METRICS)
    thread = _ManualThread()
    service.store_thread = thread
    service.snapshots.run_in_thread = thread.run
    service.startService()
    try:
        ports = {l.kind: l.port for l in service.listeners}
        assert ports["metrics"].reading and not ports["exim"].reading
        samples = scrape(service)
        assert value(samples, "policyd_snapshot_loaded") == 0
        thread.release()
    finally:
        service.stopService()


def test_alert_rules_use_only_metrics_the_endpoint_has(tmp_path):
    """contrib/prometheus/policyd-alerts.yml: every policyd_* name it uses is served
    (the store failing, so every family, the failure ones included, is there)."""
    import re
    from pathlib import Path

    rules = (Path(__file__).resolve().parents[1] / "contrib" / "prometheus"
             / "policyd-alerts.yml").read_text()
    used = set(re.findall(r"\bpolicyd_[a-z_]+", rules))
    assert {"policyd_store_healthy", "policyd_snapshot_confirmed_age_seconds",
            "policyd_answers_total"} <= used
    service, reactor, backend = build(tmp_path, text=METRICS)
    service.startService()
    try:
        service.factory("exim").answer(b"POLICYD/1 list=" + LIST.encode() + b" sender=",
                                       StringTransport())
        samples = scrape(service)
    finally:
        service.stopService()
    assert used <= set(samples), used - set(samples)


def _stale_alert() -> tuple[str, float]:
    """contrib/prometheus/policyd-alerts.yml's PolicydSnapshotStale: its expression (a
    ``>-`` block folded into one line) and its ``for`` in seconds."""
    import re
    from pathlib import Path

    rules = (Path(__file__).resolve().parents[1] / "contrib" / "prometheus"
             / "policyd-alerts.yml").read_text()
    rule = re.search(r"alert: PolicydSnapshotStale\n\s+expr: (>-\n(?:\s{10}.*\n)+|.*\n)"
                     r"\s+for: (\d+)m\n", rules)
    expr, minutes = rule.groups()
    expr = " ".join(expr.removeprefix(">-").split())
    return expr, 60.0 * int(minutes)


def stale_alert_fires(samples) -> bool:
    """PolicydSnapshotStale's expression evaluated on one scrape (its one shape: clauses
    joined by ``or``, each ``AGE > LIMIT + C``, ``AGE > LIMIT - C``, ``AGE > LIMIT``,
    ``AGE > N`` or such comparisons joined by ``and`` in parentheses; a comparison over a series the
    scrape lacks is empty, as in PromQL)."""
    import re

    def holds(comparison: str) -> bool:
        shape = re.fullmatch(r'(\w+)\{job="policyd"\} > (?:(\w+)\{job="policyd"\}'
                             r'(?: ([+-]) (\d+))?|(\d+))', comparison)
        assert shape, f"PolicydSnapshotStale has a new shape; teach this test: {expr}"
        age, limit, sign, constant, number = shape.groups()
        if value(samples, age) is None:
            return False
        if number is not None:
            return value(samples, age) > int(number)
        if value(samples, limit) is None:
            return False
        offset = 0 if sign is None else (1 if sign == "+" else -1) * int(constant)
        return value(samples, age) > value(samples, limit) + offset

    expr, _ = _stale_alert()
    fires = False
    for clause in expr.split(" or "):
        if clause.startswith("(") and clause.endswith(")"):
            fires = fires or all(holds(c) for c in clause[1:-1].split(" and "))
        else:
            fires = fires or holds(clause)
    return fires


def test_stale_alert_follows_refresh_interval(tmp_path):
    """PolicydSnapshotStale stays silent on a healthy daemon whose refresh_interval is
    longer than its old fixed threshold (300 s), just before each refresh, and fires a
    minute after the slowest confirmation a healthy store gives, before max_stale."""
    service, reactor, backend = build(
        tmp_path, text=METRICS + "[store]\nrefresh_interval = 600\n")
    service.startService()
    try:
        for _ in range(3):
            reactor.advance(599)
            samples = scrape(service)
            assert value(samples, "policyd_store_slowest_confirmation_seconds") == 660
            assert value(samples, "policyd_snapshot_confirmed_age_seconds") == 599
            assert not stale_alert_fires(samples)
            reactor.advance(1)
        backend.fail = ConnectionError("refused")
        reactor.advance(660 + 59)
        assert not stale_alert_fires(scrape(service))
        reactor.advance(2)
        samples = scrape(service)
        assert stale_alert_fires(samples)
        assert value(samples, "policyd_snapshot_max_stale_seconds") == 900
        assert service.snapshots.stale_reason() is None  # the 4xx begin later
    finally:
        service.stopService()


def _firing_at(seconds: list[float], conditions: list[bool], hold: float) -> float | None:
    """When an alert whose expression was ``conditions`` at the evaluations ``seconds``
    (in order) fires with ``for: hold``: the first evaluation at least ``hold`` after the
    first of an unbroken run of true ones (Prometheus's pending, then firing)."""
    pending = None
    for second, condition in zip(seconds, conditions):
        if not condition:
            pending = None
            continue
        pending = second if pending is None else pending
        if second - pending >= hold:
            return second
    return None


@pytest.mark.parametrize("phase", [0, 7, 14, 21, 28])
@pytest.mark.parametrize("store", ["max_stale = 100\n",
                                   # under 90 s: max_stale - 90 is below zero
                                   "refresh_timeout = 5\nmax_stale = 40\n"])
def test_stale_alert_fires_before_the_4xx_of_a_tight_max_stale(tmp_path, phase, store):
    """An explicit max_stale just above the slowest confirmation (62 s at the defaults):
    PolicydSnapshotStale, scraped and evaluated every 30 s with its ``for``, stays silent
    while the store answers and fires no later than the first temporary failure for a
    stale snapshot (it fired a minute past the slowest confirmation plus its ``for``:
    the MTAs had been deferred for 80 s).  ``phase``: where the 30 s grid falls."""
    _, hold = _stale_alert()
    service, reactor, backend = build(
        tmp_path, text=METRICS + "[store]\n" + store)
    service.startService()
    try:
        seconds, conditions = [], []
        for second in range(300):  # a healthy store, refreshed every 2 s
            reactor.advance(1)
            if second % 15 == 0:
                seconds.append(reactor.seconds())
                conditions.append(stale_alert_fires(scrape(service)))
        assert _firing_at(seconds, conditions, hold) is None
        backend.fail = ConnectionError("refused")
        failed_at = reactor.seconds()
        seconds, conditions, deferring = [], [], None
        for second in range(300):
            samples = scrape(service)
            assert value(samples, "policyd_snapshot_max_stale_seconds") in (40, 100)
            if deferring is None and service.snapshots.stale_reason() is not None:
                deferring = reactor.seconds()
            if (second + phase) % 30 == 0:
                seconds.append(reactor.seconds())
                conditions.append(stale_alert_fires(samples))
            reactor.advance(1)
        firing = _firing_at(seconds, conditions, hold)
        assert deferring is not None and firing is not None
        if "max_stale = 100" in store:
            assert firing <= deferring, (firing, deferring)
        else:  # 10 s without a confirmation, its ``for`` and one evaluation after that
            assert firing - failed_at <= 10 + hold + 30, (firing, failed_at, deferring)
    finally:
        service.stopService()


def test_documented_scrape_excerpts_name_only_served_samples(tmp_path):
    """The scrape excerpts in docs/configuration.md and docs/monitoring.md: every sample
    name they show is served, after the same kind of answers (one Exim, two Postfix)."""
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    shown = set()
    for page in ("configuration.md", "monitoring.md"):
        text = (docs / page).read_text()
        start = text.index("An excerpt of `curl -s http://127.0.0.1:9163/metrics`")
        block = text[text.index("```", start) + 3:]
        block = block[:block.index("```")]
        shown |= set(re.findall(r"^(policyd_[a-z_]+)[{ ]", block, re.M))
    assert {"policyd_decisions_total", "policyd_answers_total"} <= shown
    service, reactor, backend = build(tmp_path, text=METRICS)
    service.startService()
    try:
        service.factory("exim").answer(b"POLICYD/1 list=" + LIST.encode() + b" sender=",
                                       StringTransport())
        samples = scrape(service)
    finally:
        service.stopService()
    served = set(samples) | {name + suffix for name in samples
                             for suffix in ("_bucket", "_count", "_sum")}
    assert shown <= served, shown - served


# --- SMTP-time moderation (issue 17) ------------------------------------------------------


class FakeModerationStore:
    """``store.moderation`` over Python values: what a sync reads, or an error."""

    def __init__(self) -> None:
        self.remote: tuple = ([], [], [])  # what the next read_since returns, once
        self.fail: Exception | None = None
        self.conflicts: list[str] = []  # what the next write_changes returns, once

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def load_state(self, engine, settings, now):
        self._check()
        return [], [], []

    def write_changes(self, engine, changes) -> list[str]:
        self._check()
        conflicts, self.conflicts = self.conflicts, []
        return conflicts

    def read_since(self, engine, since, remember):
        self._check()
        rows, self.remote = self.remote, ([], [], [])
        return rows

    def prune_rows(self, engine, settings, now) -> int:
        self._check()
        return 0


GREY = "grey@lists.example.com"
MODERATED = "moderated@lists.example.com"
PLAIN = "plain@lists.example.com"


class Moderated:
    """A ``ModerationService`` over a fake store, a ``Clock`` and a synchronous thread,
    after the ``Decider`` as the MTA factories use them."""

    def __init__(self) -> None:
        from twisted.internet import defer
        from twisted.internet.task import Clock

        from policyd.core.snapshot import ListSpec, MemberSpec, build as build_snapshot
        from policyd.core.verdict import Action
        from policyd.moderation_service import ModerationService

        from .protocols.fakes import StaticSnapshots

        specs = [ListSpec(address, members=(MemberSpec(MEMBER),),
                          default_nonmember_action=Action.HOLD, smtp_moderation=mode)
                 for address, mode in ((GREY, "greylist"), (MODERATED, "moderate"),
                                       (PLAIN, "off"))]
        snapshots = StaticSnapshots(build_snapshot(specs, version="v1", built_at=0.0))
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = FakeModerationStore()
        self.decider = Decider(snapshots, ReplyPolicy())
        self.service = ModerationService(
            snapshots, engine=None, clock=self.clock, wall=self.clock.seconds,
            store=self.store, store_clock=lambda engine: self.clock.seconds(),
            run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))

    def ask(self, to: str, sender: str = NONMEMBER):
        query = Query(to, sender, f"<{sender}>")
        answer = self.decider.decide(query, "exim")
        return self.service.apply(answer, query, client="192.0.2.7",
                                  message_id="<1@example.net>")

    def counts(self) -> dict:
        """(mode, outcome, transition) -> count, leaving out the zeros."""
        return {(mode.value, outcome.value, transition): count
                for mode, outcomes in self.service.counts.items()
                for outcome, transitions in outcomes.items()
                for transition, count in transitions.items() if count}


def test_moderation_counts_every_attempt_by_mode_outcome_and_transition():
    """Deferrals, passes, tickets, an approval, the normal outcome while the state is
    unusable and the failed sync are counted; posts moderation does not look at (a
    member, a list with ``off``) are not."""
    from dataclasses import replace

    from policyd.core.moderation import Decision

    m = Moderated()
    m.ask(GREY)                               # before the first load: the normal outcome
    m.service.sync()
    m.ask(GREY)                               # first attempt: deferred
    m.clock.advance(301)
    m.ask(GREY)                               # after min_delay: passes
    m.ask(GREY)                               # remembered
    m.ask(PLAIN)
    m.ask(GREY, MEMBER)
    _, step = m.ask(MODERATED)                # a ticket
    ticket = m.service.state.tickets[step.ticket]
    m.store.remote = ([], [], [replace(ticket, decision=Decision.APPROVE,
                                       decided_at=m.clock.seconds())])
    m.service.sync()
    answer, _ = m.ask(MODERATED)              # approved
    assert answer.reply.code == 250
    m.store.fail = ConnectionError("the database is down")
    m.service.sync()
    m.ask(MODERATED)                          # unusable: the normal outcome
    assert m.counts() == {
        ("greylist", "pass", "state-unusable"): 1,
        ("greylist", "defer", "first-attempt"): 1,
        ("greylist", "pass", "retry-in-window"): 1,
        ("greylist", "pass", "remembered"): 1,
        ("moderate", "held", "first-attempt"): 1,
        ("moderate", "accept", "approved"): 1,
        ("moderate", "pass", "state-unusable"): 1,
    }
    assert (m.service.decisions_read, m.service.sync_failures) == (1, 1)


def test_moderation_counts_expired_rows_when_pruned():
    """Rows that expired are counted when a sync prunes them."""
    from policyd.moderation_service import PRUNE_EVERY

    m = Moderated()
    m.service.sync()
    m.ask(GREY)
    m.ask(MODERATED)
    m.clock.advance(5 * 86400)  # beyond max_age and decide_within + max_age
    for _ in range(PRUNE_EVERY):
        m.service.sync()
    assert m.service.expired == 2
    assert not m.service.state.entries and not m.service.state.tickets


def test_moderation_prunes_a_batch_of_the_index_at_every_sync():
    """A prune of the index looks at a bounded batch, so every sync does one (the
    store's rows are pruned every ``PRUNE_EVERY`` syncs)."""
    m = Moderated()
    m.service.sync()
    m.ask(GREY)
    m.ask(MODERATED)
    m.clock.advance(5 * 86400)
    m.service.sync()
    assert m.service.expired == 2
    assert not m.service.state.entries and not m.service.state.tickets


def test_scrape_shows_moderation(tmp_path):
    """The endpoint shows the attempts with readable outcomes, the decisions read, the
    expired and evicted rows, the failed syncs, whether the state is usable and the size
    of the index (pending: undecided tickets)."""
    m = Moderated()
    m.service.sync()
    m.ask(GREY)
    m.ask(MODERATED)
    service, reactor, _ = build(tmp_path, text=METRICS)
    service.moderation = m.service
    samples = scrape(service)
    assert value(samples, "policyd_moderation_attempts_total", mode="greylist",
                 outcome="deferred", transition="first-attempt") == 1
    assert value(samples, "policyd_moderation_attempts_total", mode="moderate",
                 outcome="held", transition="first-attempt") == 1
    for name in ("decisions_read", "expired", "evicted", "sync_failures"):
        assert value(samples, f"policyd_moderation_{name}_total") == 0
    assert value(samples, "policyd_moderation_state_usable") == 1
    for kind, count in (("greylist", 1), ("remembered", 0), ("tickets", 1),
                        ("pending", 1)):
        assert value(samples, "policyd_moderation_entries", kind=kind) == count


def test_scrape_counts_pending_tickets_without_walking_them(tmp_path):
    """The pending gauge is the state's count, not a walk over every ticket on the
    reactor at each scrape (a flood fills the cap: tens of thousands)."""
    from collections import OrderedDict

    from policyd.core.moderation import Decision

    class NoWalk(OrderedDict):
        def __iter__(self):
            raise AssertionError("a scrape walked every ticket")

        values = items = __iter__

    m = Moderated()
    m.service.sync()
    for n in range(5):
        m.ask(MODERATED, f"stranger{n}@example.net")
    state = m.service.state
    state.decide(next(iter(state.tickets)), Decision.REJECT)
    state.tickets = NoWalk(state.tickets)
    service, reactor, _ = build(tmp_path, text=METRICS)
    service.moderation = m.service
    samples = scrape(service)
    assert value(samples, "policyd_moderation_entries", kind="tickets") == 5
    assert value(samples, "policyd_moderation_entries", kind="pending") == 4


def test_no_moderation_metrics_without_moderation(tmp_path):
    """A store without a place for the state (the Mailman 3 backend): no family."""
    service, reactor, _ = build(tmp_path, text=METRICS)
    assert service.moderation is None
    assert not [name for name in scrape(service) if name.startswith("policyd_moderation")]


def _full_site(heads=b"GET /metrics HTTP/1.1\r\nX-a: ", peer="127.0.0.1"):
    """A metrics endpoint with all its connections open from ``peer``, 0.01 s apart,
    each sent ``heads`` (incomplete: a client trickling its heads; ``b""``: silent)."""
    from twisted.internet.task import Clock

    clock = Clock()
    site = MetricsFactory(_page()[0], clock)
    held = []
    for i in range(MetricsFactory.MAX_CONNECTIONS):
        protocol, transport = _connect(site, peer, 40000 + i)
        assert protocol is not None
        if heads:
            protocol.dataReceived(heads)
        held.append((protocol, transport))
        clock.advance(0.01)
    assert len(site.connections) == MetricsFactory.MAX_CONNECTIONS
    return site, clock, held


def _connect(site, host="127.0.0.1", port=50000):
    from twisted.internet.address import IPv4Address

    addr = IPv4Address("TCP", host, port)
    protocol = site.buildProtocol(addr)
    if protocol is None:
        return None, None
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    if transport.disconnecting and not transport.value():
        # Refused once its peer could be read (a loopback newcomer at the limit is
        # decided at ``connectionMade``, by the uid owning its socket): closed at once.
        return None, None
    return protocol, transport


def _closed(held):
    return [i for i, (_, t) in enumerate(held) if t.disconnecting]


def test_at_the_limit_a_newcomer_closes_the_oldest_begun_head_and_gets_its_page():
    """A client holds every connection with request heads it trickles: a scraper's
    newcomer is admitted at once, the oldest of those connections answered 503 and
    closed, and the scraper, sending its head, gets its page; one warning."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        site, clock, held = _full_site()
        scraper, transport = _connect(site)
        assert scraper is not None
        assert _closed(held) == [0]
        assert held[0][1].value().startswith(b"HTTP/1.1 503 ")
        scraper.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
        # the client reconnects: the next oldest of its heads makes room
        assert _connect(site)[0] is not None and _closed(held) == [0, 1]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert site.evicted == 2 and site.refused == 0
    warnings = [e for e in events if e.get("log_namespace") == "policyd.limits"]
    assert len(warnings) == 1 and "metrics endpoint" in warnings[0]["listener"]


def test_connections_with_nothing_read_keep_their_grace_while_a_begun_head_is_there():
    """Connections accepted with nothing read yet (a scraper whose head waits for the
    next turn) are not closed for a newcomer within HEAD_GRACE while a connection with
    an incomplete head is open; once past it, they are, the oldest first."""
    from policyd.protocols.http import HEAD_GRACE

    site, clock, held = _full_site(heads=b"")
    held[7][0].dataReceived(b"GET / HTTP/1.1\r\n")  # the newest: a head begun
    assert _connect(site)[0] is not None
    assert _closed(held) == [7]
    clock.advance(HEAD_GRACE - 0.1)  # the oldest are past their grace now
    assert _connect(site)[0] is not None
    assert _closed(held) == [0, 7]


def test_within_their_grace_the_oldest_with_nothing_read_makes_room():
    """Every connection within its grace with nothing read (a burst of accepts): the
    newcomer is admitted and the oldest of them closed, as on the MTA listeners; a
    client opening connections faster than their grace lapses cannot keep a newcomer
    out."""
    site, clock, held = _full_site(heads=b"")
    assert _connect(site)[0] is not None
    assert _closed(held) == [0]


def test_a_connection_being_answered_is_never_closed_for_a_newcomer():
    """Connections whose head is complete and whose answer is being sent (a client slow
    to take it) are never closed for a newcomer, however old: with only those, the
    newcomer is refused; with one begun head among them, that one is closed."""
    from policyd.protocols.http import HEAD_GRACE

    site, clock, held = _full_site(heads=b"GET /metrics HTTP/1.1\r\n\r\n")
    assert all(t.value().startswith(b"HTTP/1.1 200 ") for _, t in held)
    answers = [t.value() for _, t in held]
    clock.advance(HEAD_GRACE + 5)
    assert _connect(site)[0] is None and site.refused == 1
    assert _connect(site, "192.0.2.1")[0] is None and site.refused == 2  # another peer
    assert [t.value() for _, t in held] == answers and not any(t.disconnected
                                                               for _, t in held)
    held[3][0].connectionLost(None)  # one goes; a trickler takes its place
    trickler, transport = _connect(site)
    trickler.dataReceived(b"GET /")
    assert _connect(site)[0] is not None
    assert transport.value().startswith(b"HTTP/1.1 503 ") and transport.disconnecting
    assert [t.value() for i, (_, t) in enumerate(held) if i != 3] == \
        [a for i, a in enumerate(answers) if i != 3]


def test_another_peers_newcomer_closes_the_peer_holding_the_most():
    """A client at one address holds every connection, all of them within their grace:
    a newcomer from another address closes one of them all the same (the per-peer share
    of the MTA listeners); more of that client's newcomers are refused rather than close
    the other peer's connection."""
    site, clock, held = _full_site(heads=b"", peer="192.0.2.7")
    scraper, _ = _connect(site, "198.51.100.2")
    assert scraper is not None and len(_closed(held)) == 1
    assert site.share_evicted == 1


def test_the_endpoint_holds_few_connections_and_none_for_long():
    """Whoever reaches the endpoint cannot take the MTAs' descriptors: a few connections
    at most (those being closed for newcomers besides), one that has not sent its
    request within REQUEST_TIMEOUT answered 408 and closed; a limit incident logs one
    line and, once quiet, one summary."""
    from twisted.logger import globalLogPublisher

    from policyd.protocols import INCIDENT_QUIET
    from policyd.protocols.http import REQUEST_TIMEOUT

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        site, clock, held = _full_site()
        newcomers = [_connect(site) for _ in range(5 * MetricsFactory.MAX_CONNECTIONS)]
        admitted = [p for p, _ in newcomers if p is not None]
        assert len(site.connections) == 2 * MetricsFactory.MAX_CONNECTIONS
        assert len(site.connections) - len(site.evicting) == MetricsFactory.MAX_CONNECTIONS
        assert site.refused == len(newcomers) - len(admitted) > 0
        kept = [t for p, t in newcomers if p is not None and p not in site.evicting]
        assert len(kept) == MetricsFactory.MAX_CONNECTIONS
        clock.advance(REQUEST_TIMEOUT + 1)
        assert all(t.disconnecting and t.value().startswith(b"HTTP/1.1 408 ")
                   for t in kept)
        for protocol in list(site.connections):
            protocol.connectionLost(None)
        clock.advance(INCIDENT_QUIET + 1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "policyd.limits"]
    assert len(lines) == 2 and "over after" in lines[1]["log_format"]
    assert not site.connections and not clock.getDelayedCalls()


def _page():
    from prometheus_client import CollectorRegistry, Gauge
    from twisted.internet.task import Clock

    registry = CollectorRegistry()
    gauge = Gauge("policyd_probe", "A sample, so that a GET has a body.", registry=registry)
    gauge.set(1)
    clock = Clock()
    return MetricsPage(registry, clock), gauge, clock


def _ask(page, data: bytes) -> bytes:
    from twisted.internet.testing import StringTransport

    factory = MetricsFactory(page, page.clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    assert transport.disconnecting  # one request per connection, always
    return transport.value()


def test_get_and_head_on_any_path_answer_and_close():
    """GET (any path, as the twisted.web resource served) gets the page with
    Connection: close; HEAD the same header fields and no body, and no log line."""
    from twisted.logger import globalLogPublisher

    page, _, _ = _page()
    for path in (b"/metrics", b"/", b"/other"):
        answer = _ask(page, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: close" in head
        assert b"\r\nContent-Type: text/plain" in head
        assert b"policyd_probe 1.0" in body
        assert f"Content-Length: {len(body)}".encode() in head
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        answer = _ask(page, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")
    assert b"Content-Type: text/plain" in answer
    assert events == []
    assert _ask(page, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 405 ")


def test_a_rendering_is_reused_for_a_second():
    """A flood of scrapes costs one rendering a second: within CACHE_SECONDS the same
    page, after it a new one."""
    page, gauge, clock = _page()
    renders = []
    render = page.render
    page.render = lambda: renders.append(1) or render()
    for _ in range(100):
        _ask(page, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert len(renders) == 1
    gauge.set(2)
    assert b"policyd_probe 1.0" in _ask(page, b"GET / HTTP/1.1\r\n\r\n")
    clock.advance(MetricsPage.CACHE_SECONDS)
    assert b"policyd_probe 2.0" in _ask(page, b"GET / HTTP/1.1\r\n\r\n")
    assert len(renders) == 2


def test_state_usable_is_served_only_while_moderation_is_in_use(tmp_path):
    """A site where no list has ``smtp_moderation`` never loads the state: the gauge is
    absent there (the documented ``== 0`` alert would fire for ever), 0 once a list uses
    moderation and the state is not loaded yet, 1 once it is."""
    from policyd.core.snapshot import ListSpec, build as build_snapshot

    from .protocols.fakes import StaticSnapshots

    m = Moderated()
    in_use = m.service.snapshots
    m.service.snapshots = StaticSnapshots(build_snapshot([ListSpec(PLAIN)], version="v2",
                                                         built_at=0.0))
    m.service.sync()
    service, reactor, _ = build(tmp_path, text=METRICS)
    service.moderation = m.service
    assert "policyd_moderation_state_usable" not in scrape(service)
    m.service.snapshots = in_use
    assert value(scrape(service), "policyd_moderation_state_usable") == 0
    m.service.sync()
    assert value(scrape(service), "policyd_moderation_state_usable") == 1


def test_a_ticket_id_the_store_holds_for_another_post_is_redrawn_at_the_sync():
    """``write_changes`` reports an id another daemon's post holds in the store: the
    sync gives the ticket a new id, which the sender's next retry is told, and logs it."""
    from twisted.logger import globalLogPublisher

    m = Moderated()
    m.service.sync()
    _, first = m.ask(MODERATED)
    m.store.conflicts = [first.ticket]
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        m.service.sync()
    finally:
        globalLogPublisher.removeObserver(events.append)
    _, again = m.ask(MODERATED)
    assert again.transition == "waiting" and again.ticket not in (None, first.ticket)
    assert [e["count"] for e in events if "another daemon" in e.get("log_format", "")] \
        == [1]


def test_an_approval_is_not_replayed_for_another_post_with_its_from_and_message_id():
    """A moderator approved a post: its retry is accepted, but a later message with the
    same From: and Message-ID and another Subject, from another network, is not that
    post: the list's normal outcome (accepted into Mailman's hold queue), not the
    approval."""
    from dataclasses import replace

    from policyd.core.moderation import Decision

    m = Moderated()
    m.service.sync()

    def ask(client, subject):
        query = Query(MODERATED, NONMEMBER, f"<{NONMEMBER}>")
        answer = m.decider.decide(query, "exim")
        return m.service.apply(answer, query, client=client, subject=subject,
                               message_id="<legit@example.net>")

    answer, step = ask("198.51.100.5", "Question about the release")
    assert answer.reply.code == 451
    ticket = m.service.state.tickets[step.ticket]
    m.store.remote = ([], [], [replace(ticket, decision=Decision.APPROVE,
                                       decided_at=m.clock.seconds())])
    m.service.sync()
    answer, step = ask("198.51.100.5", "Question about the release")
    assert (answer.reply.code, step.transition) == (250, "approved")
    m.clock.advance(6 * 3600)
    answer, step = ask("203.0.113.66", "BUY CHEAP PILLS")
    assert step.transition == "other-post"
    assert "accepted for moderation" in answer.reply.text  # Mailman holds it


def test_clock_offset_is_served_while_moderation_is_in_use(tmp_path):
    """The daemon's wall clock minus the store's, read at each sync: near 0 while they
    agree; a day when the daemon's clock ran a day ahead (the state is then unusable,
    and no moderation row is expired or deleted: docs/moderation.md)."""
    m = Moderated()
    service, reactor, _ = build(tmp_path, text=METRICS)
    service.moderation = m.service
    m.service.sync()
    assert value(scrape(service), "policyd_moderation_clock_offset_seconds") == 0
    m.service._store_clock = lambda engine: m.clock.seconds() - 86400
    m.service.sync()
    samples = scrape(service)
    assert value(samples, "policyd_moderation_clock_offset_seconds") == 86400
    assert value(samples, "policyd_moderation_state_usable") == 0
