"""The daemon's reactor: Twisted's epoll reactor, minus the legacy log context per event.

Twisted's ``doPoll`` hands every ready descriptor to ``log.callWithLogger``, which asks
the selectable for its ``logPrefix()``, copies a context dictionary and pushes it on a
thread-local stack so that a legacy ``log.msg`` inside the handler is tagged with a
"system".  policyd logs through ``twisted.logger`` with namespaces and never prints that
tag, yet it cost ~3 µs per event: a tenth of a Postfix request, and three events (accept,
read, close) for every Exim connection.  An event that is only "readable" (the usual
one) is handled here as ``_doReadOrWrite`` handles it, one Python call fewer per event:
``doRead``, and the connection dropped when that says so or raises (logged).  Every other
event (writable, hang-up, error) goes to Twisted's ``_doReadOrWrite`` unchanged.

It also tells a snapshot rebuild when it is back waiting for events (``pacing.turns``),
so that the builder gives it the GIL until it has caught up, and, with ``turn_writes``,
opens a turn around each batch of events: the Postfix answers written meanwhile are sent
together when it ends (``fastio.turn``, which says why).
"""

from __future__ import annotations

import errno
from time import perf_counter

from twisted.internet import epollreactor, posixbase
from twisted.logger import Logger

from . import fastio, monotonic
from .pacing import turns
from .upstream import changed

log = Logger(namespace="policyd.runtime.reactor")


class EPollReactor(epollreactor.EPollReactor):
    #: Answers written in a turn held for its end (``fastio.turn``; ``[runtime]
    #: turn_writes``).
    turn_writes = False

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
        readable = self._POLL_IN
        held = fastio.turn
        held.open = self.turn_writes
        try:
            self._dispatch(events, selectables, dispatch, readable)
        finally:
            held.open = False
            if held.held or held.accepted:
                try:
                    held.send()
                except Exception:
                    log.failure("unexpected error sending the answers of a turn")

    def _dispatch(self, events, selectables, dispatch, readable) -> None:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == readable:
                # _doReadOrWrite's path for this event, inline.
                in_read = True
                try:
                    if selectable.fileno() == -1:
                        why, in_read = _NO_FILEDESC, False
                    else:
                        why = selectable.doRead()
                except BaseException as error:
                    why = error
                    log.failure("unexpected error reading from {selectable!r}",
                                selectable=selectable)
                if why:
                    try:
                        self._disconnectSelectable(selectable, why, in_read)
                    except Exception:
                        log.failure("unexpected error closing {selectable!r}",
                                    selectable=selectable)
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("unexpected error handling an event on {selectable!r}",
                            selectable=selectable)

    doIteration = doPoll


# What the upstream ``doPoll`` this class replaces must do, line by line (comments and
# white space aside): poll ``_poller`` for at most ``len(_selectables)`` events, retry on
# EINTR, and hand each ready selectable to ``_doReadOrWrite``.
_UPSTREAM_LINES = (
    "l = self._poller.poll(timeout, len(self._selectables))",
    "if err.errno == errno.EINTR:",
    "_drdw = self._doReadOrWrite",
    "selectable = self._selectables[fd]",
    "log.callWithLogger(selectable, _drdw, selectable, fd, event)",
)


# What the upstream ``_doReadOrWrite`` does with a read event, which ``doPoll`` does inline.
_UPSTREAM_DISPATCH_LINES = (
    "if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):",
    "if selectable.fileno() == -1:",
    "why = _NO_FILEDESC",
    "if event & self._POLL_IN:",
    "why = selectable.doRead()",
    "inRead = True",
    "if not why and event & self._POLL_OUT:",
    "self._disconnectSelectable(selectable, why, inRead)",
)

_NO_FILEDESC = getattr(posixbase, "_NO_FILEDESC", None)


def check(upstream=epollreactor.EPollReactor) -> str | None:
    """``None`` when the running Twisted's epoll reactor is the one this replacement was
    written against, else why not."""
    why = changed(upstream.doPoll, _UPSTREAM_LINES, "Twisted's EPollReactor.doPoll")
    if why is not None:
        return why
    why = changed(upstream._doReadOrWrite, _UPSTREAM_DISPATCH_LINES,
                  "Twisted's _doReadOrWrite")
    if why is not None:
        return why
    if _NO_FILEDESC is None:
        return "Twisted's posixbase has no _NO_FILEDESC"
    for name in ("_doReadOrWrite", "_disconnectSelectable"):
        if not callable(getattr(upstream, name, None)):
            return f"Twisted's EPollReactor has no {name}"
    return None


def install(enabled: bool = True) -> tuple[object, str | None]:
    """Install the global reactor (before anything imports ``reactor``): this one when
    ``enabled`` and ``check()`` passes, else Twisted's stock epoll reactor; either with
    its timers on the monotonic clock (``monotonic``; ``policyd.tap.makeService`` notes
    it when that steps aside).  Returns the reactor and, when the stock one was taken
    although this one was asked for, why."""
    from twisted.internet.main import installReactor

    why = check() if enabled else None
    if enabled and why is None:
        reactor = EPollReactor()
    else:
        reactor = epollreactor.EPollReactor()
    monotonic.use(reactor)
    installReactor(reactor)
    return reactor, why
