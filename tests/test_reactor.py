"""policyd's reactor (epoll without the per-event legacy log context, its timers on the
monotonic clock), run in a child process: the test process runs pytest-twisted's own
reactor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from twisted.internet import base
from twisted.internet.task import Clock

from policyd.runtime import monotonic

CHILD = textwrap.dedent('''
    import socket, sys, tempfile, os
    from policyd.runtime.reactor import EPollReactor, install
    reactor, why = install()
    assert isinstance(reactor, EPollReactor) and why is None
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)

    class Echo(Protocol):
        def dataReceived(self, data):
            if data.startswith(b"boom"):
                raise RuntimeError("handler bug")
            self.transport.write(data.upper())

    path = os.path.join(tempfile.mkdtemp(), "s")
    reactor.listenUNIX(path, Factory.forProtocol(Echo))
    results = []

    def client():
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"hello")
        results.append(s.recv(10))
        s.sendall(b"boom")
        results.append(s.recv(10))  # b"": the server dropped the connection
        s.close()
        reactor.callFromThread(reactor.stop)

    reactor.callInThread(client)
    reactor.callLater(10, reactor.stop)
    reactor.run()
    print("RESULTS", results)
''')


def test_events_are_dispatched_and_a_handler_error_drops_only_that_connection():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "RESULTS [b'HELLO', b'']" in out.stdout
    assert "RuntimeError: handler bug" in out.stdout


def test_the_start_up_check_accepts_the_running_twisted():
    """The upstream ``doPoll`` the reactor replaces is the one it was written against."""
    from policyd.runtime.reactor import check

    assert check() is None


def test_the_start_up_check_refuses_a_changed_upstream():
    from twisted.internet import epollreactor

    from policyd.runtime.reactor import check

    class Changed(epollreactor.EPollReactor):
        def doPoll(self, timeout):
            for fd, event in self._poller.poll(timeout, 64):
                self._doReadOrWrite(self._selectables[fd], fd, event)

    why = check(Changed)
    assert why is not None and "doPoll changed" in why


FALLBACK = textwrap.dedent('''
    from twisted.internet import epollreactor
    import policyd.runtime.reactor as tuned
    tuned.check = lambda upstream=None: "doPoll changed (test)"
    reactor, why = tuned.install()
    assert type(reactor) is epollreactor.EPollReactor, type(reactor)
    assert why == "doPoll changed (test)"
    print("FELL BACK")
''')


def test_a_failed_check_installs_twisteds_stock_reactor():
    """When the check fails, the daemon runs Twisted's own epoll reactor and says why."""
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "FELL BACK" in out.stdout


def test_the_start_up_check_refuses_a_changed_read_dispatch():
    """``doPoll`` handles a read event as ``_doReadOrWrite`` does: a Twisted whose
    ``_doReadOrWrite`` no longer reads so is refused (the stock reactor runs then)."""
    from twisted.internet import epollreactor

    from policyd.runtime.reactor import check

    class Changed(epollreactor.EPollReactor):
        def _doReadOrWrite(self, selectable, fd, event):
            why = selectable.doRead() if event & self._POLL_IN else selectable.doWrite()
            if why:
                self._disconnectSelectable(selectable, why, True)

    why = check(Changed)
    assert why is not None and "_doReadOrWrite changed" in why


READ_EVENTS = textwrap.dedent('''
    import socket
    from policyd.runtime.reactor import install
    reactor, why = install()
    assert why is None
    from twisted.internet import error
    from twisted.internet.abstract import FileDescriptor

    class Reader(FileDescriptor):
        """A selectable whose doRead says what the test asks, once."""
        def __init__(self, sock, answer):
            super().__init__(reactor)
            self.sock, self.answer, self.lost = sock, answer, []
        def fileno(self):
            return self.sock.fileno()
        def doRead(self):
            self.sock.recv(10)
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer
        def connectionLost(self, reason):
            self.lost.append(reason.type.__name__)
            super().connectionLost(reason)

    readers = []
    for answer in (None, error.ConnectionDone(), RuntimeError("reader bug")):
        a, b = socket.socketpair()
        reader = Reader(a, answer)
        reader.startReading()
        b.send(b"x")
        readers.append((reader, b))
    def report():
        print("LOST", [list(reader.lost) for reader, _ in readers])
        reactor.stop()
    reactor.callLater(0.2, report)
    reactor.run()
''')


def test_a_read_event_is_handled_as_twisted_handles_it():
    """Nothing returned: the connection stays; a reason: it is dropped with that reason;
    an exception: logged, and the connection dropped with it."""
    out = subprocess.run([sys.executable, "-c", READ_EVENTS], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LOST [[], ['ConnectionDone'], ['RuntimeError']]" in out.stdout, out.stdout


CLOCK_STEP = textwrap.dedent('''
    import sys, threading, time
    # The wall clock as the test steps it; set before Twisted reads ``time.time``.
    offset = 0.0
    wall = time.time
    time.time = lambda: wall() + offset
    from policyd.runtime.reactor import install
    reactor, why = install(sys.argv[1] == "policyd")
    assert why is None
    fired = []

    def step(seconds):
        global offset
        offset += seconds

    def stop(what):
        fired.append(what)
        if reactor.running:
            reactor.stop()

    reactor.callLater(600, fired.append, "ten minutes early")
    step(3600)
    reactor.callLater(0.1, step, -7200)
    reactor.callLater(0.2, stop, "on time")
    # Not on the reactor's clock: it must end the test however the timers go.
    watchdog = threading.Timer(30, reactor.callFromThread, (stop, "late"))
    watchdog.daemon = True
    watchdog.start()
    reactor.run()
    print("FIRED", fired)
''')


@pytest.mark.parametrize("reactor", ["policyd", "stock"])
def test_wall_clock_steps_move_no_timer(reactor):
    """The daemon's reactor (policyd's, or Twisted's stock one that ``install`` takes when
    policyd's is switched off or steps aside) times its calls on the monotonic clock: a
    wall clock stepped an hour forward fires no ten-minute timer early, then stepped two
    hours back delays no timer."""
    out = subprocess.run([sys.executable, "-c", CLOCK_STEP, reactor], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "FIRED ['on time']" in out.stdout, out.stdout


class _Bare(base.ReactorBase):
    """A reactor that only keeps time: no waker, nothing to close."""

    def installWaker(self) -> None:
        pass


def test_the_monotonic_clock_check_accepts_the_running_twisted():
    """``ReactorBase`` reads the time only through ``self.seconds``: the reactor gets
    ``time.monotonic``, and giving it again changes nothing."""
    reactor = _Bare()
    assert monotonic.use(reactor) is None
    assert reactor.seconds is time.monotonic
    assert monotonic.use(reactor) is None


def test_timers_already_scheduled_keep_the_wall_clock():
    """A reactor with calls scheduled keeps its clock, and says why: changing it would
    compare their wall-clock times with monotonic ones."""
    reactor = _Bare()
    reactor.callLater(5, lambda: None)
    assert monotonic.use(reactor) == "calls are already scheduled on the wall clock"
    assert reactor.seconds is not time.monotonic


def test_a_reactor_that_keeps_its_own_time_is_left_alone():
    """A reactor class with its own ``timeout`` (or not a ``ReactorBase`` at all, like
    the tests' ``Clock``) may read the time elsewhere: it keeps its clock."""

    class Own(_Bare):
        def timeout(self):
            return None

    own = Own()
    assert monotonic.use(own) == "Own has its own timeout"
    assert own.seconds is not time.monotonic
    clock = Clock()
    assert monotonic.use(clock) == "Clock is not a Twisted ReactorBase"
    clock.advance(3)
    assert clock.seconds() == 3


def test_the_monotonic_clock_check_refuses_a_changed_upstream(monkeypatch):
    """A Twisted whose ``ReactorBase`` no longer reads the time where this was written
    against keeps the wall clock."""
    monkeypatch.setattr(monotonic, "_UPSTREAM", (
        ("timeout", ("delay = self._pendingTimedCalls[0].time - time.time()",)),))
    reactor = _Bare()
    why = monotonic.use(reactor)
    assert why is not None and "ReactorBase.timeout changed" in why
    assert reactor.seconds is not time.monotonic
