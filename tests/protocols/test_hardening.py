"""Issue 13, unit level: connection and buffer limits, idle requests, fail-closed codecs,
CRLF and half-close on the Postfix path, log escaping and rate limiting, safe defaults.

Driven with ``StringTransport`` and ``Clock`` (no sockets); the denial-of-service checks
with a real daemon are in ``tests/integration/daemon/test_hardening.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel

from policyd import config as config_module
from policyd.logging import LineWriter, RateLimit, _open, escape_controls, make_observer
from policyd.protocols import CLOSING_SLACK, ProcessLimits, ProtocolError
from policyd.protocols import exim as exim_codec
from policyd.protocols.postfix import RequestReader
from policyd.protocols.postfix import parse_request as postfix_parse

from . import test_exim, test_postfix
from . import test_password_off_reactor as passwords
from .fakes import LIST, MEMBER, NONMEMBER

EXIM = dataclasses.replace(test_exim.CONFIG, max_connections=3)
POSTFIX = dataclasses.replace(test_postfix.CONFIG, max_connections=3)


def more(factory):
    """One more connection on ``factory``: ``(protocol, transport)``, protocol ``None``
    when refused."""
    proto = factory.buildProtocol(None)
    if proto is None:
        return None, None
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def limit_lines(events):
    return [e for e in events if e.get("log_namespace") == "policyd.limits"]


# --- 1. connection limits: idle longest closed first, then refused, one line ----------------


def test_postfix_at_max_connections_closes_the_idlest_then_refuses(events):
    """At ``max_connections`` the connection idle longest is closed (Postfix reconnects)
    and the new one admitted; with every connection receiving a request, new ones are
    refused; the incident is one warning, and one summary once it has been quiet."""
    first, first_t, clock, factory = test_postfix.connect(config=POSTFIX)
    first.dataReceived(test_postfix.request())
    clock.pump([0.5] * 10)
    others = [more(factory) for _ in range(2)]
    for proto, _ in others:
        proto.dataReceived(test_postfix.request()[:50])  # a request arriving
    clock.advance(0.5)
    fourth, _ = more(factory)
    assert fourth is not None
    assert first_t.disconnecting and first_t.value().count(b"\n\n") == 1  # its answer only
    assert not any(t.disconnecting for _, t in others)
    fourth.dataReceived(test_postfix.request()[:50])
    # Now every connection open has a request arriving: refuse.
    refused = [more(factory)[0] for _ in range(50)]
    assert refused == [None] * 50
    assert factory.refused == 50 and factory.evicted == 1
    assert len(limit_lines(events)) == 1
    for proto, _ in others:  # keep them active while time passes
        proto.connectionLost(None)
    fourth.connectionLost(None)
    first.connectionLost(None)
    clock.pump([1] * 15)
    lines = limit_lines(events)
    assert len(lines) == 2 and lines[1]["refused"] == 50 and lines[1]["closed"] == 1


def test_bursts_that_empty_the_listener_in_between_are_one_incident(events):
    """Ten bursts a second apart, each past ``max_connections`` with silent Exim
    connections that then go away (the listener is empty between bursts): one warning
    when it starts and one summary once it has been quiet, with every burst counted."""
    first, first_t, clock, factory = test_exim.connect(config=EXIM)
    first.connectionLost(None)
    for _ in range(10):
        burst = [more(factory)[0] for _ in range(6)]
        for proto in burst:
            if proto is not None:
                proto.connectionLost(None)
        assert not factory.connections
        clock.advance(1)
    assert len(limit_lines(events)) == 1
    clock.pump([1] * 15)
    lines = limit_lines(events)
    assert len(lines) == 2
    assert lines[1]["closed"] + lines[1]["refused"] >= 10 * 3
    assert lines[1]["duration"] >= 8
    clock.pump([1] * 30)
    assert len(limit_lines(events)) == 2
    assert not clock.getDelayedCalls()  # the sweeps stop once it is over


def test_postfix_incomplete_request_evicted_gets_a_4xx():
    """A connection closed at the limit while holding an incomplete request gets
    ``451 4.3.2``; a request in flight (read within the last second) is never closed."""
    stale, stale_t, clock, factory = test_postfix.connect(config=POSTFIX)
    stale.dataReceived(b"request=smtpd_access_policy\n")
    clock.pump([0.5] * 10)
    _, fresh_t = more(factory)
    _, fresh2_t = more(factory)
    clock.advance(0.2)
    fresh, _ = more(factory)
    assert stale_t.disconnecting
    assert stale_t.value() == b"action=451 4.3.2 Policy service busy, please try again later\n\n"
    assert not fresh_t.disconnecting and not fresh2_t.disconnecting


def test_exim_at_max_connections_defers_the_oldest_waiting():
    first, first_t, clock, factory = test_exim.connect(config=EXIM)
    first.dataReceived(b"POLICYD/1 list=")
    clock.advance(2)
    for proto, _ in (more(factory), more(factory)):
        proto.dataReceived(b"POLICYD/1 ")
    fourth, _ = more(factory)
    assert fourth is not None
    assert first_t.value().startswith(b"DEFER 451 4.3.2") and first_t.disconnecting
    fourth.dataReceived(b"POLICYD/1 ")
    assert more(factory)[0] is None  # every line is arriving
    clock.advance(0.05)
    silent, silent_t = more(factory)  # ... until one of them stalls for a second
    assert silent is None
    clock.advance(1)
    silent, silent_t = more(factory)
    assert silent is not None


def test_a_silent_connection_is_closable_at_once():
    """Exim writes its line as soon as it connects: a connection silent for
    ``SILENT_GRACE`` is not a request in flight and is closed first at a limit; one
    holding half a line it read just now is not closed."""
    first, first_t, clock, factory = test_exim.connect(config=EXIM)
    first.dataReceived(b"POLICYD/1 ")
    _, silent_t = more(factory)
    clock.advance(0.2)
    _, young_t = more(factory)
    assert more(factory)[0] is not None
    assert silent_t.disconnecting and silent_t.value().startswith(b"DEFER 451 4.3.2")
    assert not young_t.disconnecting and not first_t.disconnecting


# --- 1b. a burst of silent connections: the oldest silent one makes room --------------------
#
# Connections that piled up in the listen backlog are accepted in one burst, all younger
# than SILENT_GRACE, none read yet (reads happen on the next reactor turn): the MTA's
# connection among them must be admitted, and must not be closed by the next connection
# of the same burst.


def test_a_burst_of_silent_connections_admits_the_newcomer_closing_the_oldest_silent(events):
    first, first_t, clock, factory = test_exim.connect(config=EXIM)
    held = [(first, first_t)] + [more(factory) for _ in range(2)]  # the cap, all silent
    mta, mta_t = more(factory)  # the same instant: nothing idle, nothing silent long
    assert mta is not None
    assert [t.disconnecting for _, t in held] == [True, False, False]
    assert held[0][1].value().startswith(b"DEFER 451 4.3.2")
    assert more(factory)[0] is not None  # the next of the burst closes the next oldest ...
    assert [t.disconnecting for _, t in held] == [True, True, False]
    assert not mta_t.disconnecting  # ... never the MTA's, younger
    mta.dataReceived(exim_request(LIST, NONMEMBER) + b"\n")  # its request, read next turn
    assert mta_t.value().startswith(b"REJECT 550") and mta_t.disconnecting
    assert factory.evicted == 2 and factory.refused == 0
    lines = limit_lines(events)
    assert len(lines) == 1 and "max_connections = 3" in lines[0]["limit"]
    clock.pump([1] * 15)
    lines = limit_lines(events)
    assert len(lines) == 2 and lines[1]["closed"] == 2 and lines[1]["refused"] == 0


def test_a_request_begun_is_never_closed_for_a_silent_newcomer():
    """Half a Postfix request read just now (not idle a second): the oldest connection,
    yet the oldest *silent* one is closed; with every connection holding a request
    begun, the newcomer is refused and nothing is closed."""
    begun, begun_t, clock, factory = test_postfix.connect(config=POSTFIX)
    begun.dataReceived(b"request=smtpd_access_policy\n")
    silent = [more(factory) for _ in range(2)]
    newcomer, newcomer_t = more(factory)
    assert newcomer is not None
    assert not begun_t.disconnecting
    assert [t.disconnecting for _, t in silent] == [True, False]
    assert silent[0][1].value() == b""  # nothing begun: a plain close
    newcomer.dataReceived(b"request=")
    silent[1][0].dataReceived(b"request=")
    assert [more(factory)[0] for _ in range(5)] == [None] * 5
    assert not begun_t.disconnecting and not newcomer_t.disconnecting
    assert not silent[1][1].disconnecting
    assert factory.evicted == 1 and factory.refused == 5
    begun.dataReceived(test_postfix.request()[len(b"request=smtpd_access_policy\n"):])
    assert begun_t.value() == b"action=DUNNO\n\n"


def test_a_request_waiting_for_its_answer_is_never_closed_for_a_silent_newcomer():
    """An Exim request being decided (a moderator password checked in a thread) is the
    oldest connection: the oldest silent one is closed instead, and the waiting one
    gets its answer."""
    threads = passwords.Threads()
    factory = passwords.factory(threads)
    factory.max_connections = 3
    waiting, waiting_t = more(factory)
    waiting.dataReceived(passwords.request("right horse") + b"\n")
    assert waiting.waiting and waiting_t.value() == b""
    silent = [more(factory) for _ in range(2)]
    assert more(factory)[0] is not None
    assert not waiting_t.disconnecting
    assert [t.disconnecting for _, t in silent] == [True, False]
    assert more(factory)[0] is not None
    assert not waiting_t.disconnecting and silent[1][1].disconnecting
    threads.run_all()
    assert waiting_t.value().startswith(b"ACCEPT 250") and waiting_t.disconnecting


def test_at_the_descriptor_cap_a_burst_is_admitted_within_the_closing_slack():
    """For all listeners: each newcomer of a burst closes the oldest silent connection,
    whichever listener holds it, while the descriptors being closed fit in
    ``CLOSING_SLACK``; past it the newcomers are refused and nothing more is closed
    (that would free nothing this turn).  Once the closed ones are gone, the burst's
    youngest connections are still open."""
    limits = ProcessLimits(descriptors=64 + 4)
    _, _, clock, exim = test_exim.connect(config=dataclasses.replace(EXIM, max_connections=100))
    _, _, _, postfix = test_postfix.connect(config=dataclasses.replace(
        POSTFIX, max_connections=100))
    postfix.reactor = clock
    for factory in (exim, postfix):
        factory.connections.clear()
        factory.limits = limits
        limits.register(factory)
    held = [more(exim), more(exim), more(postfix), more(postfix)]
    burst = [more(postfix if i % 2 else exim) for i in range(CLOSING_SLACK + 10)]
    admitted = [pair for pair in burst if pair[0] is not None]
    assert len(admitted) == CLOSING_SLACK
    assert all(t.disconnecting for _, t in held)
    assert [t.disconnecting for _, t in admitted] == [True] * (CLOSING_SLACK - 4) + [False] * 4
    assert exim.evicted + postfix.evicted == CLOSING_SLACK
    assert exim.refused + postfix.refused == 10
    for proto, t in held + admitted:  # the reactor's next turn: their descriptors are free
        if t.disconnecting:
            proto.connectionLost(None)
    assert limits.counts() == (4, 0)
    assert more(exim)[0] is not None


def test_descriptor_cap_for_all_listeners_keeps_a_reserve():
    """Together the MTA listeners hold at most RLIMIT_NOFILE less the reserve; the
    control socket's factory has no limit."""
    limits = ProcessLimits(descriptors=64 + 4)
    _, _, clock, exim = test_exim.connect(config=dataclasses.replace(EXIM, max_connections=100))
    _, _, _, postfix = test_postfix.connect(config=dataclasses.replace(
        POSTFIX, max_connections=100))
    postfix.reactor = clock  # one clock for both listeners, as in the daemon
    for factory in (exim, postfix):
        factory.connections.clear()
        factory.limits = limits
        limits.register(factory)
    for proto, _ in [more(exim), more(exim)]:
        proto.dataReceived(b"POLICYD/1 ")
    for proto, _ in [more(postfix), more(postfix)]:
        proto.dataReceived(b"request=")
    assert more(postfix)[0] is None and more(exim)[0] is None  # none idle a second yet
    clock.advance(2)
    assert more(postfix)[0] is not None  # the Exim line stalled longest made room


# --- 8. buffered bytes: a global cap -----------------------------------------------------------


def test_buffered_bytes_are_capped_for_all_connections():
    """Incomplete requests may hold ``max_buffered`` bytes together: over it, the
    connections idle longest are answered 4xx and closed; with none idle, the request
    that overflows is; closed connections give their bytes back."""
    limits = ProcessLimits(max_buffered=10_000)
    old, old_t, clock, factory = test_postfix.connect(
        config=dataclasses.replace(POSTFIX, max_connections=100))
    factory.limits = limits
    limits.register(factory)
    partial = b"request=smtpd_access_policy\n" + b"x=" + b"y" * 4000 + b"\n"
    old.dataReceived(partial)
    assert limits.buffered == len(partial)
    clock.pump([0.5] * 10)
    new, new_t = more(factory)
    new.dataReceived(partial + partial[:2000])
    assert old_t.disconnecting and old_t.value().startswith(b"action=451 4.3.2")
    assert not new_t.disconnecting
    assert limits.buffered == len(partial) * 2 - len(partial) + 2000 or limits.buffered <= 10_000
    third, third_t = more(factory)
    third.dataReceived(partial)  # nothing idle to close: this one is refused
    assert third_t.disconnecting and third_t.value().startswith(b"action=451 4.3.2")
    assert limits.buffered <= 10_000
    new.connectionLost(None)
    old.connectionLost(None)
    third.connectionLost(None)
    assert limits.buffered == 0


# --- 1/6. idle and incomplete requests on the Postfix path -----------------------------------


def test_postfix_silent_or_incomplete_connection_closed_after_request_timeout(events):
    """A connection that sends nothing, or half a request, is closed after
    ``request_timeout`` (10 s), not ``idle_timeout`` (600 s); half a request gets a
    4xx; one summary line for all of them."""
    silent, silent_t, clock, factory = test_postfix.connect()
    half, half_t = more(factory)
    half.dataReceived(b"request=smtpd_access_policy\nsender=")
    idle, idle_t = more(factory)
    idle.dataReceived(test_postfix.request())
    clock.pump([1] * 15)
    assert silent_t.disconnecting and silent_t.value() == b""
    assert half_t.disconnecting
    assert half_t.value() == b"action=451 4.3.0 Malformed policy request: no complete request " \
                             b"within 10 s\n\n"
    assert not idle_t.disconnecting
    assert len(limit_lines(events)) == 1


def test_postfix_request_trickled_byte_by_byte_times_out_from_its_first_byte(events):
    """A slowloris: half a request, then one byte every half second.  ``request_timeout``
    counts from the request's first byte, not from its last read: the connection gets
    the 4xx and is closed at about the same time as a silent half request, however
    often bytes trickle in; a request completed meanwhile on another connection, and the
    connection's own next request, are unaffected."""
    slow, slow_t, clock, factory = test_postfix.connect()
    slow.dataReceived(b"request=smtpd_access_policy\nsender=")
    for _ in range(30):  # 15 s of one byte per 0.5 s
        if slow_t.disconnecting:
            break
        slow.dataReceived(b"x")
        clock.advance(0.5)
    assert slow_t.disconnecting
    assert slow_t.value() == b"action=451 4.3.0 Malformed policy request: no complete " \
                             b"request within 10 s\n\n"
    assert clock.seconds() <= 10 + factory.sweep_interval + 0.5
    # A connection that completes its requests, one byte at a time each but each within
    # a second, is never closed however long it lives.
    steady, steady_t = more(factory)
    whole = test_postfix.request()
    for _ in range(6):
        for byte in range(len(whole)):
            steady.dataReceived(whole[byte:byte + 1])
        clock.advance(3)
    assert not steady_t.disconnecting
    assert steady_t.value().count(b"\n\n") == 6


def test_postfix_trickling_requests_cannot_hold_every_connection(events):
    """At ``max_connections`` with every connection trickling bytes of a request begun
    more than a second ago, a newcomer (an MTA) is admitted: the connection whose request
    began first is closed with the 4xx, as a stalled one.  A request begun within the
    last second is still never closed."""
    first, first_t, clock, factory = test_postfix.connect(config=POSTFIX)
    others = [(first, first_t)] + [more(factory) for _ in range(2)]
    for proto, _ in others:
        proto.dataReceived(b"request=smtpd_access_policy\n")
        clock.advance(0.1)
    for _ in range(6):  # 3 s of a byte per connection every half second
        for proto, _ in others:
            proto.dataReceived(b"x")
        clock.advance(0.5)
    mta, mta_t = more(factory)
    assert mta is not None
    assert first_t.disconnecting
    assert first_t.value() == b"action=451 4.3.2 Policy service busy, please try again later\n\n"
    mta.dataReceived(test_postfix.request())
    assert mta_t.value().startswith(b"action=")
    # One closed for one newcomer: the other tricklers wait for their own timeout.
    assert factory.evicted == 1
    assert not others[1][1].disconnecting and not others[2][1].disconnecting
    # A request begun less than a second ago is never closed for a newcomer: with the
    # tricklers gone, the limit is full of requests arriving now, and a newcomer is
    # refused rather than one of them closed.
    for proto, transport in others[1:] + [(mta, mta_t)]:
        proto.connectionLost(None)
    arriving = [more(factory) for _ in range(3)]
    for proto, _ in arriving:
        proto.dataReceived(b"request=smtpd_access_policy\n")
    clock.advance(0.5)
    assert more(factory)[0] is None
    assert not any(t.disconnecting for _, t in arriving)


def test_postfix_crlf_request_is_answered_at_once():
    """CRLF line ends (a hand-written client, a proxy) are read as LF: the request is
    answered at once, the same answer as with LF, however the bytes are split."""
    lf = test_postfix.request(sender=NONMEMBER)
    crlf = lf.replace(b"\n", b"\r\n")
    _, t_lf, _, _ = test_postfix.connect()
    proto, _, _, _ = test_postfix.connect()
    proto.dataReceived(lf)
    expected = proto.transport.value()
    assert expected.startswith(b"action=")
    for cut in range(len(crlf) - 3, len(crlf) + 1):
        proto, transport, _, _ = test_postfix.connect()
        proto.dataReceived(crlf[:cut])
        proto.dataReceived(crlf[cut:])
        assert transport.value() == expected, cut


def test_postfix_incomplete_request_at_half_close_is_answered_and_logged(events):
    proto, transport, _, _ = test_postfix.connect()
    proto.dataReceived(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
    proto.readConnectionLost()
    assert transport.value().startswith(b"action=451 4.3.0 Malformed policy request: "
                                         b"incomplete request")
    assert transport.disconnecting
    assert any("incomplete request" in str(e.get("reason", "")) for e in events
               if e.get("log_level") == LogLevel.warn)


# --- 4/5. the Exim codec: linear, fail-closed --------------------------------------------------


def exim_request(lists: str, sender: str = "", extra: bytes = b"") -> bytes:
    return (b"POLICYD/1 list=" + lists.encode() + b" sender="
            + base64.b64encode(sender.encode()) + extra)


@pytest.mark.parametrize("data", [
    exim_request(LIST) .replace(b"list=", b"list=\0"),
    exim_request(LIST + "\0"),
    exim_request(LIST, extra=b"\0"),
    b"POLICYD/1 list=" + LIST.encode() + b" junk sender=",
    b"POLICYD/1 list=" + LIST.encode() + b" evil@x sender=",
    exim_request("@" + LIST),
    exim_request("nolocalpart"),
    exim_request(LIST + ",a b@x"),
    exim_request(LIST + "\x1b[2J"),
    exim_request(",".join(["a@x"] * 101)),
])
def test_exim_malformed_list_field_is_deferred_never_accepted(data):
    """A NUL, a stray word after the list address, anything that is not one address
    per entry: DEFER 4xx, even for the null sender; never the ACCEPT of an unmanaged
    list."""
    with pytest.raises(ProtocolError):
        exim_codec.parse_request(data)
    answer, closed = test_exim.ask(data + b"\n")
    assert answer.startswith(b"DEFER 451 4.3.0 Malformed policy request"), answer
    assert closed


def _best_time(f, arg, repeat=7) -> float:
    """The least CPU time of this thread over ``repeat`` runs: a growth rate, not a
    speed (time on other threads and time descheduled on a busy machine do not count)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.thread_time()
        f(arg)
        best = min(best, time.thread_time() - started)
    return best


def _swallow(f):
    def run(data):
        try:
            f(data)
        except ProtocolError:
            pass
    return run


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([b"x", b"ab", b"word5"]))
def test_exim_parse_time_grows_linearly(word):
    """A line 8 times longer costs about 8 times as much (a quadratic codec: 64):
    a value continued over many words (an unknown key's)."""
    def line(n):
        words = (n - 40) // (len(word) + 1)
        return exim_request(LIST, MEMBER, b" future=" + b" ".join([word] * words))
    parse = _swallow(exim_codec.parse_request)
    small, large = line(8_000), line(64_000)
    ratio = _best_time(parse, large) / max(_best_time(parse, small), 1e-6)
    print(f"exim parse 64 KB / 8 KB time ratio: {ratio:.1f} (linear 8, quadratic 64)")
    assert ratio < 32


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([1, 7, 16]))
def test_postfix_reader_time_grows_linearly_in_small_reads(chunk):
    """An incomplete request fed in small reads: 8 times the bytes, about 8 times the
    time (re-copying the buffer per read: 64)."""
    def feed(n):
        data = b"".join(b"a%d=%s\n" % (i, b"v" * 30) for i in range(n // 36))
        reader = RequestReader(max_line=4096, max_attributes=100, max_request=1 << 20)
        for i in range(0, len(data), chunk):
            reader.feed(data[i:i + chunk])
    small, large = 16_000, 128_000  # both past max_line: the same checks per read
    ratio = _best_time(feed, large, 5) / max(_best_time(feed, small, 5), 1e-6)
    print(f"postfix reader {chunk}-byte reads, 128 KB / 16 KB time ratio: {ratio:.1f}")
    assert ratio < 32


# --- fuzz targets (bounded): only the codec's error, never ACCEPT malformed, chunking --------

VALID_EXIM = exim_request(LIST, "", b"")  # the null sender: REJECT
VALID_POSTFIX = test_postfix.request(sender=NONMEMBER)
_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"\0", b"\n", b"\r", b"\r\n", b" ", b",", b"=", b"@", b'"', b"\x1b", b"list=", b"sender="])


def _mutate(base: bytes, edits) -> bytes:
    data = base
    for position, insert, delete in edits:
        position %= len(data) + 1
        data = data[:position] + insert + data[position + delete:]
    return data


def _split(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


_EDITS = st.lists(st.tuples(st.integers(0, 400), _BYTES, st.integers(0, 3)), max_size=4)
_CUTS = st.lists(st.integers(0, 400), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_EDITS, _CUTS)
def test_fuzz_exim_codec(edits, cuts):
    """Mutations of a request the null sender sends: ``parse_request`` raises only
    ``ProtocolError``; a request it refuses is answered DEFER, never ACCEPT; what it
    parses names real addresses; the answer does not depend on the chunking."""
    data = _mutate(VALID_EXIM, edits)
    line = data.split(b"\n", 1)[0]
    try:
        request = exim_codec.parse_request(line)
    except ProtocolError:
        request = None
    answer, _ = test_exim.ask(data, half_close=True)
    if request is None:
        assert answer.startswith(b"DEFER "), answer
    else:
        for address in request.lists:
            assert "@" in address and not any(ord(c) < 32 for c in address)
    proto, transport, _, _ = test_exim.connect()
    for chunk in _split(data, cuts):
        proto.dataReceived(chunk)
    if not proto.answered:
        proto.readConnectionLost()
    assert transport.value() == answer


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_EDITS, _CUTS)
def test_fuzz_postfix_codec(edits, cuts):
    """Mutations of a RCPT request: the reader raises nothing (errors are items), a
    malformed request is answered 451, never DUNNO or OK; chunking changes nothing."""
    data = _mutate(VALID_POSTFIX, edits)
    items = RequestReader().feed(data)
    for item in items:
        assert isinstance(item, (ProtocolError, type(postfix_parse(b"a=b"))))
    chunked = RequestReader()
    split_items = []
    for chunk in _split(data, cuts):
        split_items.extend(chunked.feed(chunk))
    assert [repr(i) if not isinstance(i, ProtocolError) else i.reason for i in items] == \
        [repr(i) if not isinstance(i, ProtocolError) else i.reason for i in split_items]
    proto, transport, _, _ = test_postfix.connect()
    proto.dataReceived(data)
    answers = [a for a in transport.value().split(b"\n\n") if a]
    for item, answer in zip(items, answers):
        if isinstance(item, ProtocolError):
            assert answer.startswith(b"action=451 4.3.0"), answer


# --- 7. log escaping: one line per decision ----------------------------------------------------

CONTROLS = ["\n", "\r", "\0", "\x1b"]


@pytest.mark.parametrize("char", CONTROLS)
def test_control_characters_are_escaped_one_line_per_decision(char, events):
    """A control character in the sender, through Exim (base64) and Postfix: every log
    line written is one line, the character escaped."""
    out = io.StringIO()
    writer, observer = make_observer("info", out)
    sender = f"evil{char}2026-01-01T00:00:00.000 info [policyd.decision] forged@x"
    exim_data = exim_request(LIST, sender) + b"\n"
    test_exim.ask(exim_data)
    postfix_sender = sender.replace("\n", "\x0b").encode()  # a newline ends a Postfix line
    proto, _, _, _ = test_postfix.connect()
    proto.dataReceived(test_postfix.request(sender=postfix_sender))
    for event in list(events):
        observer(event)
    writer.decision("exim", "reject", LIST, sender, "-", None, "rule", "REJECT x", 0.1, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(events) + 1 >= 3
    assert all(line[:4].isdigit() for line in lines), lines
    assert not any(c in out.getvalue().replace("\n", "") for c in "\r\0\x1b")


def test_escape_controls():
    assert escape_controls("a\nb\r\0\x1b[31m\x85\u2028") == "a\\nb\\r\\x00\\x1b[31m\\x85\\u2028"
    assert escape_controls("plain") == "plain"
    # Invisible format characters and odd spaces: a right-to-left override in a sender
    # made the line read otherwise than it is written.
    assert escape_controls("a\u202eb\u200bc\xa0d\ufeffe f") == \
        "a\\u202eb\\u200bc\\xa0d\\ufeffe f"


def test_invisible_class_is_this_pythons_unicode():
    """``_INVISIBLE`` is written out (deriving it costs a third of a second at import):
    it must be exactly Unicode's format characters and non-ASCII separators."""
    import unicodedata

    from policyd.logging import _INVISIBLE

    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        invisible = (code >= 0xA0
                     and unicodedata.category(char) in ("Cf", "Zs", "Zl", "Zp"))
        assert (_INVISIBLE.match(char) is not None) == invisible, hex(code)


FORGING = ["x> senders=- rule=accept reply='DUNNO' 0.001ms client_address=9.9.9.9 <@e.example",
           '"a b"@x.example', "back\\slash@x.example", "tab\there@x.example"]


@pytest.mark.parametrize("sender", FORGING)
def test_a_sender_cannot_forge_decision_line_fields(sender, events):
    """The envelope sender (and the recipient: any SMTP client's words) was written as it
    came inside ``sender=<...>``: a ``>`` and spaces in it forged ``rule=`` and the
    client fields.  Now each field is one word: white space, ``<>"\\`` escaped."""
    out = io.StringIO()
    writer, observer = make_observer("info", out)
    for recipient in (LIST, 'x y rule=accept"@lists.example.org'):
        proto, _, _, _ = test_postfix.connect()
        proto.dataReceived(test_postfix.request(sender=sender, recipient=recipient))
    test_exim.ask(exim_request(LIST, sender) + b"\n")
    for event in list(events):
        observer(event)
    lines = [line for line in out.getvalue().splitlines() if "[policyd.decision]" in line]
    assert len(lines) == 3
    for line in lines:
        words = line.split(" ")
        assert sum(w.startswith("rule=") for w in words) <= 1, line
        assert sum(w.startswith("senders=") for w in words) <= 1, line
        assert sum(w.startswith("client_address=") for w in words) <= 1, line
        sender_word = next(w for w in words if w.startswith("sender="))
        assert sender_word.startswith("sender=<") and sender_word.endswith(">"), line
        assert ">" not in sender_word[8:-1] and "<" not in sender_word[8:-1]


# --- 2. rate-limited warnings -------------------------------------------------------------------


def test_outsider_warnings_are_rate_limited_with_a_summary():
    """EMFILE lines from Twisted's accept loop and malformed-request warnings: five per
    kind and interval, then one summary line with the counts."""
    now = [0.0]
    seen = []
    limit = RateLimit(seen.append, interval=60, burst=5, clock=lambda: now[0])
    for _ in range(1000):
        limit({"log_namespace": "twisted.internet.tcp.Port", "log_level": LogLevel.info,
               "log_format": "EMFILE encountered; releasing reserved file descriptor."})
        limit({"log_namespace": "policyd.exim", "log_level": LogLevel.warn,
               "log_format": "malformed Exim policy request from {peer}: {reason}"})
    limit({"log_namespace": "policyd", "log_format": "other"})
    assert len(seen) == 11
    now[0] = 61
    limit.tick()
    assert len(seen) == 12
    summary = seen[-1]["summary"]
    assert "1990" in summary and "accept errors" in summary and ": 995" in summary


# --- 9. safe defaults, 10. start-up checks ------------------------------------------------------


def test_a_traceback_in_the_log_is_bounded_and_escaped():
    """A failure deep in a recursion wrote one line per frame (2,000 for a From: that
    made the stdlib's address parser recurse): identical frames in a row are counted as
    Python's own tracebacks do, other long stacks cut to ``MAX_FRAMES`` frames, and the
    exception's text is escaped (a peer's newline cannot forge a line) and cut."""
    from twisted.python.failure import Failure

    from policyd.logging import MAX_FRAMES

    def same(n):
        if n:
            return same(n - 1)
        raise ValueError("forged\n2026-01-01 info [policyd.decision] " + "x" * 10_000)

    def ping(n):
        return pong(n - 1) if n else 1 / 0

    def pong(n):
        return ping(n)

    out = io.StringIO()
    writer = LineWriter(out)
    written = {}
    for deep, kind in ((same, "ValueError"), (ping, "ZeroDivisionError")):
        try:
            deep(300)
        except Exception:
            failure = Failure()
        failure.cleanFailure()  # as a Deferred's errback leaves it: frames only
        out.seek(0)
        out.truncate()
        writer({"log_level": LogLevel.critical, "log_namespace": "t", "log_time": 0.0,
                "log_format": "it broke", "log_failure": failure})
        lines = out.getvalue().splitlines()
        assert len(lines) <= 2 * MAX_FRAMES + 4, len(lines)
        assert lines[1] == "Traceback (most recent call last):"
        assert lines[-1].startswith(f"builtins.{kind}: ")
        assert len(lines[-1]) < 2100
        assert all(not line.startswith("2026-01-01") for line in lines)
        written[kind] = lines
    assert any("[Previous line repeated 29" in line for line in written["ValueError"])
    assert any("more frames left out]" in line for line in written["ZeroDivisionError"])


def test_safe_defaults():
    config = config_module.parse("")
    assert config.exim.listen == ("unix:/run/policyd/exim.sock:mode=660",)
    assert config.postfix.listen == ("unix:/run/policyd/postfix.sock:mode=660",)
    assert config.daemon.control_socket_mode == 0o660
    assert config.exim.max_connections == config.postfix.max_connections == 1000
    assert config.postfix.request_timeout == 10
    with pytest.raises(config_module.ConfigError, match="control_socket_mode"):
        config_module.parse("[daemon]\ncontrol_socket_mode = 0666\n")


def test_log_file_is_created_0640(tmp_path):
    old = os.umask(0o022)
    try:
        _open(str(tmp_path / "policyd.log")).close()
    finally:
        os.umask(old)
    assert (tmp_path / "policyd.log").stat().st_mode & 0o777 == 0o640


def _checked(tmp_path, daemon="", exim=None):
    exim = exim or f"unix:{tmp_path}/exim.sock:mode=660"
    text = (f"[daemon]\ncontrol_socket = {tmp_path}/control.sock\n{daemon}"
            f"[exim]\nlisten = {exim}\n[postfix]\nlisten = unix:{tmp_path}/pf.sock\n")
    config_module.check_paths(config_module.parse(text, base=tmp_path))


def test_check_paths_log_file_and_socket_directories(tmp_path):
    _checked(tmp_path, f"log_file = {tmp_path}/new/policyd.log\n")
    with pytest.raises(config_module.ConfigError, match=r"\[daemon\] log_file .* directory"):
        _checked(tmp_path, f"log_file = {tmp_path}\n")
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(config_module.ConfigError, match="not writable"):
            _checked(tmp_path, f"log_file = {tmp_path}/ro/policyd.log\n")
    with pytest.raises(config_module.ConfigError,
                       match=r"\[exim\] listen = .* directory .*missing does not exist"):
        _checked(tmp_path, exim=f"unix:{tmp_path}/missing/exim.sock")


def test_check_config_refuses_a_directory_as_log_file(tmp_path, capsys):
    from policyd import daemon

    conf = tmp_path / "policyd.conf"
    conf.write_text(f"[daemon]\nstate_dir = {tmp_path}\ncontrol_socket = {tmp_path}/c.sock\n"
                    f"log_file = {tmp_path}\n[exim]\nlisten = unix:{tmp_path}/e.sock\n"
                    f"[postfix]\nlisten = unix:{tmp_path}/p.sock\n")
    assert daemon.main(["--config", str(conf), "--check-config"], environ={}) == 2
    assert "[daemon] log_file" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([b"client_address", b"client_name", b"queue_id",
                                        b"sasl_username", b"other"]),
                       st.binary(max_size=12), max_size=5))
def test_postfix_client_fields_fast_path_is_log_fields(attributes):
    """The decision line's client fields, built on the fast path, are exactly what
    ``log_fields`` writes for the same attributes (quoting and escaping included)."""
    from policyd.logging import log_fields
    from policyd.protocols.postfix import _LOGGED_ATTRIBUTES, PostfixRequest

    expected = log_fields((name.decode("ascii"),
                           attributes.get(name, b"").decode("utf-8", "backslashreplace"))
                          for name in _LOGGED_ATTRIBUTES)
    assert PostfixRequest(attributes).client_fields() == expected
