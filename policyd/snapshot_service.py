"""The snapshot service: the live ``Snapshot`` every decision reads, kept fresh off-reactor.

The reactor thread never runs SQL.  Every ``refresh_interval`` seconds a ``TimerService``
asks the store for its change token in a small dedicated thread pool; only when the token
differs from the current snapshot's version (or on SIGHUP / ``policyctl reload``) does that
thread build a new ``Snapshot``, and the reactor swaps the reference (one assignment, so a
query sees the old or the new snapshot, never half of one).

Failure policy:
* the timer body catches and logs every error (an uncaught one would stop the timer);
* a failed refresh keeps the last good snapshot serving (up to ``max_stale``, below);
  the failure is logged once per incident (and once per new kind of error in it, the
  rest summed up every ``SUMMARY_INTERVAL`` seconds), and once more when it ends: after
  ``quiet_interval`` seconds without a failure, so a store failing now and then is one
  incident, and ``status()`` stays unhealthy meanwhile instead of flipping at every
  refresh;
* a verification build (``load_verified``) that fails does not stop the
  refresh: it loads what changed through the usual path, the failure is logged once
  until a verification build works again, and ``status()`` says since when it fails;
* two refreshes never overlap: a tick that finds one running does nothing, a forced reload
  requested meanwhile runs right after it, one for all the reloads requested meanwhile;
  a caller that stops waiting for it is forgotten (see ``reload``);
* a store whose change detection cannot be trusted (the native store's triggers missing
  or disabled: ``change_detection_problem``) keeps being served, from full builds; it is
  logged once, and ``status()`` says unhealthy with the reason until it is fixed;
* before the first snapshot ``current`` is ``None`` and ``unavailable_reason`` says why;
  the decision service then answers every query with the configured temporary failure;
* a refresh still running after ``refresh_timeout`` seconds (a stuck store: a lock, a
  frozen server) is logged once, and ``status()`` says unhealthy with the reason until
  it ends; the last good snapshot keeps serving.  A reactor timer watches it (not the
  refresh timer: its ``LoopingCall`` does not tick again until the refresh it started
  has finished).

Never stale, and never silently: ``confirmed_at`` is when the store last confirmed that
``current`` is its current state (a refresh that read an unchanged change token, or loaded
what changed).  It is the *start* of that refresh: the token is read after it, so the
snapshot was the store's state at least then (a build that took a minute confirms the
store as it was a minute ago, not as it is now).  When it is ``max_stale`` seconds old or
more (the store failing, stuck, or the refresh loop stalled), ``stale_reason()`` says so:
the decision service answers the temporary failure, as without a snapshot, ``status()``
says unhealthy, and one line is logged when it begins and one when the next refresh that
succeeds ends it.  Every interval here (ages, the notification gap, the watchdog) is
measured on ``monotonic`` (``time.monotonic``): the reactor's ``seconds()`` is the wall
clock, which an NTP step or a resumed VM moves backwards or forwards.

Instant propagation: a store that can say it changed (PostgreSQL ``NOTIFY``, listened to
by ``policyd.change_listener``) calls ``changed()`` on the reactor.  That refreshes at
once, coalesced: while a refresh runs, any number of notifications make one more refresh
after it, and refreshes started by notifications are at least ``NOTIFY_GAP`` seconds
apart, so a storm of 10,000 commits in a second costs at most about ``1 / NOTIFY_GAP``
refreshes, not 10,000.  The timer keeps polling as the fallback.
"""

from __future__ import annotations


import queue
import threading
from contextlib import nullcontext
from time import monotonic
from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .decider import Incidents
from .errors import PolicydError
from .runtime import heap, threads
from .runtime.pacing import pace, pacing
from .core.snapshot import Snapshot

log = Logger(namespace="policyd.store")

RunInThread = Callable[..., Deferred]


class StoreThread(Service):
    """One daemon thread that runs every store call, in order, off the reactor.

    One thread, so two store calls never overlap and a backend never sees two threads at
    once.  A daemon thread, and never joined at shutdown: a call stuck in a dead TCP
    connection must not keep the process alive after SIGTERM.
    """


    def __init__(self, reactor, name: str = "policyd-store") -> None:
        self.reactor = reactor
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def startService(self) -> None:
        super().startService()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stopService(self):
        super().stopService()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def run(self, f: Callable, *args: Any, **kwargs: Any) -> Deferred:
        """Run ``f(*args, **kwargs)`` in the thread; the Deferred fires on the reactor."""
        d: Deferred = Deferred()
        self._jobs.put((d, f, args, kwargs))
        return d

    # How far below the reactor thread the store thread runs (``policyd.runtime.threads``;
    # ``[runtime] store_niceness``).
    niceness = 19

    def _loop(self) -> None:
        threads.lower_priority(self.niceness)
        call = self.reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is None:
                return
            d, f, args, kwargs = job
            try:
                result = f(*args, **kwargs)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)


def release(box: list) -> None:
    """Drop the old snapshot in ``box`` piecewise, resting for the reactor in between
    (``policyd.runtime.heap.release``)."""
    with pacing():
        heap.release(box, pace)


class SnapshotService(Service):
    """Holds ``current`` (a ``Snapshot`` or ``None``) and refreshes it from a backend.

    ``backend`` is a store ``Backend`` (``change_token``, ``load_snapshot``, ``check``,
    ``describe``, ``close``), only ever called through ``run_in_thread``.  ``clock`` is an
    ``IReactorTime`` (a ``Clock`` in tests) for the timers; ``monotonic`` the clock every
    interval is measured on (``clock.seconds`` of the same ``Clock`` in tests);
    ``run_in_thread(f, *args)`` returns a Deferred (a thread pool in the daemon, a
    synchronous or hand-driven substitute in tests).  ``max_stale``: seconds without a
    confirmation after which ``stale_reason()`` says the snapshot may be stale (``None``
    or 0: never).
    """

    CLOSE_TIMEOUT = 2.0
    # Seconds between two refreshes started by notifications (``changed``).
    NOTIFY_GAP = 0.05
    # A store incident ends after this many refresh intervals without a failure (see
    # ``quiet_interval``): a store failing one refresh in two passes 30 in a row by
    # chance once in a billion tries, and at the default interval it is a minute, so
    # one failed refresh does not keep the store unhealthy for long.
    QUIET_REFRESHES = 30
    # ... but at most this long, unless the interval itself is long (then three of them).
    QUIET_MAX = 300.0
    # During an incident, what failed after its first line is summed up this often.
    SUMMARY_INTERVAL = 300.0
    # Callers of ``reload`` waiting at once, at most (the control socket's connections
    # and one SIGHUP need far fewer): past it the oldest stops waiting.
    MAX_RELOAD_WAITERS = 64

    def __init__(self, backend, *, interval: float, clock, run_in_thread: RunInThread,
                 describe_store: str = "", refresh_timeout: float | None = None,
                 max_stale: float | None = None,
                 monotonic: Callable[[], float] = monotonic) -> None:
        self.backend = backend
        self.monotonic = monotonic
        # What tells this service that the store changed (a ``ChangeListener``, only
        # read for ``status()``), else None: polling only.
        self.change_listener = None
        # Notifications received, and refreshes they started.
        self.notifications = 0
        self.notified_refreshes = 0
        self._again = False
        # A refresh succeeded but began too long ago to end a stale incident: check the
        # token once more at once (``_confirmed``).
        self._check_again = False
        self._wake = None
        self._last_start: float | None = None
        self.refresh_timeout = refresh_timeout
        self.refresh_started: float | None = None
        self._overdue_call = None
        self.interval = interval
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.current: Snapshot | None = None
        # ``monotonic`` times: of the last load, of the last check that reached the store,
        # and of the start of the last refresh that succeeded (``confirmed_at``, see the
        # module docstring).
        self.loaded_at: float | None = None
        self.checked_at: float | None = None
        self.confirmed_at: float | None = None
        self.max_stale = max_stale or None
        # When the current stale incident began (``confirmed_at + max_stale``), else None;
        # and the reactor timer that notices it even when no query asks.
        self.stale_since: float | None = None
        self._stale_call = None
        self.store_description = describe_store
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        # The store's current incident: when its first refresh failed, how many failed
        # (``failures``), whether the last one did; it ends after ``quiet_interval``
        # seconds without a failure (``_done``).
        self.failing_since: float | None = None
        self.failures = 0
        self.last_refresh_failed = False
        self.quiet_interval = max(min(self.QUIET_REFRESHES * interval, self.QUIET_MAX),
                                  3 * interval)
        # The first failure of an incident (and of each new kind of error in it) is
        # logged, the others summed up every ``SUMMARY_INTERVAL`` seconds.
        self.incidents = Incidents(self._failures_left_out, burst=1,
                                   interval=self.SUMMARY_INTERVAL,
                                   quiet=self.quiet_interval, clock=clock)
        self._succeeded_since_summary = 0
        self.loads = 0
        # For the metrics: failed refreshes since start (``failures`` counts the current
        # incident only) and how long the last refresh that loaded a snapshot took.
        self.failures_total = 0
        self.last_load_seconds: float | None = None
        # How the last snapshot loaded was made (``Snapshot.built_how``, "full build...").
        self.last_load_how = ""
        self.checks = 0
        self._busy: Deferred | None = None
        # What the last verification build found (set in the store thread, logged and
        # cleared by ``_done``).
        self._divergence: list[str] = []
        # Verification builds (``load_verified``) that failed in a row: the first one's
        # time, how many, the last error; and when the last one worked.
        self.verify_failing_since: float | None = None
        self.verify_failures = 0
        self.verify_error: str | None = None
        self.verify_error_at: float | None = None
        self.verified_at: float | None = None
        # Why the store's change detection cannot be trusted (the backend's
        # ``change_detection_problem`` after the last refresh), else None.
        self.change_detection_problem: str | None = None
        # Reloads (``reload``) asked while a refresh runs share one forced refresh after
        # it: ``_force_next`` says one is due; ``_forced`` holds the callers waiting for
        # it, ``_forced_running`` those waiting for the forced refresh running now.  A
        # caller that stops waiting (cancels its Deferred: its control connection gone,
        # its answer given up) leaves both, and at most ``MAX_RELOAD_WAITERS`` wait.
        self._force_next = False
        self._forced: dict[Deferred, None] = {}
        self._forced_running: dict[Deferred, None] = {}
        self._attempt_waiters: list[Deferred] | None = []
        self._timer = TimerService(interval, self.tick)
        self._timer.clock = clock

    # --- the state queries read ------------------------------------------------------

    @property
    def unavailable_reason(self) -> str:
        if self.current is not None:
            return ""
        if self.last_error:
            return f"no snapshot loaded yet: the store failed: {self.last_error}"
        return "no snapshot loaded yet: the store has not answered yet"

    def age(self) -> float | None:
        """Seconds since the snapshot served was loaded (a quiet store keeps it for long:
        ``confirmed_age`` is what says whether it is still the store's state)."""
        if self.loaded_at is None:
            return None
        return max(0.0, self.monotonic() - self.loaded_at)

    def confirmed_age(self) -> float | None:
        """Seconds since the store last confirmed the snapshot served as its current
        state (``confirmed_at``); ``None`` before the first snapshot."""
        if self.confirmed_at is None:
            return None
        return max(0.0, self.monotonic() - self.confirmed_at)

    def stale_reason(self) -> str | None:
        """Why the snapshot served may no longer be the store's state: not confirmed for
        ``max_stale`` seconds; else ``None`` (also before the first snapshot: then
        ``current`` is ``None`` and ``unavailable_reason`` says why).  Read for every
        query: one clock read while all is well."""
        max_stale, confirmed = self.max_stale, self.confirmed_at
        if max_stale is None or confirmed is None:
            return None
        age = self.monotonic() - confirmed
        if age < max_stale:
            return None
        if self.stale_since is None:
            self._stale_began(confirmed + max_stale)
        return (f"the snapshot has not been confirmed as the store's current state for "
                f"{age:.1f} s ([store] max_stale = {max_stale:g} s): "
                f"{self._trouble_text()}")

    # --- service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer.startService()

    def stopService(self):
        super().stopService()
        # Do not wait for a refresh in progress: it may hang in a dead connection.
        self._timer.stopService()
        self._end_watch()
        self._cancel_stale_watch()
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            wake.cancel()
        if self._busy is not None:
            return None
        d = self.run_in_thread(self.backend.close)
        d.addTimeout(self.CLOSE_TIMEOUT, self.clock)
        d.addErrback(lambda f: log.failure("closing the store failed", f))
        return d

    # --- refresh -------------------------------------------------------------------------

    def tick(self) -> Deferred:
        """The timer body: check the change token, load if it changed.  Never fails."""
        d = maybeDeferred(self.refresh, False)
        d.addErrback(self._unexpected)
        return d

    def reload(self, wait: bool = True) -> Deferred | None:
        """Load a new snapshot whatever the change token says (SIGHUP, ``reload``).

        While a refresh runs, the reload is one full build right after it, shared by
        every reload asked meanwhile however many (a SIGHUP storm during a stuck store
        is one build, not thousands).  With ``wait`` (the default) the result is a
        Deferred of the caller's own: ``True`` once a snapshot is in place, ``False`` if
        the load failed (the last good snapshot stays), ``None`` if it stopped waiting
        because more than ``MAX_RELOAD_WAITERS`` callers wait (the oldest stops; the
        build still runs).  Cancelling it stops that caller's wait only (the build still
        runs) and forgets the caller.  Without ``wait``: ``None``, and nothing kept
        about the caller.  Never fails (but for the caller's own cancel).
        """
        waiter = None
        if wait:
            waiter = Deferred(self._forget)
            if len(self._forced) >= self.MAX_RELOAD_WAITERS:
                oldest = next(iter(self._forced))
                del self._forced[oldest]
                oldest.callback(None)
            self._forced[waiter] = None
        if self._busy is not None:
            self._force_next = True
            return waiter
        self._force_now()
        return waiter

    def _force_now(self) -> None:
        """Start the forced refresh that the callers in ``_forced`` wait for (after the
        one running, if a caller woken by ``_idle`` started one meanwhile)."""
        if self._busy is not None:
            self._force_next = True
            return
        self._force_next = False
        self._forced_running, self._forced = self._forced, {}
        d = self.refresh(force=True)
        d.addErrback(self._unexpected)

    def _forget(self, waiter: Deferred) -> None:
        """A caller of ``reload`` stopped waiting (cancelled its Deferred)."""
        self._forced.pop(waiter, None)
        self._forced_running.pop(waiter, None)

    def reload_delay(self) -> str:
        """Why a reload asked now is not done yet, for an answer that stops waiting."""
        running = self.refresh_running_for()
        if running is None:
            return "the store refresh it waits for has not ended yet"
        timeout = self.refresh_timeout
        stuck = ""
        if timeout is not None and running >= timeout:
            stuck = (f" (more than [store] refresh_timeout = {timeout:g} s: the store is "
                     "stuck or very slow)")
        after = "; the reload runs when it ends" if self._force_next else ""
        return f"a store refresh has been running for {running:.1f} s{stuck}{after}"

    def changed(self) -> None:
        """The store says it changed (a notification, or its listener is listening
        again): refresh now, coalesced (see the module docstring).  Never fails."""
        self.notifications += 1
        self._refresh_soon()

    def _refresh_soon(self) -> None:
        if not self.running:
            return
        if self._busy is not None:
            self._again = True
            return
        if self._wake is not None:
            return  # one is scheduled
        wait = (0.0 if self._last_start is None
                else self._last_start + self.NOTIFY_GAP - self.monotonic())
        if wait > 0:
            self._wake = self.clock.callLater(wait, self._notified_refresh)
        else:
            self._notified_refresh()

    def _notified_refresh(self) -> None:
        self._wake = None
        if self._busy is not None:
            self._again = True
            return
        self.notified_refreshes += 1
        self.tick()

    def refresh(self, force: bool) -> Deferred:
        if self._busy is not None:
            return succeed(None)
        self._last_start = self.monotonic()
        self._start_watch()
        d = self.run_in_thread(self._work, force, self.current)
        self._busy = d
        d.addCallbacks(self._done, self._failed)
        d.addBoth(self._idle)
        return d

    def _work(self, force: bool, current: Snapshot | None):
        """In the store thread: ``_load``'s result and the backend's
        ``change_detection_problem`` as that left it."""
        result = self._load(force, current)
        return result + (getattr(self.backend, "change_detection_problem", None),)

    def _load(self, force: bool, current: Snapshot | None):
        """(token, new snapshot or None, description or None, how, what a verification
        build gave: None if none was tried, True, or its Failure).

        A forced refresh (SIGHUP, ``reload``) is always a full build; a change seen by
        the token is an incremental one where the backend can do that safely
        (``load_changes``).  A backend whose change detection is inferred rather than
        exact (Mailman 3), or exact only while its triggers fire (the native store),
        asks, through ``verification_due()``, for a periodic verification build
        (``load_verified``): a full build compared with what the incremental path
        serves; a divergence is logged (in ``_done``) and the full build swapped in.  A
        verification build that fails takes the usual path in the same refresh: the
        snapshot is never older than that path can make it."""
        full = force or current is None
        # A full build reads the token inside its own consistent read: none asked first.
        token = None if full else self.backend.change_token()
        due = getattr(self.backend, "verification_due", None)
        verifying = not full and due is not None and due()
        if not full and token == current.version and not verifying:
            return token, None, None, "", None
        load_changes = getattr(self.backend, "load_changes", None)
        verified = None
        snapshot = None
        # No cyclic garbage collection while a snapshot is built: a build allocates
        # millions of short-lived objects (rows, specs), and every full collection it
        # would trigger scans them all while holding the GIL, stalling the reactor for
        # hundreds of milliseconds.  They die by reference counting when the build returns;
        # what survives (the snapshot) holds few GC-tracked objects.
        # No cyclic collection during the build (``policyd.runtime.heap``).
        with heap.no_collection():
            # Resting for the reactor thread once it serves queries (see ``pacing``).
            with pacing() if current is not None else nullcontext():
                if verifying:
                    try:
                        snapshot, self._divergence = self.backend.load_verified(current)
                    except Exception:
                        # Its full half can fail where the incremental path works (a
                        # statement timeout on the big scan): retried at the next
                        # ``verification_due``, and meanwhile changes load as usual.
                        verified = Failure()
                        verified.cleanFailure()
                        self._divergence = []
                        # The failed build took its time: the token as it is now.
                        token = self.backend.change_token()
                        if token == current.version:
                            return token, None, None, "", verified
                    else:
                        verified = True
                        if not self._divergence and snapshot.version == current.version:
                            return token, None, None, "", verified  # keep serving current
                        how = "verification build"
                if snapshot is None and not full and load_changes is not None:
                    snapshot = load_changes(current)
                    how = getattr(snapshot, "built_how", "") or "full build"
                elif snapshot is None:
                    snapshot = self.backend.load_snapshot()
                    how = ("full build: first load" if current is None else
                           "full build: reload asked" if force else "full build")
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"the store returned {type(snapshot).__name__}, not a Snapshot")
        if current is None:
            # With a snapshot in place, ``release`` frees it next and trims then, once
            # for both: a trim walks the whole heap (2-4 ms for a 1M-membership one), and
            # with both threads on one core the reactor thread waits for it even though
            # the GIL is free meanwhile.
            heap.return_free_memory()
        if token is None:
            token = snapshot.version
        return token, snapshot, self.backend.describe(), how, verified

    def _done(self, result) -> bool:
        token, snapshot, description, how, verified, problem = result
        now = self.monotonic()
        self._change_detection(problem)
        divergence, self._divergence = self._divergence, []
        if divergence:
            log.warn("verification build: the incremental snapshot differed from the "
                     "store in {differences}; serving the full build {version}",
                     differences=", ".join(divergence), version=token)
        if verified is not None:
            self._verification_done(verified, now)
        self.checks += 1
        self.checked_at = now
        if description is not None:
            self.store_description = description
        if snapshot is not None:
            # Describe it first: a snapshot that cannot even be counted is not swapped in.
            fields = dict(
                version=snapshot.version, lists=len(snapshot.lists),
                memberships=snapshot.membership_count,
                previous=self.current.version if self.current is not None else None,
                problems=(f"; {len(snapshot.problems)} problems: "
                          + "; ".join(snapshot.problems[:5])) if snapshot.problems else "",
            )
            _report_broken(self.current, snapshot)
            previous, self.current = self.current, snapshot
            if previous is not None:
                # Hand the old snapshot to the store thread to be freed there, piece by
                # piece (see ``release``): freeing it here in one go would stall the
                # reactor for as long as a million-membership snapshot takes to free.
                d = self.run_in_thread(release, [previous])
                d.addErrback(lambda f: log.failure("freeing an old snapshot failed", f))
                del previous
            self.loaded_at = now
            self.loads += 1
            self.last_load_how = how
            took = ""
            if self.refresh_started is not None:
                self.last_load_seconds = now - self.refresh_started
                took = f", {self.last_load_seconds:.2f} s"
            log.info("snapshot {version} loaded ({how}{took}): {lists} lists, "
                     "{memberships} memberships{problems}", how=how, took=took, **fields)
            if snapshot.caveat:
                self.last_load_how = f"{how}; {snapshot.caveat}"
                log.warn("snapshot {version}: {caveat}", version=snapshot.version,
                         caveat=snapshot.caveat, rate_limit="snapshot caveat")
        self._confirmed(now if self.refresh_started is None else self.refresh_started)
        self.last_refresh_failed = False
        if self.failing_since is not None:
            self._succeeded_since_summary += 1
            if now - self.last_error_at >= self.quiet_interval:
                log.info("store recovered after {duration:.1f} s and {failures} failed "
                         "refreshes (none in the last {quiet:g} s); serving snapshot "
                         "{version}", duration=now - self.failing_since,
                         failures=self.failures, quiet=self.quiet_interval,
                         version=self.current.version if self.current else None)
                self.incidents.forget()
                self.failing_since = None
                self.failures = 0
                self._succeeded_since_summary = 0
        return True

    def _failed(self, failure: Failure) -> bool:
        now = self.monotonic()
        self.last_error = _describe_error(failure)
        self.last_error_at = now
        self.failures += 1
        self.failures_total += 1
        self.last_refresh_failed = True
        if self.failing_since is None:
            self.failing_since = now
        # Once per incident, and once per new kind of error in it (at most one per
        # summary interval): a store failing every other refresh is one incident, not a
        # pair of lines per failure.
        if self.incidents.first(self.last_error):
            if self.current is not None:
                text = ("store refresh failed: {error}; serving the last good snapshot "
                        "{version} (loaded {age:.1f} s ago) until the store is back "
                        "(further failures summed up every {summary:g} s; it is back after "
                        "{quiet:g} s without one)")
                fields = dict(version=self.current.version, age=now - self.loaded_at)
            else:
                text = ("store refresh failed: {error}; no snapshot yet, every query gets "
                        "a temporary failure until the store answers")
                fields = {}
            fields.update(summary=self.SUMMARY_INTERVAL, quiet=self.quiet_interval)
            if failure.check(PolicydError):
                # The store's own, already worded error: no traceback needed.
                log.error(text, error=self.last_error, **fields)
            else:
                log.failure(text, failure, LogLevel.error, error=self.last_error, **fields)
        return False

    def _failures_left_out(self, left_out, new: int, others: int, more: bool,
                           interval: float) -> None:
        """``Incidents``' summary: the refreshes that failed since the last line."""
        succeeded, self._succeeded_since_summary = self._succeeded_since_summary, 0
        now = self.monotonic()
        if self.current is not None:
            serving = (f"serving the last good snapshot {self.current.version} (loaded "
                       f"{now - self.loaded_at:.1f} s ago)")
        else:
            serving = "no snapshot yet, every query gets a temporary failure"
        log.warn("the store is still failing: {count} more refreshes failed in the last "
                 "{interval:g} s ({kinds}), {succeeded} succeeded; {failures} failed in "
                 "the {duration:.1f} s of this incident; {serving}",
                 count=sum(left_out.values()), interval=interval, succeeded=succeeded,
                 kinds="; ".join(f"{kind}: {count}"
                                 for kind, count in left_out.most_common(5)),
                 failures=self.failures,
                 duration=now - (self.failing_since if self.failing_since is not None
                                 else now),
                 serving=serving)

    def _change_detection(self, problem: str | None) -> None:
        """The backend's ``change_detection_problem`` after a refresh: logged when it
        begins or changes, and once when it ends."""
        before, self.change_detection_problem = self.change_detection_problem, problem
        if problem is not None and problem != before:
            log.error("{problem}; until that is fixed every change is loaded with a full "
                      "build and every refresh is a verification build, and status says "
                      "the store is unhealthy", problem=problem)
        elif problem is None and before is not None:
            log.info("the store's change triggers all fire again; refreshes are "
                     "incremental again")

    def _verification_done(self, verified, now: float) -> None:
        """What a verification build gave (``True`` or its Failure): a failure is logged
        once until one works again, then one line says so."""
        if verified is True:
            self.verified_at = now
            if self.verify_failing_since is not None:
                log.info("verification builds work again after {failures} failed ones "
                         "over {duration:.1f} s", failures=self.verify_failures,
                         duration=now - self.verify_failing_since)
                self.verify_failing_since = None
                self.verify_failures = 0
            return
        self.verify_error = _describe_error(verified)
        self.verify_error_at = now
        self.verify_failures += 1
        if self.verify_failing_since is not None:
            return
        self.verify_failing_since = now
        text = ("verification build failed: {error}; store changes are loaded as usual "
                "meanwhile, without the full build that checks them; tried again when the "
                "store asks for the next one (logged once until one works)")
        if verified.check(PolicydError):
            log.error(text, error=self.verify_error)
        else:
            log.failure(text, verified, LogLevel.error, error=self.verify_error)

    def first_attempt(self) -> Deferred:
        """Fires (with None) once the first refresh has finished, loaded or failed."""
        if self._attempt_waiters is None:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._attempt_waiters.append(waiter)
        return waiter

    def _idle(self, result):
        self._busy = None
        self._end_watch()
        waiters, self._attempt_waiters = self._attempt_waiters, None
        for waiter in waiters or ():
            waiter.callback(None)
        # Who waited for this refresh (a forced one): whether it loaded a snapshot.
        ok = result if isinstance(result, bool) else False
        woken, self._forced_running = self._forced_running, {}
        for waiter in woken:
            waiter.callback(ok)
        if self._force_next and self.running:
            self._force_now()
        else:
            self._force_next = False
            forced, self._forced = self._forced, {}
            for waiter in forced:
                waiter.callback(False)
            check_again, self._check_again = self._check_again, False
            if self._again:
                # Notifications came while it ran: one more refresh for all of them.
                self._again = False
                self._refresh_soon()
            elif check_again and self.running:
                self.tick()
        return result

    # --- staleness ----------------------------------------------------------------------

    def _confirmed(self, at: float) -> None:
        """A refresh started at ``at`` (``monotonic``) succeeded: the snapshot served was
        the store's state then.  Ends a stale incident, unless even that is too old (a
        refresh stuck for longer than ``max_stale`` before it ended: when it read the
        token is unknown); then a check follows at once, and ends it."""
        if self.confirmed_at is None or at > self.confirmed_at:
            self.confirmed_at = at
        if self.max_stale is None:
            return
        now = self.monotonic()
        if now - self.confirmed_at >= self.max_stale:
            self._check_again = True
        elif self.stale_since is not None:
            log.info("snapshot {version} confirmed as the store's current state again "
                     "after {duration:.1f} s stale: queries are answered again",
                     version=self.current.version if self.current else None,
                     duration=now - self.stale_since)
            self.stale_since = None
        self._watch_stale(now)

    def _watch_stale(self, now: float) -> None:
        """A reactor timer for when the snapshot turns stale, so that the incident is
        logged and shown even when no query reads ``stale_reason()``."""
        self._cancel_stale_watch()
        if self.max_stale is None or self.confirmed_at is None or not self.running:
            return
        wait = self.confirmed_at + self.max_stale - now
        self._stale_call = self.clock.callLater(max(0.0, wait), self._stale_due)

    def _stale_due(self) -> None:
        self._stale_call = None
        if self.stale_reason() is None:
            # The reactor's timer ran early on ``monotonic``'s scale: look again then.
            self._watch_stale(self.monotonic())

    def _cancel_stale_watch(self) -> None:
        call, self._stale_call = self._stale_call, None
        if call is not None and call.active():
            call.cancel()

    def _stale_began(self, since: float) -> None:
        self.stale_since = since
        log.error("snapshot {version} has not been confirmed as the store's current state "
                  "for {max_stale:g} s ([store] max_stale): every list query gets the "
                  "temporary failure until a store refresh succeeds (logged again when one "
                  "does); "
                  "{trouble}", version=self.current.version if self.current else None,
                  max_stale=self.max_stale, trouble=self._trouble_text(),
                  store=self.store_description)

    def _trouble_text(self) -> str:
        """What keeps the snapshot from being confirmed, for the stale reason."""
        trouble = self._store_trouble()
        if trouble is not None:
            return trouble
        running = self.refresh_running_for()
        if running is not None:
            return f"a store refresh has been running for {running:.1f} s"
        # Nothing failed and nothing runs: the refresh timer itself does not fire.
        return (f"no store refresh has run for {self.monotonic() - self.checked_at:.1f} s "
                "(is the refresh timer stalled?)")

    # --- the refresh watchdog ---------------------------------------------------------

    def _start_watch(self) -> None:
        self.refresh_started = self.monotonic()
        if self.refresh_timeout is not None:
            self._overdue_call = self.clock.callLater(self.refresh_timeout, self._overdue)

    def _end_watch(self) -> None:
        call, self._overdue_call = self._overdue_call, None
        if call is not None and call.active():
            call.cancel()
        elif call is not None and self.refresh_started is not None:
            # It was reported overdue: say that it ended.
            log.info("the overdue store refresh ended after {duration:.1f} s",
                     duration=self.monotonic() - self.refresh_started)
        self.refresh_started = None

    def _overdue(self) -> None:
        """Called once per refresh that outlives ``refresh_timeout``."""
        running = self.monotonic() - (self.refresh_started or 0.0)
        if self.current is not None:
            serving = f"serving the last good snapshot {self.current.version}"
        else:
            serving = "no snapshot yet, every query gets a temporary failure"
        log.error("store refresh still running after {duration:.1f} s (more than [store] "
                  "refresh_timeout = {timeout:g} s): the store is stuck or very slow; "
                  "{serving}", duration=running, timeout=self.refresh_timeout,
                  serving=serving, store=self.store_description)

    def refresh_running_for(self) -> float | None:
        if self._busy is None or self.refresh_started is None:
            return None
        return max(0.0, self.monotonic() - self.refresh_started)

    def trouble_since(self) -> float | None:
        """When the store's current trouble began (``monotonic`` time): its first failed
        refresh, or the start of a refresh running past ``refresh_timeout`` (a frozen
        store fails nothing, it just never answers), or when the snapshot turned stale
        (``max_stale``: a refresh loop that stopped fails nothing either); ``None`` while
        healthy."""
        since = self.failing_since
        if self.stale_reason() is not None and self.stale_since is not None:
            since = self.stale_since if since is None else min(since, self.stale_since)
        running = self.refresh_running_for()
        if (running is not None and self.refresh_timeout is not None
                and running >= self.refresh_timeout and self.refresh_started is not None):
            since = self.refresh_started if since is None else min(since,
                                                                   self.refresh_started)
        return since

    def unhealthy_reason(self) -> str | None:
        """Why ``status()`` says the store is unhealthy, else ``None``: first that the
        snapshot is stale (queries get the temporary failure), with its cause."""
        stale = self.stale_reason()
        if stale is not None:
            return stale
        return self._store_trouble()

    def _store_trouble(self) -> str | None:
        """The store's failure or stuck refresh, else ``None``."""
        running = self.refresh_running_for()
        if (running is not None and self.refresh_timeout is not None
                and running >= self.refresh_timeout):
            return (f"a store refresh has been running for {running:.1f} s (more than "
                    f"[store] refresh_timeout = {self.refresh_timeout:g} s)")
        if self.failing_since is not None:
            if self.last_refresh_failed:
                return f"the store is failing: {self.last_error}"
            now = self.monotonic()
            plural = "" if self.failures == 1 else "es"
            return (f"the store failed {self.failures} refresh{plural} in the last "
                    f"{now - self.failing_since:.1f} s, the last one "
                    f"{now - self.last_error_at:.1f} s ago ({self.last_error}); healthy "
                    f"again after {self.quiet_interval:g} s without a failure")
        if self.checked_at is None:
            return "the store has not answered yet"
        return self.change_detection_problem

    def _unexpected(self, failure: Failure) -> bool:
        log.failure("unexpected error in the snapshot refresh", failure)
        return False

    def status(self) -> dict:
        snap = self.current
        now = self.monotonic()
        unhealthy = self.unhealthy_reason()
        running = self.refresh_running_for()
        trouble_since = self.trouble_since()
        return {
            "snapshot": None if snap is None else {
                "version": snap.version,
                "age": round(self.age(), 3),
                "confirmed_age": round(self.confirmed_age(), 3),
                "built_at": snap.built_at,
                "lists": len(snap.lists),
                "memberships": snap.membership_count,
                "domains": len(snap.domains),
                "problems": list(snap.problems),
                "broken_lists": dict(snap.broken),
            },
            "unavailable_reason": self.unavailable_reason or None,
            "store": {
                "describe": self.store_description,
                "healthy": unhealthy is None,
                "unhealthy_reason": unhealthy,
                "refresh_running_for": (None if running is None else round(running, 3)),
                "refresh_timeout": self.refresh_timeout,
                "max_stale": self.max_stale,
                "last_check_age": (None if self.checked_at is None
                                   else round(now - self.checked_at, 3)),
                "last_error": self.last_error,
                "last_error_age": (None if self.last_error_at is None
                                   else round(now - self.last_error_at, 3)),
                "failing_for": (None if trouble_since is None
                                else round(now - trouble_since, 3)),
                "failed_refreshes": self.failures,
                "quiet_interval": self.quiet_interval,
                "refresh_interval": self.interval,
                "checks": self.checks,
                "loads": self.loads,
                "last_load": self.last_load_how or None,
                "last_load_seconds": (None if self.last_load_seconds is None
                                      else round(self.last_load_seconds, 3)),
                "verification": self._verification_status(now),
                "change_detection_problem": self.change_detection_problem,
                "listen": self.listen_status(),
            },
        }

    def _verification_status(self, now: float) -> dict | None:
        """``status()["store"]["verification"]``: None for a store that needs none (its
        change detection is exact), else whether verification builds are failing, since
        when, and when one last worked."""
        if getattr(self.backend, "verification_due", None) is None:
            return None
        since = self.verify_failing_since
        return {
            "failing": since is not None,
            "failing_for": None if since is None else round(now - since, 3),
            "failed": self.verify_failures,
            "last_error": self.verify_error,
            "last_error_age": (None if self.verify_error_at is None
                               else round(now - self.verify_error_at, 3)),
            "last_verified_age": (None if self.verified_at is None
                                  else round(now - self.verified_at, 3)),
        }

    def listen_status(self) -> dict:
        """``status()["store"]["listen"]``: whether the store's notifications are
        listened to, and how many came."""
        listener = self.change_listener
        status: dict = {"enabled": listener is not None}
        if listener is not None:
            status.update(listener.status())
        status.update(notifications=self.notifications,
                      notified_refreshes=self.notified_refreshes)
        return status


def _report_broken(previous: Snapshot | None, snapshot: Snapshot) -> None:
    """One log line per list that became unreadable (or changed its reason), and one
    when it is readable again; nothing for a list that stays as it was."""
    before = previous.broken if previous is not None else {}
    for posting, reason in snapshot.broken.items():
        if before.get(posting) != reason:
            log.error("list {list} is answered with a temporary failure until its rows "
                      "can be read: {reason}", list=posting, reason=reason)
    for posting in before:
        if posting not in snapshot.broken and posting in snapshot.lists:
            log.info("list {list} is readable again", list=posting)


def _describe_error(failure: Failure) -> str:
    error = failure.value
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    name = type(error).__name__
    return f"{name}: {first}" if first else name
