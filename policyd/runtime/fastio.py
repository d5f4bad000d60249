"""Answers sent at once instead of on the reactor's next turn.

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
"""

from __future__ import annotations

from twisted.internet.tcp import Connection as _SocketConnection

__all__ = ["available", "write_now"]

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
