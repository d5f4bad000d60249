"""The Prometheus endpoint (``[metrics] listen``, off by default): what it shows and how.

Everything is read at scrape time from what the daemon keeps anyway: the ``Decider``'s
counters (by protocol, verdict and rule; per list only with ``[metrics] per_list = on``),
the latency histograms the protocols fill (plain ints, ``decider.LatencyHistogram``), the
``SnapshotService``'s state, each listener's connections and, with the native store, the
``ModerationService``'s counters and index (SMTP-time moderation).  The hot path calls nothing
of ``prometheus_client``: its ``Counter.inc()`` takes a lock per call, and a decision costs
a few tens of microseconds.

The page is rendered on the reactor thread by ``MetricsPage`` below, not by
``prometheus_client.twisted.MetricsResource``: that one runs its WSGI app in the reactor's
thread pool, where the collector would read counters the reactor is changing (a ``dict``
changing size during iteration), and it uses the global reactor.  A rendering takes about
a millisecond and is reused for a second.  It is served by ``protocols.http``, a small
bounded HTTP server (one request per connection, no body, the head within seconds), not
by ``twisted.web``, which serves every pipelined request in one reactor turn.

Names follow Prometheus's conventions: ``policyd_`` prefix, ``_total`` for counters,
``_seconds`` for durations, labels for the dimensions.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .core.moderation import Outcome
from .moderation_service import CLOCK_AGREE
from .protocols.http import HttpFactory, HttpRequest, format_response

__all__ = ["PolicydCollector", "MetricsPage", "MetricsFactory", "metrics_site"]


class PolicydCollector:
    """A ``prometheus_client`` collector over a running ``PolicyService``."""

    def __init__(self, service) -> None:
        self.service = service

    def describe(self):
        # Registering must not call ``collect`` (it reads live state): nothing described.
        return []

    def collect(self):
        service = self.service
        decider = service.decider
        snapshots = service.snapshots

        info = InfoMetricFamily("policyd_build", "policyd's version.")
        info.add_metric([], {"version": __version__})
        yield info

        # --- answers ---------------------------------------------------------------------
        decisions = CounterMetricFamily(
            "policyd_decisions", "Decisions by protocol, verdict and the rule that decided.",
            labels=["protocol", "verdict", "rule"])
        for (protocol, verdict, rule), count in list(decider.by_rule.items()):
            decisions.add_metric([protocol, verdict, rule], count)
        yield decisions

        requests = CounterMetricFamily(
            "policyd_requests",
            "Requests by protocol and result: a verdict, or error, unavailable, "
            "not-managed, malformed, busy, other-state.",
            labels=["protocol", "result"])
        for protocol, counts in list(decider.by_protocol.items()):
            for result, count in list(counts.items()):
                requests.add_metric([protocol, result], count)
        yield requests

        answers = CounterMetricFamily(
            "policyd_answers",
            "What was answered, by protocol: ACCEPT, HOLD, DISCARD, REJECT, DEFER (every "
            "temporary failure), or Postfix's DUNNO and OK.",
            labels=["protocol", "answer"])
        for protocol, counts in list(decider.answers.items()):
            for answer, count in list(counts.items()):
                answers.add_metric([protocol, answer], count)
        yield answers

        if decider.per_list:
            per_list = CounterMetricFamily(
                "policyd_list_decisions", "Decisions by protocol, list and verdict "
                "([metrics] per_list = on).", labels=["protocol", "list", "verdict"])
            for (protocol, name, verdict), count in list(decider.by_list.items()):
                per_list.add_metric([protocol, name, verdict], count)
            yield per_list

        latency = HistogramMetricFamily(
            "policyd_decision_duration_seconds",
            "From the start of the decision to the answer written, by protocol.",
            labels=["protocol"])
        for protocol, histogram in decider.latency.items():
            latency.add_metric([protocol], histogram.buckets(), histogram.sum)
        yield latency

        # --- snapshot and store ------------------------------------------------------------
        snapshot = snapshots.current
        if snapshot is not None:
            version = InfoMetricFamily("policyd_snapshot", "The snapshot being served.")
            version.add_metric([], {"version": str(snapshot.version)})
            yield version
        yield _gauge("policyd_snapshot_loaded", "1 when a snapshot is served, else 0.",
                     1 if snapshot is not None else 0)
        age = snapshots.age()
        if age is not None:
            yield _gauge("policyd_snapshot_age_seconds",
                         "Seconds since the snapshot being served was loaded (an "
                         "unchanged store keeps it: see "
                         "policyd_snapshot_confirmed_age_seconds).", age)
        confirmed = snapshots.confirmed_age()
        if confirmed is not None:
            yield _gauge("policyd_snapshot_confirmed_age_seconds",
                         "Seconds since the store last confirmed the snapshot being served "
                         "as its current state (a refresh that succeeded); past [store] "
                         "max_stale every list query gets the temporary failure.", confirmed)
        # What an alert on the confirmed age compares it with (policyd-alerts.yml): a
        # fixed threshold misfires on a site with a long refresh_interval.
        yield _gauge("policyd_store_slowest_confirmation_seconds",
                     "refresh_interval + 2 x refresh_timeout: the longest a store answering "
                     "every refresh in time leaves policyd_snapshot_confirmed_age_seconds "
                     "growing.",
                     snapshots.interval + 2 * (snapshots.refresh_timeout or 0.0))
        if snapshots.max_stale is not None:
            yield _gauge("policyd_snapshot_max_stale_seconds",
                         "[store] max_stale in effect: the confirmed age at which every "
                         "list query gets the temporary failure.", snapshots.max_stale)
        if snapshots.last_load_seconds is not None:
            yield _gauge("policyd_snapshot_build_duration_seconds",
                         "How long the last refresh that loaded a snapshot took.",
                         snapshots.last_load_seconds)
        if snapshot is not None:
            yield _gauge("policyd_snapshot_lists", "Lists in the snapshot.",
                         len(snapshot.lists))
            yield _gauge("policyd_snapshot_memberships", "Memberships in the snapshot.",
                         snapshot.membership_count)
            yield _gauge("policyd_snapshot_broken_lists",
                         "Lists answered with a temporary failure (unreadable rows).",
                         len(snapshot.broken))
        yield _counter("policyd_snapshot_loads", "Refreshes that loaded a new snapshot.",
                       snapshots.loads)
        yield _counter("policyd_store_checks", "Refreshes that reached the store.",
                       snapshots.checks)
        yield _counter("policyd_store_refresh_failures", "Refreshes that failed.",
                       snapshots.failures_total)
        yield _gauge("policyd_store_healthy",
                     "1 when the store answers its refreshes in time, else 0.",
                     1 if snapshots.unhealthy_reason() is None else 0)
        failing_since = snapshots.trouble_since()
        yield _gauge("policyd_store_failing_seconds",
                     "Seconds since the current store failure began (a failed refresh, "
                     "one running past refresh_timeout, or the snapshot stale past "
                     "max_stale; 0 when healthy).",
                     0.0 if failing_since is None
                     else max(0.0, snapshots.monotonic() - failing_since))
        listen = snapshots.listen_status()
        if listen["enabled"]:
            # What ``policyctl status`` shows as ``store: listen``: lost notifications
            # leave the daemon on polling alone, slower but not failing.
            yield _gauge("policyd_store_notifications_listening",
                         "1 while the store's change notifications are listened to (a "
                         "PostgreSQL LISTEN, the SQLite file watch), else 0.",
                         1 if listen.get("listening") else 0)
            yield _gauge("policyd_store_notifications_lost_seconds",
                         "Seconds since the store's change notifications were lost (0 "
                         "while listened to): meanwhile changes arrive by polling only.",
                         listen.get("lost_for") or 0.0)
            yield _counter("policyd_store_notifications",
                           "Change notifications from the store.",
                           listen["notifications"])

        moderation = getattr(service, "moderation", None)
        if moderation is not None:
            yield from _moderation(moderation)

        # --- listeners -------------------------------------------------------------------
        labels = ["kind", "endpoint"]
        open_ = GaugeMetricFamily("policyd_listener_connections",
                                  "Open connections per listener.", labels=labels)
        refused = CounterMetricFamily("policyd_listener_refused_connections",
                                      "Connections refused at a limit, per listener.",
                                      labels=labels)
        evicted = CounterMetricFamily("policyd_listener_evicted_connections",
                                      "Idle connections closed to make room at a limit.",
                                      labels=labels)
        share_refused = CounterMetricFamily(
            "policyd_listener_share_refused_connections",
            "Of the refused connections, those of the peer holding the most at a limit "
            "(refused rather than close another peer's).", labels=labels)
        share_evicted = CounterMetricFamily(
            "policyd_listener_share_evicted_connections",
            "Of the evicted connections, those of the peer holding the most, closed for "
            "another peer's newcomer at a limit.", labels=labels)
        for listener in service.listeners:
            factory = listener.factory
            if not hasattr(factory, "refused"):  # the metrics listener itself
                continue
            key = [listener.kind, listener.description]
            open_.add_metric(key, len(factory.connections))
            refused.add_metric(key, factory.refused)
            evicted.add_metric(key, factory.evicted)
            share_refused.add_metric(key, getattr(factory, "share_refused", 0))
            share_evicted.add_metric(key, getattr(factory, "share_evicted", 0))
        yield open_
        yield refused
        yield evicted
        yield share_refused
        yield share_evicted
        if service.started_at is not None:
            yield _gauge("policyd_uptime_seconds", "Seconds since policyd started.",
                         service.reactor.seconds() - service.started_at)


# The outcome label of an attempt, by what moderation said (``core.moderation.Outcome``).
MODERATION_OUTCOMES = {
    Outcome.DEFER: "deferred",      # greylisted
    Outcome.HELD: "held",           # deferred with a ticket
    Outcome.PASS: "passed",         # the list's normal outcome
    Outcome.ACCEPT: "approved",
    Outcome.REJECT: "rejected",
    Outcome.DISCARD: "discarded",
}


def _moderation(moderation):
    """SMTP-time moderation (docs/moderation.md): what it did, and its index."""
    attempts = CounterMetricFamily(
        "policyd_moderation_attempts",
        "Attempts SMTP-time moderation looked at, by the list's mode, the outcome "
        "(deferred, held, passed, approved, rejected, discarded) and the transition "
        "(first-attempt, early-retry, retry-in-window, remembered, expired, waiting, "
        "approved, rejected, discarded, undecided-fallback, state-unusable, at-cap, "
        "network-at-cap, sender-at-cap, other-post).",
        labels=["mode", "outcome", "transition"])
    for mode, outcomes in moderation.counts.items():
        for outcome, transitions in outcomes.items():
            for transition, count in list(transitions.items()):
                attempts.add_metric([mode.value, MODERATION_OUTCOMES[outcome], transition],
                                    count)
    yield attempts
    yield _counter("policyd_moderation_decisions_read",
                   "Moderators' decisions (policyctl approve, reject, discard) this daemon "
                   "read from the store.", moderation.decisions_read)
    yield _counter("policyd_moderation_expired",
                   "Greylist entries, remembered senders and tickets dropped from the "
                   "index because they expired (at a cap also tickets whose post got its "
                   "final answer).", moderation.expired)
    yield _counter("policyd_moderation_evicted",
                   "Remembered senders dropped at their cap (least recently remembered "
                   "first) and other daemons' rows left out of a full index.",
                   moderation.evicted)
    yield _counter("policyd_moderation_sync_failures",
                   "Syncs with the store that failed (the state is unusable until one "
                   "succeeds).", moderation.sync_failures)
    # Only while some list uses it: a site without SMTP-time moderation never loads the
    # state, and a 0 there would fire the documented ``== 0`` alert for ever.
    if moderation.in_use():
        yield _gauge("policyd_moderation_state_usable",
                     "1 when the moderation state is loaded and its last sync worked, else "
                     "0 (lists then get their normal outcome); absent while no list has "
                     "smtp_moderation.", 1 if moderation.usable else 0)
        if moderation.clock_offset is not None:
            yield _gauge("policyd_moderation_clock_offset_seconds",
                         "The daemon's wall clock minus the store's clock at the last "
                         f"sync; beyond {CLOCK_AGREE:.0f} s either way the state is "
                         "unusable and no moderation row is expired or deleted.",
                         moderation.clock_offset)
    state = moderation.state
    entries = GaugeMetricFamily("policyd_moderation_entries",
                                "The moderation index: greylist entries, remembered "
                                "senders, tickets, and undecided tickets among them.",
                                labels=["kind"])
    entries.add_metric(["greylist"], len(state.entries))
    entries.add_metric(["remembered"], len(state.remembered))
    entries.add_metric(["tickets"], len(state.tickets))
    entries.add_metric(["pending"], state.undecided)  # kept by the state: no walk
    yield entries


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class MetricsPage:
    """What the endpoint answers: ``GET`` (any path) the registry in Prometheus's text
    format, made on the reactor thread; ``HEAD`` the same header fields without a body;
    other methods ``405``.

    A rendering (every collector, ``/proc`` read by the process collector) costs about a
    millisecond; it is reused for ``CACHE_SECONDS`` (by ``clock``), so a flood of scrapes
    costs one rendering a second, and a scraper never sees a page older than that."""

    CACHE_SECONDS = 1.0
    ALLOW = "GET, HEAD"

    def __init__(self, registry: CollectorRegistry, clock) -> None:
        self.registry = registry
        self.clock = clock
        self._body: bytes | None = None
        self._rendered_at = 0.0

    def render(self) -> bytes:
        """The page as of now (uncached)."""
        return generate_latest(self.registry)

    def body(self) -> bytes:
        now = self.clock.seconds()
        if self._body is None or not 0 <= now - self._rendered_at < self.CACHE_SECONDS:
            self._body = self.render()
            self._rendered_at = now
        return self._body

    def respond(self, request: HttpRequest) -> bytes:
        if request.method not in ("GET", "HEAD"):
            return format_response(405, (("Allow", self.ALLOW),
                                         ("Content-Type", "text/plain; charset=utf-8")),
                                   b"405 only GET and HEAD are served\n")
        return format_response(200, (("Content-Type", CONTENT_TYPE_LATEST),), self.body(),
                               head_only=request.method == "HEAD")


class MetricsFactory(HttpFactory):
    """The endpoint's listener factory (``protocols.http``): one request per connection,
    no request body, the head within a few seconds, ``MAX_CONNECTIONS`` open at most.

    The connections live in the descriptors the MTA listeners leave free, so whoever can
    reach the endpoint cannot take the MTAs' descriptors by holding connections.  At the
    limit a newcomer closes a connection without a complete request head
    (``protocols.http``: a head begun first, the oldest first; the peer holding the most
    first), never one being answered, so a client holding every connection with heads
    it trickles cannot keep Prometheus out; one warning per incident."""

    MAX_CONNECTIONS = max_connections = 8
    kind = "metrics"
    what = "metrics endpoint"

    def __init__(self, page: MetricsPage, reactor) -> None:
        super().__init__(page.respond, reactor)
        self.page = page


def metrics_site(service) -> MetricsFactory:
    """The endpoint for ``[metrics] listen``: policyd's collector and the process's (CPU,
    memory, descriptors: ``process_*``), in a registry of its own."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PolicydCollector(service))
    ProcessCollector(registry=registry)
    return MetricsFactory(MetricsPage(registry, service.reactor), service.reactor)
