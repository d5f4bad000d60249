"""Every command the documentation shows with its output (issue 18) is run, and its output
compared with what the page shows.

An example is a fenced block in README.md or docs/*.md whose lines start with ``$ ``:
each such line is a command (a trailing ``\\`` continues it on the next line), the lines
up to the next command its output (standard output and standard error, as a terminal
shows them).  A line ``...`` in an output stands for the rest of it; ``(exit status N)``
at the end of an output line is the command's exit status, checked, not printed.

The examples of one page run in order in one temporary directory, as one session: the
store ``policyctl init`` creates at ``/tmp/ex/policyd.sqlite`` is in that directory, and
``--store ...`` names it.  Files an example reads but the page does not show are in
``FILES``.  Commands run in ``bash`` with the virtualenv's ``policyctl`` and ``policyd``
first on ``PATH`` and no configuration file, so they touch nothing outside the
directory.

What differs from run to run is normalised on both sides: the temporary directory,
snapshot versions and ages, times, process ids, the policyd version and the store's
schema revision (the newest migration).

An example that asks the daemon ``make run`` starts is marked on the line before its
fence with ``<!-- example: the demo daemon (make run) -->``: it runs in a directory where
``python -m policyd.demo --state-dir state`` wrote ``state/`` and ``policyd --config
state/policyd.conf`` runs (started once for the module, stopped after it).  Where
``socat`` is not installed, the ``socat - UNIX-CONNECT:PATH`` of those examples is a
few lines of Python doing the same (``SOCAT``: send standard input, half-close, print
the answer).

An example that cannot run offline (an MTA, ``curl`` of the metrics endpoint of a daemon
that has answered given queries) is marked in the page the same way::

    <!-- example: not run offline (needs a running daemon with its metrics endpoint) -->

The test lists those (``-rs`` shows them) and checks the rest; it fails if fewer than
``MIN_COMMANDS`` commands ran, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.requirements import require

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md")])
BIN = Path(sys.executable).parent
MIN_COMMANDS = 18
SKIP = re.compile(r"<!--\s*example:\s*not run offline\s*\((?P<why>[^)]*)\)\s*-->")
DEMO = re.compile(r"<!--\s*example:\s*the demo daemon \(make run\)\s*-->")
FENCE = re.compile(r"^(?P<fence>```|~~~)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.S | re.M)
EXIT = re.compile(r"\s+\(exit status (?P<code>\d+)\)$")

# Files an example reads that its page does not show.
FILES = {
    "docs/configuration.md": {
        # The three mistakes of the --check-config example, and a systemd listener.
        "a.conf": "[daemon]\ncontrol_socket = /tmp/control.sock\n\n"
                  "[exim]\nlisten = systemd:domain=UNIX:name=exim tcp:99999\n\n"
                  "[postfix]\nlisten = tcp:10040:interface=127.0.0.1\n\n"
                  "[smtp]\nreject_text = Posting to {lst} refused\n\n"
                  "[store]\nurl = notaurl\n",
    },
}


@dataclass
class Command:
    line: int
    text: str
    expected: list[str] = field(default_factory=list)
    exit_code: int | None = None


@dataclass
class Example:
    page: str
    line: int
    commands: list[Command]
    skip: str | None = None
    demo: bool = False


def examples(page: Path) -> list[Example]:
    """The console examples of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        body = match.group("body").splitlines()
        if not any(line.startswith("$ ") for line in body):
            continue
        start = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        commands: list[Command] = []
        continued = False
        for offset, line in enumerate(body, start=start + 1):
            if continued:
                commands[-1].text += "\n" + line
                continued = line.endswith("\\")
            elif line.startswith("$ "):
                commands.append(Command(offset, line[2:]))
                continued = line.endswith("\\")
            elif commands:
                status = EXIT.search(line)
                if status:
                    commands[-1].exit_code = int(status.group("code"))
                    line = line[:status.start()]
                commands[-1].expected.append(line)
        found.append(Example(str(page.relative_to(ROOT)), start, commands,
                             skip.group("why") if skip else None,
                             DEMO.search(before) is not None))
    return found


ALL = [example for page in PAGES for example in examples(page)]
RUN = [example for example in ALL if example.skip is None]


def normalise(text: str, workdir: Path) -> list[str]:
    text = text.replace(str(workdir), "/tmp/ex")
    text = re.sub(r"\bversion \d+\.[0-9a-f]{12}", "version <v>", text)
    text = re.sub(r"\bsnapshot \d+\.[0-9a-f]{12}", "snapshot <v>", text)
    text = re.sub(r"\bage \d+(\.\d+)? s\b", "age <t> s", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", "<time>", text)
    text = re.sub(r"\bpid \d+", "pid <pid>", text)
    text = re.sub(r"\bschema rev \w+", "schema rev <rev>", text)  # the newest migration
    text = re.sub(r"\bpolicyd \d+\.\d+(\.\d+)?\S*", "policyd <version>", text)
    return [line.rstrip() for line in text.rstrip("\n").split("\n")] if text else []


def prepare(text: str, workdir: Path) -> str:
    """A command as the page shows it, made to run in ``workdir``."""
    store = f"sqlite:///{workdir}/policyd.sqlite"
    text = text.replace("sqlite:////tmp/ex/policyd.sqlite", store)
    return text.replace("--store ...", f"--store {shlex.quote(store)}")


def matches(expected: list[str], actual: list[str]) -> bool:
    if "..." in expected:
        head = expected[:expected.index("...")]
        return actual[:len(head)] == head
    return actual == expected


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One working directory per page, with its ``FILES``; the examples of a page run
    in order in it."""
    made = {}

    def session(page: str) -> Path:
        if page not in made:
            workdir = tmp_path_factory.mktemp(Path(page).stem)
            for name, content in FILES.get(page, {}).items():
                (workdir / name).write_text(content, encoding="utf-8")
            made[page] = workdir
        return made[page]
    return session


SOCAT = f"""#!{sys.executable}
import socket, sys
assert sys.argv[1] == "-" and sys.argv[2].startswith("UNIX-CONNECT:"), sys.argv
peer = socket.socket(socket.AF_UNIX)
peer.connect(sys.argv[2][len("UNIX-CONNECT:"):])
peer.sendall(sys.stdin.buffer.read())
peer.shutdown(socket.SHUT_WR)
while data := peer.recv(65536):
    sys.stdout.buffer.write(data)
"""


def environment(workdir: Path) -> dict:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    if shutil.which("socat") is None:
        shim = workdir / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "socat").write_text(SOCAT, encoding="utf-8")
        (shim / "socat").chmod(0o755)
        path = f"{shim}{os.pathsep}{path}"
    return {"PATH": path, "HOME": str(workdir), "LANG": "C.UTF-8",
            "POLICYD_CONFIG": "/nonexistent", "TZ": "UTC"}


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory):
    """A directory with ``state/`` as ``make run`` makes it and its daemon running."""
    workdir = tmp_path_factory.mktemp("demo")
    env = environment(workdir)
    subprocess.run([sys.executable, "-m", "policyd.demo", "--state-dir", "state"],
                   cwd=workdir, env=env, check=True, capture_output=True, timeout=120)
    log = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen([str(BIN / "policyd"), "--config", "state/policyd.conf"],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # against hanging only
        while time.monotonic() < deadline:
            # Answering status is not enough: the examples' answers need the snapshot,
            # whose first load takes a while on a busy machine (an Exim question asked
            # before it waited longer than socat's half second and printed nothing).
            probe = subprocess.run([str(BIN / "policyctl"), "--config", "state/policyd.conf",
                                    "status", "--json"], cwd=workdir, env=env,
                                   capture_output=True)
            if probe.returncode == 0 and json.loads(probe.stdout).get("snapshot"):
                break
            assert daemon.poll() is None, (workdir / "daemon.log").read_text()
            time.sleep(0.2)
        else:
            pytest.fail("the demo daemon did not answer policyctl status")
        yield workdir
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


@pytest.mark.parametrize("example", ALL, ids=[f"{e.page}:{e.line}" for e in ALL])
def test_example_output(example, sessions, request):
    """The example's commands, run in the page's session (or beside the demo daemon),
    print what the page shows (normalised) and exit with the status it shows."""
    if example.skip is not None:
        # Nothing may be skipped in CI: an example marked not runnable fails there.
        require(False, f"{example.page}:{example.line} not run offline: {example.skip}")
    if example.demo:
        workdir = request.getfixturevalue("demo_daemon")
    else:
        workdir = sessions(example.page)
    env = environment(workdir)
    previous = 0
    for command in example.commands:
        script = prepare(command.text, workdir)
        if command.text.strip() == "echo $?":
            script = f"echo {previous}"
        proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=120)
        previous = proc.returncode
        actual = normalise(proc.stdout + proc.stderr, workdir)
        expected = normalise("\n".join(command.expected), workdir)
        assert matches(expected, actual), (
            f"{example.page}:{command.line}: $ {command.text}\n--- the page shows:\n"
            + "\n".join(expected) + "\n--- the command printed:\n" + "\n".join(actual))
        if command.exit_code is not None:
            assert proc.returncode == command.exit_code, (
                f"{example.page}:{command.line}: exit status {proc.returncode}, the page "
                f"shows {command.exit_code}")


def test_examples_are_found_and_run():
    """The extraction finds the examples: enough commands run (the test cannot pass by
    finding none), and every skipped example says why."""
    commands = sum(len(example.commands) for example in RUN)
    assert commands >= MIN_COMMANDS, (commands, [f"{e.page}:{e.line}" for e in RUN])
    assert all(example.skip.strip() for example in ALL if example.skip is not None)
    assert all(example.commands for example in ALL)
