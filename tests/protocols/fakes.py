"""Test doubles shared by the daemon's unit tests: an in-memory store backend, a
synchronous stand-in for the store thread, and a small sample snapshot."""

from __future__ import annotations

from contextlib import contextmanager

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action

LIST = "test@lists.example.com"
OPEN = "open@lists.example.com"
HOLDING = "held@lists.example.com"
MEMBER = "alice@example.com"
NONMEMBER = "mallory@example.net"


def sample_lists(extra_member: str | None = None):
    members = (MemberSpec(MEMBER),) + ((MemberSpec(extra_member),) if extra_member else ())
    return [
        ListSpec(LIST, members=members, default_nonmember_action=Action.REJECT),
        ListSpec(OPEN, members=(MemberSpec(MEMBER),), default_nonmember_action=Action.ACCEPT),
        ListSpec(HOLDING, members=(MemberSpec(MEMBER),),
                 default_nonmember_action=Action.HOLD),
    ]


def sample_snapshot(version: str = "v1", **kwargs):
    return build(sample_lists(**kwargs), version=version, built_at=0.0)


class FakeBackend:
    """The store ``Backend`` interface over Python values; records every call."""

    def __init__(self, lists=None, token: str = "1") -> None:
        self.lists = sample_lists() if lists is None else lists
        self.token = token
        self.fail: Exception | None = None
        self.fail_load: Exception | None = None
        self.calls: list[str] = []
        self.closed = False

    def change_token(self) -> str:
        self.calls.append("change_token")
        if self.fail is not None:
            raise self.fail
        return self.token

    def load_snapshot(self):
        self.calls.append("load_snapshot")
        if self.fail is not None:
            raise self.fail
        if self.fail_load is not None:
            raise self.fail_load
        return build(self.lists, version=self.token, built_at=0.0)

    def check(self) -> None:
        self.calls.append("check")
        if self.fail is not None:
            raise self.fail

    def describe(self) -> str:
        return "fake in-memory store"

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True


def run_now(f, *args, **kwargs) -> defer.Deferred:
    """A synchronous substitute for the store thread."""
    return defer.maybeDeferred(f, *args, **kwargs)


class ManualThread:
    """A store-thread substitute whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list = []

    def run(self, f, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, f, args, kwargs))
        return d

    def step(self) -> None:
        d, f, args, kwargs = self.jobs.pop(0)
        try:
            result = f(*args, **kwargs)
        except Exception:
            d.errback()
        else:
            d.callback(result)


class SyncStoreThread:
    """``StoreThread``'s interface, running each job at once (for PolicyService)."""

    running = False

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False

    def run(self, f, *args, **kwargs) -> defer.Deferred:
        return run_now(f, *args, **kwargs)


class StaticSnapshots:
    """What the decider reads from the snapshot service: ``current`` and a reason."""

    def __init__(self, snapshot=None, reason: str = "no snapshot loaded yet: test") -> None:
        self.current = snapshot
        self.unavailable_reason = "" if snapshot is not None else reason


@contextmanager
def captured_events():
    """Every ``twisted.logger`` event emitted inside the block."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)
