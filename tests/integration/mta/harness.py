"""Processes and sessions for the real-MTA tests: policyd, Exim, Postfix, a stand-in.

Every process is started here with its id kept, and stopped by that id (or process group
we created) in the fixtures' teardown, even when a test fails.  Nothing here asserts:
helpers return what the MTA said and the tests decide.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import re
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CONTRIB = REPO / "contrib"
HERE = Path(__file__).resolve().parent

LIST_DOMAIN = "lists.test.example"
USER_DOMAIN = "users.test.example"

# The users Exim's and Postfix's own processes run as: they open the configurations, the
# files those include, the spools and the policy sockets, never the checkout.
MTA_USERS = ("Debian-exim", "postfix")
# Where a run folder may go, in this order (POLICYD_MTA_RUN_PARENT comes first when set).
RUN_PARENTS = ("/tmp", "/var/tmp")


# --- small utilities ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM the process we started (or the process group it leads), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"{template}: placeholders left: {left}")
    return text


# --- the run folder: what Exim and Postfix must reach ----------------------------------------


def blocking_folder(path: Path, user: str) -> Path | None:
    """The first folder on the way to ``path`` (``/`` first, ``path`` itself last) that
    ``user`` may not enter by its mode bits, or None when all of them let it through."""
    account = pwd.getpwnam(user)
    if account.pw_uid == 0:
        return None
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    path = Path(os.path.abspath(path))
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        if info.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


def make_run_folder(parents=RUN_PARENTS, users=MTA_USERS, prefix="policyd-mta-") -> Path:
    """A new folder (mode 0755) for one session's configurations, sockets, spools and
    queues, under the first of ``parents`` that every one of ``users`` can enter and whose
    file system honours the setuid bit (the run's copy of Exim needs it).

    The checkout may live where those users cannot go (a 0700 home, ``mktemp -d``), so
    nothing they open may stay under it.  When no parent fits, the error names each
    folder and the user it shuts out."""
    refused = []
    for parent in parents:
        parent = Path(parent).resolve()
        if not parent.is_dir():
            refused.append(f"{parent} is not a folder")
            continue
        if os.statvfs(parent).f_flag & os.ST_NOSUID:
            refused.append(f"{parent} is mounted nosuid (the run's Exim binary is setuid root)")
            continue
        blocked = [(user, folder) for user in users
                   if (folder := blocking_folder(parent, user)) is not None]
        if blocked:
            refused.extend(f"user {user} cannot enter {folder} (on the way to {parent})"
                           for user, folder in blocked)
            continue
        run = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        run.chmod(0o755)
        return run
    raise RuntimeError(
        "no folder for the real-MTA tests' run files that Exim and Postfix can reach: "
        + "; ".join(refused)
        + ". Set POLICYD_MTA_RUN_PARENT to a folder that "
        + " and ".join(users) + " can enter.")


# Debian's Exim has TRUSTED_CONFIG_LIST=/etc/exim4/trusted_configs compiled in: an Exim
# started with -C on a configuration listed there keeps its privileges for delivery.
TRUSTED_CONFIGS = Path("/etc/exim4/trusted_configs")


def trust_exim_config(conf: Path, trusted: bool = True,
                      listing: Path = TRUSTED_CONFIGS) -> None:
    """List ``conf`` in Exim's trusted configurations (or take it out again).

    Concurrent sessions edit the list under a lock on its folder and replace it whole
    (Exim never reads half a file); entries of earlier runs whose run folder is gone are
    dropped on the way."""
    folder = os.open(listing.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        lines = listing.read_text(encoding="utf-8").splitlines() if listing.exists() else []
        kept = [line for line in lines
                if line != str(conf)
                and not ("/policyd-mta-" in line and not Path(line).parent.exists())]
        if trusted:
            kept.append(str(conf))
        tmp = listing.with_name(listing.name + f".{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.chmod(0o644)           # Exim ignores a list that others may write
        os.replace(tmp, listing)
    finally:
        os.close(folder)


# --- messages and SMTP sessions -----------------------------------------------------------


@dataclass
class Message:
    """One SMTP transaction: envelope, headers, and a unique tag in Subject and body."""

    sender: str
    recipients: list[str]
    headers: list[str] = field(default_factory=list)
    tag: str = ""
    body: str = ""  # more body lines after the tag line

    def __post_init__(self) -> None:
        if not self.tag:
            Message._n = getattr(Message, "_n", 0) + 1
            self.tag = f"policyd-test-{os.getpid()}-{Message._n}-{time.monotonic_ns()}"

    def data(self) -> str:
        lines = list(self.headers) + [f"Subject: {self.tag}", f"Message-ID: <{self.tag}@test>",
                                      "", f"tag {self.tag}"]
        if self.body:
            lines += self.body.split("\n")
        return "\r\n".join(lines + [""])


@dataclass
class Result:
    """What the client saw: the MAIL reply, one reply per RCPT, the DATA reply (or None
    when no recipient was accepted)."""

    mail: tuple[int, str]
    rcpt: list[tuple[int, str]]
    data: tuple[int, str] | None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def _one_line(text: str) -> str:
    """A multi-line reply as one line: the lines joined, the enhanced status code that
    RFC 2034 repeats on every line kept only once."""
    lines = text.splitlines() or [""]
    first = _STATUS.match(lines[0])
    rest = [line[first.end():] if first and line.startswith(first.group(0)) else line
            for line in lines[1:]]
    return " ".join(" ".join([lines[0], *rest]).split())


def smtp_send(port: int, message: Message, timeout: float = 60.0) -> Result:
    """Drive a real SMTP server with smtplib, like any client would."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example",
                      timeout=timeout) as client:
        client.ehlo()
        code, text = client.mail(message.sender)
        mail = (code, _one_line(text.decode()))
        rcpts = []
        for recipient in message.recipients:
            code, text = client.rcpt(recipient)
            rcpts.append((code, _one_line(text.decode())))
        data = None
        if any(code // 100 == 2 for code, _ in rcpts):
            code, text = client.data(message.data())
            data = (code, _one_line(text.decode()))
        else:
            client.rset()
    return Result(mail, rcpts, data)


_REPLY = re.compile(r"^(\d{3})([ -])(.*?)\r?$")


class EximOutputError(AssertionError):
    """Exim's output has not got the replies a session needs: it failed before or during
    the session (a configuration it could not read, a crash).  The message carries what
    Exim printed and its exit status."""


def parse_bh(stdout: str, message: Message, stderr: str = "",
             status: int | None = None) -> Result:
    """Split the output of ``exim -bh`` into the replies to MAIL, each RCPT and DATA.

    Raises ``EximOutputError`` with Exim's own output (``stdout``, the end of ``stderr``)
    and exit ``status`` when that output has not got those replies."""
    replies = []
    text: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("**** "):
            continue
        match = _REPLY.match(line)
        if not match:
            continue
        text.append(match.group(3))
        if match.group(2) == " ":
            replies.append((int(match.group(1)), _one_line("\n".join(text))))
            text = []
    # 220 banner, EHLO, MAIL, RCPT..., then 354 + DATA reply or a 503 (no valid RCPT).
    wanted = 3 + len(message.recipients)
    problem = None
    if len(replies) < wanted or replies[0][0] != 220:
        problem = (f"expected the banner (220) and replies to EHLO, MAIL and "
                   f"{len(message.recipients)} RCPT, found {len(replies)} replies")
    else:
        mail = replies[2]
        rcpts = replies[3:wanted]
        rest = replies[wanted:]
        if rest and rest[0][0] == 354:
            if len(rest) < 2:
                problem = "found 354 after DATA but no reply to the message"
            else:
                return Result(mail, rcpts, rest[1])
        elif any(code // 100 == 2 for code, _ in rcpts) and not rest:
            problem = "a recipient was accepted but DATA got no reply"
        else:
            return Result(mail, rcpts, None)
    raise EximOutputError(
        f"cannot read the SMTP replies in the output of exim -bh: {problem}.\n"
        f"exit status: {status}\n"
        f"--- stdout ---\n{stdout.rstrip()}\n"
        f"--- stderr (last 4000 characters) ---\n{stderr[-4000:].rstrip()}")


# --- maildirs -----------------------------------------------------------------------------


def find_in_maildir(directory: Path, tag: str) -> Path | None:
    new = directory / "new"
    if not new.is_dir():
        return None
    for path in new.iterdir():
        try:
            if tag in path.read_text(errors="replace"):
                return path
        except FileNotFoundError:
            continue
    return None


def wait_delivered(directory: Path, tag: str, timeout: float = 10.0) -> Path:
    return wait_until(lambda: find_in_maildir(directory, tag), timeout,
                      f"message {tag} in {directory}")


# --- a stand-in for policyd on its sockets (only for answers policyd never gives) -----------


class StandIn:
    """A socket server that answers what a test tells it to, bound at policyd's socket
    paths while policyd is stopped.

    ``answer(line)`` returns the bytes to send for one Exim request line, ``None`` to hang
    up without answering, or a float to sleep that long first (then answer ACCEPT).
    The Postfix listener answers every request with ``postfix_reply`` (bytes, sent as is).
    """

    def __init__(self, exim_path: Path, postfix_path: Path) -> None:
        self.exim_path = exim_path
        self.postfix_path = postfix_path
        self.answer = lambda line: b"ACCEPT 250 2.1.5 stand-in"
        self.postfix_reply = b"action=DUNNO\n\n"
        self.requests: list[bytes] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "StandIn":
        for path, handler in ((self.exim_path, self._exim), (self.postfix_path, self._postfix)):
            if path.exists() or path.is_symlink():
                path.unlink()
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.chmod(path, 0o666)
            server.listen(16)
            server.settimeout(0.1)
            self._sockets.append(server)
            thread = threading.Thread(target=self._accept, args=(server, handler), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for server in self._sockets:
            server.close()
        for path in (self.exim_path, self.postfix_path):
            if path.exists():
                path.unlink()

    def _accept(self, server, handler) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn, handler), daemon=True).start()

    def _serve(self, conn, handler) -> None:
        try:
            with conn:
                conn.settimeout(30)
                handler(conn)
        except OSError:
            pass

    def _exim(self, conn) -> None:
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\n", 1)[0]
        self.requests.append(line)
        answer = self.answer(line)
        if isinstance(answer, float):
            self._stop.wait(answer)
            answer = b"ACCEPT 250 2.1.5 stand-in (late)"
        if answer is not None:
            conn.sendall(answer)

    def _postfix(self, conn) -> None:
        buffer = b""
        while not self._stop.is_set():
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffer += chunk
            while b"\n\n" in buffer:
                request, buffer = buffer.split(b"\n\n", 1)
                self.requests.append(request)
                conn.sendall(self.postfix_reply)


def is_data_request(line: bytes) -> bool:
    """The DATA question carries the headers; the RCPT question has list and sender only."""
    return b" headers=" in line
