"""systemd notifications (``policyd.systemd``): READY=1 once the MTA listeners accept,
STATUS=, WATCHDOG=1 from the reactor's clock, STOPPING=1; nothing without $NOTIFY_SOCKET.
A real datagram socket in a temporary directory stands in for systemd's."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock

from policyd.systemd import SystemdNotifier, notify_address, watchdog_interval

from .test_tap import _ManualThread, _PortReactor, build


@pytest.fixture
def systemd_socket(tmp_path):
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    yield str(path), receiver
    receiver.close()


def received(receiver) -> list[dict]:
    messages = []
    while True:
        try:
            data = receiver.recv(4096)
        except BlockingIOError:
            return messages
        messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


def test_addresses_and_watchdog_interval_from_the_environment():
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) == "\0abstract"
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
                             pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier(Clock(), {}, lambda: "x")
    notifier.startService()
    notifier.ready()
    assert not notifier.enabled and notifier.notify("READY=1") is False
    notifier.stopService()


def test_watchdog_status_and_stopping(systemd_socket):
    path, receiver = systemd_socket
    clock = Clock()
    notifier = SystemdNotifier(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"},
                               lambda: "serving")
    notifier.startService()
    assert received(receiver) == [{"WATCHDOG": "1"}]
    clock.advance(2.0)
    assert received(receiver) == [{"WATCHDOG": "1"}]
    notifier.ready()
    notifier.ready()  # once only
    (ready,) = received(receiver)
    assert ready["READY"] == "1" and ready["STATUS"] == "serving"
    clock.advance(SystemdNotifier.STATUS_INTERVAL)
    messages = received(receiver)
    assert {"STATUS": "serving"} in messages and {"WATCHDOG": "1"} in messages
    notifier.stopService()
    assert received(receiver) == [{"STOPPING": "1", "STATUS": "stopping"}]
    clock.advance(60)
    assert received(receiver) == []


def test_a_vanished_notify_socket_is_logged_once_not_raised(tmp_path):
    clock = Clock()
    notifier = SystemdNotifier(clock, {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"),
                                       "WATCHDOG_USEC": "1000000"}, lambda: "x")
    notifier.startService()
    clock.advance(2)
    assert notifier.notify("WATCHDOG=1") is False
    notifier.stopService()


@pytest.mark.parametrize("fail", [False, True])
def test_ready_once_the_mta_listeners_accept(tmp_path, systemd_socket, fail):
    """READY=1 comes when the listeners resume after the first snapshot attempt (loaded:
    the status names the version; failed: it says so), not at start."""
    path, receiver = systemd_socket
    service, reactor, backend = build(tmp_path, reactor=_PortReactor())
    service.notifier = SystemdNotifier(reactor, {"NOTIFY_SOCKET": path}, service.notify_status)
    service.listener_group.on_serving = service.notifier.ready
    thread = _ManualThread()
    service.store_thread = thread
    service.snapshots.run_in_thread = thread.run
    if fail:
        backend.fail = ConnectionError("refused")
    service.startService()
    try:
        assert received(receiver) == []
        thread.release()
        assert all(l.port.reading for l in service.listeners)
        (ready,) = received(receiver)
        assert ready["READY"] == "1"
        if fail:
            assert ready["STATUS"].startswith("no snapshot yet")
        else:
            assert ready["STATUS"].startswith(f"serving snapshot {backend.token} (3 lists)")
        reactor.advance(SystemdNotifier.STATUS_INTERVAL)
        (status,) = [m for m in received(receiver) if "STATUS" in m]
        assert "answers/s" in status["STATUS"]
    finally:
        service.stopService()
    assert {"STOPPING": "1", "STATUS": "stopping"} in received(receiver)


def test_make_service_reads_notify_socket_from_the_passed_environment(tmp_path):
    """Tests (a reactor passed) get no notifications whatever the environment says."""
    service, _, _ = build(tmp_path)
    assert not service.notifier.enabled
