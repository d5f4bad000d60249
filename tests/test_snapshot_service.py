"""The snapshot service: refresh off the reactor, token check, last-good, no overlap.

Driven with a ``Clock``, an in-memory backend and a synchronous (or hand-stepped)
substitute for the store thread.
"""

from __future__ import annotations

import dataclasses
import threading

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from policyd.snapshot_service import SnapshotService, StoreThread

from .protocols.fakes import FakeBackend, ManualThread, captured_events, run_now, sample_lists


def make(backend=None, run=run_now, interval=2.0):
    clock = Clock()
    backend = backend or FakeBackend()
    service = SnapshotService(backend, interval=interval, clock=clock, run_in_thread=run,
                              monotonic=clock.seconds)
    return service, backend, clock


def errors(events):
    return [e for e in events if e["log_level"] in (LogLevel.error, LogLevel.critical)]


def test_first_snapshot_loaded_at_start():
    service, backend, clock = make()
    assert service.current is None
    assert "no snapshot loaded yet" in service.unavailable_reason
    service.startService()
    assert service.current is not None
    assert service.current.version == "1"
    assert service.unavailable_reason == ""
    assert backend.calls == ["load_snapshot"]  # a full build: no token asked first
    assert service.store_description == "fake in-memory store"


def test_unchanged_token_does_not_reload():
    """Every interval only the change token is read while nothing changed."""
    service, backend, clock = make()
    service.startService()
    first = service.current
    backend.calls.clear()
    clock.advance(2)
    clock.advance(2)
    assert backend.calls == ["change_token", "change_token"]
    assert service.current is first


def test_changed_token_reloads_within_the_interval():
    service, backend, clock = make()
    service.startService()
    backend.lists = sample_lists(extra_member="bob@example.com")
    backend.token = "2"
    clock.advance(1.9)
    assert service.current.version == "1"
    clock.advance(0.1)
    assert service.current.version == "2"
    assert "bob@example.com" in service.current.lists["test@lists.example.com"].members


def test_reload_loads_even_when_unchanged():
    service, backend, clock = make()
    service.startService()
    first = service.current
    backend.calls.clear()
    results = []
    service.reload().addCallback(results.append)
    assert results == [True]
    assert backend.calls == ["load_snapshot"]  # a full build: no token asked first
    assert service.current is not first


def test_failure_keeps_last_good_and_logs_once_per_incident():
    """A failing store: the last good snapshot keeps serving; one error line for the
    whole incident, one info line when it ends: once the store has answered for
    ``quiet_interval`` seconds without a failure (what it loads meanwhile is served at
    once)."""
    service, backend, clock = make()
    service.startService()
    good = service.current
    with captured_events() as events:
        backend.fail = ConnectionError("connection refused")
        for _ in range(5):
            clock.advance(2)
        assert service.current is good
        assert len(errors(events)) == 1
        assert "serving the last good snapshot" in errors(events)[0]["log_format"]
        assert service.status()["store"]["healthy"] is False
        assert service.status()["store"]["last_error"] == "ConnectionError: connection refused"
        assert service.failures == 5
        backend.fail = None
        backend.token = "2"
        clock.advance(2)
        assert service.current.version == "2"
        store = service.status()["store"]
        assert store["healthy"] is False and store["failed_refreshes"] == 5
        assert "healthy again after 60 s without a failure" in store["unhealthy_reason"]
        assert not [e for e in events if "recovered" in e.get("log_format", "")]
        clock.advance(service.quiet_interval - 2)
        recovered = [e for e in events if "recovered" in e.get("log_format", "")]
        assert len(recovered) == 1
        assert service.status()["store"]["healthy"] is True
        # a second incident is logged again
        backend.fail = ConnectionError("again")
        clock.advance(2)
        clock.advance(2)
        assert len(errors(events)) == 2


def test_failed_load_after_token_change_keeps_last_good():
    service, backend, clock = make()
    service.startService()
    backend.token = "2"
    backend.fail_load = RuntimeError("half-migrated schema")
    clock.advance(2)
    assert service.current.version == "1"
    backend.fail_load = None
    clock.advance(2)
    assert service.current.version == "2"


def test_no_snapshot_until_the_store_answers():
    """Before the first snapshot, ``current`` is None and the reason is clear."""
    backend = FakeBackend()
    backend.fail = ConnectionError("no route to host")
    with captured_events() as events:
        service, _, clock = make(backend)
        service.startService()
        clock.advance(2)
        clock.advance(2)
        assert service.current is None
        assert service.unavailable_reason == \
            "no snapshot loaded yet: the store failed: ConnectionError: no route to host"
        assert len(errors(events)) == 1
        assert "no snapshot yet" in errors(events)[0]["log_format"]
        backend.fail = None
        clock.advance(2)
        assert service.current is not None


def test_refreshes_never_overlap():
    """A tick while a refresh is in flight does nothing; the timer waits for it."""
    thread = ManualThread()
    service, backend, clock = make(run=thread.run)
    service.startService()
    assert len(thread.jobs) == 1
    clock.advance(2)
    clock.advance(2)
    assert len(thread.jobs) == 1
    thread.step()
    assert service.current is not None
    clock.advance(2)
    assert len(thread.jobs) == 1


def test_reload_during_refresh_runs_after_it():
    thread = ManualThread()
    service, backend, clock = make(run=thread.run)
    service.startService()
    results = []
    service.reload().addCallback(results.append)
    assert len(thread.jobs) == 1 and results == []
    thread.step()  # the timer's refresh
    assert len(thread.jobs) == 1 and results == []  # the forced one, queued after it
    backend.calls.clear()
    thread.step()
    assert results == [True]
    assert backend.calls == ["load_snapshot"]  # a full build: no token asked first


def test_a_reload_asked_while_the_waiters_of_a_build_are_woken():
    """Callers woken by a forced build ask again at once (a control client pipelining
    ``reload`` twice): the first starts a build of its own, the second must wait for a
    build that begins after it asked, not be answered by one that began before, nor be
    left behind (``_force_now`` while a build runs)."""
    thread = ManualThread()
    service, backend, clock = make(run=thread.run)
    service.startService()
    thread.step()  # the first load
    first, second = [], []

    def again(result, into):
        into.append(result)
        service.reload().addCallback(
            lambda ok: into.append(("again", ok, backend.calls.count("load_snapshot"))))

    clock.advance(2)  # a refresh is running: both reloads wait for one build after it
    service.reload().addCallback(again, first)
    service.reload().addCallback(again, second)
    thread.step()  # the refresh: the forced build is queued
    thread.step()  # the forced build for both: both woken, both ask again
    assert first == [True] and second == [True]
    asked_at = backend.calls.count("load_snapshot")
    while thread.jobs:
        thread.step()
    clock.advance(60)  # nothing left waiting for a timeout either
    assert len(first) == len(second) == 2, (first, second)
    for results in (first, second):
        tag, ok, loads = results[1]
        assert ok is True and loads > asked_at  # a build begun after it asked


def test_reload_failure_reports_false():
    service, backend, clock = make()
    service.startService()
    backend.fail = OSError("disk gone")
    results = []
    service.reload().addCallback(results.append)
    assert results == [False]
    assert service.current.version == "1"


def test_store_returning_garbage_is_a_store_failure():
    service, backend, clock = make()
    service.startService()
    backend.token = "2"
    backend.load_snapshot = lambda: object()
    clock.advance(2)
    assert service.current.version == "1"
    assert service.last_error == "TypeError: the store returned object, not a Snapshot"


def test_timer_survives_an_unexpected_error():
    """An exception outside the store calls is logged, the snapshot is not swapped in,
    and the timer keeps running."""
    service, backend, clock = make()
    service.startService()
    backend.token = "2"
    broken = dataclasses.replace(service.current, lists=None, version="2")
    backend.load_snapshot = lambda: broken  # a Snapshot that cannot even be counted
    with captured_events() as events:
        clock.advance(2)
        clock.advance(2)
        unexpected = [e for e in events if "unexpected error" in e.get("log_format", "")]
    assert len(unexpected) == 2
    assert service.current.version == "1"
    backend.load_snapshot = FakeBackend.load_snapshot.__get__(backend)
    clock.advance(2)
    assert service.current.version == "2"


def test_stop_closes_the_backend_through_the_thread():
    service, backend, clock = make()
    service.startService()
    service.stopService()
    assert backend.calls[-1] == "close"
    backend.calls.clear()
    clock.advance(10)
    assert backend.calls == []


def test_stop_during_a_hung_refresh_does_not_wait():
    thread = ManualThread()
    service, backend, clock = make(run=thread.run)
    service.startService()
    assert service.stopService() is None
    assert "close" not in backend.calls


def test_status_fields():
    service, backend, clock = make()
    service.startService()
    clock.advance(2)
    clock.advance(1)
    status = service.status()
    assert status["snapshot"]["version"] == "1"
    assert status["snapshot"]["lists"] == 3
    assert status["snapshot"]["memberships"] == 3
    assert status["snapshot"]["age"] == 3.0
    assert status["store"]["describe"] == "fake in-memory store"
    assert status["store"]["last_check_age"] == 1.0
    assert status["unavailable_reason"] is None


def test_store_thread_runs_calls_off_the_calling_thread():
    """The real StoreThread: calls run in its own daemon thread, results come back via
    the reactor's callFromThread."""
    delivered = []

    class Reactor:
        def callFromThread(self, f, *args):
            delivered.append((f, args))

    worker = StoreThread(Reactor())
    worker.startService()
    done = threading.Event()
    names = []

    def job():
        names.append(threading.current_thread().name)
        done.set()
        return 42
    d = worker.run(job)
    assert done.wait(5)
    worker.stopService()
    for _ in range(100):
        if delivered:
            break
        threading.Event().wait(0.01)
    results = []
    d.addCallback(results.append)
    f, args = delivered[0]
    f(*args)
    assert results == [42]
    assert names == ["policyd-store"]
    assert isinstance(d, defer.Deferred)


def test_store_unavailable_is_logged_without_traceback():
    """The store's own worded error is logged as one line; anything else with its
    traceback."""
    from policyd.errors import StoreUnavailable

    service, backend, clock = make()
    service.startService()
    with captured_events() as events:
        backend.fail = StoreUnavailable("store x: connection refused")
        clock.advance(2)
        assert [("log_failure" in e) for e in errors(events)] == [False]
        backend.fail = None
        clock.advance(service.quiet_interval)  # that incident is over
        backend.fail = KeyError("surprise")
        clock.advance(2)
        assert [("log_failure" in e) for e in errors(events)] == [False, True]


class IncrementalBackend(FakeBackend):
    """A backend that can refresh incrementally (``load_changes``)."""

    def load_changes(self, previous):
        self.calls.append("load_changes")
        assert previous.version != self.token
        return self.load_snapshot()


def test_changed_token_uses_the_incremental_load_when_the_backend_has_one():
    """A change seen by the timer goes through ``load_changes(current)``; the first load
    and a forced reload are full builds."""
    service, backend, clock = make(IncrementalBackend())
    service.startService()
    assert backend.calls == ["load_snapshot"]  # a full build: no token asked first
    backend.calls.clear()
    backend.lists = sample_lists(extra_member="bob@example.com")
    backend.token = "2"
    clock.advance(2)
    assert backend.calls == ["change_token", "load_changes", "load_snapshot"]
    assert "bob@example.com" in service.current.lists["test@lists.example.com"].members
    backend.calls.clear()
    service.reload()
    assert backend.calls == ["load_snapshot"]  # a full build: no token asked first


class ExplainingBackend(FakeBackend):
    """``load_changes`` says how it went, as ``refresh.load_changes`` does."""

    def load_changes(self, previous):
        self.calls.append("load_changes")
        return dataclasses.replace(self.load_snapshot(),
                                   built_how="incremental: 1 list read again")


def test_the_load_line_and_status_say_how_each_snapshot_was_made():
    """Each load's line and ``status()`` say how the snapshot was made and how long it
    took: the first load and a reload are full builds, a change the token shows is what
    the backend's ``load_changes`` reports (an incremental refresh here)."""
    from twisted.logger import formatEvent

    service, backend, clock = make(ExplainingBackend())
    with captured_events() as events:
        service.startService()
        backend.token = "2"
        clock.advance(2)
        service.reload()
    loaded = [formatEvent(e) for e in events if "loaded" in e.get("log_format", "")]
    assert len(loaded) == 3
    assert loaded[0].startswith("snapshot 1 loaded (full build: first load, ")
    assert loaded[1].startswith("snapshot 2 loaded (incremental: 1 list read again, ")
    assert loaded[2].startswith("snapshot 2 loaded (full build: reload asked, ")
    assert all(line.endswith(" 0.00 s): 3 lists, 3 memberships") for line in loaded), loaded
    store = service.status()["store"]
    assert store["last_load"] == "full build: reload asked"
    assert store["last_load_seconds"] == 0.0  # the Clock did not move during the build


class TornBackend(FakeBackend):
    """A read that straddled the store's commits (``Snapshot.caveat``), as the Mailman 3
    backend's SQLite read serves after its attempts."""

    def load_snapshot(self):
        return dataclasses.replace(super().load_snapshot(),
                                   caveat="the rows may mix moments")


def test_a_snapshot_with_a_caveat_is_said_as_it_loads():
    """A snapshot that may not be one moment of the store is served, and said: a
    warning (rate-limited) and ``status()``'s last load."""
    from twisted.logger import LogLevel, formatEvent

    service, backend, clock = make(TornBackend())
    with captured_events() as events:
        service.startService()
    warned = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    assert warned == ["snapshot 1: the rows may mix moments"]
    assert service.status()["store"]["last_load"] == (
        "full build: first load; the rows may mix moments")


def test_old_snapshot_is_freed_through_the_store_thread():
    """After a swap the previous snapshot is handed to the store thread and freed there;
    nothing else keeps it alive."""
    import gc as _gc
    import weakref

    from policyd.snapshot_service import release

    jobs = []

    def recording(f, *args, **kwargs):
        jobs.append(f)
        return run_now(f, *args, **kwargs)

    service, backend, clock = make(run=recording)
    service.startService()
    first = weakref.ref(service.current)
    backend.token = "2"
    clock.advance(2)
    assert release in jobs
    _gc.collect()
    assert first() is None
    assert service.current.version == "2"


def test_a_refresh_past_refresh_timeout_is_logged_once_and_makes_status_unhealthy():
    """A refresh still running after ``refresh_timeout`` (a stuck store) is logged once;
    ``status`` says unhealthy with the reason while the last good snapshot keeps
    serving; when the refresh ends, status is healthy again and the end is logged."""
    thread = ManualThread()
    clock = Clock()
    backend = FakeBackend()
    service = SnapshotService(backend, interval=2.0, clock=clock, run_in_thread=thread.run,
                              refresh_timeout=30.0, monotonic=clock.seconds)
    service.startService()
    thread.step()
    first = service.current
    assert service.status()["store"]["healthy"] is True
    with captured_events() as events:
        clock.advance(2)  # this refresh hangs in the store
        assert len(thread.jobs) == 1
        clock.advance(28)
        assert service.status()["store"]["healthy"] is True
        assert service.status()["store"]["refresh_running_for"] == 28.0
        for _ in range(20):
            clock.advance(2)
    overdue = [e for e in events if "refresh_timeout" in e["log_format"]]
    assert len(overdue) == 1 and overdue[0]["log_level"] is LogLevel.error
    assert overdue[0]["duration"] == 30.0 and "last good snapshot 1" in overdue[0]["serving"]
    status = service.status()["store"]
    assert status["healthy"] is False
    assert "running for 68.0 s" in status["unhealthy_reason"]
    assert "[store] refresh_timeout = 30 s" in status["unhealthy_reason"]
    # A frozen store fails no refresh, yet it has been in trouble since the refresh that
    # hangs began: what status and the metrics' failing_seconds say (alerts read it).
    assert status["failing_for"] == 68.0 and service.trouble_since() == 2.0
    assert status["failed_refreshes"] == 0
    assert service.current is first
    with captured_events() as events:
        thread.step()
    assert service.status()["store"]["healthy"] is True
    assert service.status()["store"]["unhealthy_reason"] is None
    assert service.status()["store"]["failing_for"] is None
    assert any("overdue store refresh ended" in e["log_format"] for e in events)


def test_a_failing_store_is_unhealthy_with_the_error_as_reason():
    service, backend, clock = make()
    service.startService()
    backend.fail = RuntimeError("connection refused")
    clock.advance(2)
    status = service.status()["store"]
    assert status["healthy"] is False and "the store is failing" in status["unhealthy_reason"]


class VerifyingBackend(FakeBackend):
    """A backend with inferred change detection: asks for verification builds."""

    def __init__(self):
        super().__init__()
        self.due = False
        self.divergence: list[str] = []

    def verification_due(self) -> bool:
        return self.due

    def load_verified(self, previous):
        self.calls.append("load_verified")
        self.due = False
        return self.load_snapshot(), list(self.divergence)


def test_verification_build_swaps_in_the_full_result_and_logs_a_divergence():
    """When the backend says a verification is due, the tick runs ``load_verified`` even
    with an unchanged token; with no divergence the current snapshot stays; with one, a
    warning names what differed and the full build is served."""
    service, backend, clock = make(VerifyingBackend())
    service.startService()
    first = service.current
    backend.calls.clear()
    backend.due = True
    with captured_events() as events:
        clock.advance(2)
    assert backend.calls == ["change_token", "load_verified", "load_snapshot"]
    assert service.current is first
    assert not [e for e in events if e["log_level"] is LogLevel.warn]
    # The store changed behind the token's back: the verification build catches it.
    backend.lists = sample_lists(extra_member="bob@example.com")
    backend.divergence = ["test@lists.example.com"]
    backend.due = True
    with captured_events() as events:
        clock.advance(2)
    assert service.current is not first
    assert "bob@example.com" in service.current.lists["test@lists.example.com"].members
    warnings = [e for e in events if e["log_level"] is LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["differences"] == "test@lists.example.com"
    clock.advance(2)  # logged once: not due again, nothing new
    assert service.current.version == "1"


# --- notifications (``changed``) ------------------------------------------------------------


def test_a_notification_refreshes_at_once():
    """``changed()`` (a store NOTIFY) refreshes without waiting for the timer."""
    service, backend, clock = make(interval=30.0)
    service.startService()
    backend.lists = sample_lists(extra_member="bob@example.com")
    backend.token = "2"
    clock.advance(service.NOTIFY_GAP)
    service.changed()
    assert service.current.version == "2"
    assert service.status()["store"]["listen"] == {
        "enabled": False, "notifications": 1, "notified_refreshes": 1}


def test_a_notification_storm_is_coalesced():
    """10,000 notifications in one second, refreshes taking 10 ms each: while a refresh
    runs, any number of notifications make one more after it, and refreshes they start
    are NOTIFY_GAP apart: about 1 / NOTIFY_GAP refreshes, not 10,000; the last change is
    loaded."""
    thread = ManualThread()
    service, backend, clock = make(run=thread.run, interval=30.0)
    service.startService()
    thread.step()
    backend.calls.clear()
    for i in range(10_000):
        backend.token = str(i + 2)
        service.changed()
        clock.advance(0.0001)
        if i % 100 == 99 and thread.jobs:  # a refresh ends every 10 ms
            thread.step()
    clock.advance(1.0)
    while thread.jobs:
        thread.step()
        clock.advance(1.0)
    refreshes = backend.calls.count("change_token")
    assert service.notifications == 10_000
    assert refreshes <= 1.0 / service.NOTIFY_GAP + 2, refreshes
    assert service.current.version == "10001"


def test_a_notification_during_a_refresh_makes_exactly_one_more():
    thread = ManualThread()
    service, backend, clock = make(run=thread.run, interval=30.0)
    service.startService()
    assert len(thread.jobs) == 1
    for _ in range(50):
        service.changed()
    assert len(thread.jobs) == 1
    thread.step()
    clock.advance(service.NOTIFY_GAP)
    assert len(thread.jobs) == 1
    thread.step()
    clock.advance(1)
    assert thread.jobs == []


def test_no_refresh_from_notifications_after_stop():
    thread = ManualThread()
    service, backend, clock = make(run=thread.run, interval=30.0)
    service.startService()
    thread.step()
    clock.advance(service.NOTIFY_GAP)
    service.changed()
    thread.step()
    service.changed()  # scheduled after the gap
    assert thread.jobs == []
    service.stopService()
    clock.advance(1)
    assert [job[1].__name__ for job in thread.jobs] == ["close"]


# --- a verification build that fails (Mailman 3) -------------------------------------------


class FailingVerificationBackend(IncrementalBackend):
    """Mailman 3-like: the incremental path works, the verification build's full half
    fails (a statement timeout on its big unordered scan).  ``due`` stays true: a backend
    that does not back off itself."""

    def __init__(self):
        super().__init__()
        self.due = False
        self.verify_fails: Exception | None = RuntimeError(
            "canceling statement due to statement timeout")

    def verification_due(self) -> bool:
        return self.due

    def load_verified(self, previous):
        self.calls.append("load_verified")
        if self.verify_fails is not None:
            raise self.verify_fails
        self.due = False
        return self.load_snapshot(), []


def test_a_failing_verification_build_does_not_hold_back_store_changes():
    """Once a verification build is due and fails, every change the usual path can load
    is still loaded, in the same refresh; the failure is logged once for the incident,
    ``status`` says since when verification fails, the store itself stays healthy (its
    refreshes work), and a verification build that works again ends it with one line."""
    service, backend, clock = make(FailingVerificationBackend())
    service.startService()
    backend.due = True
    with captured_events() as events:
        clock.advance(2)  # the verification build fails; nothing changed
        assert service.current.version == "1"
        backend.lists = sample_lists(extra_member="bob@example.com")
        backend.token = "2"  # bob subscribes
        backend.calls.clear()
        clock.advance(2)
        # Loaded in this very refresh, through the incremental path, after the failure.
        assert backend.calls[:4] == ["change_token", "load_verified", "change_token",
                                     "load_changes"]
        assert service.current.version == "2"
        assert "bob@example.com" in service.current.lists["test@lists.example.com"].members
        for _ in range(30):
            clock.advance(2)
    failed = [e for e in events if "verification build failed" in e.get("log_format", "")]
    assert len(failed) == 1 and failed[0]["log_level"] is LogLevel.error
    assert failed[0]["error"] == \
        "RuntimeError: canceling statement due to statement timeout"
    store = service.status()["store"]
    assert store["healthy"] is True and store["unhealthy_reason"] is None
    verification = store["verification"]
    assert verification["failing"] is True
    assert verification["failing_for"] == 62.0  # since the first failed attempt, at 2 s
    assert verification["failed"] == 32
    assert verification["last_error"] == \
        "RuntimeError: canceling statement due to statement timeout"
    backend.verify_fails = None
    with captured_events() as events:
        clock.advance(2)
    again = [e for e in events if "verification builds work again" in e.get("log_format", "")]
    assert len(again) == 1 and again[0]["failures"] == 32
    assert service.status()["store"]["verification"]["failing"] is False
    assert service.status()["store"]["verification"]["failing_for"] is None


def test_a_failing_verification_with_the_store_down_is_a_store_failure():
    """When the usual path fails too, the refresh failed: the store's incident, with its
    error; the last good snapshot keeps serving."""
    service, backend, clock = make(FailingVerificationBackend())
    service.startService()
    backend.due = True
    backend.token = "2"
    backend.fail_load = ConnectionError("connection refused")
    clock.advance(2)
    store = service.status()["store"]
    assert store["last_error"] == "ConnectionError: connection refused"
    assert store["healthy"] is False
    assert service.current.version == "1"


def test_the_mailman3_backend_backs_off_after_a_failed_verification(tmp_path):
    """``Mailman3Backend``: a verification build that fails counts as an attempt, so
    ``verification_due`` waits ``verify_interval`` again (the refreshes in between take
    the incremental path) instead of retrying the failing build on every tick."""
    import pytest

    from policyd.errors import StoreUnavailable
    from policyd.store.mailman3 import Mailman3Backend

    backend = Mailman3Backend(f"sqlite:///{tmp_path / 'not-mailman.db'}",
                              verify_interval=600.0)
    try:
        assert not backend.verification_due()
        backend.verifications.last_full -= 600.0
        assert backend.verification_due()
        with pytest.raises(StoreUnavailable):  # no Mailman tables: the build fails
            backend.load_verified(FakeBackend().load_snapshot())
        assert not backend.verification_due()
    finally:
        backend.close()


def test_verification_at_every_refresh_backs_off_after_a_failure():
    """``VerificationSchedule.due(always=True)`` (the native store with a trigger missing):
    due at every refresh, except right after a failed verification build, which waits
    ``interval`` like any other (or the next full build) instead of costing every refresh
    the whole failing build."""
    import pytest

    from policyd.store.refresh import VerificationSchedule

    schedule = VerificationSchedule(600.0)
    assert not schedule.due() and schedule.due(always=True)

    def fails():
        raise TimeoutError("statement timeout")

    with pytest.raises(TimeoutError):
        schedule.attempt(fails)
    assert not schedule.due(always=True)
    schedule.built()
    assert schedule.due(always=True)


# --- change detection that cannot be trusted (the native store's triggers) ----------------


class UntrustedBackend(VerifyingBackend):
    """Says, after each load, whether its change detection can be trusted."""

    change_detection_problem: str | None = None


def test_untrusted_change_detection_is_unhealthy_logged_once_and_still_served():
    """A backend whose change triggers do not all fire (``change_detection_problem``):
    queries are still answered from its snapshots, ``status`` says unhealthy with the
    backend's words, one error line says so however many refreshes see it, and one info
    line says when it ends."""
    service, backend, clock = make(UntrustedBackend())
    service.startService()
    problem = ("the store's change triggers do not all fire (missing: "
               "policyd_rev_lists_au on lists): writes that bypass them are only seen "
               "by a full build")
    backend.change_detection_problem = problem
    with captured_events() as events:
        for _ in range(3):
            backend.due = True
            clock.advance(2)
    logged = [e for e in events if e.get("problem") == problem]
    assert len(logged) == 1 and logged[0]["log_level"] is LogLevel.error
    status = service.status()["store"]
    assert status["healthy"] is False and status["unhealthy_reason"] == problem
    assert status["change_detection_problem"] == problem
    assert service.current is not None and service.unavailable_reason == ""
    backend.change_detection_problem = None
    with captured_events() as events:
        backend.due = True
        clock.advance(2)
    assert [e for e in events if "all fire again" in e.get("log_format", "")]
    assert service.status()["store"]["healthy"] is True


# --- a flapping store ------------------------------------------------------------------


def test_a_flapping_store_is_one_incident_until_it_has_been_quiet():
    """A store that fails every other refresh (one bad server behind a balancer): one
    incident, not one per failure.  An hour of it logs the first failure and at most one
    summary every five minutes; ``status`` says unhealthy at every look (no flip between
    scrapes), with the incident's count; the incident ends, with one line, once the store
    has gone ``quiet_interval`` seconds (30 refreshes here) without a failure."""
    from policyd.errors import StoreUnavailable

    service, backend, clock = make()
    service.startService()
    healthy = []
    with captured_events() as events:
        for i in range(1800):  # one hour of 2 s refreshes
            backend.fail = (StoreUnavailable("store sqlite:///x: database is locked")
                            if i % 2 == 0 else None)
            clock.advance(2)
            healthy.append(service.status()["store"]["healthy"])
        mine = [e for e in events if e.get("log_namespace") == "policyd.store"]
        assert set(healthy) == {False}
        store = service.status()["store"]
        assert store["failed_refreshes"] == 900
        assert store["failing_for"] == 3598.0  # since the first failure, at 2 s
        assert "failed 900 refreshes" in store["unhealthy_reason"]
        assert len(mine) <= 1 + 12, [e["log_format"] for e in mine]
        assert "database is locked" in mine[0]["error"]
        summaries = [e for e in mine if "still failing" in e["log_format"]]
        assert len(summaries) >= 11
        assert all(e["log_level"] is LogLevel.warn for e in summaries)
        assert summaries[0]["count"] == 74 and summaries[0]["succeeded"] == 75
        # Back for good: still the incident until 60 s without a failure, then one line.
        assert store["quiet_interval"] == service.quiet_interval == 60.0
        backend.fail = None
        clock.advance(2)  # the last failure was at 3598 s
        for _ in range(27):
            clock.advance(2)
            assert service.status()["store"]["healthy"] is False
        before = len(events)
        clock.advance(2)
        store = service.status()["store"]
        assert store["healthy"] is True and store["failing_for"] is None
        assert store["failed_refreshes"] == 0
        recovered = [e for e in events[before:] if "recovered" in e["log_format"]]
        assert len(recovered) == 1 and recovered[0]["failures"] == 900
        clock.advance(3600)  # no summary left behind after the end
    assert not [e for e in events[before:] if "still failing" in e["log_format"]]


# --- staleness: confirmed age and [store] max_stale -------------------------------------


def stale_lines(events):
    return [e for e in events if "max_stale" in e.get("log_format", "")]


def test_confirmed_age_counts_from_the_last_check_not_the_last_load():
    """A quiet, healthy store keeps its snapshot for long: ``age`` (since the load) grows,
    ``confirmed_age`` (since a refresh last found the token unchanged) stays within an
    interval; a failing store stops confirming, its ``confirmed_age`` grows."""
    service, backend, clock = make()
    service.startService()
    for _ in range(30):
        clock.advance(2)
    snapshot = service.status()["snapshot"]
    assert snapshot["age"] == 60.0
    assert snapshot["confirmed_age"] == 0.0
    clock.advance(1.5)
    assert service.status()["snapshot"]["confirmed_age"] == 1.5
    backend.fail = ConnectionError("refused")
    clock.advance(0.5)
    for _ in range(5):
        clock.advance(2)
    assert service.status()["snapshot"]["confirmed_age"] == 12.0
    assert service.status()["snapshot"]["age"] == 72.0


def test_a_slow_build_confirms_the_store_as_it_was_when_the_build_began():
    """A load that took 20 s confirms the store as of its start, not its end: the data
    may have changed meanwhile."""
    thread = ManualThread()
    clock = Clock()
    service = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                              run_in_thread=thread.run, monotonic=clock.seconds)
    service.startService()
    clock.advance(20)
    thread.step()
    assert service.status()["snapshot"]["confirmed_age"] == 20.0
    assert service.status()["snapshot"]["age"] == 0.0


def test_a_stuck_store_past_max_stale_makes_the_snapshot_stale_until_a_check_works():
    """A refresh that hangs: after ``max_stale`` seconds without a confirmation
    ``stale_reason()`` says why (queries get the temporary failure), status is unhealthy
    with that reason, one error line is logged, and no more while it lasts; when the
    hung refresh ends, its token was read at an unknown time, so a check follows at
    once, and that one ends the incident with one info line."""
    thread = ManualThread()
    clock = Clock()
    service = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                              run_in_thread=thread.run, refresh_timeout=30.0,
                              max_stale=100.0, monotonic=clock.seconds)
    service.startService()
    thread.step()
    with captured_events() as events:
        clock.advance(2)  # this refresh hangs in the store
        clock.advance(97)
        assert service.stale_reason() is None
        assert "refresh_timeout" in service.status()["store"]["unhealthy_reason"]
        assert stale_lines(events) == []
        clock.advance(1)  # 100 s since the last refresh that worked began
        assert len(stale_lines(events)) == 1  # the reactor timer noticed: no query asked
        assert stale_lines(events)[0]["log_level"] is LogLevel.error
        reason = service.stale_reason()
        assert "not been confirmed as the store's current state for 100.0 s" in reason
        assert "[store] max_stale = 100 s" in reason
        assert "a store refresh has been running for 98.0 s" in reason
        status = service.status()["store"]
        assert status["healthy"] is False and status["unhealthy_reason"] == reason
        assert status["max_stale"] == 100.0
        for _ in range(100):
            clock.advance(2)
            service.stale_reason()
        assert len(stale_lines(events)) == 1
        thread.step()  # the hung refresh ends: its token was read any time in 298 s
        assert service.stale_reason() is not None
        assert len(thread.jobs) == 1  # ... so the token is checked again at once
        thread.step()
    assert service.stale_reason() is None
    assert service.status()["store"]["healthy"] is True
    assert service.status()["snapshot"]["confirmed_age"] == 0.0
    ended = [e for e in events if "again after" in e["log_format"]]
    assert len(ended) == 1 and ended[0]["duration"] == 200.0
    assert ended[0]["log_level"] is LogLevel.info


def test_a_failing_store_turns_stale_and_recovers_at_the_first_good_refresh():
    """Refreshes that fail fast: stale ``max_stale`` after the last good one began, the
    error named in the reason; the first refresh that works ends it."""
    service, backend, clock = make()
    service.max_stale = 30.0
    service.startService()
    backend.fail = ConnectionError("connection refused")
    for _ in range(14):
        clock.advance(2)
    assert service.stale_reason() is None
    clock.advance(2)
    reason = service.stale_reason()
    assert "for 30.0 s" in reason and "ConnectionError: connection refused" in reason
    assert service.trouble_since() == 2.0  # the first failed refresh
    backend.fail = None
    clock.advance(2)
    assert service.stale_reason() is None
    assert service.status()["snapshot"]["confirmed_age"] == 0.0


def test_max_stale_does_not_trip_before_the_first_snapshot():
    """While the daemon starts (no snapshot yet, however long the first load takes)
    nothing is stale: ``current`` is None and ``unavailable_reason`` says why."""
    thread = ManualThread()
    clock = Clock()
    service = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                              run_in_thread=thread.run, max_stale=100.0,
                              monotonic=clock.seconds)
    with captured_events() as events:
        service.startService()
        clock.advance(500)
        assert service.current is None and service.stale_reason() is None
        assert stale_lines(events) == []
        assert service.status()["snapshot"] is None


def test_a_stalled_refresh_timer_is_seen_on_the_monotonic_clock():
    """The reactor's clock steps back an hour (NTP, a resumed VM): its timers, the
    refresh timer among them, wait out that hour.  Ages are measured on the monotonic
    clock, so status never shows a negative age, and after ``max_stale`` the snapshot
    is stale, with the reason, instead of served silently for an hour."""
    reactor = Clock()
    reactor.advance(1_000_000)
    steady = Clock()
    backend = FakeBackend()
    service = SnapshotService(backend, interval=2.0, clock=reactor, run_in_thread=run_now,
                              max_stale=120.0, monotonic=steady.seconds)
    service.startService()

    def elapse(seconds):
        steady.advance(seconds)
        reactor.advance(seconds)
    elapse(2)
    reactor.advance(-3600)  # the wall clock steps back, the monotonic one does not
    backend.token = "2"
    with captured_events() as events:
        for _ in range(59):
            elapse(2)
        store = service.status()["store"]
        assert store["last_check_age"] == 118.0 and store["healthy"] is True
        assert service.current.version == "1"
        elapse(2)
        assert service.stale_reason() is not None
        assert "no store refresh has run for 120.0 s" in service.stale_reason()
    assert service.status()["store"]["healthy"] is False
    assert len(stale_lines(events)) == 1


def stuck(thread):
    """A service whose second refresh hangs in the store (``thread`` never steps it)."""
    service, backend, clock = make(run=thread.run)
    service.startService()
    thread.step()  # the first load works
    clock.advance(2)  # the next refresh starts, and the store hangs
    assert service.refresh_running_for() is not None
    backend.calls.clear()
    return service, backend, clock


def refreshes(thread, service) -> list:
    """The refreshes queued in ``thread`` (not what else it runs: the old snapshot's
    release)."""
    return [job for job in thread.jobs if job[1] == service._work]


def test_reloads_during_a_stuck_refresh_share_one_build_and_forget_who_gave_up():
    """Reloads asked while a refresh hangs are one full build after it, whoever asked;
    a caller that stops waiting (cancels: its control connection gone) is forgotten at
    once, so what the service keeps is bounded by the callers still waiting."""
    thread = ManualThread()
    service, backend, clock = stuck(thread)
    waiters = [service.reload() for _ in range(10)]
    for _ in range(1000):
        assert service.reload(wait=False) is None  # SIGHUP: asks, keeps nothing
    gone = []
    for waiter in waiters[1:]:
        waiter.addErrback(lambda f: gone.append(f.trap(defer.CancelledError)))
        waiter.cancel()
    assert len(gone) == 9
    assert len(service._forced) == 1
    results = []
    waiters[0].addCallback(results.append)
    thread.step()  # the stuck refresh ends at last
    assert len(refreshes(thread, service)) == 1 and results == []  # one for them all
    thread.step()
    assert results == [True]
    assert backend.calls == ["change_token", "load_snapshot"]
    assert not refreshes(thread, service)
    assert not service._forced and not service._forced_running


def test_a_reload_storm_during_a_stuck_refresh_keeps_a_bounded_number_of_waiters():
    """100,000 reloads during a stuck refresh, none of them cancelled: at most
    ``MAX_RELOAD_WAITERS`` are kept, the oldest stop waiting (``None``), and the one
    build after the stuck refresh answers the rest."""
    thread = ManualThread()
    service, backend, clock = stuck(thread)
    first = []
    service.reload().addCallback(first.append)
    last = [service.reload() for _ in range(100_000)][-1]
    assert len(service._forced) == SnapshotService.MAX_RELOAD_WAITERS
    assert first == [None]
    results = []
    last.addCallback(results.append)
    thread.step()
    thread.step()
    assert results == [True] and not refreshes(thread, service)
    assert backend.calls.count("load_snapshot") == 1


def test_reload_delay_says_what_the_reload_waits_for():
    """What a reload that stopped waiting is answered: the refresh it waits for, how
    long it has run, and that it is past ``refresh_timeout``."""
    thread = ManualThread()
    clock = Clock()
    service = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                              run_in_thread=thread.run, monotonic=clock.seconds,
                              refresh_timeout=30.0)
    service.startService()
    thread.step()
    clock.advance(2)
    service.reload(wait=False)
    clock.advance(45)
    assert service.reload_delay() == (
        "a store refresh has been running for 45.0 s (more than [store] refresh_timeout "
        "= 30 s: the store is stuck or very slow); the reload runs when it ends")
