"""policyd.runtime: each tuning part does what it says, can be switched off, and the
switches live in one place (``Tuning``)."""

from __future__ import annotations

import gc
import sys

import pytest_twisted
from twisted.internet.task import Clock

from policyd.config import RuntimeConfig, parse
from policyd.runtime import fastio, heap, pacing, threads
from policyd.runtime.tuning import Tuning


def test_no_collection_pauses_the_cyclic_gc_and_restores_it():
    assert gc.isenabled()
    with heap.no_collection():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_heap_switched_off_leaves_the_gc_alone(monkeypatch):
    monkeypatch.setattr(heap, "enabled", False)
    with heap.no_collection():
        assert gc.isenabled()


def test_free_piecewise_empties_and_rests():
    pauses = []
    items, table = list(range(100)), {n: n for n in range(50)}
    heap.free_piecewise(items, table, pause=lambda: pauses.append(1))
    assert items == [] and table == {} and pauses


def test_release_drops_the_snapshot_list_by_list():
    from tests.protocols.fakes import sample_snapshot

    pauses = []
    box = [sample_snapshot()]
    heap.release(box, lambda: pauses.append(1))
    assert box == [] and len(pauses) == 3


def test_switch_interval_is_restored():
    before = sys.getswitchinterval()
    with threads.switch_interval(0.0005):
        assert sys.getswitchinterval() == 0.0005
    assert sys.getswitchinterval() == before


def test_fast_write_checks_the_running_twisted():
    assert fastio.available() is None


def test_fast_write_sends_at_once_on_a_real_socket():
    import socket

    from twisted.internet import reactor
    from twisted.internet.tcp import Connection

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = Connection(a, None, reactor)
        conn.connected = True
        fastio.write_now(conn, b"action=DUNNO\n\n")
        assert b.recv(100) == b"action=DUNNO\n\n"
        assert not conn._tempDataLen  # nothing queued for the reactor's next turn
    finally:
        a.close()
        b.close()


def test_fast_read_checks_the_running_twisted():
    assert fastio.reads_available() is None


def test_fast_read_refuses_a_changed_upstream_read(monkeypatch):
    """``PlainReadServer.doRead`` copies Twisted's: a Twisted that reads otherwise is
    refused (the daemon then keeps Twisted's own Unix connections)."""
    from twisted.internet import tcp

    def doRead(self):
        return self._dataReceived(self.socket.recv(65536))

    monkeypatch.setattr(tcp.Connection, "doRead", doRead)
    why = fastio.reads_available()
    assert why is not None and "tcp.Connection.doRead changed" in why


class _Gather:
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_plain_reads_take_bytes_and_leave_a_passed_descriptor_to_the_kernel():
    """A peer that passes a descriptor with its bytes: the bytes arrive, the descriptor is
    never received (no ancillary data asked for), so nothing is logged and nothing is
    left open in the daemon."""
    import os
    import socket

    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    r, w = os.pipe()
    try:
        a.setblocking(False)
        protocol = _Gather()
        conn = fastio.PlainReadServer(a, protocol, "peer", None, 1, reactor)
        conn.stopReading()  # driven by hand here, never by the reactor
        assert type(conn).doRead is not fastio.unix.Server.doRead
        before = len(os.listdir("/proc/self/fd"))
        b.sendmsg([b"request=smtpd_access_policy\n"],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))])
        assert conn.doRead() is None
        assert protocol.data == b"request=smtpd_access_policy\n"
        assert len(os.listdir("/proc/self/fd")) == before  # no descriptor came in
        assert conn.doRead() is None  # nothing more to read: EAGAIN, not a lost connection
        b.close()
        assert conn.doRead() is not None  # the peer is gone: connection done
        assert not events
    finally:
        globalLogPublisher.removeObserver(events.append)
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_read_plainly_changes_unix_ports_only():
    from twisted.internet import reactor, tcp, unix

    port = unix.Port("/nonexistent/policyd-test.sock", None, reactor=reactor)
    assert fastio.read_plainly(port) is True
    assert port.transport is fastio.PlainReadServer
    assert unix.Port.transport is unix.Server  # the class itself is left alone
    assert fastio.read_plainly(tcp.Port(0, None, reactor=reactor)) is False


class _Answering:
    """Answers the first bytes it reads with ``send_and_close`` (as the Exim protocol's
    ``finish`` does)."""

    def __init__(self, answer: bytes = b"ACCEPT 250 2.1.5 ok") -> None:
        self.answer = answer
        self.lost = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        fastio.send_and_close(self.transport, self.answer)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


def _closing_pair(protocol):
    import socket

    from twisted.internet import reactor

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    cls = fastio.closing_transport(fastio.PlainReadServer)
    conn = cls(a, protocol, "peer", None, 1, reactor)
    conn.stopReading()  # driven by hand here, never by the reactor
    protocol.makeConnection(conn)
    return conn, a, b


def test_an_answer_sent_during_a_read_ends_the_connection_in_that_read():
    """``send_and_close`` during ``doRead``: the answer is in the peer's socket at once
    and ``doRead`` reports the connection finished, so Twisted closes it in the same
    turn (no write registered, no later turn)."""
    from twisted.internet import error

    protocol = _Answering()
    conn, a, b = _closing_pair(protocol)
    try:
        b.sendall(b"POLICYD/1 list=l@example.com sender=\n")
        why = conn.doRead()
        assert isinstance(why, error.ConnectionLost)  # closed both ways, not half-closed
        assert not conn._tempDataLen and not conn.dataBuffer and not conn.disconnecting
        assert b.recv(100) == b"ACCEPT 250 2.1.5 ok"
    finally:
        a.close()
        b.close()


def test_an_answer_outside_a_read_goes_the_usual_way():
    """Written from anywhere else (a timeout, a password check's callback, the client's
    half-close), the answer is queued and the connection closed by Twisted as usual."""
    protocol = _Answering()
    conn, a, b = _closing_pair(protocol)
    try:
        conn.startWriting = lambda: None  # the reactor is not running here
        fastio.send_and_close(conn, b"DEFER 451 4.3.0 timeout")
        assert conn._tempDataLen == len(b"DEFER 451 4.3.0 timeout")
        assert conn.disconnecting and not conn._answered
    finally:
        a.close()
        b.close()


def test_a_read_without_an_answer_leaves_the_connection_open():
    import socket

    class Quiet(_Answering):
        def dataReceived(self, data: bytes) -> None:
            pass

    conn, a, b = _closing_pair(Quiet())
    try:
        b.sendall(b"POLICYD/1 list=")
        assert conn.doRead() is None
        b.shutdown(socket.SHUT_WR)
        assert conn.doRead() is not None  # the peer's half-close, reported as before
    finally:
        a.close()
        b.close()


def test_close_after_answer_wraps_the_class_the_port_creates():
    from twisted.internet import reactor, tcp, unix

    port = unix.Port("/nonexistent/policyd-test.sock", None, reactor=reactor)
    fastio.read_plainly(port)
    assert fastio.close_after_answer(port) is True
    assert issubclass(port.transport, fastio.PlainReadServer)
    assert issubclass(port.transport, fastio.Closing)
    assert fastio.close_after_answer(port) is True  # once only
    assert port.transport.__mro__.count(fastio.Closing) == 1
    tcp_port = tcp.Port(0, None, reactor=reactor)
    assert fastio.close_after_answer(tcp_port) is True
    assert issubclass(tcp_port.transport, tcp.Server)
    assert tcp.Port.transport is tcp.Server and unix.Port.transport is unix.Server
    assert fastio.close_after_answer(object()) is False


def test_tuning_gives_listeners_plain_reads_unless_switched_off():
    factory, off = type("F", (), {})(), type("F", (), {})()
    Tuning(RuntimeConfig()).apply_to_factory(factory)
    assert factory.tune_port is fastio.read_plainly
    Tuning(RuntimeConfig(fast_read=False)).apply_to_factory(off)
    assert not hasattr(off, "tune_port")


def test_a_part_whose_twisted_changed_steps_aside_with_a_note(monkeypatch):
    monkeypatch.setattr(fastio, "reads_available", lambda: "no unix.Server here")
    monkeypatch.setattr(fastio, "available", lambda: "no dataBuffer here")
    tuning = Tuning(RuntimeConfig())
    assert tuning.read_plainly is None and tuning.fast_write is None
    assert tuning.notes == ["fast_write off: no dataBuffer here",
                            "fast_read off: no unix.Server here"]
    factory = type("F", (), {})()
    tuning.apply_to_factory(factory)
    assert not hasattr(factory, "tune_port") and not hasattr(factory, "write")
    assert Tuning(RuntimeConfig(fast_read=False, fast_write=False)).notes == []


@pytest_twisted.inlineCallbacks
def test_listener_tunes_its_port_before_it_accepts(tmp_path):
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from policyd.listeners import Listener

    factory = Factory.forProtocol(Protocol)
    tuned = []
    factory.tune_port = tuned.append
    listener = Listener(reactor, "exim", "[exim] listen", f"unix:{tmp_path / 's.sock'}",
                        factory)
    listener.startService()
    try:
        assert tuned == [listener.port]
    finally:
        yield listener.stopService()


def test_tuning_applies_fast_write_where_answers_stay_open():
    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory
    from policyd.protocols.postfix import PostfixFactory
    from tests.protocols.fakes import sample_snapshot

    config = parse("")
    decider = Decider(FixedSnapshot(sample_snapshot()), config.smtp)
    postfix = PostfixFactory(decider, config.postfix, Clock())
    exim = EximFactory(decider, config.exim, Clock())
    tuning = Tuning(RuntimeConfig())
    for factory in (postfix, exim):
        tuning.apply_to_factory(factory)
    assert postfix.write is fastio.write_now
    assert exim.write is not fastio.write_now  # an answer followed by a close:
    assert exim.finish is fastio.send_and_close  # sent and closed in one turn
    assert postfix.finish is not fastio.send_and_close
    off = Tuning(RuntimeConfig(fast_write=False, fast_accept=False))
    fresh = PostfixFactory(decider, config.postfix, Clock())
    fresh_exim = EximFactory(decider, config.exim, Clock())
    off.apply_to_factory(fresh)
    off.apply_to_factory(fresh_exim)
    assert fresh.write is not fastio.write_now
    assert fresh_exim.finish is not fastio.send_and_close
    assert fresh_exim.tune_port is fastio.read_plainly


def test_an_exim_port_reads_plainly_and_closes_after_its_answer():
    from twisted.internet import reactor, unix

    from policyd.decider import Decider, FixedSnapshot
    from policyd.protocols.exim import EximFactory
    from tests.protocols.fakes import sample_snapshot

    config = parse("")
    decider = Decider(FixedSnapshot(sample_snapshot()), config.smtp)
    exim = EximFactory(decider, config.exim, Clock())
    Tuning(RuntimeConfig()).apply_to_factory(exim)
    port = unix.Port("/nonexistent/policyd-test.sock", None, reactor=reactor)
    exim.tune_port(port)
    assert issubclass(port.transport, fastio.PlainReadServer)
    assert issubclass(port.transport, fastio.Closing)


def test_tuning_switches_pacing_heap_and_restores_the_switch_interval(monkeypatch):
    monkeypatch.setattr(pacing, "enabled", True)
    monkeypatch.setattr(heap, "enabled", True)
    before = sys.getswitchinterval()
    tuning = Tuning(RuntimeConfig(pacing=False, heap=False, switch_interval=0.002))
    tuning.daemon_starting()
    try:
        assert pacing.enabled is False and heap.enabled is False
        assert sys.getswitchinterval() == 0.002
        with pacing.pacing() as pacer:
            assert pacer is None  # switched off: no rests
    finally:
        tuning.daemon_stopped()
    assert sys.getswitchinterval() == before


def test_runtime_section_parses_and_refuses_bad_values():
    import pytest

    from policyd.config import ConfigError

    config = parse("[runtime]\nreactor = off\nstore_niceness = 5\n").runtime
    assert config.reactor is False and config.store_niceness == 5
    with pytest.raises(ConfigError, match="store_niceness"):
        parse("[runtime]\nstore_niceness = 42\n")


def test_reactor_collector_runs_the_collector_on_the_reactor(monkeypatch):
    """After the first load the collector runs at fixed times from the reactor (young,
    middle, all), never at an allocation threshold in another thread; stop() gives it
    back."""
    import gc

    from twisted.internet.task import Clock

    from policyd.runtime import heap

    clock = Clock()
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    was = gc.isenabled()
    gc.enable()
    collector = heap.ReactorCollector(clock)
    try:
        collector.start()
        assert not gc.isenabled()
        clock.pump([heap.ReactorCollector.YOUNG] * int(heap.ReactorCollector.FULL /
                                                       heap.ReactorCollector.YOUNG + 1))
        assert collected.count(2) == 1
        assert collected.count(1) == int(heap.ReactorCollector.FULL /
                                         heap.ReactorCollector.MIDDLE)
        assert collected.count(0) >= 290
    finally:
        collector.stop()
        assert gc.isenabled()
        if not was:
            gc.disable()


def test_reactor_collector_waits_while_a_snapshot_is_built(monkeypatch):
    """No collection from the reactor during a build: the young generation then holds
    the builder's rows, and scanning them would stop the reactor; after it, they run
    again."""
    import gc

    from twisted.internet.task import Clock

    from policyd.runtime import heap

    clock = Clock()
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))
    was = gc.isenabled()
    collector = heap.ReactorCollector(clock)
    try:
        collector.start()
        with heap.no_collection():
            clock.pump([heap.ReactorCollector.YOUNG] * 20)
            assert collected == []
            assert not gc.isenabled()
        clock.pump([heap.ReactorCollector.YOUNG] * 20)
        assert collected.count(0) >= 19 and collected.count(1) >= 1
    finally:
        collector.stop()
        if was:
            gc.enable()
        else:
            gc.disable()
