"""Answers sent at once instead of on the reactor's next turn, and Unix sockets read with
``recv``.

Twisted queues every write for the next turn of the reactor: one more trip through it and
two ``epoll_ctl`` calls per answer.  A Postfix answer is a few dozen bytes for a socket
with nothing queued, which the kernel takes at once.  ``write_now`` sends it with one
``send`` when nothing is queued before it; what the kernel does not take, and any error,
go the usual way (``transport.write`` queues the rest; its next write then meets the
error itself).  Unix and TCP sockets only (both are ``tcp.Connection``); anything else,
such as a test's ``StringTransport``, gets a plain ``write``.

An answer followed by a close (Exim's) is sent and closed in the same turn instead
(``send_and_close``): Twisted would register the socket for writing, stop reading it,
come back on its next turn to send, and only then close, three ``epoll_ctl`` calls and a
trip through the reactor per connection.  Sending early and closing later would make the
client wake twice, so the two go together: the connection's ``doRead`` (``Closing``)
reports the connection finished as soon as the protocol has sent its last answer during
that read, and Twisted's own ``_doReadOrWrite`` closes it on the spot, as for any
connection whose read ends it.  Only an answer written during a read of that connection
is sent this way; any other (after a password check in a thread, at a timeout, at the
client's half-close) goes the usual way.

It reads ``tcp.Connection``'s private write buffer (``_tempDataLen``, ``dataBuffer``):
``available()`` checks that the running Twisted still has them.

Twisted reads every Unix socket connection with ``recvmsg`` and a 4 KB ancillary buffer
(``unix.Server`` can receive file descriptors), through two Python wrappers, where a TCP
connection calls ``recv``.  Neither Exim nor Postfix nor ``policyctl`` passes descriptors,
so ``read_plainly`` makes a listening Unix port create connections that read with
``recv`` and write with ``send``: a Python call or two fewer per request, and a
descriptor a local peer sends anyway is dropped by the kernel instead of being received,
logged and closed by Twisted (a line per message, which such a peer could repeat at
will).  ``reads_available()`` checks that the
running Twisted's Unix port and connection are the ones this was written against.

With the daemon's reactor, the Postfix answers written while it handles one turn's events
are held and sent together at the end of the turn (``turn``, at most ``TurnWrites.LIMIT``
held at a time), as Redis sends its replies before it waits for events again; so are the
Exim answers made as their connections are accepted (``fastaccept``), each socket closed
after its answer.  A send to a peer asleep in ``epoll_wait`` wakes it, a cross-CPU
interrupt on another core; sent one by one, a client with many connections (a proxy, a
load generator) wakes for each answer and sleeps again between them, and each wake-up is
paid in the daemon's send.  Sent together, it wakes once per turn, and an SMTP process on
the daemon's own CPU is woken after the daemon's turn instead of preempting it.  An
answer waits at most for the rest of its turn's events.  The connection class
(``TurnWriting``, ``hold_for_turn`` on the port) sends a held answer before anything else
is written to it or it is closed, so the order of a connection's output never changes.
"""

from __future__ import annotations

from twisted.internet import error, main, tcp, unix
from twisted.internet.tcp import EWOULDBLOCK
from twisted.internet.tcp import Connection as _SocketConnection
from twisted.logger import Logger

from .upstream import changed

__all__ = ["available", "write_now", "reads_available", "read_plainly", "PlainReadServer",
           "send_and_close", "closing_transport", "close_after_answer", "turn",
           "TurnWrites", "TurnWriting", "hold_for_turn"]

log = Logger(namespace="policyd.runtime.fastio")

# What ``Closing.doRead`` returns once the answer is out: the class Twisted's
# ``_disconnectSelectable`` closes both ways (``ConnectionDone`` from a read would be
# taken for the client's half-close and leave the socket open).
_ANSWERED = error.ConnectionLost("answered")


class PlainReadServer(unix.Server):
    """A Unix socket connection that reads with ``recv`` and writes with ``send``, as a
    TCP connection does (no descriptor passing either way)."""

    def doRead(self):
        """``tcp.Connection.doRead`` with its ``_dataReceived`` inline (a call fewer)."""
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None

    writeSomeData = tcp.Connection.writeSomeData


# What ``PlainReadServer.doRead`` copies from the running Twisted.
_UPSTREAM_READ_LINES = (
    "data = self.socket.recv(self.bufferSize)",
    "if se.args[0] == EWOULDBLOCK:",
    "return main.CONNECTION_LOST",
    "return self._dataReceived(data)",
)
_UPSTREAM_RECEIVED_LINES = (
    "if not data:",
    "return main.CONNECTION_DONE",
    "self.protocol.dataReceived(data)",
)


def reads_available() -> str | None:
    """``None`` when ``read_plainly`` can be used, else why not."""
    if getattr(unix.Port, "transport", None) is not unix.Server:
        return "Twisted's Unix port no longer creates unix.Server connections"
    if not issubclass(unix.Server, tcp.Connection):
        return "Twisted's unix.Server is no longer a tcp.Connection"
    for name in ("doRead", "writeSomeData", "_dataReceived"):
        if not callable(getattr(tcp.Connection, name, None)):
            return f"Twisted's tcp.Connection has no {name}"
    return (changed(tcp.Connection.doRead, _UPSTREAM_READ_LINES,
                    "Twisted's tcp.Connection.doRead")
            or changed(tcp.Connection._dataReceived, _UPSTREAM_RECEIVED_LINES,
                       "Twisted's tcp.Connection._dataReceived"))


def read_plainly(port) -> bool:
    """Make the listening ``port`` create ``PlainReadServer`` connections: True for a
    Unix port (a TCP port reads with ``recv`` already; anything else is left alone)."""
    if isinstance(port, unix.Port) and port.transport is unix.Server:
        port.transport = PlainReadServer
        return True
    return False

class Closing:
    """Mixed into a connection class (``closing_transport``): ``doRead`` reports the
    connection finished when ``send_and_close`` sent the protocol's last answer during
    it.  ``_reading``: inside ``doRead``; ``_answered``: the answer is out."""

    _reading = False
    _answered = False

    def doRead(self):
        self._reading = True
        try:
            why = super().doRead()
        finally:
            self._reading = False
        if why is None and self._answered:
            return _ANSWERED
        return why


_mixed_classes: dict[tuple[type, type], type] = {}


def _mixed(mixin: type, base: type) -> type:
    """``base`` (a ``tcp.Connection`` class) with ``mixin`` mixed in, one class per pair."""
    cls = _mixed_classes.get((mixin, base))
    if cls is None:
        cls = _mixed_classes[mixin, base] = type(f"{mixin.__name__}{base.__name__}",
                                                 (mixin, base), {})
    return cls


def closing_transport(base: type) -> type:
    """``base`` (a ``tcp.Connection`` class) with ``Closing`` mixed in, one class per base."""
    return _mixed(Closing, base)


def _mix_into_port(port, mixin: type) -> bool:
    """Make the listening ``port`` create connections of the class it creates now (so
    after ``read_plainly``) with ``mixin`` mixed in: True for a Unix or TCP port."""
    base = getattr(port, "transport", None)
    if isinstance(port, (unix.Port, tcp.Port)) and isinstance(base, type) \
            and issubclass(base, _SocketConnection):
        if not issubclass(base, mixin):
            port.transport = _mixed(mixin, base)
        return True
    return False


def close_after_answer(port) -> bool:
    """Make the listening ``port`` create ``Closing`` connections (``_mix_into_port``)."""
    return _mix_into_port(port, Closing)


def send_and_close(transport, data: bytes) -> None:
    """The last answer of a connection: sent and closed in this turn when it is written
    during a read of a ``Closing`` connection with nothing queued and the kernel takes it
    whole; else ``transport.write`` and ``loseConnection``, as Twisted does it."""
    if getattr(transport, "_reading", False):
        data = _send_now(transport, data)
        if not data:
            transport._answered = True
            return
    transport.write(data)
    transport.loseConnection()


def _send_now(transport, data: bytes) -> bytes:
    """Send what the kernel takes of ``data`` now when nothing is queued before it on
    ``transport`` (a connected socket connection); what is left to send."""
    if (transport.connected and not transport.disconnecting
            and not transport._tempDataLen and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        return data[sent:] if sent else data
    return data


def available() -> str | None:
    """``None`` when ``write_now`` can be used, else why not: a file descriptor of the
    running Twisted must keep its queued data in ``dataBuffer`` and ``_tempDataLen``."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.internet.task import Clock

    probe = FileDescriptor(Clock())
    missing = [name for name in ("_tempDataLen", "dataBuffer", "_tempDataBuffer")
               if not hasattr(probe, name)]
    if missing:
        return f"Twisted's FileDescriptor has no {', '.join(missing)}"
    probe.connected = True
    probe.startWriting = lambda: None
    probe.write(b"x")
    if probe._tempDataLen != 1:
        return "Twisted's FileDescriptor.write no longer counts queued bytes in _tempDataLen"
    return None


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing is queued before it, or at
    the end of the reactor's turn when one is open and the connection is ``TurnWriting``."""
    if isinstance(transport, _SocketConnection):
        if turn.open and isinstance(transport, TurnWriting):
            turn.hold(transport, data)
            return
        data = _send_now(transport, data)
        if not data:
            return
    transport.write(data)


class TurnWrites:
    """The answers held in the reactor's current turn (module-wide ``turn``).

    ``open``: set by the daemon's reactor while it handles a turn's events (never by
    another reactor, so with one nothing is held).  Single-threaded: the reactor's."""

    #: Held answers sent at once when this many wait, so that none waits for the rest
    #: of a very long turn.
    LIMIT = 16

    def __init__(self) -> None:
        self.open = False
        self.held: list = []
        # (finish, port, socket, address, answer): made at accept
        self.accepted: list = []

    def hold_accepted(self, finish, port, skt, addr, answer: bytes) -> None:
        """An answer made as its connection was accepted (``fastaccept``), with no
        transport: ``finish(port, skt, addr, answer)`` sends it and closes the socket at
        the end of the turn."""
        self.accepted.append((finish, port, skt, addr, answer))
        if len(self.accepted) >= self.LIMIT:
            self.send()

    def hold(self, transport: "TurnWriting", data: bytes) -> None:
        if transport._held is None:
            transport._held = data
            self.held.append(transport)
            if len(self.held) >= self.LIMIT:
                self.send()
        else:  # a second answer in the same turn goes after the first
            transport._held += data

    def send(self) -> None:
        """Send every answer held (the end of the turn).  A failure with one connection
        (logged) never keeps the others' answers back."""
        if self.accepted:
            accepted, self.accepted = self.accepted, []
            for finish, port, skt, addr, answer in accepted:
                try:
                    finish(port, skt, addr, answer)
                except Exception:
                    log.failure("unexpected error answering a connection accepted "
                                "in this turn")
                    skt.close()
        held, self.held = self.held, []
        for transport in held:
            if transport._held is not None:
                try:
                    transport.send_held()
                except Exception:
                    log.failure("unexpected error sending an answer held for the turn")
                    transport.abortConnection()


turn = TurnWrites()


class TurnWriting:
    """Mixed into a connection class (``hold_for_turn``): ``_held`` is the answer held
    for the end of the turn, sent before anything else the connection writes or before
    it closes."""

    _held = None

    def send_held(self) -> None:
        data, self._held = self._held, None
        data = _send_now(self, data)
        if data:
            super().write(data)

    def write(self, data) -> None:
        if self._held is not None:
            self.send_held()
        super().write(data)

    def writeSequence(self, iovec) -> None:
        if self._held is not None:
            self.send_held()
        super().writeSequence(iovec)

    def loseConnection(self, *args, **kwargs) -> None:
        if self._held is not None:
            self.send_held()
        super().loseConnection(*args, **kwargs)


def hold_for_turn(port) -> bool:
    """Make the listening ``port`` create ``TurnWriting`` connections
    (``_mix_into_port``)."""
    return _mix_into_port(port, TurnWriting)
