"""The metrics endpoint's HTTP server (``protocols.http``): a pure codec for the request
head, and a protocol that answers one request per connection, never reads a body, and
bounds the head in bytes and in time (StringTransport + Clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd.protocols import http
from policyd.protocols.http import (ABORT_AFTER, MAX_FIELDS, MAX_HEAD, REQUEST_TIMEOUT,
                                    HttpError, HttpFactory, HttpRequest, head_end,
                                    parse_head)

GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def test_parse_a_scrape():
    request = parse_head(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9163\r\n"
                         b"Accept: text/plain;version=0.0.4\r\nContent-Length: 0\r\n\r\n")
    assert request == HttpRequest("GET", "/metrics", "HTTP/1.1", (
        ("host", "127.0.0.1:9163"), ("accept", "text/plain;version=0.0.4"),
        ("content-length", "0")))
    assert parse_head(b"\r\nHEAD / HTTP/1.0\n\n").method == "HEAD"


@pytest.mark.parametrize("head, status", [
    (b"GET /metrics\r\n\r\n", 400),                            # HTTP/0.9
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"GET /m\x00 HTTP/1.1\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 107374182400\r\n\r\n", 413),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\n\r\n", 413),
    (b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n" + b"A: b\r\n" * (MAX_FIELDS + 1) + b"\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nA: " + b"b" * MAX_HEAD + b"\r\n\r\n", 431),
])
def test_parse_errors_say_whose_fault(head, status):
    with pytest.raises(HttpError) as info:
        parse_head(head)
    assert info.value.status == status


@given(st.integers(min_value=0, max_value=len(GET)))
def test_the_head_ends_at_its_empty_line_however_the_bytes_arrive(split):
    """Looking again from where the last look stopped finds the same end."""
    first = head_end(GET[:split])
    if first is None:  # not found in what had come: found from there on
        assert head_end(GET, split) == len(GET)
    else:
        assert first == len(GET)
    assert head_end(GET + GET) == len(GET)


def connect(respond=None):
    clock = Clock()
    answers = []

    def default(request):
        answers.append(request)
        return http.format_response(200, (("Content-Type", "text/plain"),), b"page\n",
                                    head_only=request.method == "HEAD")
    factory = HttpFactory(respond or default, clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, factory, clock, answers


def test_pipelined_requests_get_one_answer_and_the_connection_is_closed():
    """6000 pipelined GETs in one read (a client that never reads its answers): one is
    answered, the rest never looked at; the connection is no longer read and closed."""
    protocol, transport, factory, clock, answers = connect()
    protocol.dataReceived(GET * 6000)
    protocol.dataReceived(GET * 100)  # read before the pause took effect
    assert len(answers) == 1
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in transport.value()
    assert transport.producerState == "paused" and transport.disconnecting


def test_a_request_body_is_refused_never_read():
    """Content-Length of 100 GB, or chunked: 413 at once, the body never buffered."""
    for header in (b"Content-Length: 107374182400", b"Transfer-Encoding: chunked"):
        protocol, transport, factory, clock, answers = connect()
        protocol.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + header +
                              b"\r\n\r\n")
        protocol.dataReceived(b"A" * (1 << 16))
        assert transport.value().startswith(b"HTTP/1.1 413 ")
        assert answers == [] and protocol._buffer == b""
        assert transport.producerState == "paused" and transport.disconnecting


def test_a_head_that_never_ends_is_refused_at_max_head():
    protocol, transport, factory, clock, answers = connect()
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nX-a: ")
    for _ in range(MAX_HEAD // 1024 + 1):
        protocol.dataReceived(b"b" * 1024)
    assert transport.value().startswith(b"HTTP/1.1 431 ") and transport.disconnecting
    assert len(protocol._buffer) == 0


def test_a_trickled_head_is_cut_off_at_the_request_timeout_from_the_accept():
    """Slowloris: a byte every second keeps no connection past REQUEST_TIMEOUT (the
    time runs from the accept, not from the last byte)."""
    protocol, transport, factory, clock, answers = connect()
    for byte in (b"GET /metrics HTTP/1.1\r\nX-a: " + b"b" * 100)[:int(REQUEST_TIMEOUT)]:
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.999)
    assert not transport.disconnecting
    clock.advance(REQUEST_TIMEOUT - clock.seconds())
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    assert answers == []


def test_an_answer_not_taken_is_aborted():
    """A client that does not read its answer: the connection is aborted ABORT_AFTER
    seconds after the answer was written, nothing more is queued for it."""
    protocol, transport, factory, clock, answers = connect()
    clock.advance(REQUEST_TIMEOUT - 1)
    protocol.dataReceived(GET)
    assert transport.disconnecting and not transport.disconnected
    clock.advance(ABORT_AFTER - 0.5)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected  # StringTransport.abortConnection
    protocol.connectionLost(None)
    assert not clock.getDelayedCalls() and not factory.connections


def test_an_answer_that_fails_is_a_500_and_logged(caplog):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        protocol, transport, *_ = connect(respond=lambda request: 1 / 0)
        protocol.dataReceived(GET)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value().startswith(b"HTTP/1.1 500 ") and transport.disconnecting
    assert any(e.get("log_failure") for e in events)
