"""The Postfix answers of one reactor turn, held and sent together at its end
(``policyd.runtime.fastio.turn``, ``[runtime] turn_writes``): on real sockets, with the
daemon's reactor driven by hand (it is not the test process's installed reactor)."""

from __future__ import annotations

import select
import socket

import pytest

from policyd.config import RuntimeConfig, parse
from policyd.runtime import fastio
from policyd.runtime.reactor import EPollReactor
from policyd.runtime.tuning import Tuning


def _nothing_yet(peer: socket.socket) -> bool:
    """Nothing has arrived at ``peer`` (looked at, not read)."""
    return not select.select([peer], [], [], 0)[0]


class _Echo:
    """Answers each read with ``write_now``; notes whether its peer already had the
    answers of the connections answered before it in the same turn."""

    def __init__(self, seen: list, peers: list) -> None:
        self.seen = seen
        self.peers = peers

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        fastio.write_now(self.transport, data.upper())
        self.seen.append(all(_nothing_yet(peer) for peer in self.peers))

    def connectionLost(self, reason) -> None:
        pass


@pytest.fixture
def turn_reactor():
    reactor = EPollReactor()
    reactor.turn_writes = True
    pairs = []

    def connect(protocol):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        b.settimeout(5)  # a test that fails never hangs
        pairs.append((a, b))
        cls = _port_class(fastio.PlainReadServer)
        conn = cls(a, protocol, "peer", None, len(pairs), reactor)
        protocol.makeConnection(conn)
        return conn, b

    yield reactor, connect
    for a, b in pairs:
        a.close()
        b.close()
    reactor._poller.close()
    fastio.turn.open = False
    fastio.turn.held = []


def _port_class(base):
    from twisted.internet import unix

    port = unix.Port("/nonexistent/policyd-test.sock", None)
    port.transport = base
    assert fastio.hold_for_turn(port) is True
    return port.transport


def test_the_daemon_reactor_sends_a_turns_answers_at_its_end(turn_reactor):
    reactor, connect = turn_reactor
    seen: list = []
    peers: list = []
    for _ in range(3):
        conn, peer = connect(_Echo(seen, peers))
        peers.append(peer)
    for number, peer in enumerate(peers):
        peer.sendall(b"request %d" % number)
    reactor.doPoll(1)
    assert seen == [True, True, True]  # each answer held while the turn went on
    assert [peer.recv(100) for peer in peers] == [b"REQUEST 0", b"REQUEST 1", b"REQUEST 2"]
    assert fastio.turn.held == [] and fastio.turn.open is False


def test_without_turn_writes_the_reactor_sends_each_answer_at_once(turn_reactor):
    reactor, connect = turn_reactor
    reactor.turn_writes = False
    seen: list = []
    peers: list = []
    for _ in range(2):
        conn, peer = connect(_Echo(seen, peers))
        peers.append(peer)
    for peer in peers:
        peer.sendall(b"x")
    reactor.doPoll(1)
    assert seen == [False, False]  # the answer was in the peer's socket at once
    assert [peer.recv(100) for peer in peers] == [b"X", b"X"]


def test_outside_a_turn_an_answer_goes_at_once(turn_reactor):
    """Another reactor (or a timer, a thread's callback) never opens a turn."""
    _, connect = turn_reactor
    conn, peer = connect(_Echo([], []))
    fastio.write_now(conn, b"action=DUNNO\n\n")
    assert peer.recv(100) == b"action=DUNNO\n\n"


def test_a_held_answer_goes_before_anything_else_the_connection_writes(turn_reactor):
    """An answer held for the turn's end, then a write (a busy answer, an eviction's
    4xx) or a close in the same turn: the held answer is sent first, so the peer reads
    the connection's output in the order it was written."""
    _, connect = turn_reactor
    conn, peer = connect(_Echo([], []))
    conn.startWriting = lambda: None  # the reactor is not running here
    fastio.turn.open = True
    fastio.write_now(conn, b"action=DUNNO\n\n")
    fastio.write_now(conn, b"action=OK\n\n")  # a second in the same turn: after it
    assert _nothing_yet(peer)
    conn.write(b"action=451 4.3.2 busy\n\n")
    assert peer.recv(100) == b"action=DUNNO\n\naction=OK\n\n"
    assert conn._tempDataLen == len(b"action=451 4.3.2 busy\n\n")  # queued after it

    conn2, peer2 = connect(_Echo([], []))
    conn2.startWriting = lambda: None
    conn2.stopReading = lambda: None
    fastio.write_now(conn2, b"action=DUNNO\n\n")
    conn2.loseConnection()
    assert peer2.recv(100) == b"action=DUNNO\n\n"
    fastio.turn.open = False
    fastio.turn.send()  # nothing left to send twice
    assert _nothing_yet(peer) and _nothing_yet(peer2)


def test_at_the_limit_the_held_answers_go_at_once(turn_reactor, monkeypatch):
    """No answer waits for the rest of a very long turn: at ``LIMIT`` held they go."""
    _, connect = turn_reactor
    monkeypatch.setattr(fastio.TurnWrites, "LIMIT", 3)
    pairs = [connect(_Echo([], [])) for _ in range(4)]
    fastio.turn.open = True
    for conn, _ in pairs[:2]:
        fastio.write_now(conn, b"a")
    assert all(_nothing_yet(peer) for _, peer in pairs)
    fastio.write_now(pairs[2][0], b"a")
    assert [peer.recv(10) for _, peer in pairs[:3]] == [b"a", b"a", b"a"]
    fastio.write_now(pairs[3][0], b"b")
    assert _nothing_yet(pairs[3][1]) and fastio.turn.held == [pairs[3][0]]


def test_an_answer_for_a_connection_gone_meanwhile_is_dropped(turn_reactor):
    _, connect = turn_reactor
    conn, peer = connect(_Echo([], []))
    fastio.turn.open = True
    fastio.write_now(conn, b"action=DUNNO\n\n")
    conn.connected = False  # lost in the same turn (reset by the peer)
    fastio.turn.send()
    assert not conn._tempDataLen and _nothing_yet(peer)


def test_tuning_holds_postfix_answers_only_with_the_daemons_reactor():
    from twisted.internet import unix
    from twisted.internet.task import Clock

    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory
    from policyd.protocols.postfix import PostfixFactory
    from tests.protocols.fakes import sample_snapshot

    config = parse("")
    decider = Decider(FixedSnapshot(sample_snapshot()), config.smtp)
    reactor = EPollReactor()
    try:
        tuning = Tuning(RuntimeConfig(), clock=reactor)
        assert reactor.turn_writes is True
        postfix = PostfixFactory(decider, config.postfix, Clock())
        exim = EximFactory(decider, config.exim, Clock())
        tuning.apply_to_factory(postfix)
        tuning.apply_to_factory(exim)
        port = unix.Port("/nonexistent/policyd-test.sock", None)
        postfix.tune_port(port)
        assert issubclass(port.transport, fastio.TurnWriting)
        assert issubclass(port.transport, fastio.PlainReadServer)
        exim_port = unix.Port("/nonexistent/policyd-test.sock", None)
        exim.tune_port(exim_port)
        assert not issubclass(exim_port.transport, fastio.TurnWriting)
    finally:
        reactor._poller.close()
    for runtime, clock in ((RuntimeConfig(turn_writes=False), EPollReactor()),
                           (RuntimeConfig(fast_write=False), EPollReactor()),
                           (RuntimeConfig(), Clock())):  # another reactor: no turns
        try:
            tuning = Tuning(runtime, clock=clock)
            assert tuning.turn_writes is False
            assert getattr(clock, "turn_writes", False) is False
        finally:
            if hasattr(clock, "_poller"):
                clock._poller.close()
    assert parse("[runtime]\nturn_writes = off\n").runtime.turn_writes is False


class _FirstAnswer:
    """A factory whose ``answer_first`` answers each accepted connection at once and
    notes whether the connections answered before it in the same turn had their
    answers yet; ``buildProtocol`` for the usual way."""

    def __init__(self, clients: list) -> None:
        self.clients = clients
        self.seen: list = []
        self.built: list = []

    def answer_first(self, data: bytes, peer) -> bytes:
        self.seen.append(all(_nothing_yet(client) for client in self.clients))
        return b"ACCEPT " + data.strip()

    def buildProtocol(self, addr):
        protocol = _Taking()
        self.built.append(protocol)
        return protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


class _Taking:
    def __init__(self) -> None:
        self.taken: list = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def take_answer(self, answer) -> None:
        self.taken.append(answer)

    def connectionLost(self, reason) -> None:
        pass


def test_answers_made_at_accept_are_sent_and_closed_at_the_turns_end(turn_reactor,
                                                                     tmp_path):
    """Exim's requests answered as their connections are accepted (``fastaccept``):
    each answer waits for the end of the turn, then goes with its close."""
    from twisted.internet import unix

    from policyd.runtime import fastaccept

    reactor, _ = turn_reactor
    clients: list = []
    factory = _FirstAnswer(clients)
    path = str(tmp_path / "exim.sock")
    port = unix.Port(path, factory, reactor=reactor)
    port.startListening()
    try:
        assert fastaccept.answer_on_accept(port) is True
        for number in range(3):
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(5)
            client.connect(path)
            client.sendall(b"POLICYD/1 n=%d\n" % number)
            client.shutdown(socket.SHUT_WR)
            clients.append(client)
        reactor.doPoll(1)
        assert factory.seen == [True, True, True]
        assert [client.recv(100) for client in clients] == \
            [b"ACCEPT POLICYD/1 n=0", b"ACCEPT POLICYD/1 n=1", b"ACCEPT POLICYD/1 n=2"]
        assert [client.recv(100) for client in clients] == [b"", b"", b""]  # closed
        assert factory.built == [] and fastio.turn.accepted == []
    finally:
        port.connectionLost(None)
        for client in clients:
            client.close()


def test_an_accepted_answer_the_kernel_does_not_take_goes_the_usual_way(turn_reactor,
                                                                        tmp_path):
    """What a held answer's send leaves over is handed to a protocol on a transport, as
    when it is sent at accept (``adopt``)."""
    from twisted.internet import unix

    from policyd.runtime import fastaccept

    reactor, _ = turn_reactor

    class Partial(socket.socket):
        def send(self, data, *flags):
            return super().send(data[:3])

    factory = _FirstAnswer([])
    port = unix.Port(str(tmp_path / "exim.sock"), factory, reactor=reactor)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    skt = Partial(socket.AF_UNIX, socket.SOCK_STREAM, fileno=a.detach())
    skt.setblocking(False)
    try:
        fastio.turn.hold_accepted(fastaccept.finish, port, skt, "", b"ACCEPT 250 ok")
        assert _nothing_yet(b)
        fastio.turn.send()
        assert b.recv(100) == b"ACC"
        assert len(factory.built) == 1 and factory.built[0].taken == [b"EPT 250 ok"]
        assert factory.built[0].transport.socket is skt
    finally:
        skt.close()
        b.close()


def test_a_failure_with_one_held_answer_keeps_no_other_back(turn_reactor, tmp_path):
    """One accepted connection whose answer cannot be handed on (its protocol cannot be
    built) is logged and closed; the other connections of the turn still get theirs."""
    from twisted.internet import unix
    from twisted.logger import globalLogPublisher

    from policyd.runtime import fastaccept

    reactor, connect = turn_reactor

    class Partial(socket.socket):
        def send(self, data, *flags):
            return super().send(data[:3])

    class Broken(_FirstAnswer):
        def buildProtocol(self, addr):
            raise RuntimeError("no protocol (test)")

    port = unix.Port(str(tmp_path / "exim.sock"), Broken([]), reactor=reactor)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    skt = Partial(socket.AF_UNIX, socket.SOCK_STREAM, fileno=a.detach())
    skt.setblocking(False)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setblocking(False)
    d.settimeout(5)
    conn, peer = connect(_Echo([], []))
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        fastio.turn.open = True
        fastio.turn.hold_accepted(fastaccept.finish, port, skt, "", b"ACCEPT 250 ok")
        fastio.turn.hold_accepted(fastaccept.finish, port, c, "", b"DEFER 451 later")
        fastio.write_now(conn, b"action=DUNNO\n\n")
        fastio.turn.open = False
        fastio.turn.send()
        assert b.recv(100) == b"ACC" and b.recv(100) == b""  # logged, then closed
        assert d.recv(100) == b"DEFER 451 later" and d.recv(100) == b""
        assert peer.recv(100) == b"action=DUNNO\n\n"
        assert any("no protocol (test)" in str(e.get("log_failure", "")) for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)
        skt.close()
        b.close()
        c.close()
        d.close()
