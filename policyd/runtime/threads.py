"""The store thread's share of the CPU, and the interpreter's switch interval.

* ``lower_priority(niceness)``, called by the store thread itself: the scheduler's
  niceness of that thread (Linux: per thread).  A rebuild is seconds of CPU and the change
  check every ``refresh_interval`` some milliseconds of SQL; where they share a core with
  the reactor thread, the reactor is served first instead of getting a fair half.  Under a
  load that keeps the reactor busy all the time, refreshes wait for it.
* ``switch_interval(seconds)``: the reactor thread needs the GIL back after each of its
  system calls while the store thread builds; Python's default 5 ms switch interval would
  add up to that per call to a query answered during a rebuild.  A context manager: the
  previous interval comes back when the daemon stops.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["lower_priority", "switch_interval"]


def lower_priority(niceness: int) -> None:
    if not niceness:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the store thread runs at the daemon's own


@contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    previous = sys.getswitchinterval()
    if seconds:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
