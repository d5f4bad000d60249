"""The wire protocols: one module each, a pure codec plus a thin Twisted protocol.

``postfix``  the Postfix policy delegation protocol (SMTPD_POLICY_README), persistent.
``exim``     one line per connection for Exim's ``${readsocket}``, answered without newline.
``control``  JSON lines over a Unix socket for ``policyctl`` (query, status, reload).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something we cannot read.  It is the peer's fault: answer with a
    temporary failure and say why, never a 5xx.

    ``fatal`` means the framing can no longer be trusted (an over-long line or request):
    answer, then close the connection.
    """

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


from twisted.internet import defer  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402
from twisted.internet.tcp import Connection as _SocketConnection  # noqa: E402


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing is queued before it.

    Twisted queues every write for the next turn of the reactor: one more trip through
    it and two ``epoll_ctl`` calls per answer, a third of what a whole request costs the
    bare server.  An answer is a few dozen bytes for a socket with nothing queued, which
    the kernel takes at once.  What it does not take, and any error, go the usual way
    (``transport.write`` queues the rest; its next write then meets the error itself).
    Unix and TCP sockets only (both are ``tcp.Connection``); anything else, such as a
    test's ``StringTransport``, gets a plain ``write``.

    Not for an answer followed by a close (Exim's): there Twisted's own turn sends and
    closes back to back and the client wakes once; sent early, the client wakes for the
    answer and again for the close, which cost more than the turn saves (measured).
    """
    if (isinstance(transport, _SocketConnection) and transport.connected
            and not transport.disconnecting and not transport._tempDataLen
            and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def peer_text(transport) -> str:
    """``127.0.0.1:4321`` for TCP, ``unix`` for a Unix socket peer, for log lines."""
    if transport is None:
        return "-"
    try:
        peer = transport.getPeer()
    except Exception:
        return "-"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"{host}:{peer.port}"
    return "unix"


class TrackingFactory(Factory):
    """A factory that knows its open connections, so shutdown can let them finish.

    Protocols call ``track``/``untrack`` from ``connectionMade``/``connectionLost`` and
    implement ``shutdown()``: close now if idle, else after the answer in progress.

    Timeouts are one sweep over the open connections every ``sweep_interval`` seconds
    while there are any (``sweep(now)``), not a timer per connection: setting, resetting
    and cancelling a timer cost more than the rest of a short connection's bookkeeping.
    """

    noisy = False
    sweep_interval: float | None = None

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.connections: set = set()
        self.closing = False
        self._drained: list[defer.Deferred] = []
        self._sweeping: LoopingCall | None = None

    def track(self, protocol) -> None:
        self.connections.add(protocol)
        if self._sweeping is None and self.sweep_interval:
            self._sweeping = LoopingCall(self._sweep)
            self._sweeping.clock = self.reactor
            self._sweeping.start(self.sweep_interval, now=False)

    def _sweep(self) -> None:
        self.sweep(self.reactor.seconds())
        if not self.connections and self._sweeping is not None:
            self._sweeping.stop()
            self._sweeping = None

    def sweep(self, now: float) -> None:
        """Time out what has to be (subclasses)."""

    def untrack(self, protocol) -> None:
        self.connections.discard(protocol)
        if not self.connections and self._drained:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(0)

    def drain(self, grace: float) -> defer.Deferred:
        """Ask every connection to finish; abort what is still open after ``grace`` s.
        Fires with the number of connections aborted."""
        self.closing = True
        for protocol in list(self.connections):
            protocol.shutdown()
        if not self.connections:
            return defer.succeed(0)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        call = self.reactor.callLater(grace, self._abort_all, d)

        def cancel_timer(result):
            if call.active():
                call.cancel()
            return result
        d.addBoth(cancel_timer)
        return d

    def _abort_all(self, d: defer.Deferred) -> None:
        remaining = list(self.connections)
        for protocol in remaining:
            protocol.transport.abortConnection()
        if d in self._drained:
            self._drained.remove(d)
            d.callback(len(remaining))
