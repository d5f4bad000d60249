"""Issue 15 on the real process: the Prometheus endpoint scraped from a running daemon
(both launchers), and socket activation as systemd does it, with ``Type=notify``
messages recorded on a fake ``$NOTIFY_SOCKET``.

systemd's socket unit holds the listening socket across service restarts; here the test
holds it (bound and listening, like the ``.socket`` unit) and passes it through
``systemd-socket-activate`` (which hands on the descriptors it is given, LISTEN_FDS), so
three runs of policyd in a row serve the same socket, and a connection made while
policyd is stopped waits in its backlog for the next run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.requirements import require

from .. import fresh_page
from .conftest import (
    BIN,
    LIST,
    MEMBER,
    NONMEMBER,
    PostfixClient,
    exim_ask,
    exim_line,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration

REJECT = (b"REJECT 550 5.7.1 Posting to test@lists.example.com is restricted to its "
          b"members; your message was not accepted")


def scrape(port: int) -> dict:
    fresh_page()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        body = reply.read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels):
    for sample_labels, sample_value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return sample_value
    return None


def test_metrics_endpoint_of_a_running_daemon(run, daemons):
    """``[metrics] listen``: a scrape after answers on both protocols shows them by
    protocol, verdict and rule, the latency histograms, the snapshot and the store."""
    port = free_port()
    run.write_config(extra=f"[metrics]\nlisten = tcp:{port}:interface=127.0.0.1\n")
    run.fill()
    daemon = daemons(run)
    daemon.wait_ready()
    assert exim_ask(run.exim_socket, exim_line(LIST, NONMEMBER)) == REJECT
    client = PostfixClient(run.postfix_socket)
    try:
        client.ask(LIST, "")
        client.ask(LIST, MEMBER)
    finally:
        client.close()
    samples = scrape(port)
    assert value(samples, "policyd_decisions_total", protocol="exim", verdict="reject",
                 rule="nonmember-moderation") == 1
    assert value(samples, "policyd_decisions_total", protocol="postfix", verdict="reject",
                 rule="null-sender") == 1
    assert value(samples, "policyd_answers_total", protocol="postfix", answer="DUNNO") == 1
    assert value(samples, "policyd_decision_duration_seconds_count", protocol="postfix") == 2
    assert value(samples, "policyd_decision_duration_seconds_bucket", protocol="exim",
                 le="+Inf") == 1
    assert value(samples, "policyd_snapshot_loaded") == 1
    assert value(samples, "policyd_snapshot_lists") == 1
    assert value(samples, "policyd_snapshot_memberships") == 1
    assert value(samples, "policyd_snapshot_age_seconds") >= 0
    assert value(samples, "policyd_snapshot_build_duration_seconds") >= 0
    assert value(samples, "policyd_store_healthy") == 1
    assert value(samples, "policyd_store_refresh_failures_total") == 0
    assert len(samples["policyd_snapshot_info"]) == 1
    assert value(samples, "policyd_listener_connections", kind="postfix") == 0
    assert value(samples, "policyd_listener_refused_connections_total", kind="exim") == 0
    assert value(samples, "process_open_fds") > 0


# --- systemd ------------------------------------------------------------------------------


class NotifySocket:
    """A fake ``$NOTIFY_SOCKET``: records every datagram as a dict of its lines."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict] = []

    def read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return
            self.messages.append(dict(line.split("=", 1)
                                      for line in data.decode().split("\n") if line))
            self.sock.settimeout(0.0)

    def wait_for(self, key: str, timeout: float = 30.0) -> dict:
        def found():
            self.read()
            self.sock.settimeout(0.2)
            return next((m for m in self.messages if key in m), None)
        return wait_until(found, timeout, f"{key} on the notify socket")

    def take(self) -> list[dict]:
        self.read()
        self.sock.settimeout(0.2)
        messages, self.messages = self.messages, []
        return messages

    def close(self) -> None:
        self.sock.close()


# Run argv[2:] as the holder of descriptor argv[1] moved to 3, as systemd runs a service
# whose socket unit passes one socket (LISTEN_PID is this pid: exec keeps it).
PASS_SOCKET = """\
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="exim")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _activate_tool() -> str:
    path = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
    require(os.access(path, os.X_OK),
            "systemd-socket-activate (Debian package systemd) is not installed")
    return path


def test_socket_activation_notify_and_restarts_keep_the_socket(run):
    """Under ``systemd-socket-activate`` with a fake NOTIFY_SOCKET and WATCHDOG_USEC, three
    runs in a row (a start, then two restarts): each sends READY=1 with a status naming
    the snapshot once it serves, WATCHDOG=1 pings, STOPPING=1 on SIGTERM; the socket
    systemd passed keeps its path, inode and mode through every stop (Twisted would
    unlink it and chmod it 0666), and a connection made while policyd is stopped is
    answered by the next run."""
    activate = _activate_tool()
    exim_path = run.path / "exim.sock"
    run.write_config(exim_listen="systemd:domain=UNIX:name=exim",
                     postfix_listen=f"tcp:{run.postfix_port}:interface=127.0.0.1")
    run.fill()
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # the socket unit
    holder.bind(str(exim_path))
    os.chmod(exim_path, 0o660)
    holder.listen(64)
    inode = os.stat(exim_path).st_ino
    notify = NotifySocket(run.path / "notify.sock")
    fd = holder.fileno()
    # systemd-socket-activate passes on only what -E names: the daemon runs the same code.
    passed_environment = [f"-E{name}={os.environ[name]}" for name in ("PYTHONPATH",)
                          if name in os.environ]
    output = open(run.path / "activate.out", "ab")
    waiting: list = []
    try:
        for attempt in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-c", PASS_SOCKET, str(fd),
                 activate, "--fdname=exim", *passed_environment, "-E",
                 f"NOTIFY_SOCKET={notify.path}", "-E", "WATCHDOG_USEC=600000",
                 str(BIN / "policyd"), "--config", str(run.config)],
                pass_fds=(fd,), stdout=output, stderr=subprocess.STDOUT, cwd=run.path,
                start_new_session=True)
            try:
                if waiting:
                    # The connection made while stopped: answered by this run.
                    waiting.pop().join(30)
                    assert answers == [REJECT], answers
                else:
                    # systemd-socket-activate starts policyd at the first connection.
                    assert exim_ask(exim_path, exim_line(LIST, NONMEMBER), timeout=30) == \
                        REJECT
                ready = notify.wait_for("READY")
                assert ready["READY"] == "1"
                assert ready["STATUS"].startswith("serving snapshot "), ready
                assert ready["MAINPID"] == str(proc.pid)
                wait_until(lambda: sum("WATCHDOG" in m for m in notify.take()) >= 2
                           or None, 10, "two WATCHDOG=1")
                assert exim_ask(exim_path, exim_line(LIST, MEMBER)) == \
                    b"ACCEPT 250 2.1.5 accept"
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            assert any(m.get("STOPPING") == "1" for m in notify.take())
            info = os.stat(exim_path)
            assert info.st_ino == inode, f"run {attempt + 1} removed the socket systemd passed"
            assert info.st_mode & 0o777 == 0o660, oct(info.st_mode)
            if attempt < 2:
                answers: list = []
                thread = threading.Thread(target=lambda: answers.append(exim_ask(
                    exim_path, exim_line(LIST, NONMEMBER), timeout=60)), daemon=True)
                thread.start()
                time.sleep(0.2)
                waiting.append(thread)
    finally:
        output.close()
        notify.close()
        holder.close()
    log = (run.path / "activate.out").read_text(errors="replace")
    assert log.count("Received 1 descriptors via the environment") == 3, log
