"""The interpreter's heap around snapshot builds: the cyclic collector and the C heap.

* ``settle()``: once, before the first MTA connection: collect, then move everything
  alive (the imported modules of Twisted, SQLAlchemy and the rest, about 100,000 objects)
  out of the collector's sight (``gc.freeze``).  Every full collection would otherwise
  scan them all, a stall of the reactor a few times a minute under load.  Nothing
  transient is alive at that moment, so nothing cyclic is kept from collection later.
* ``no_collection()``: no cyclic collection while a snapshot is built.  A build
  allocates millions of short-lived objects (rows, specs), and every full collection it
  would trigger scans them all while holding the GIL.  They die by reference counting
  when the build returns; what survives (the snapshot) holds few GC-tracked objects.
  The switch is process-wide: the reactor thread makes no cycles worth collecting meanwhile.
* ``ReactorCollector``: after ``settle()``, the cyclic collector no longer runs on its
  own: the reactor runs it at fixed times between turns (the young generations every
  ``YOUNG`` seconds, the middle one every ``MIDDLE``, all of it every ``FULL``).  Left
  to itself, it runs in whichever thread allocates when a threshold is crossed, and the
  store thread's periodic check crossed one: a collection there held the GIL for tens
  of milliseconds while the store thread (niced) and the reactor thread passed the GIL
  back and forth, long enough to queue many requests behind it (``bench --timeline``
  showed such a collection right after a store check, and the open-loop p99 with it).
  From the reactor, each collection is a short pause that
  ``gc.freeze`` keeps short (only what was made since the first load is scanned), and
  none runs while a snapshot is built (``no_collection``): the young generation then
  holds the builder's rows by the hundred thousand, and scanning them would stop the
  reactor for milliseconds (``make bench``'s worst query during a rebuild).
* ``release(box)``: drop an old snapshot one list at a time, so that freeing it gives the
  reactor thread its turns in between instead of one long reference-count drop.
* ``free_piecewise(*containers, pause)``: empty a loader's big temporary lists, dicts
  and sets item by item before they are dropped, for the same reason as ``release``.
* ``return_free_memory()``: give the C heap's free memory back to the system after a
  build (glibc keeps what a build's temporary tables used, and the RSS only grows).

``enabled`` is the ``[runtime] heap`` switch; off, each of these does only what
correctness needs (``release`` still drops the snapshot).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["enabled", "settle", "no_collection", "release", "free_piecewise",
           "return_free_memory", "ReactorCollector"]

enabled = True


def settle() -> None:
    if enabled:
        gc.collect()
        gc.freeze()


class ReactorCollector:
    """Cyclic collection at fixed times on the reactor instead of at allocation
    thresholds in any thread (see the module's docstring).  ``start()`` after
    ``settle()``; ``stop()`` gives collection back to the interpreter."""

    YOUNG = 0.1
    MIDDLE = 1.0
    FULL = 30.0

    def __init__(self, clock) -> None:
        self.clock = clock
        self._calls: list = []
        self._was_enabled = False

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        if self._calls or not enabled:
            return
        self._was_enabled = gc.isenabled()
        gc.disable()
        for interval, generation in ((self.YOUNG, 0), (self.MIDDLE, 1), (self.FULL, 2)):
            call = LoopingCall(self.collect, generation)
            call.clock = self.clock
            call.start(interval, now=False)
            self._calls.append(call)

    @staticmethod
    def collect(generation: int) -> None:
        """``gc.collect(generation)``, unless a snapshot is being built."""
        if not _building:
            gc.collect(generation)

    def stop(self) -> None:
        for call in self._calls:
            if call.running:
                call.stop()
        if self._calls and self._was_enabled:
            gc.enable()
        self._calls = []


# Builds running (``no_collection`` blocks): the ``ReactorCollector`` waits for none.
_building = 0


@contextmanager
def no_collection() -> Iterator[None]:
    global _building
    if not enabled:
        yield
        return
    collecting = gc.isenabled()
    gc.disable()
    _building += 1
    try:
        yield
    finally:
        _building -= 1
        if collecting:
            gc.enable()


def release(box: list, pause: Callable[[], None] = lambda: None) -> None:
    """Drop the snapshot in ``box`` (the only reference left) list by list, calling
    ``pause`` in between; lists the new snapshot shares survive."""
    snapshot = box.pop()
    policies = list(snapshot.lists.values())
    del snapshot
    if enabled:
        while policies:
            policies.pop()
            pause()
    del policies
    return_free_memory()


def free_piecewise(*containers, pause: Callable[[], None] = lambda: None) -> None:
    """Empty each list, dict or set one item at a time (an item can be big itself: a
    ``ListSpec`` holds a list's member dict), calling ``pause`` every few items."""
    for items in containers:
        if not enabled:
            items.clear()
            continue
        take = items.popitem if isinstance(items, dict) else items.pop
        while items:
            take()
            if not len(items) % 16:
                pause()


def return_free_memory() -> None:
    if enabled and _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()
