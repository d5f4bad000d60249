"""policyd.runtime.fastaccept: an Exim request that is whole when its connection is
accepted is answered there (no transport, no protocol); anything else goes the usual way
with the bytes already read, and the answers are the same either way."""

from __future__ import annotations

import base64
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.protocol import Factory

from policyd.config import EximConfig, RuntimeConfig, parse
from policyd.core.passwords import hash_password
from policyd.core.replies import ReplyPolicy
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action
from policyd.decider import Decider, FixedSnapshot
from policyd.logging import DecisionLog
from policyd.protocols.exim import EximFactory
from policyd.runtime import fastaccept
from policyd.runtime.tuning import Tuning
from tests.protocols.fakes import LIST, MEMBER, NONMEMBER, sample_snapshot

from .protocols.test_password_off_reactor import LIST as ANNOUNCE, Threads, request


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def line(sender: str, lst: str = LIST) -> bytes:
    return f"POLICYD/1 list={lst} sender={b64(sender)}".encode()


class Lines:
    """A ``DecisionLog`` writer that keeps the decision lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def decision(self, *fields, **kwargs) -> None:
        self.lines.append(" ".join(str(f) for f in fields))


def exim_factory(decider=None) -> tuple[EximFactory, Lines]:
    lines = Lines()
    if decider is None:
        decider = Decider(FixedSnapshot(sample_snapshot()), ReplyPolicy())
    f = EximFactory(decider, EximConfig(listen=(), timeout=10.0, max_request=4096),
                    reactor, DecisionLog(writer=lines))
    built: list = []
    build_protocol = f.buildProtocol

    def counting(addr):
        protocol = build_protocol(addr)
        built.append(protocol)
        return protocol
    f.buildProtocol = counting
    f.built = built
    return f, lines


def listen(tmp_path, factory):
    port = reactor.listenUNIX(str(tmp_path / "exim.sock"), factory)
    assert fastaccept.answer_on_accept(port) is True
    return port


@pytest.fixture
def serve(tmp_path):
    """Starts an ``EximFactory`` on a Unix port that answers at accept; stops it after."""
    ports = []

    def start(decider=None):
        factory, lines = exim_factory(decider)
        ports.append(listen(tmp_path, factory))
        return factory, lines
    yield start
    for port in ports:
        port.stopListening()


def connect(tmp_path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect(str(tmp_path / "exim.sock"))
    return s


@defer.inlineCallbacks
def answer_of(s: socket.socket, timeout: float = 5.0):
    """Everything the daemon sends until it closes (read off the reactor's turns)."""
    got = b""
    waited = 0.0
    while waited < timeout:
        try:
            chunk = s.recv(4096)
        except BlockingIOError:
            yield deferLater(0.01)
            waited += 0.01
            continue
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"no close within {timeout} s (got {got!r})")


def deferLater(seconds: float):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def test_the_running_twisted_is_the_one_it_was_written_against():
    assert fastaccept.available() is None


def test_a_changed_accept_loop_steps_aside():
    class Changed(tcp.Port):
        def doRead(self):
            """accepts differently"""

    assert "changed" in fastaccept.available(Changed)


def test_only_ports_whose_factory_answers_first_are_changed(tmp_path):
    plain = reactor.listenUNIX(str(tmp_path / "plain.sock"), Factory())
    try:
        assert fastaccept.answer_on_accept(plain) is False
        assert "doRead" not in vars(plain)
    finally:
        plain.stopListening()
    assert fastaccept.answer_on_accept(object()) is False


@pytest_twisted.inlineCallbacks
def test_a_whole_request_is_answered_at_accept_without_a_protocol(serve, tmp_path):
    factory, lines = serve()
    member, stranger = connect(tmp_path), connect(tmp_path)
    member.sendall(line(MEMBER) + b"\n")
    member.shutdown(socket.SHUT_WR)
    stranger.sendall(line(NONMEMBER) + b"\n")  # no half-close: answered all the same
    answers = [(yield answer_of(member)), (yield answer_of(stranger))]
    assert answers[0].startswith(b"ACCEPT 250") and not answers[0].endswith(b"\n")
    assert answers[1].startswith(b"REJECT 550")
    assert factory.built == [] and not factory.connections
    assert len(lines.lines) == 2 and "accept" in lines.lines[0]  # logged as usual
    assert factory.decider.answers["exim"] == {"ACCEPT": 1, "REJECT": 1}
    member.close()
    stranger.close()


@pytest_twisted.inlineCallbacks
def test_half_a_line_at_accept_goes_the_usual_way_with_the_bytes_read(serve, tmp_path):
    factory, lines = serve()
    s = connect(tmp_path)
    whole = line(MEMBER) + b"\n"
    s.sendall(whole[:20])
    yield deferLater(0.2)  # accepted with 20 bytes
    assert len(factory.built) == 1 and factory.built[0]._buffer == whole[:20]
    s.sendall(whole[20:])
    assert (yield answer_of(s)).startswith(b"ACCEPT 250")
    s.close()


@pytest_twisted.inlineCallbacks
def test_a_silent_connection_and_a_line_ended_by_half_close_go_the_usual_way(serve,
                                                                               tmp_path):
    factory, lines = serve()
    silent = connect(tmp_path)
    yield deferLater(0.2)
    assert len(factory.built) == 1 and len(factory.connections) == 1
    silent.sendall(line(NONMEMBER))
    silent.shutdown(socket.SHUT_WR)  # no newline: the half-close ends the line
    assert (yield answer_of(silent)).startswith(b"REJECT 550")
    silent.close()


@pytest_twisted.inlineCallbacks
def test_an_over_long_request_at_accept_is_refused_4xx(serve, tmp_path):
    """Answered at once, then read to the client's half-close (Exim, still writing,
    must not meet a closed socket): the usual way, not at accept."""
    factory, lines = serve()
    s = connect(tmp_path)
    s.sendall(b"POLICYD/1 list=" + b"x" * 5000)
    s.shutdown(socket.SHUT_WR)
    answer = yield answer_of(s)
    assert answer.startswith(b"DEFER 451") and b"longer than 4096" in answer
    s.close()


@pytest_twisted.inlineCallbacks
def test_an_over_long_whole_line_at_accept_is_refused_4xx_at_once(serve, tmp_path):
    factory, lines = serve()
    s = connect(tmp_path)
    s.sendall(b"POLICYD/1 list=" + b"x" * 5000 + b"\n")
    answer = yield answer_of(s)
    assert answer.startswith(b"DEFER 451") and b"longer than 4096" in answer
    assert factory.built == []
    s.close()


class BrokenLines(Lines):
    """A decision-line writer that raises for the null sender's lines."""

    def decision(self, protocol, verdict, list_, sender, *fields, **kwargs) -> None:
        if sender == "":
            raise ValueError("broken decision line")
        super().decision(protocol, verdict, list_, sender, *fields, **kwargs)


@pytest_twisted.inlineCallbacks
def test_an_exception_answering_at_accept_is_a_4xx_not_a_hang_up(serve, tmp_path):
    """An exception after the decision (here the decision line) is the temporary
    failure, answered at accept like any answer, not a socket closed without one."""
    factory, lines = serve()
    factory.decision_log = DecisionLog(writer=BrokenLines())
    s = connect(tmp_path)
    s.sendall(line("") + b"\n")
    assert (yield answer_of(s)).startswith(b"DEFER 451 4.3.0")
    assert factory.built == []
    assert factory.decider.counters()["by_protocol"]["exim"]["error"] == 1
    s.close()


@pytest_twisted.inlineCallbacks
def test_an_answer_that_waits_is_handed_to_the_protocol(serve, tmp_path):
    """A moderator password to verify: the connection gets a protocol that waits for the
    check (in a thread), then answers."""
    threads = Threads()
    snapshot = build([ListSpec(ANNOUNCE, members=(MemberSpec("pat@example.com"),),
                               default_nonmember_action=Action.REJECT,
                               moderator_password=hash_password("right horse"))],
                     version="v1", built_at=0.0)
    factory, lines = serve(Decider(FixedSnapshot(snapshot), ReplyPolicy(),
                                   run_in_thread=threads))
    s = connect(tmp_path)
    s.sendall(request("right horse") + b"\n")
    yield deferLater(0.2)
    assert len(factory.built) == 1 and factory.built[0].waiting
    threads.run_all()
    assert (yield answer_of(s)).startswith(b"ACCEPT 250")
    s.close()


def test_tuning_answers_exim_at_accept_unless_switched_off(tmp_path):
    from policyd.protocols.postfix import PostfixFactory

    config = parse("")
    assert config.runtime.fast_accept is True
    assert parse("[runtime]\nfast_accept = off\n").runtime.fast_accept is False
    decider = Decider(FixedSnapshot(sample_snapshot()), config.smtp)
    cases = ((EximFactory(decider, config.exim, reactor), RuntimeConfig(), True),
             (EximFactory(decider, config.exim, reactor), RuntimeConfig(fast_accept=False),
              False),
             (PostfixFactory(decider, config.postfix, reactor), RuntimeConfig(), False))
    for i, (factory, runtime, answered) in enumerate(cases):
        Tuning(runtime).apply_to_factory(factory)
        port = reactor.listenUNIX(str(tmp_path / f"{i}.sock"), factory)
        try:
            factory.tune_port(port)
            assert ("doRead" in vars(port)) is answered
        finally:
            port.stopListening()
