"""The metrics (issue 15): per-rule and per-list counts in the Decider, latency histograms
filled by the protocols, and the collector that reads them with the snapshot and listener
state at scrape time, on a MemoryReactor (no socket)."""

from __future__ import annotations

import base64

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import StringTransport

from policyd.core.replies import ReplyPolicy
from policyd.core.verdict import Query
from policyd.decider import Decider, FixedSnapshot, LatencyHistogram
from policyd.metrics import MetricsResource, MetricsSite
from policyd.protocols.postfix import PostfixRequest

from .protocols.fakes import LIST, MEMBER, NONMEMBER, sample_snapshot
from .test_tap import build

METRICS = "[metrics]\nlisten = tcp:9163:interface=127.0.0.1\n"


def scrape(service) -> dict:
    """name -> list of (labels, value) for every sample of the service's endpoint."""
    site = next(l.factory for l in service.listeners if l.kind == "metrics")
    assert isinstance(site, MetricsSite)
    resource = site.resource
    assert isinstance(resource, MetricsResource)

    class Request:
        def setHeader(self, name, value):
            self.content_type = value

    request = Request()
    body = resource.render_GET(request)
    assert request.content_type.startswith(b"text/plain")
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
    unlike the per-incident count)."""
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
        assert value(samples, "policyd_store_healthy") == 1
        assert value(samples, "policyd_store_refresh_failures_total") == 2
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
    assert {"policyd_store_healthy", "policyd_snapshot_age_seconds",
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
