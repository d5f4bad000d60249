"""How long the reactor thread waits for the GIL while the store thread rebuilds (helper).

    python -m bench.stall STORE_URL [--runs N] [--cpu 0] [--threshold-ms 4]

Loads a snapshot with the daemon's own ``SnapshotService`` and ``StoreThread``, settles the
heap as the daemon does after its first load, then runs N forced reloads (SIGHUP /
``policyctl reload``: a full build in the store thread, the swap on the "reactor", then the
old snapshot freed by ``cache.release`` in the store thread).  Meanwhile the main thread
stands in for the reactor: it sleeps 0.2 ms at a time, runs what the store thread handed it
with ``callFromThread``, and records the longest time it could not run.

For each gap above ``--threshold-ms`` it records where the store thread was when the main
thread got the GIL back: the line just after (or at) the long C call that held the GIL,
which is what to fix.

Both threads are pinned to one CPU (``--cpu``, like the daemon in ``make bench``; ``-1``
leaves the affinity alone) and the switch interval is the daemon's.  Prints JSON: per run
the rebuild seconds (reload until the new snapshot is in place), the free seconds (until
the old one is released), the worst gap, the longest the main thread itself spent in the
calls handed to it (part of a gap, not the store thread's doing), the longest garbage
collection (either thread) and the top gaps with the store thread's stack; then the
medians.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import queue
import statistics
import sys
import threading
import time
import traceback


class ProbeReactor:
    """Just what ``StoreThread`` and ``SnapshotService`` use of a reactor, with the calls
    from the store thread run by the probe loop (the main thread), as a reactor would."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, f, *args, **kwargs) -> None:  # noqa: N802 (Twisted's name)
        self.calls.put((f, args, kwargs))

    def seconds(self) -> float:
        return time.time()

    def run_pending(self) -> None:
        while True:
            try:
                f, args, kwargs = self.calls.get_nowait()
            except queue.Empty:
                return
            f(*args, **kwargs)


def where(thread_id: int, depth: int = 4) -> list[str]:
    """The innermost ``depth`` frames of a thread, as ``file:line function: code``."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return []
    stack = traceback.extract_stack(frame)[-depth:]
    return [f"{os.path.relpath(s.filename)}:{s.lineno} {s.name}: {s.line}" for s in stack]


class GcWatch:
    """The longest garbage collection, and in which thread, via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.started = 0.0
        self.worst = (0.0, -1, "")

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            took = time.perf_counter() - self.started
            if took > self.worst[0]:
                self.worst = (took, info["generation"], threading.current_thread().name)

    def take(self) -> dict:
        took, generation, thread = self.worst
        self.worst = (0.0, -1, "")
        return {"ms": round(took * 1000, 2), "generation": generation, "thread": thread}


def probe(reactor: ProbeReactor, done, store_id: int, threshold: float, top: int = 5):
    """Run the probe loop until ``done()``; returns (worst gap, the longest the main
    thread itself spent on the store thread's calls, top gaps with stacks)."""
    gaps: list[tuple[float, int, list[str]]] = []  # a min-heap of the biggest gaps
    seq = 0
    worst = worst_own = 0.0
    while not done():
        t = time.perf_counter()
        time.sleep(0.0002)
        woke = time.perf_counter()
        reactor.run_pending()
        now = time.perf_counter()
        gap = now - t
        worst_own = max(worst_own, now - woke)
        if gap > worst:
            worst = gap
        if gap >= threshold:
            seq += 1
            entry = (gap, seq, where(store_id))
            if len(gaps) < top:
                heapq.heappush(gaps, entry)
            elif gap > gaps[0][0]:
                heapq.heapreplace(gaps, entry)
    return worst, worst_own, [{"ms": round(g * 1000, 2), "store_thread": stack}
                   for g, _, stack in sorted(gaps, reverse=True)]


def wait_for(reactor: ProbeReactor, d) -> object:
    """Run the reactor's calls until the Deferred ``d`` fires; its result."""
    results: list = []
    d.addBoth(results.append)
    while not results:
        time.sleep(0.001)
        reactor.run_pending()
    return results[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="store URL, e.g. sqlite:////tmp/stall-store.sqlite")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: don't)")
    parser.add_argument("--threshold-ms", type=float, default=4.0,
                        help="record the store thread's stack for gaps at least this long")
    args = parser.parse_args(argv)

    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    from policyd.snapshot_service import SnapshotService, StoreThread
    from policyd.config import StoreConfig
    from policyd.service import PolicyService, settle_heap
    from policyd.store import open_backend

    sys.setswitchinterval(PolicyService.SWITCH_INTERVAL)
    gc_watch = GcWatch()
    gc.callbacks.append(gc_watch)
    reactor = ProbeReactor()
    store_thread = StoreThread(reactor)
    backend = open_backend(StoreConfig("native", args.url, 2.0))
    service = SnapshotService(backend, interval=3600.0, clock=reactor,
                              run_in_thread=store_thread.run)
    store_thread.startService()
    service.running = True  # reload() runs; the refresh timer stays off
    if wait_for(reactor, service.reload()) is not True:
        print(f"first load failed: {service.last_error}", file=sys.stderr)
        return 1
    settle_heap()  # as the daemon does once its first load is done
    store_id = store_thread._thread.ident

    runs = []
    for _ in range(args.runs):
        finished = threading.Event()
        state: dict = {}
        started = time.perf_counter()

        def loaded(ok, started=started, state=state):
            state["rebuild_s"] = time.perf_counter() - started
            state["ok"] = ok
            # Queued after the ``release`` that ``_done`` handed to the store thread:
            # fires once the old snapshot is freed.
            freed = store_thread.run(lambda: None)
            freed.addBoth(lambda _: (state.__setitem__("free_s", time.perf_counter()
                                                       - started), finished.set()))
            return ok

        service.reload().addCallback(loaded)
        gc_watch.take()
        worst, own, top = probe(reactor, finished.is_set, store_id, args.threshold_ms / 1000)
        if not state.get("ok"):
            print(f"reload failed: {service.last_error}", file=sys.stderr)
            return 1
        runs.append({"rebuild_s": round(state["rebuild_s"], 3),
                     "until_freed_s": round(state["free_s"], 3),
                     "worst_gap_ms": round(worst * 1000, 2),
                     "main_thread_calls_ms": round(own * 1000, 2),
                     "longest_gc": gc_watch.take(), "top_gaps": top})

    print(json.dumps({
        "url": args.url, "memberships": service.current.membership_count,
        "runs": runs,
        "median": {
            "rebuild_s": round(statistics.median(r["rebuild_s"] for r in runs), 3),
            "until_freed_s": round(statistics.median(r["until_freed_s"] for r in runs), 3),
            "worst_gap_ms": round(statistics.median(r["worst_gap_ms"] for r in runs), 2),
        },
    }, indent=1))
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
