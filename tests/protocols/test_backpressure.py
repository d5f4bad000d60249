"""A peer that sends requests and never reads the answers: the daemon stops reading it
instead of queueing answers without end, and a connection closed while its answers
cannot leave is aborted.  Real Unix sockets and the real reactor (pytest-twisted)."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from policyd.decider import Decider
from policyd.core.replies import ReplyPolicy
from policyd.protocols import ABORT_AFTER
from policyd.protocols.postfix import PostfixFactory

from .fakes import LIST, StaticSnapshots, sample_snapshot
from .test_postfix import CONFIG, connect, request

# The null sender to the list: refused, a long answer for a short request.
REQUEST = request(sender="")
SEND_AT_MOST = 32 << 20


def _queued(transport) -> int:
    return transport._tempDataLen + len(transport.dataBuffer) - transport.offset


@pytest_twisted.inlineCallbacks
def test_a_client_that_never_reads_its_answers_stops_being_read(tmp_path):
    factory = PostfixFactory(Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy()),
                             CONFIG, reactor)
    path = str(tmp_path / "postfix.sock")
    port = reactor.listenUNIX(path, factory)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        client.setblocking(False)
        burst = REQUEST * 200
        sent = stalled = 0
        while sent < SEND_AT_MOST and stalled < 50:
            try:
                # From where the last send stopped: a stream of whole requests.
                offset = sent % len(burst)
                sent += client.send(burst[offset:])
                stalled = 0
            except BlockingIOError:
                stalled += 1
            yield deferLater(reactor, 0.001 if stalled else 0, lambda: None)
        (protocol,) = factory.connections
        transport = protocol.transport
        queued = _queued(transport)
        print(f"\nsent {sent:,} bytes of requests before the daemon stopped reading; "
              f"{queued:,} bytes of answers queued; answers {protocol.reads} reads")
        assert sent < SEND_AT_MOST  # the sender was made to wait
        assert transport.producerPaused
        assert queued < 4 * transport.bufferSize
        # The client reads at last: the daemon reads again and answers every request.
        answered = 0
        tail = b""
        wanted = sent // len(REQUEST)
        for _ in range(5000):
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                yield deferLater(reactor, 0.002, lambda: None)
                continue
            assert chunk
            data = tail + chunk
            answered += data.count(b"\n\n")
            tail = data[data.rfind(b"\n\n") + 2:] if b"\n\n" in data else data
            if answered >= wanted:
                break
        assert answered == wanted
        assert not transport.producerPaused
    finally:
        client.close()
        yield port.stopListening()
        for protocol in list(factory.connections):
            protocol.transport.abortConnection()
        yield deferLater(reactor, 0.01, lambda: None)


def test_a_connection_closed_with_answers_it_does_not_take_is_aborted():
    proto, transport, clock, factory = connect()
    proto.dataReceived(REQUEST)
    factory.evicting.add(proto)
    proto.transport.loseConnection()
    transport.disconnecting = False  # as if the answer could not leave
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    factory.sweep(clock.seconds())  # notes when it began to close
    clock.advance(ABORT_AFTER - 1)
    factory.sweep(clock.seconds())
    assert not aborted
    clock.advance(1)
    factory.sweep(clock.seconds())
    assert aborted


@pytest_twisted.inlineCallbacks
def test_a_pipelined_scrape_flood_costs_one_rendering_and_an_mta_query_still_answers(
        tmp_path, monkeypatch):
    """The metrics endpoint (a real TCP socket) sent 6000 pipelined GETs by a client that
    never reads, then a Postfix query on the same reactor: the query is answered, and by
    then the endpoint has rendered its page once (twisted.web rendered every pipelined
    request it had read, a millisecond each, before anything else ran) and closed."""
    from policyd import metrics

    from ..test_tap import build

    renders = []
    render = metrics.generate_latest
    monkeypatch.setattr(metrics, "generate_latest",
                        lambda registry: renders.append(1) or render(registry))
    service, _, _ = build(tmp_path, text="[metrics]\nlisten = tcp:0:interface=127.0.0.1\n")
    site = next(l.factory for l in service.listeners if l.kind == "metrics")
    metrics_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    postfix = PostfixFactory(Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy()),
                             CONFIG, reactor)
    path = str(tmp_path / "postfix.sock")
    postfix_port = reactor.listenUNIX(path, postfix)
    scraper = socket.create_connection(("127.0.0.1", metrics_port.getHost().port))
    mta = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        scraper.setblocking(False)
        flood = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 6000
        sent = 0
        for _ in range(200):
            try:
                sent += scraper.send(flood[sent:])
            except OSError:
                pass
            if sent >= len(flood) or (sent and not site.connections):
                break
            yield deferLater(reactor, 0.001, lambda: None)
        assert sent >= 1 << 16  # well past one read's worth of requests
        mta.connect(path)
        mta.setblocking(False)
        mta.sendall(REQUEST)
        answer = b""
        for _ in range(5000):
            try:
                answer += mta.recv(4096)
            except BlockingIOError:
                yield deferLater(reactor, 0.001, lambda: None)
            if answer.endswith(b"\n\n"):
                break
        assert answer.startswith(b"action=")
        print(f"\nsent {sent:,} bytes of pipelined scrapes; {len(renders)} renderings "
              "before the MTA query was answered")
        assert len(renders) == 1
        for _ in range(100):
            if not site.connections:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert not site.connections  # answered once, closed
    finally:
        scraper.close()
        mta.close()
        yield metrics_port.stopListening()
        yield postfix_port.stopListening()
        for protocol in list(site.connections) + list(postfix.connections):
            protocol.transport.abortConnection()
        yield deferLater(reactor, 0.01, lambda: None)
