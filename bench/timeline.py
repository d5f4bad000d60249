"""A timeline of the daemon's reactor turns, garbage collections and timed calls (helper).

    python -m bench.timeline OUT.json -- --config policyd.conf

Runs ``policyd.daemon.main`` (the arguments after ``--``) in this process with probes put
around it from the outside (policyd's code is not changed):

* every turn of the reactor (``policyd.runtime.reactor.EPollReactor.doPoll``): when it
  began waiting for events, when the wait returned (the GIL taken back), how many events
  it handled and when it was done with them;
* every ``runUntilCurrent`` (the timed calls and the calls handed over from threads) that
  took more than 0.2 ms, and the named periodic jobs inside it (log flush, store refresh
  tick, connection sweeps);
* every cyclic garbage collection (``gc.callbacks``): generation, duration, collected;
* the reactor thread's CPU time and the time it was runnable but not running
  (``/proc/self/task/TID/schedstat``: another process had the CPU) at every turn that
  took longer than 2 ms, and at start and end.

Recording starts on SIGUSR1 and stops on SIGUSR2, which also writes OUT.json; so the
bench records exactly the window its load generator runs.  ``summarise(path)`` condenses
the file into what a report needs: the turn-length distribution, the long turns and what
was inside them, GC time, and the share of the window the thread was kept off the CPU.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
from array import array
from time import perf_counter

_REC = {"on": False}
TURNS = array("d")       # (poll entered, poll returned, events, turn done) x N
CALLS: list = []         # (start, end, label)
GCS: list = []           # (start, end, generation, collected)
SCHED: list = []         # (when, cpu_ns, run_delay_ns) at long turns
MAX_TURNS = 3_000_000
_gc_started = [0.0]


def _schedstat(tid: int) -> tuple[int, int]:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        cpu, delay, _ = f.read().split()
    return int(cpu), int(delay)


def install(out_path: str) -> None:
    from policyd.runtime import reactor as policyd_reactor

    cls = policyd_reactor.EPollReactor
    original_poll = cls.doPoll
    tid = threading.get_native_id()

    marks = [0.0, 0]

    class TimedPoller:
        """The reactor's epoll object, noting when each wait returned and its events."""

        def __init__(self, poller) -> None:
            self._real = poller

        def poll(self, timeout, maxevents):
            events = self._real.poll(timeout, maxevents)
            marks[0] = perf_counter()
            marks[1] = len(events)
            return events

        def __getattr__(self, name):
            return getattr(self._real, name)

    def doPoll(self, timeout):  # noqa: N802 (Twisted's name)
        if not isinstance(self._poller, TimedPoller):
            self._poller = TimedPoller(self._poller)
        if not _REC["on"] or len(TURNS) >= 4 * MAX_TURNS:
            return original_poll(self, timeout)
        entered = perf_counter()
        marks[0] = entered
        marks[1] = 0
        try:
            return original_poll(self, timeout)
        finally:
            done = perf_counter()
            TURNS.extend((entered, marks[0], marks[1], done))
            if done - marks[0] > 0.002:
                SCHED.append((done, *_schedstat(tid)))

    cls.doPoll = doPoll
    cls.doIteration = doPoll

    from twisted.internet import base

    original_ruc = base.ReactorBase.runUntilCurrent

    def runUntilCurrent(self):  # noqa: N802
        if not _REC["on"]:
            return original_ruc(self)
        t = perf_counter()
        try:
            return original_ruc(self)
        finally:
            end = perf_counter()
            if end - t > 0.0002:
                CALLS.append((t, end, "runUntilCurrent"))

    base.ReactorBase.runUntilCurrent = runUntilCurrent

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if _REC["on"]:
                    CALLS.append((t, perf_counter(), label))

        setattr(owner, name, wrapper)

    def slow_only(owner, name, label, threshold):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = perf_counter()
                if _REC["on"] and end - t > threshold:
                    CALLS.append((t, end, label))

        setattr(owner, name, wrapper)

    from policyd import logging as plog
    from policyd import snapshot_service
    from policyd.protocols import TrackingFactory

    timed(plog.LogSetup, "flush", "log flush")
    slow_only(plog.LineWriter, "decision", "decision line write", 0.0005)
    timed(snapshot_service.SnapshotService, "tick", "store refresh tick")
    if hasattr(TrackingFactory, "_sweep"):
        timed(TrackingFactory, "_sweep", "connection sweep")

    def on_gc(phase, info):
        if not _REC["on"]:
            return
        if phase == "start":
            _gc_started[0] = perf_counter()
        else:
            GCS.append((_gc_started[0], perf_counter(), info["generation"],
                        info.get("collected", 0)))

    gc.callbacks.append(on_gc)

    def start(*_):
        del TURNS[:]
        CALLS.clear()
        GCS.clear()
        SCHED.clear()
        SCHED.append((perf_counter(), *_schedstat(tid)))
        _REC["on"] = True

    def stop(*_):
        _REC["on"] = False
        SCHED.append((perf_counter(), *_schedstat(tid)))
        data = {"turns": TURNS.tolist(), "calls": CALLS, "gcs": GCS, "sched": SCHED,
                "gc_frozen": gc.get_freeze_count(), "gc_counts": gc.get_count(),
                "gc_tracked": len(gc.get_objects())}
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, out_path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def summarise(path: str, slow_ms: float = 5.0) -> dict:
    """The turn-length distribution and what the long turns had inside them."""
    data = json.load(open(path))
    t = data["turns"]
    turns = [(t[i], t[i + 1], int(t[i + 2]), t[i + 3]) for i in range(0, len(t), 4)]
    if not turns:
        return {"turns": 0}
    window = turns[-1][3] - turns[0][0]
    busy = [(end - ret) * 1e3 for _, ret, _, end in turns]
    waits = [(ret - ent) * 1e3 for ent, ret, _, _ in turns]
    events = [n for _, _, n, _ in turns]
    ordered = sorted(busy)

    def q(p):
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    calls = data["calls"]
    gcs = data["gcs"]
    long_turns = []
    for ent, ret, n, end in turns:
        if (end - ret) * 1e3 >= slow_ms:
            inside = [c[2] + f" {1e3 * (c[1] - c[0]):.1f} ms" for c in calls
                      if c[0] >= ret and c[1] <= end and c[1] - c[0] > 0.0005
                      and c[2] != "runUntilCurrent"]
            inside += [f"gc gen{g[2]} {1e3 * (g[1] - g[0]):.1f} ms" for g in gcs
                       if g[0] >= ret and g[1] <= end]
            long_turns.append({"at_s": round(ret - turns[0][0], 3),
                               "ms": round((end - ret) * 1e3, 2), "events": n,
                               "inside": inside})
    sched = data["sched"]
    cpu_s = (sched[-1][1] - sched[0][1]) / 1e9 if len(sched) > 1 else None
    delay_s = (sched[-1][2] - sched[0][2]) / 1e9 if len(sched) > 1 else None
    gc_by_gen = {}
    for start, end, gen, _ in gcs:
        entry = gc_by_gen.setdefault(gen, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) * 1e3
        entry[2] = max(entry[2], (end - start) * 1e3)
    by_label = {}
    for start, end, label in calls:
        entry = by_label.setdefault(label, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) * 1e3
        entry[2] = max(entry[2], (end - start) * 1e3)
    # a wait that lasted > 2 ms and came back with many events: they were ready while the
    # thread was not running (another process had the CPU, or another thread the GIL)
    late = [(round(ent - turns[0][0], 3), round((ret - ent) * 1e3, 2), n)
            for ent, ret, n, _ in turns if ret - ent > 0.002 and n >= 4]
    # The reactor's time per event by how many events its turn handled: whether serving
    # requests in batches (a queue) makes each cheaper, as it does for the bare servers.
    per_batch = {}
    for label, low, high in (("1-3", 1, 3), ("4-15", 4, 15), ("16+", 16, 1 << 30)):
        chosen = [(end - ret, n) for _, ret, n, end in turns if low <= n <= high]
        count = sum(n for _, n in chosen)
        if count:
            per_batch[label] = {"events": count,
                                "us_per_event": round(sum(b for b, _ in chosen) / count * 1e6, 1)}
    return {
        "late_waits": len(late), "late_waits_first": late[:10],
        "us_per_event_by_events_per_turn": per_batch,
        "window_s": round(window, 3), "turns": len(turns),
        "busy_share": round(sum(busy) / 1e3 / window, 3),
        "wait_share": round(sum(waits) / 1e3 / window, 3),
        "events_per_turn_mean": round(sum(events) / len(events), 2),
        "events_per_turn_max": max(events),
        "turn_ms": {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": round(ordered[-1], 3)},
        "long_turns": long_turns[:40], "long_turn_count": len(long_turns),
        "gc": {f"gen{g}": {"count": v[0], "total_ms": round(v[1], 1), "max_ms": round(v[2], 2)}
               for g, v in sorted(gc_by_gen.items())},
        "calls": {k: {"count": v[0], "total_ms": round(v[1], 1), "max_ms": round(v[2], 2)}
                  for k, v in by_label.items()},
        "reactor_thread_cpu_s": cpu_s,
        "reactor_thread_runnable_not_running_s": delay_s,
        "gc_tracked_at_end": data.get("gc_tracked"), "gc_frozen": data.get("gc_frozen"),
    }


def main() -> int:
    argv = sys.argv[1:]
    if not argv or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    rest = argv[argv.index("--") + 1:]
    if out == "summarise":
        print(json.dumps(summarise(rest[0]), indent=1))
        return 0
    install(out)
    from policyd.daemon import main as daemon_main

    return daemon_main(rest)


if __name__ == "__main__":
    sys.exit(main())
