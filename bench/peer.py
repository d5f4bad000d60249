"""A real peer on the same job: postfwd on the membership job (issue 14, benchmark helper).

The job: 100 lists of 1,000 members each; a Postfix RCPT request from a member of the
list is let through (``DUNNO``), anybody else rejected.  policyd does it from its store in
``[postfix] mode = envelope`` (every list's nonmember action ``reject``, no patterns, no
bans, no moderation: nothing but the membership); postfwd from rule files written here.

postfwd is Debian's ``postfwd`` package (``postfwd1``, one process, and ``postfwd2``,
pre-forking).  ``ensure_postfwd()`` installs it with apt-get when we are root and it is
missing; otherwise the figure is skipped with the reason (never faked).  The rule sets
(``RULESETS``), each tried with both programs, the best measured one reported:

* ``file``: per list, a rule accepting ``recipient==<list>`` with
  ``sender==file:<members of the list>`` (postfwd's list files: a case-insensitive exact
  match against the file's lines), then a rule rejecting the rest of that list's mail;
* ``regex``: per list, the same with one anchored regex over the list's members
  (``sender=^(?:a|b|...)$``, postfwd's default PCRE match for ``sender``: Perl compiles the alternation of literals into a trie);
* ``jump-file``, ``jump-regex``: a first pass of one rule per list that only compares
  the recipient and ``jump()``s to that list's ``file`` or ``regex`` rule (postfwd
  evaluates every item of a rule, so without the jump each request pays for every list's
  member check; with it, for its own list's only).
  Every rule carries at least one item: postfwd 1.35 spins for minutes loading a rule
  that has none.

All listen on 127.0.0.1 (TCP: postfwd has no Unix socket listener in ``postfwd1``; policyd
is measured on TCP too), the request cache off (``-c 0``: every request decided, as
policyd decides every request), no DNS, no logging.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .dataset import Dataset

LISTS = 100
MEMBERS = 1000
RULESETS = ("file", "regex", "jump-file", "jump-regex")
PROGRAMS = ("postfwd1", "postfwd2")


@dataclass(frozen=True)
class MembershipJob(Dataset):
    """100 lists x 1,000 members (uniform), addresses shared between lists."""

    lists: int = LISTS
    memberships: int = LISTS * MEMBERS
    addresses: int = 60_000

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return (MEMBERS,) * self.lists

    def members(self, i: int) -> list[str]:
        return [self.email(self.member_address_id(i, k)) for k in range(MEMBERS)]


def ensure_postfwd(log=print) -> dict | str:
    """``{"postfwd1": path, "postfwd2": path}`` (those present), or why not (a string)."""
    def present():
        return {name: path for name in PROGRAMS
                if (path := shutil.which(name) or (f"/usr/sbin/{name}"
                                                   if os.path.exists(f"/usr/sbin/{name}")
                                                   else None))}

    found = present()
    if found:
        return found
    if os.geteuid() != 0:
        return "postfwd is not installed and we are not root (apt-get install postfwd)"
    if shutil.which("apt-get") is None:
        return "postfwd is not installed and there is no apt-get here"
    log("bench: installing postfwd with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "postfwd"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", b"") or b""
        return f"apt-get install postfwd failed: {detail.decode(errors='replace')[-300:]}"
    return present() or "apt-get installed postfwd but no postfwd1/postfwd2 is on PATH"


def make_store(url: str, job: MembershipJob, log=print) -> None:
    """The job's store for policyd: the bench dataset's rows, reduced to membership."""
    from sqlalchemy import create_engine, text

    from .dataset import populate

    populate(url, job, log=log)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE lists SET default_nonmember_action = 1, "
                                "emergency = 0, mode = 'mailman3'"))
        connection.execute(text("UPDATE memberships SET moderation_action = NULL"))
        connection.execute(text("DELETE FROM nonmember_patterns"))
        connection.execute(text("DELETE FROM bans"))
        connection.execute(text("UPDATE store_state SET generation = generation + 1 "
                                "WHERE id = 1"))
    engine.dispose()


def write_requests(path: Path, job: MembershipJob, count: int, seed: int = 14) -> dict:
    """Postfix RCPT requests: half from a member of the list, half from outsiders."""
    import random

    from .mix import POSTFIX_TEMPLATE

    rng = random.Random(seed)
    kinds = {"member": 0, "nonmember": 0}
    with open(path, "w") as out:
        for n in range(count):
            i = rng.randrange(job.lists)
            if rng.random() < 0.5:
                sender = job.email(job.member_address_id(i, rng.randrange(MEMBERS)))
                kinds["member"] += 1
            else:
                sender = f"visitor{rng.randrange(10**6)}@outside{n % 313}.example"
                kinds["nonmember"] += 1
            octet = rng.randrange(1, 255)
            out.write(POSTFIX_TEMPLATE.format(
                ip=f"198.51.100.{octet}", client=f"mx{octet}.example",
                port=rng.randrange(1024, 65535), sender=sender,
                recipient=job.posting_address(i), count=0,
                instance=f"{rng.randrange(16**8):08x}.0", size=0, tls="", cipher="",
                bits=0))
    return kinds


def write_rules(directory: Path, job: MembershipJob, ruleset: str) -> Path:
    """postfwd's rule file for ``ruleset`` (and its member files); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    if ruleset.startswith("jump-"):
        for i in range(job.lists):
            lines.append(f"id=D{i:03d}; recipient=={job.posting_address(i)}; "
                         f"action=jump(M{i:03d})")
        lines.append("id=NOLIST; protocol_state==RCPT; action=DUNNO")
    for i in range(job.lists):
        recipient = job.posting_address(i)
        if ruleset.endswith("file"):
            members = directory / f"members-{i:03d}"
            members.write_text("\n".join(job.members(i)) + "\n")
            accept = f"sender==file:{members}"
        else:
            accept = "sender=^(?:" + "|".join(re.escape(m) for m in job.members(i)) + ")$"
        lines.append(f"id=M{i:03d}; recipient=={recipient}; {accept}; action=DUNNO")
        lines.append(f"id=R{i:03d}; recipient=={recipient}; action=REJECT not a member")
    path = directory / f"rules-{ruleset}.cf"
    path.write_text("\n".join(lines) + "\n")
    return path


class Postfwd:
    """One postfwd (``postfwd1`` or ``postfwd2``) on 127.0.0.1:``port``, pinned to
    ``cpu``.  postfwd only serves as a daemon (``-d``: Net::Server forks into the
    background in a session of its own); it is found by its pid file and stopped with its
    whole process group (the pre-forked children and postfwd2's cache process)."""

    def __init__(self, program: str, rules: Path, port: int, workdir: Path, cpu: str) -> None:
        self.program = program
        self.port = port
        name = Path(program).name
        self.pidfile = workdir / f"{name}.pid"
        self.pidfile.unlink(missing_ok=True)
        self.pid: int | None = None
        cmd = ["taskset", "-c", cpu, program, "-d", "-f", str(rules),
               "--interface", "127.0.0.1", "--port", str(port), "--nodns", "-c", "0",
               "--perfmon", "--pidfile", str(self.pidfile)]
        if name == "postfwd2":
            cmd += ["--cache_socket", f"unix::{workdir / 'postfwd2-cache.sock'}",
                    "--no_parent_cache", "--min_servers", "12", "--max_servers", "40",
                    "--min_spare_servers", "4", "--max_spare_servers", "20"]
        if os.geteuid() == 0:
            cmd += ["--user", "nobody", "--group", "nogroup"]
        self.log = workdir / f"{name}.out"
        with open(self.log, "w") as out:
            started = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"{program} exited with {started.returncode}: "
                               f"{self.log.read_text()[-500:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid is None and self.pidfile.exists():
                text = self.pidfile.read_text().strip()
                if text.isdigit():
                    self.pid = int(text)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                              b"sender=a@b.example\nrecipient=c@d.example\n\n")
                    s.settimeout(5)
                    if s.recv(100).startswith(b"action=") and self.pid is not None:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.program} did not answer on 127.0.0.1:{self.port}: "
                           f"{self.log.read_text()[-300:]}")

    def stop(self) -> None:
        if self.pid is None and self.pidfile.exists():
            text = self.pidfile.read_text().strip()
            self.pid = int(text) if text.isdigit() else None
        if self.pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
