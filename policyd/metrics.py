"""The Prometheus endpoint (``[metrics] listen``, off by default): what it shows and how.

Everything is read at scrape time from what the daemon keeps anyway: the ``Decider``'s
counters (by protocol, verdict and rule; per list only with ``[metrics] per_list = on``),
the latency histograms the protocols fill (plain ints, ``decider.LatencyHistogram``), the
``SnapshotService``'s state, each listener's connections and, with the native store, the
``ModerationService``'s counters and index (SMTP-time moderation).  The hot path calls nothing
of ``prometheus_client``: its ``Counter.inc()`` takes a lock per call, and a decision costs
a few tens of microseconds.

The page is rendered on the reactor thread by ``MetricsResource`` below, not by
``prometheus_client.twisted.MetricsResource``: that one runs its WSGI app in the reactor's
thread pool, where the collector would read counters the reactor is changing (a ``dict``
changing size during iteration), and it uses the global reactor.  A scrape of a few
hundred series takes well under a millisecond.

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
import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import __version__
from .core.moderation import Outcome

__all__ = ["PolicydCollector", "MetricsResource", "MetricsSite", "metrics_site"]

_log = Logger(namespace="policyd.metrics")


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
                         "Seconds since the snapshot being served was loaded.", age)
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
                     "Seconds since the current store failure began (a failed refresh, or "
                     "one running past refresh_timeout; 0 when healthy).",
                     0.0 if failing_since is None
                     else max(0.0, snapshots.clock.seconds() - failing_since))

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
        "approved, rejected, discarded, undecided-fallback, state-unusable).",
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
                   "index because they expired.", moderation.expired)
    yield _counter("policyd_moderation_evicted",
                   "Entries dropped from the index at a cap (max_entries, max_tickets).",
                   moderation.evicted)
    yield _counter("policyd_moderation_sync_failures",
                   "Syncs with the store that failed (the state is unusable until one "
                   "succeeds).", moderation.sync_failures)
    yield _gauge("policyd_moderation_state_usable",
                 "1 when the moderation state is loaded and its last sync worked, else 0 "
                 "(lists then get their normal outcome).", 1 if moderation.usable else 0)
    state = moderation.state
    entries = GaugeMetricFamily("policyd_moderation_entries",
                                "The moderation index: greylist entries, remembered "
                                "senders, tickets, and undecided tickets among them.",
                                labels=["kind"])
    entries.add_metric(["greylist"], len(state.entries))
    entries.add_metric(["remembered"], len(state.remembered))
    entries.add_metric(["tickets"], len(state.tickets))
    entries.add_metric(["pending"], sum(1 for ticket in list(state.tickets.values())
                                        if ticket.decision is None))
    yield entries


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class MetricsResource(Resource):
    """``GET`` any path: the registry in Prometheus's text format, made on the reactor
    thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)

    def render_HEAD(self, request) -> bytes:
        """The headers a GET would have, no body (Twisted logs a line for each HEAD
        answered with a body: a health checker's every probe)."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return b""


class MetricsSite(Site):
    """The web site, shaped as a listener's factory (``service.ListenerGroup``): closed
    at shutdown without waiting, no access log (a scrape every 15 s is not news).

    Bounded like the control socket: at most ``MAX_CONNECTIONS`` open (a scraper keeps
    one or two), each closed after ``IDLE_TIMEOUT`` seconds without a request (Twisted's
    default is 12 hours).  They live in the descriptors the MTA listeners leave free, so
    whoever can reach the endpoint cannot take the MTAs' descriptors by holding
    connections; beyond the limit a new connection is refused, with one warning per
    incident."""

    noisy = False
    evicted = 0  # none: a scrape in progress is never cut short for a newcomer
    MAX_CONNECTIONS = 8
    IDLE_TIMEOUT = 30.0

    def __init__(self, resource, *args, **kwargs) -> None:
        kwargs.setdefault("timeout", self.IDLE_TIMEOUT)
        super().__init__(resource, *args, **kwargs)
        self.open: set = set()
        self.refused = 0
        self._warned_at: float | None = None

    def buildProtocol(self, addr):
        if len(self.open) >= self.MAX_CONNECTIONS:
            self.refused += 1
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= 60:
                _log.warn("metrics endpoint: {limit} connections open, refusing new ones "
                          "({refused} refused so far; next warning in a minute at the "
                          "earliest)", limit=self.MAX_CONNECTIONS, refused=self.refused)
            self._warned_at = now
            return None
        # ``ProtocolWrapper`` tells us when the connection is gone (``unregisterProtocol``).
        return ProtocolWrapper(self, super().buildProtocol(addr))

    @property
    def connections(self) -> set:
        return self.open

    def registerProtocol(self, protocol) -> None:
        self.open.add(protocol)

    def unregisterProtocol(self, protocol) -> None:
        self.open.discard(protocol)

    def drain(self, grace: float) -> defer.Deferred:
        """Stopping: a scraper reconnects; nothing here is worth waiting for."""
        for protocol in list(self.open):
            protocol.loseConnection()
        return defer.succeed(0)

    def log(self, request) -> None:
        pass


def metrics_site(service) -> MetricsSite:
    """The site for ``[metrics] listen``: policyd's collector and the process's (CPU,
    memory, descriptors: ``process_*``), in a registry of its own."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PolicydCollector(service))
    ProcessCollector(registry=registry)
    return MetricsSite(MetricsResource(registry))
