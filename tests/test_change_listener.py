"""The LISTEN thread (``policyd.change_listener``) with a fake connection: a socket pair
stands in for the database connection's socket, so the thread really waits in select().
It wakes the reactor once per burst of notifications, logs a lost connection once per
incident, reconnects, says so, and asks for a refresh once listening again."""

from __future__ import annotations

import queue
import socket

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
    listener.startService()
    try:
        name, fields = next_call(reactor)
        assert name == "info" and "listening on" in fields["text"]
        assert next_call(reactor)[0] == "<lambda>"        # refresh: catch up
        assert listener.status()["listening"] is True

        connections[0].peer.send(b"nnn")                  # three at once: one wake-up
        assert next_call(reactor)[0] == "<lambda>"
        assert listener.received == 3

        failures[0] = 3                                   # the server is gone a while
        connections[0].peer.close()
        name, fields = next_call(reactor)
        assert name == "warn" and "administrator command" in fields["error"]
        # Three failed reconnections log nothing more; then listening again, and a
        # refresh for what changed meanwhile.
        name, fields = next_call(reactor)
        assert name == "info" and "listening again" in fields["text"]
        assert next_call(reactor)[0] == "<lambda>"
        status = listener.status()
        assert status["listening"] is True and status["incidents"] == 1
        assert len(connections) == 2
        assert reactor.calls.empty()
    finally:
        listener.stopService()
