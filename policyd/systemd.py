"""systemd's service notifications (``Type=notify``): ready, status, watchdog, stopping.

The ``$NOTIFY_SOCKET`` protocol (sd_notify(3)) is implemented here, in a few lines, rather
than through a library: it is one ``sendto`` of ``KEY=VALUE`` lines on a Unix datagram
socket (a leading ``@`` names an abstract socket), documented and stable since systemd
v209.  The libraries that wrap it (python-systemd, sdnotify, cysystemd) bring a C
extension built against libsystemd or an unmaintained package, for less than this module,
and none fits the reactor: every message here is sent from the reactor thread, non-blocking,
and a failure is logged once instead of raised.

``SystemdNotifier`` is a service of ``PolicyService``:

* ``ready(status)``: ``READY=1`` and ``STATUS=...``, once the first snapshot attempt is over
  and the MTA listeners accept (``service.ListenerGroup``);
* every ``STATUS_INTERVAL`` seconds ``STATUS=`` with the snapshot version and the answers
  per second (what ``systemctl status policyd`` shows);
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (``WatchdogSec=`` in the unit), sent by a
  reactor timer: a reactor that stops turning stops the pings and systemd restarts the
  service;
* ``STOPPING=1`` when the service stops.

Without ``$NOTIFY_SOCKET`` (not under systemd, ``Type=exec``) it does nothing at all.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="policyd.systemd")

__all__ = ["SystemdNotifier", "notify_address", "watchdog_interval"]


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address in ``$NOTIFY_SOCKET`` (``@name`` -> abstract), else ``None``."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return None
    return "\0" + address[1:] if address[0] == "@" else address


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, when it is set and
    ``$WATCHDOG_PID`` (if set) is this process; else ``None``."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2e6


class SystemdNotifier(Service):
    """Send the notifications described in the module docstring; ``status()`` returns
    the current ``STATUS=`` text."""

    STATUS_INTERVAL = 10.0

    def __init__(self, reactor, environ: Mapping[str, str],
                 status: Callable[[], str]) -> None:
        self.reactor = reactor
        self.address = notify_address(environ)
        self.watchdog = watchdog_interval(environ) if self.address else None
        self.status = status
        self.is_ready = False
        self._socket: socket.socket | None = None
        self._failed = False
        self._loops: list[LoopingCall] = []

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; ``False`` if it could not be sent
        (logged once)."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as error:
            if not self._failed:
                self._failed = True
                log.warn("cannot notify systemd on {address}: {error}",
                         address=self.address.replace("\0", "@"), error=error)
            return False
        self._failed = False
        return True

    def startService(self) -> None:
        super().startService()
        if self.address is None:
            return
        if self.watchdog is not None:
            self._loop(self.watchdog, lambda: self.notify("WATCHDOG=1"))
            log.info("systemd watchdog: WATCHDOG=1 every {interval:g} s",
                     interval=self.watchdog)

    def ready(self) -> None:
        """Tell systemd that policyd serves (once), then keep its status fresh."""
        if self.address is None or self.is_ready:
            return
        self.is_ready = True
        self.notify("READY=1", f"STATUS={self.status()}", f"MAINPID={os.getpid()}")
        self._loop(self.STATUS_INTERVAL, self.update_status, now=False)

    def update_status(self) -> None:
        self.notify(f"STATUS={self.status()}")

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self.address is not None:
            self.notify("STOPPING=1", "STATUS=stopping")
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _loop(self, interval: float, body: Callable[[], object], now: bool = True) -> None:
        loop = LoopingCall(body)
        loop.clock = self.reactor
        loop.start(interval, now=now)
        self._loops.append(loop)
