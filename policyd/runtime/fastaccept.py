"""Exim's requests answered as their connections are accepted.

Exim's ``${readsocket}`` connects, writes its request line and half-closes at once, so by
the time the reactor accepts the connection the whole request is nearly always in the
socket already.  Twisted would wrap the socket in a transport, register it with epoll,
build and track a protocol, come back on its next turn to read, answer, and take it all
down again: more than the decision itself costs.  ``answer_on_accept`` makes a listening
port read what has arrived as it accepts a connection and hand it to the factory's
``answer_first``: a complete request answered at once is sent and the socket closed right
there, with no transport, protocol or epoll registration; anything else (no bytes yet,
half a line, an answer that waits for a password check or a DNS lookup, an answer the
kernel does not take whole) goes the usual way, with the bytes already read handed to the
protocol as if Twisted had read them.  The factory decides, counts and logs exactly as
for any connection; limits are untouched, since such a connection holds no descriptor
once the call returns.  With the daemon's reactor (``[runtime] turn_writes``) the answers
made at accept are sent, and their sockets closed, at the end of the reactor's turn
(``fastio.turn``, which says why), as the Postfix answers are.

The accept loop is Twisted's own ``Port.doRead`` (``twisted.internet.tcp``) with that one
step added, so it uses what that loop uses (``_accept``, ``_BuffersLogs``,
``_reservedFD``, ``numberAccepts``): ``available()`` checks that the running Twisted's
loop is still the one this was written against.
"""

from __future__ import annotations

import socket
import types

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.python import log as legacy_log

from .fastio import turn
from .upstream import changed

__all__ = ["available", "answer_on_accept", "first_bytes", "finish", "adopt"]

# What the upstream ``Port.doRead`` this replaces must do, line by line (comments and white
# space aside).
_UPSTREAM_LINES = (
    "numAccepts = self.numberAccepts",
    "with _BuffersLogs(",
    "self._logger.namespace, self._logger.observer",
    "clients = _accept(",
    "bufferingLogger, range(numAccepts), self.socket, _reservedFD",
    "for accepted, (skt, addr) in enumerate(clients, 1):",
    "protocol = self.factory.buildProtocol(self._buildAddr(addr))",
    "transport = self.transport(",
    "skt, protocol, addr, self, s, self.reactor",
    "protocol.makeConnection(transport)",
    "self.numberAccepts += 20",
    "self.numberAccepts = max(1, accepted)",
)

#: At most this much is read at accept (as much as Twisted reads at a time).
READ_SIZE = 65536


def available(upstream=tcp.Port) -> str | None:
    """``None`` when ``answer_on_accept`` can be used, else why not."""
    for name in ("_accept", "_BuffersLogs", "_reservedFD"):
        if not hasattr(tcp, name):
            return f"twisted.internet.tcp has no {name}"
    return changed(upstream.doRead, _UPSTREAM_LINES, "Twisted's tcp.Port.doRead")


def answer_on_accept(port) -> bool:
    """Make the listening ``port`` (TCP or Unix) offer what a new connection has sent to
    its factory's ``answer_first`` as it accepts it: True when it will."""
    if not isinstance(port, tcp.Port) or not callable(
            getattr(port.factory, "answer_first", None)):
        return False
    port.doRead = types.MethodType(_accept_and_answer, port)
    return True


def first_bytes(skt: socket.socket) -> bytes:
    """What a just-accepted connection has sent so far (``b""``: nothing yet, the peer
    gone, or an error, all of which the usual path meets again and handles)."""
    try:
        skt.setblocking(False)
        return skt.recv(READ_SIZE)
    except OSError:
        return b""


class _Peer:
    """What ``answer_first`` may ask about the connection (for its log lines)."""

    __slots__ = ("_port", "_addr")

    def __init__(self, port, addr) -> None:
        self._port = port
        self._addr = addr

    def getPeer(self):
        return self._port._buildAddr(self._addr)


def finish(port, skt: socket.socket, addr, answer: bytes) -> None:
    """Send an accepted connection its whole answer and close it; what the kernel does
    not take goes the usual way (``adopt``)."""
    try:
        sent = skt.send(answer)
    except OSError:
        sent = len(answer)  # the peer is gone: nobody to answer
    if sent == len(answer):
        skt.close()
    else:
        adopt(port, skt, addr, answer[sent:], b"")


def adopt(port, skt: socket.socket, addr, answer: bytes | Deferred | None,
          data: bytes) -> None:
    """The usual way for an accepted connection (as Twisted's accept loop makes it): a
    transport and a protocol, handed the ``answer`` (what remains to send, or the
    ``Deferred`` of one that waits) or else the ``data`` read so far."""
    protocol = port.factory.buildProtocol(port._buildAddr(addr))
    if protocol is None:
        skt.close()
        return
    s = port.sessionno
    port.sessionno = s + 1
    transport = port.transport(skt, protocol, addr, port, s, port.reactor)
    protocol.makeConnection(transport)
    if answer is not None:
        protocol.take_answer(answer)
    elif data:
        protocol.dataReceived(data)


def _accept_and_answer(self) -> None:
    """``tcp.Port.doRead`` with ``answer_first`` between accept and the transport."""
    try:
        first = self.factory.answer_first
        with tcp._BuffersLogs(self._logger.namespace,
                              self._logger.observer) as bufferingLogger:
            accepted = 0
            clients = tcp._accept(bufferingLogger, range(self.numberAccepts), self.socket,
                                  tcp._reservedFD)
            for accepted, (skt, addr) in enumerate(clients, 1):
                if len(addr) == 4:
                    # IPv6: the scope ID kept, as Twisted does
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST
                                              | socket.NI_NUMERICSERV)
                    addr = tuple([host[0]] + list(addr[1:]))
                data = first_bytes(skt)
                result = None
                if data:
                    try:
                        result = first(data, _Peer(self, addr))
                    except Exception:
                        # as an exception in dataReceived would: logged, connection closed
                        legacy_log.err(None, "answering a connection as it was accepted")
                        skt.close()
                        continue
                if type(result) is bytes:
                    if turn.open:  # sent and closed at the end of the turn
                        turn.hold_accepted(finish, self, skt, addr, result)
                    else:
                        finish(self, skt, addr, result)
                    continue
                adopt(self, skt, addr, result, data)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)
    except BaseException:
        legacy_log.deferr()
