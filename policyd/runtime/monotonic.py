"""The reactor's timers on the monotonic clock.

Twisted's reactors read the time through ``seconds()``, which is ``time.time``, so a step
of the wall clock (an NTP or chrony step, a VM resumed) moves every timer of the daemon:
stepped back an hour, the snapshot refresh, the idle and request timeouts of the MTA
connections, the sweeps and the moderation sync all wait an hour more; stepped forward,
they all fire at once.  ``use(reactor)`` gives the reactor ``time.monotonic`` as its
``seconds``, an instance attribute that ``callLater``, each ``DelayedCall`` it makes and
the loop waiting for them read, before anything is scheduled (no timer may mix the two
clocks).  It checks that the running Twisted reads the time only there, else it steps
aside and says why: the timers then stay on the wall clock, as Twisted has them.

``reactor.seconds()`` is then good for durations only.  A time that leaves the process
(written to the store that other daemons and ``policyctl`` read, printed as a date,
compared with one on disk or from a peer) is taken from ``time.time``: SMTP-time
moderation has a wall clock of its own (``ModerationService``'s ``wall``), and
``twisted.logger`` stamps its events with ``time.time`` itself.
"""

from __future__ import annotations

import time

from twisted.internet import base

from .upstream import changed

__all__ = ["check", "use"]

# Where Twisted's ``ReactorBase`` reads the time, each through ``self.seconds``: a call
# scheduled (and the clock its ``DelayedCall`` keeps for ``reset``/``delay``), the wait for
# the next one, the run of those due.
_UPSTREAM = (
    ("callLater", ("self.seconds() + delay,", "seconds=self.seconds,")),
    ("timeout", ("delay = self._pendingTimedCalls[0].time - self.seconds()",)),
    ("runUntilCurrent", ("now = self.seconds()",)),
)


def check(reactor) -> str | None:
    """``None`` when ``reactor`` can be given the monotonic clock now, else why not."""
    kind = type(reactor)
    if not isinstance(reactor, base.ReactorBase):
        return f"{kind.__name__} is not a Twisted ReactorBase"
    for name in ("seconds",) + tuple(name for name, _ in _UPSTREAM):
        if getattr(kind, name, None) is not getattr(base.ReactorBase, name):
            return f"{kind.__name__} has its own {name}"
    for name, lines in _UPSTREAM:
        why = changed(getattr(base.ReactorBase, name), lines, f"Twisted's ReactorBase.{name}")
        if why is not None:
            return why
    if reactor.getDelayedCalls():
        return "calls are already scheduled on the wall clock"
    return None


def use(reactor) -> str | None:
    """Give ``reactor`` the monotonic clock; ``None`` when it has it (now or already),
    else why not (its timers stay on the wall clock)."""
    if getattr(reactor, "seconds", None) is time.monotonic:
        return None
    why = check(reactor)
    if why is None:
        reactor.seconds = time.monotonic
    return why
