"""Fixtures for the real-process daemon tests: a run directory, ``policyctl``, the
``policyd`` console script as a child process, socket clients for both protocols, and a
TCP proxy the tests can cut to make a database unreachable.

Every process started here is stopped at the end of its test (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from policyd import control_client
from tests.requirements import require

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
LIST = "test@lists.example.com"
MEMBER = "alice@example.com"
NONMEMBER = "bob@example.net"
REFRESH = 0.3


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as error:  # the thing polled may not be up yet
            last_error = error
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def exim_line(lists: str, sender: str, from_header: str | None = None) -> bytes:
    words = ["POLICYD/1", f"list={lists}", f"sender={b64(sender)}"]
    if from_header is not None:
        words.append(f"from={b64(from_header)}")
    return " ".join(words).encode()


def connect_like_an_mta(s: socket.socket, address, timeout: float) -> None:
    """Connect as Exim's ``${readsocket}`` does, with a blocking connect under a timeout.

    Python's socket with a timeout is non-blocking inside, and a Unix socket's connect
    then fails at once with EAGAIN while the listen queue is full; a blocking connect
    (Exim's) waits for room instead.  So this one waits too, until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.002)


def exim_ask(address, data: bytes, *, half_close: bool = True, timeout: float = 5.0) -> bytes:
    """One Exim-style ${readsocket}: connect, write, half-close, read to EOF."""
    family = socket.AF_UNIX if isinstance(address, (str, Path)) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        connect_like_an_mta(s, str(address) if family == socket.AF_UNIX else address,
                            timeout)
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


class PostfixClient:
    """A persistent Postfix-style connection: one request at a time, like smtpd."""

    def __init__(self, address, timeout: float = 5.0) -> None:
        family = socket.AF_UNIX if isinstance(address, (str, Path)) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(address) if family == socket.AF_UNIX else address)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_answer(self) -> bytes:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        answer, _, self.buffer = self.buffer.partition(b"\n\n")
        return answer

    def ask(self, recipient: str, sender: str, state: str = "RCPT") -> bytes:
        self.send(postfix_request(recipient, sender, state))
        return self.read_answer()

    def close(self) -> None:
        self.sock.close()


def postfix_request(recipient: str, sender: str, state: str = "RCPT") -> bytes:
    attrs = [
        "request=smtpd_access_policy", f"protocol_state={state}", "protocol_name=ESMTP",
        "client_address=127.0.0.1", "client_name=localhost", "helo_name=client.example",
        f"sender={sender}", f"recipient={recipient}", "recipient_count=0", "queue_id=",
        "instance=1a2b.3c4d.5e6f.0", "size=0", "policy_context=",
    ]
    return ("\n".join(attrs) + "\n\n").encode()


class Run:
    """A run directory with a configuration file for one daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exim_port = free_port()
        self.postfix_port = free_port()
        self.config = path / "policyd.conf"
        self.control = path / "control.sock"
        self.exim_socket = path / "exim.sock"
        self.postfix_socket = path / "postfix.sock"

    def write_config(self, url: str | None = None, extra: str = "", *,
                     postfix_listen: str | None = None, exim_listen: str | None = None,
                     log_file: bool = False) -> Path:
        url = url or f"sqlite:///{self.path}/policyd.sqlite"
        exim_listen = exim_listen or (f"unix:{self.exim_socket}:mode=666 "
                                      f"tcp:{self.exim_port}:interface=127.0.0.1")
        postfix_listen = postfix_listen or (f"unix:{self.postfix_socket}:mode=666 "
                                            f"tcp:{self.postfix_port}:interface=127.0.0.1")
        self.config.write_text(
            "[store]\n"
            f"url = {url}\n"
            f"refresh_interval = {REFRESH}\n"
            "[daemon]\n"
            f"state_dir = {self.path}\n"
            f"control_socket = {self.control}\n"
            "control_socket_mode = 0600\n"
            "shutdown_grace = 5\n"
            + (f"log_file = {self.path}/policyd.log\n" if log_file else "")
            + "[exim]\n"
            f"listen = {exim_listen}\n"
            "timeout = 3\n"
            "[postfix]\n"
            f"listen = {postfix_listen}\n"
            + extra)
        return self.config

    def policyctl(self, *args: str, store: str | None = None, check: bool = True,
                  input: str | None = None) -> subprocess.CompletedProcess:
        command = [str(BIN / "policyctl"), "--config", str(self.config)]
        if store is not None:
            command += ["--store", store]
        done = subprocess.run(command + list(args), capture_output=True, text=True,
                              timeout=60, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"policyctl {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def fill(self, store: str | None = None) -> None:
        """The store: one list whose nonmembers are rejected, one member."""
        self.policyctl("init", store=store)
        self.policyctl("list", "add", LIST, "--default-nonmember-action", "reject",
                       store=store)
        self.policyctl("member", "add", LIST, MEMBER, store=store)


class Daemon:
    """``policyd --config PATH`` as a child process, its output in a file."""

    def __init__(self, run: Run, command: list[str] | None = None,
                 env: dict | None = None, launcher: str = "policyd") -> None:
        self.run = run
        self.output_path = run.path / "policyd.out"
        if command is None:
            command = ([str(BIN / "policyd")] if launcher == "policyd"
                       else [str(BIN / "twist"), "--log-format=text", "policyd"]
                       ) + ["--config", str(run.config)]
        self.command = command
        self.launcher = launcher
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self.output = open(self.output_path, "ab")
        self.proc = subprocess.Popen(self.command, stdout=self.output,
                                     stderr=subprocess.STDOUT, cwd=self.run.path,
                                     env=self.env)
        return self

    def text(self) -> str:
        log = self.run.path / "policyd.log"
        text = self.output_path.read_text(errors="replace")
        if log.exists():
            text += log.read_text(errors="replace")
        return text

    def status(self) -> dict:
        return control_client.status(self.run.control, timeout=2.0)

    def wait_ready(self, snapshot: bool = True, timeout: float = 30.0) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"policyd exited with {self.proc.returncode}:\n"
                                   f"{self.text()}")
            status = self.status()
            return status if (status.get("snapshot") or not snapshot) else None
        try:
            return wait_until(ready, timeout, "policyd to answer on its control socket")
        except AssertionError:
            raise AssertionError(f"policyd not ready; output:\n{self.text()}") from None

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"policyd ignored SIGTERM for {timeout:g} s:\n{self.text()}")

    def wait_exit(self, timeout: float) -> int:
        """The exit status, 0 for a clean stop after SIGTERM under either launcher: twist
        re-raises the signal that stopped it once the reactor has stopped cleanly
        (Twisted's ``Runner``), so its status is -15 by design."""
        status = self.proc.wait(timeout)
        return 0 if self.launcher == "twist" and status == -signal.SIGTERM else status

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if hasattr(self, "output"):
            self.output.close()


@pytest.fixture
def run():
    # Short paths: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    yield Run(path)
    if not os.environ.get("POLICYD_KEEP_RUN"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["policyd", "twist"])
def daemons(request):
    """Start daemons with ``daemons(run)``; all are stopped at the end of the test.

    Every test runs twice: under the ``policyd`` command and under ``twist policyd``,
    which share one construction path (``policyd.tap.makeService``)."""
    started: list[Daemon] = []

    def start(run: Run, **kwargs) -> Daemon:
        kwargs.setdefault("launcher", request.param)
        daemon = Daemon(run, **kwargs).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.cleanup()


# --- a TCP proxy the test can cut -----------------------------------------------------------


class TcpProxy:
    """127.0.0.1:port -> upstream, in threads.  ``stop()`` refuses new connections and
    cuts the open ones (the database is "unreachable"); ``start()`` brings it back on the
    same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.accepted = 0

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    server.close()
                    return
                self.accepted += 1
                self.connections.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --- PostgreSQL ------------------------------------------------------------------------------

PG = ("127.0.0.1", 5432)


def _pg_reachable() -> bool:
    try:
        socket.create_connection(PG, timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database (dropped afterwards); yields its name."""
    require(_pg_reachable(), "PostgreSQL is not reachable on 127.0.0.1:5432")
    import psycopg2

    name = f"policyd_daemon_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
