"""The LISTEN thread (``policyd.change_listener``) with a fake connection: a socket pair
stands in for the database connection's socket, so the thread really waits in select().
It wakes the reactor once per burst of notifications, logs a lost connection once per
incident, reconnects, says so, and asks for a refresh once listening again."""

from __future__ import annotations

import os
import queue
import resource
import socket
import time

from policyd.change_listener import ChangeListener


class FakeReactor:
    """Records what the thread hands to the reactor."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):  # noqa: N802 (Twisted's name)
        self.calls.put((f, args, kwargs))


class FakeConnection:
    """psycopg2's ``fileno``/``poll``/``notifies``: each byte the peer sends is one
    notification; the peer closing is the server ending the session."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.notifies: list = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self) -> None:
        data = self.sock.recv(4096)
        if not data:
            raise ConnectionError("terminating connection due to administrator command")
        self.notifies.extend("policyd_changes" for _ in data)

    def close(self) -> None:
        self.sock.close()


def next_call(reactor: FakeReactor, timeout: float = 5.0):
    f, args, kwargs = reactor.calls.get(timeout=timeout)
    return getattr(f, "__name__", f), dict(kwargs, text=args[0] if args else "")


def test_notifications_reconnection_and_logging():
    reactor = FakeReactor()
    connections: list[FakeConnection] = []
    failures = [0]

    def connect():
        if failures[0]:
            failures[0] -= 1
            raise OSError("connection refused")
        connection = FakeConnection()
        connections.append(connection)
        return connection, connection.close

    changes = []
    listener = ChangeListener(reactor, connect, lambda: changes.append(1),
                              channel="policyd_changes")
    listener.RETRY = (0.01,)
    listener.SETTLE = 0.05
    listener.startService()
    try:
        assert next_call(reactor)[0] == "<lambda>"        # refresh: catch up
        name, fields = next_call(reactor)                 # once settled
        assert name == "info" and "listening on" in fields["text"]
        assert listener.status()["listening"] is True

        connections[0].peer.send(b"nnn")                  # three at once: one wake-up
        assert next_call(reactor)[0] == "<lambda>"
        assert listener.received == 3

        failures[0] = 3                                   # the server is gone a while
        connections[0].peer.close()
        name, fields = next_call(reactor)
        assert name == "warn" and "administrator command" in fields["error"]
        # Three failed reconnections log nothing more; then a refresh for what changed
        # meanwhile, and listening again.
        assert next_call(reactor)[0] == "<lambda>"
        name, fields = next_call(reactor)
        assert name == "info" and "listening again" in fields["text"]
        status = listener.status()
        assert status["listening"] is True and status["incidents"] == 1
        assert len(connections) == 2
        assert reactor.calls.empty()
    finally:
        listener.stopService()


class HighConnection(FakeConnection):
    """A connection whose descriptor is beyond select()'s FD_SETSIZE (1024), as a daemon
    holding a thousand MTA connections gets for a reconnection."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = os.dup2(self.sock.fileno(), fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)
        super().close()


def drain(reactor: FakeReactor) -> list:
    calls = []
    while not reactor.calls.empty():
        f, args, kwargs = reactor.calls.get_nowait()
        calls.append((getattr(f, "__name__", f), args[0] if args else ""))
    return calls


def test_a_connection_beyond_fd_setsize_listens():
    """The wait works whatever the descriptor's number: notifications arrive, and the
    thread does not reconnect in a loop (select() raised ValueError for it, taken for a
    lost connection, twice a second for ever)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1600, hard), hard))
    reactor = FakeReactor()
    made: list[HighConnection] = []

    def connect():
        connection = HighConnection(1500 + len(made))
        made.append(connection)
        return connection, connection.close

    listener = ChangeListener(reactor, connect, lambda: None, channel="policyd_changes")
    listener.RETRY = (0.01,)
    listener.SETTLE = 0.05
    listener.startService()
    try:
        time.sleep(0.2)
        made[0].peer.send(b"n")
        time.sleep(0.3)
        calls = drain(reactor)
        assert len(made) == 1 and listener.status()["incidents"] == 0, calls
        assert listener.received == 1 and listener.status()["listening"] is True
        assert [name for name, _ in calls] == ["<lambda>", "info", "<lambda>"], calls
    finally:
        listener.stopService()
    soft_now = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_now[0] != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_that_fail_at_once_are_one_incident_with_growing_pauses():
    """A server that ends every session as soon as it starts (a pooler refusing, a
    database in recovery): one warning for the incident, never "listening again", and
    the pauses between attempts grow as for refused connections, not a reconnection
    every RETRY[0]."""
    reactor = FakeReactor()
    made: list[FakeConnection] = []

    def connect():
        connection = FakeConnection()
        connection.peer.close()  # the session ends at once
        made.append(connection)
        return connection, connection.close

    listener = ChangeListener(reactor, connect, lambda: None, channel="policyd_changes")
    listener.RETRY = (0.01, 0.02, 0.04, 0.08, 0.5)
    listener.SETTLE = 0.05
    listener.startService()
    try:
        time.sleep(1.2)
    finally:
        listener.stopService()
    calls = drain(reactor)
    logged = [(name, text) for name, text in calls if name in ("info", "warn")]
    assert [name for name, _ in logged] == ["warn"], logged
    # 0.01 + 0.02 + 0.04 + 0.08 then every 0.5 s: a handful, not one per 0.01 s.
    assert 3 <= len(made) <= 8, len(made)
    assert listener.status()["incidents"] == 1


def test_a_settled_connection_lost_restarts_the_pauses():
    """A connection that had settled (after refused attempts had grown the pauses to the
    longest) and is then lost reconnects after RETRY[0]: whether it had settled was read
    after ``_lost()`` had marked it not listening, so the pauses never started again and
    the reconnection waited the longest one."""
    reactor = FakeReactor()
    made: list[tuple[float, FakeConnection]] = []
    refusals = [len(ChangeListener.RETRY) - 1]  # the next pause is the longest

    def connect():
        if refusals[0]:
            refusals[0] -= 1
            raise OSError("connection refused")
        connection = FakeConnection()
        made.append((time.monotonic(), connection))
        return connection, connection.close

    listener = ChangeListener(reactor, connect, lambda: None, channel="policyd_changes")
    listener.RETRY = (0.01, 0.02, 0.04, 0.08, 30.0)
    listener.SETTLE = 0.05
    listener.startService()
    try:
        deadline = time.monotonic() + 5
        while not listener.listening and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.listening and len(made) == 1
        lost_at = time.monotonic()
        made[0][1].peer.close()  # the server ends the settled session
        while len(made) < 2 and time.monotonic() < lost_at + 8:
            time.sleep(0.01)
        assert len(made) == 2, "no reconnection within 8 s (the longest pause is 30 s)"
        assert made[1][0] - lost_at < 5
    finally:
        listener.stopService()
