"""The daemon's reactor: Twisted's epoll reactor, minus the legacy log context per event.

Twisted's ``doPoll`` hands every ready descriptor to ``log.callWithLogger``, which asks
the selectable for its ``logPrefix()``, copies a context dictionary and pushes it on a
thread-local stack so that a legacy ``log.msg`` inside the handler is tagged with a
"system".  policyd logs through ``twisted.logger`` with namespaces and never prints that
tag, yet it cost ~3 µs per event: a tenth of a Postfix request, and three events (accept,
read, close) for every Exim connection.  ``_doReadOrWrite`` is unchanged: it still catches
what a handler raises, logs it and drops that connection.

It also tells a snapshot rebuild when it is back waiting for events (``pacing.turns``),
so that the builder gives it the GIL until it has caught up.
"""

from __future__ import annotations

import errno
from time import perf_counter

from twisted.internet import epollreactor
from twisted.logger import Logger

from .pacing import turns

log = Logger(namespace="policyd.runtime.reactor")


class EPollReactor(epollreactor.EPollReactor):
    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        turns.active = True
        turns.waited_at = perf_counter()
        turns.waiting = True
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        finally:
            turns.waiting = False
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("unexpected error handling an event on {selectable!r}",
                            selectable=selectable)

    doIteration = doPoll


def install() -> EPollReactor:
    """Install it as the global reactor (before anything imports ``reactor``)."""
    from twisted.internet.main import installReactor

    reactor = EPollReactor()
    installReactor(reactor)
    return reactor
