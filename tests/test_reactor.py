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
