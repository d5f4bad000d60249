"""Rests for the store thread while it rebuilds a snapshot under traffic.

A rebuild is seconds of Python on the store thread, and the reactor thread needs the GIL
back after every system call it makes (``recv``, ``send``, ``epoll_wait``): each time it
waits until the builder is made to let go (``sys.setswitchinterval``).  With a few system
calls per query that convoy throttles the reactor to a fraction of its speed for the
whole rebuild, and queries queue for tens of milliseconds.  So the builder rests: after
``work`` seconds of building it sleeps, in which the reactor runs with nobody to wait
for.  With the daemon's own reactor, which reports its turns (``turns``, kept by
``policyd.runtime.reactor``), the builder rests only while the reactor is busy, until it is back
waiting for events (at most ``longest`` seconds, so that a saturated daemon still gets
its snapshot), and not at all while it is idle.  With another reactor it sleeps
``rest`` seconds each time.

The build loops call ``pace()`` between batches (of rows, lists, freed objects); it does
nothing unless a ``pacing()`` block is active, as it is for rebuilds in the daemon (not
for its first load, made before any MTA connection is accepted, nor for ``policyctl``
and the benchmarks' one-shot builds).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

WORK = 0.002
REST = 0.0005
LONGEST = 0.05


class ReactorTurns:
    """Where the reactor thread is: set by ``policyd.runtime.reactor`` around each wait for
    events (``active`` once it runs).  Plain attributes: one writer, read under the GIL."""

    active = False
    waiting = False
    waited_at = 0.0


turns = ReactorTurns()


class _Pacer:
    def __init__(self, work: float, rest: float, longest: float) -> None:
        self.work = work
        self.rest = rest
        self.longest = longest
        self.rested = 0.0
        self._since = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        if now - self._since < self.work:
            return
        if not turns.active:
            time.sleep(self.rest)
        elif not turns.waiting:
            # The reactor is busy: rest until it is back waiting for events.
            deadline = now + self.longest
            while True:
                time.sleep(self.rest)
                if (turns.waiting or turns.waited_at > now
                        or time.perf_counter() >= deadline):
                    break
        # (an idle reactor: no rest at all)
        self._since = time.perf_counter()
        self.rested += self._since - now


_pacer: _Pacer | None = None

# The ``[runtime] pacing`` switch: off, ``pacing()`` blocks do nothing.
enabled = True


def pace() -> None:
    """A point where the builder may rest (cheap when no ``pacing()`` is active)."""
    if _pacer is not None:
        _pacer()


@contextmanager
def pacing(work: float = WORK, rest: float = REST, longest: float = LONGEST
           ) -> Iterator[_Pacer]:
    """Rest in ``pace()`` calls made (from any thread) while the block runs.  One build
    runs at a time (the store thread), so one module-wide pacer is enough."""
    global _pacer
    if not enabled:
        yield None
        return
    previous, _pacer = _pacer, _Pacer(work, rest, longest)
    try:
        yield _pacer
    finally:
        _pacer = previous
