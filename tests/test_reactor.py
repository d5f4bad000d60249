"""policyd's reactor (epoll without the per-event legacy log context), in a child process:
the test process runs pytest-twisted's own reactor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
