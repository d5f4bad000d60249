"""Answers sent at once instead of on the reactor's next turn, and Unix sockets read with
``recv``.

Twisted queues every write for the next turn of the reactor: one more trip through it and
two ``epoll_ctl`` calls per answer.  A Postfix answer is a few dozen bytes for a socket
with nothing queued, which the kernel takes at once.  ``write_now`` sends it with one
``send`` when nothing is queued before it; what the kernel does not take, and any error,
go the usual way (``transport.write`` queues the rest; its next write then meets the
error itself).  Unix and TCP sockets only (both are ``tcp.Connection``); anything else,
such as a test's ``StringTransport``, gets a plain ``write``.

Not for an answer followed by a close (Exim's): there Twisted's own turn sends and closes
back to back and the client wakes once; sent early, the client would wake twice.

It reads ``tcp.Connection``'s private write buffer (``_tempDataLen``, ``dataBuffer``):
``available()`` checks that the running Twisted still has them.

Twisted reads every Unix socket connection with ``recvmsg`` and a 4 KB ancillary buffer
(``unix.Server`` can receive file descriptors), through two Python wrappers, where a TCP
connection calls ``recv``.  Neither Exim nor Postfix nor ``policyctl`` passes descriptors,
so ``read_plainly`` makes a listening Unix port create connections that read with
``recv`` and write with ``send``: a Python call or two fewer per request, and a descriptor a local peer sends anyway is
dropped by the kernel instead of being received, logged and closed by Twisted (a line per
message, which such a peer could repeat at will).  ``reads_available()`` checks that the
running Twisted's Unix port and connection are the ones this was written against.
"""

from __future__ import annotations

from twisted.internet import tcp, unix
from twisted.internet.tcp import Connection as _SocketConnection

__all__ = ["available", "write_now", "reads_available", "read_plainly", "PlainReadServer"]


class PlainReadServer(unix.Server):
    """A Unix socket connection that reads with ``recv`` and writes with ``send``, as a
    TCP connection does (no descriptor passing either way)."""

    doRead = tcp.Connection.doRead
    writeSomeData = tcp.Connection.writeSomeData


def reads_available() -> str | None:
    """``None`` when ``read_plainly`` can be used, else why not."""
    if getattr(unix.Port, "transport", None) is not unix.Server:
        return "Twisted's Unix port no longer creates unix.Server connections"
    if not issubclass(unix.Server, tcp.Connection):
        return "Twisted's unix.Server is no longer a tcp.Connection"
    for name in ("doRead", "writeSomeData", "_dataReceived"):
        if not callable(getattr(tcp.Connection, name, None)):
            return f"Twisted's tcp.Connection has no {name}"
    return None


def read_plainly(port) -> bool:
    """Make the listening ``port`` create ``PlainReadServer`` connections: True for a
    Unix port (a TCP port reads with ``recv`` already; anything else is left alone)."""
    if isinstance(port, unix.Port) and port.transport is unix.Server:
        port.transport = PlainReadServer
        return True
    return False

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
    """``transport.write(data)``, sent at once when nothing is queued before it."""
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
