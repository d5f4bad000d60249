"""A client pipelining many Postfix requests in one read: they are answered a bounded
number per turn of the reactor (the connection not read meanwhile), malformed ones close
the connection after a few, and what a request's failure leaves behind is no cycle for
the collector.  ``StringTransport`` and ``Clock``; then two real Unix connections on the
real reactor, one flooding, one asking as Postfix does."""

from __future__ import annotations

import gc
import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport

from policyd.core.replies import ReplyPolicy
from policyd.decider import Decider
from policyd.protocols import ProcessLimits, ProtocolError
from policyd.protocols.postfix import (MALFORMED_MAX, PER_TURN, PostfixFactory,
                                       RequestReader)

from .fakes import NONMEMBER, StaticSnapshots, sample_snapshot
from .test_postfix import CONFIG, connect, request


def answers(transport) -> list[bytes]:
    return [a for a in transport.value().split(b"\n\n") if a]


def test_a_pipelined_read_is_answered_a_turn_at_a_time_in_order():
    proto, transport, clock, _ = connect()
    writes = []
    write = transport.write
    transport.write = lambda data: (writes.append(data.count(b"\n\n")), write(data))
    senders = [f"s{n}@example.net" for n in range(3 * PER_TURN + 5)]
    proto.dataReceived(b"".join(request(sender=s, instance=str(n))
                                for n, s in enumerate(senders)))
    assert writes == [PER_TURN]
    assert transport.producerState == "paused"  # the rest wait: nothing more is read
    clock.advance(0)  # (a Clock runs the calls each turn schedules for now at once)
    assert writes == [PER_TURN, PER_TURN, PER_TURN, 5]
    assert len(answers(transport)) == len(senders)
    assert transport.producerState == "producing"  # read again
    assert not proto.reader.pending
    # Then a request as Postfix sends it: answered at once, as ever.
    transport.clear()
    proto.dataReceived(request())
    assert answers(transport) == [b"action=DUNNO"]


def test_answers_keep_the_order_of_the_requests_across_turns():
    proto, transport, clock, _ = connect(config=CONFIG.__class__(
        **{**CONFIG.__dict__, "mode": "envelope"}))
    from .fakes import LIST, MEMBER
    # A nonmember (held: HOLD) and a member (DUNNO) alternating, then an unknown list.
    blocks = [request(sender=NONMEMBER if n % 2 else MEMBER) for n in range(2 * PER_TURN)]
    blocks.append(request(recipient="nolist@" + LIST.split("@")[1]))
    proto.dataReceived(b"".join(blocks))
    while proto._next_turn is not None:
        clock.advance(0)
    got = answers(transport)
    assert len(got) == len(blocks)
    for n, answer in enumerate(got[:-1]):
        assert (answer == b"action=DUNNO") == (n % 2 == 0), (n, answer)
    assert got[-1].startswith(b"action=550 5.1.1")


def test_more_arriving_while_a_backlog_waits_goes_behind_it():
    proto, transport, clock, _ = connect()
    proto.dataReceived(request(instance="first") * (PER_TURN + 1))
    # The transport resumed itself (its queued answers left) and read on.
    proto.dataReceived(request(sender="", instance="last"))
    assert transport.producerState == "paused"
    while proto._next_turn is not None:
        clock.advance(0)
    got = answers(transport)
    assert len(got) == PER_TURN + 2
    assert got[-1].startswith(b"action=")
    assert got[-1] != b"action=DUNNO"  # the null sender's answer, last


def test_malformed_requests_close_the_connection_after_a_few():
    """Postfix sends none; each costs an answer (24 x the bytes of ``x\\n\\n``) and a
    log event: a read of 20,000 of them got 20,000 answers queued in one turn."""
    proto, transport, clock, factory = connect()
    proto.dataReceived(b"x\n\n" * 20000)
    while proto._next_turn is not None:
        clock.advance(0)
    got = answers(transport)
    assert len(got) == MALFORMED_MAX
    assert all(a.startswith(b"action=451 4.3.0 Malformed policy request") for a in got)
    assert transport.disconnecting


def test_a_few_malformed_requests_leave_the_connection_usable():
    proto, transport, clock, _ = connect()
    proto.dataReceived(b"x\n\n" * (MALFORMED_MAX - 1))
    assert not transport.disconnecting
    transport.clear()
    proto.dataReceived(request())
    assert answers(transport) == [b"action=DUNNO"]


def test_a_failed_request_leaves_no_cycle_for_the_collector():
    """The error of a malformed request held its traceback, hence ``feed``'s frame and
    the list of results holding the error: a cycle per request, freed only by the cyclic
    collector (a read of 20,000 left about 30 MB until it ran)."""
    reader = RequestReader()
    gc.collect()
    gc.disable()
    try:
        for data in (b"x\n\n" * 50, b"x\n\n", b"a=1\na=2\n\n"):
            for item in reader.feed(data):
                assert isinstance(item, ProtocolError)
                assert item.__traceback__ is None
            del item
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_the_limit_leaves_whole_requests_for_the_next_call():
    reader = RequestReader()
    data = request(instance="a") + request(instance="b") + request(instance="c")[:40]
    first = reader.feed(data, 1)
    assert [r.attributes[b"instance"] for r in first] == [b"a"]
    assert reader.backlog and reader.pending
    second = reader.feed(b"", 1)
    assert [r.attributes[b"instance"] for r in second] == [b"b"]
    assert not reader.backlog and reader.pending  # the third is incomplete
    third = reader.feed(request(instance="c")[40:], 1)
    assert [r.attributes[b"instance"] for r in third] == [b"c"]
    assert not reader.pending


@pytest_twisted.inlineCallbacks
def test_a_flood_of_pipelined_requests_does_not_hold_back_another_client(tmp_path):
    """Two real connections: one writes 20,000 requests at once and reads its answers;
    the other asks one question, as Postfix does, while the first is being answered.
    Its answer comes before the flood's last: the flood is answered a few requests per
    turn of the reactor (it held the reactor for all of them)."""
    factory = PostfixFactory(Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy()),
                             CONFIG, reactor)
    per_write = []  # answers per write: one write per turn of a connection
    write = factory.write
    factory.write = lambda transport, data: (per_write.append(data.count(b"\n\n")),
                                             write(transport, data))
    path = str(tmp_path / "postfix.sock")
    port = reactor.listenUNIX(path, factory)
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        flood.connect(path)
        asker.connect(path)
        flood.setblocking(False)
        asker.setblocking(False)
        count = 20000
        # The shortest request that is decided: about 1,500 of them in a read of 64 KB.
        data = b"protocol_state=RCPT\nsender=\nrecipient=x@example.org\n\n" * count
        sent = 0
        flood_answers = 0
        asked_at = None
        asker_done_at_flood = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sent < len(data):
                try:
                    sent += flood.send(data[sent:sent + (1 << 20)])
                except BlockingIOError:
                    pass
            try:
                flood_answers += flood.recv(1 << 20).count(b"\n\n")
            except BlockingIOError:
                pass
            if asked_at is None and flood_answers > 0:
                asker.send(request())
                asked_at = flood_answers
            if asked_at is not None and asker_done_at_flood is None:
                try:
                    if asker.recv(4096).endswith(b"\n\n"):
                        asker_done_at_flood = flood_answers
                except BlockingIOError:
                    pass
            if flood_answers >= count and asker_done_at_flood is not None:
                break
            yield deferLater(reactor, 0, lambda: None)
        assert flood_answers == count
        assert asker_done_at_flood is not None
        assert asker_done_at_flood < count / 2, (asked_at, asker_done_at_flood)
        # A read brought hundreds of requests at a time; no turn answered more than
        # PER_TURN of them.
        assert max(per_write) == PER_TURN, max(per_write)
    finally:
        flood.close()
        asker.close()
        yield port.stopListening()
        for protocol in list(factory.connections):
            protocol.transport.abortConnection()
        yield deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.inlineCallbacks
def test_a_request_that_arrived_during_a_long_turn_is_answered_not_timed_out(tmp_path):
    """The victim connects, then writes a whole request while the reactor spends 1.5 s
    on another connection's answer.  Twisted runs the due timers before it polls again:
    the sweep saw the victim silent for ``request_timeout`` (1 s) and closed it, its
    request unread in the socket.  A late sweep now spares a connection with bytes
    waiting; the next one, on time, would still close a silent one."""
    import dataclasses
    import threading

    config = dataclasses.replace(CONFIG, request_timeout=1.0)
    factory = PostfixFactory(Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy()),
                             config, reactor)
    answer = factory.answer
    slowed = []

    def slow_answer(request_, transport=None):
        if not slowed:
            slowed.append(True)
            time.sleep(1.5)  # a long turn of the reactor
        return answer(request_, transport)

    factory.answer = slow_answer
    path = str(tmp_path / "postfix.sock")
    port = reactor.listenUNIX(path, factory)
    out = {}

    def clients():
        victim = socket.socket(socket.AF_UNIX)
        staller = socket.socket(socket.AF_UNIX)
        try:
            victim.connect(path)
            staller.connect(path)
            time.sleep(0.3)  # both accepted, idle
            staller.sendall(request())
            time.sleep(0.3)  # the reactor is in the slow answer now
            victim.sendall(request())
            victim.settimeout(10)
            try:
                out["victim"] = victim.recv(1000)
            except OSError as error:
                out["victim"] = repr(error)
        finally:
            victim.close()
            staller.close()

    thread = threading.Thread(target=clients, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if not thread.is_alive():
                break
            yield deferLater(reactor, 0.02, lambda: None)
        assert out.get("victim") == b"action=DUNNO\n\n"
    finally:
        yield port.stopListening()
        for protocol in list(factory.connections):
            protocol.transport.abortConnection()
        yield deferLater(reactor, 0.01, lambda: None)


class _ClosingTransport(StringTransport):
    """A ``StringTransport`` whose close reaches its protocol, as a socket's does: the
    factory stops counting the connection (its slot against the descriptor limit)."""

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(None)


def test_connections_left_idle_one_after_another_are_one_incident_in_the_log():
    """A client opening a connection per sweep, each sending one request and left idle:
    the sweep closed them at ``idle_timeout`` with a line per sweep that closed any
    (about 1,200 lines an hour); now one line when it starts and one when it is over."""
    from .fakes import captured_events

    proto, transport, clock, factory = connect()
    factory.limits = ProcessLimits()  # its own: these connections are not the suite's
    proto.dataReceived(request())
    with captured_events() as events:
        for _ in range(1440):  # an hour, a connection every 2.5 s
            other = factory.buildProtocol(None)
            closing = _ClosingTransport()
            closing.protocol = other
            other.makeConnection(closing)
            other.dataReceived(request())
            clock.advance(2.5)
        closed_by_now = factory.incidents["idle_timeout"].closed
        clock.pump([1] * 1000)  # the client stops: the incident ends
    lines = [e for e in events if "idle" in str(e.get("limit", "")) + e["log_format"]]
    assert closed_by_now > 1000
    assert len(lines) == 2, [e["log_format"] for e in lines]
    assert "over after" in lines[-1]["log_format"]


def test_a_half_close_behind_a_backlog_waits_for_its_answers():
    """``printf ... | socat``: many requests, then the client's half-close, seen while
    some wait for their turn: every one is answered, then the connection closes (an
    incomplete last one gets its 4xx)."""
    proto, transport, clock, _ = connect()
    proto.dataReceived(request() * (2 * PER_TURN + 3) + b"request=smtpd_access_policy\n")
    proto.readConnectionLost()
    assert not transport.disconnecting
    clock.advance(0)
    got = answers(transport)
    assert got[:-1] == [b"action=DUNNO"] * (2 * PER_TURN + 3)
    assert got[-1].startswith(b"action=451 4.3.0 Malformed policy request: incomplete")
    assert transport.disconnecting


class _SocketTransport(StringTransport):
    """A ``StringTransport`` over a real socket's descriptor: what ``unread_bytes``
    asks the kernel about."""

    def __init__(self, sock) -> None:
        super().__init__()
        self._socket = sock

    def fileno(self) -> int:
        return self._socket.fileno()


def test_a_late_sweep_after_a_late_sweep_still_spares_an_unread_request():
    """Lateness was measured from the previous sweep: a sweep 1 s late, then one 0.6 s
    late read as 0.4 s early, and closed a connection whose whole request waited unread.
    It is measured from when the sweep was due."""
    import dataclasses

    config = dataclasses.replace(CONFIG, request_timeout=10.0)
    proto, _, clock, factory = connect(config)
    proto.dataReceived(request())  # the sweeps: due every 2.5 s from 0
    assert factory.sweep_interval == 2.5
    clock.advance(2.6)
    ours, peer = socket.socketpair()
    try:
        victim = factory.buildProtocol(None)
        transport = _SocketTransport(ours)
        victim.makeConnection(transport)  # at 2.6, silent
        clock.advance(10.0 - 2.6 - 0.001)
        clock.advance(0.001 + 1.0)  # the sweep due at 10.0 runs 1 s late
        assert not transport.disconnecting
        clock.advance(12.5 - clock.seconds() - 0.001)
        peer.sendall(request())  # during a long turn: not read yet
        clock.advance(0.001 + 0.6)  # the sweep due at 12.5 runs 0.6 s late
        assert factory.sweep_late > 0.5
        assert not transport.disconnecting  # spared: its request is read next
        victim.dataReceived(ours.recv(4096))
        assert answers(transport) == [b"action=DUNNO"]
        # A silent one is still closed by a sweep on time.
        clock.advance(30)
        assert not transport.disconnecting  # (it spoke)
        silent = factory.buildProtocol(None)
        silent_transport = _SocketTransport(peer)
        silent.makeConnection(silent_transport)
        clock.advance(12.5)
        assert silent_transport.disconnecting
    finally:
        ours.close()
        peer.close()


def test_rcpt_requests_without_recipient_or_sender_count_as_malformed():
    """They were malformed only when decided, and did not count: a thousand of them on
    one connection got a thousand answers and warnings."""
    proto, transport, clock, _ = connect()
    proto.dataReceived(b"protocol_state=RCPT\nsender=\n\n" * 6
                       + b"protocol_state=RCPT\nrecipient=l@x.example\n\n" * 994)
    got = answers(transport)
    assert len(got) == MALFORMED_MAX
    assert got[0].endswith(b"RCPT request without recipient=")
    assert got[-1].endswith(b"RCPT request without sender=")
    assert transport.disconnecting


def test_a_late_sweep_asks_the_kernel_only_about_connections_it_would_close(monkeypatch):
    """Sparing costs a system call: a late sweep over connections none of which is due
    to close makes none (it asked about every connection)."""
    import policyd.protocols

    asked = []
    monkeypatch.setattr(policyd.protocols, "unread_bytes",
                        lambda transport: asked.append(transport) or 0)
    proto, _, clock, factory = connect()
    factory.limits = ProcessLimits()  # its own: these connections are not the suite's
    proto.dataReceived(request())
    for _ in range(100):
        other = factory.buildProtocol(None)
        other.makeConnection(StringTransport())
        other.dataReceived(request())
    clock.advance(factory.sweep_interval + 1.0)  # a sweep 1 s late
    assert factory.sweep_late > 0.5
    assert asked == []
