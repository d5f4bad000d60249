"""policyd's reactor (epoll without the per-event legacy log context), in a child process:
the test process runs pytest-twisted's own reactor."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import socket, sys, tempfile, os
    from policyd.runtime.reactor import EPollReactor, install
    reactor = install()
    assert isinstance(reactor, EPollReactor)
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
