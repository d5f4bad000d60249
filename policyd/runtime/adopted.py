"""Unix sockets passed by systemd (``systemd:domain=UNIX``), adopted without harm.

This reaches into Twisted's private Unix port code (``_fromListeningDescriptor``,
``_bindPath``, ``_shouldShutdown``, ``unix._inFilesystemNamespace``), so it lives here
with the rest of what depends on Twisted's internals: ``listen`` checks that they are
there and otherwise adopts the socket the stock way and says what that costs.
"""

from __future__ import annotations

import os
import socket
import stat

from twisted.internet import defer, fdesc, tcp, unix
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import AlreadyListened
from twisted.logger import Logger

__all__ = ["listen"]

log = Logger(namespace="policyd.runtime")


def listen(reactor, endpoint, factory) -> defer.Deferred:
    """``endpoint.listen(factory)``, except for a Unix socket passed by systemd
    (``systemd:domain=UNIX``): adopted as a ``_SystemdUNIXPort``, which leaves its path
    and mode alone, as Twisted's ``AdoptedStreamServerEndpoint.listen`` does otherwise
    (same steps: non-blocking, adopt a duplicate, close the original descriptor)."""
    if not (isinstance(endpoint, AdoptedStreamServerEndpoint)
            and endpoint.addressFamily == socket.AF_UNIX):
        return endpoint.listen(factory)
    if not all(hasattr(unix.Port, name) for name in ("_fromListeningDescriptor",
                                                      "_shouldShutdown")) \
            or not hasattr(unix, "_inFilesystemNamespace") \
            or not hasattr(endpoint, "_used"):
        log.warn("this Twisted's Unix port is not the one policyd was written against: the "
                 "systemd socket is adopted the stock way, and Twisted removes its path "
                 "on stop")
        return endpoint.listen(factory)
    if endpoint._used:
        return defer.fail(AlreadyListened())
    endpoint._used = True
    try:
        fdesc.setNonBlocking(endpoint.fileno)
        port = _SystemdUNIXPort._fromListeningDescriptor(reactor, endpoint.fileno, factory)
        port.startListening()
        os.close(endpoint.fileno)
    except BaseException:
        return defer.fail()
    return defer.succeed(port)


class _SystemdUNIXPort(unix.Port):
    """A listening Unix socket that systemd passed (``LISTEN_FDS``): the socket unit
    owns its path, its owner and its mode.

    Twisted's ``unix.Port`` treats every Unix port as its own, an adopted one included:
    ``startListening`` chmods the path to the port's mode (0666 for an adopted port:
    the unit's ``SocketMode=0660`` lost); on stop, ``_closeSocket`` calls ``shutdown()``
    on the listening socket, which is systemd's too (after it the socket refuses every
    connection, for the next policyd as well: the TCP port skips it for an adopted
    socket, the Unix port does not), and ``connectionLost`` unlinks the path, so after
    ``systemctl restart policyd`` the socket unit listens on a socket nobody can reach.
    Here the mode is kept, the socket only closed (systemd keeps its descriptor) and
    the path never removed."""

    # Only close our descriptor on stop: no shutdown() of the socket systemd holds.
    _shouldShutdown = False

    def startListening(self) -> None:
        path = self._bindPath
        if unix._inFilesystemNamespace(path):
            try:
                self.mode = stat.S_IMODE(os.stat(path).st_mode)  # the chmod changes nothing
            except OSError:
                pass
        super().startListening()

    def connectionLost(self, reason) -> None:
        # unix.Port.connectionLost less its os.unlink(self._bindPath).
        if self.lockFile is not None:
            self.lockFile.unlock()
        tcp.Port.connectionLost(self, reason)
