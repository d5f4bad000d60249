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
    """

    noisy = False

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.connections: set = set()
        self.closing = False
        self._drained: list[defer.Deferred] = []

    def track(self, protocol) -> None:
        self.connections.add(protocol)

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
