"""Session fixtures for the real-MTA tests: the MTAs, a store filled by ``policyctl``, the
real ``policyd`` process, a real Exim daemon and a private Postfix instance.

Needs root (Exim's ``-C`` with a trusted configuration, Postfix's ``postfix start``).  As
root the session runs ``install-mtas.sh`` (quick when everything is installed); otherwise,
or when the install fails, ``tests.requirements.require`` skips outside CI and fails in CI.

Exim's and Postfix's processes run as Debian-exim and postfix, which may not enter the
checkout (a 0700 home, ``mktemp -d``).  So everything they open lives in one run folder,
mode 0755, under /tmp or /var/tmp (``harness.make_run_folder``; POLICYD_MTA_RUN_PARENT
chooses another parent): the Exim configuration (listed in Exim's trusted configurations
for the session), a copy of contrib/exim/ it includes, a copy of the Exim binary (its
``exim_path``), spools, queues, maildirs and policyd's sockets.  Set POLICYD_KEEP_MTA_RUN=1
to keep the folder for a post-mortem.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.requirements import require

from .harness import (
    CONTRIB,
    HERE,
    LIST_DOMAIN,
    REPO,
    RUN_PARENTS,
    Message,
    Result,
    free_port,
    make_run_folder,
    parse_bh,
    pid_alive,
    port_open,
    render,
    smtp_send,
    stop_process,
    trust_exim_config,
    wait_until,
)

MTA_DIR = Path(os.environ.get("POLICYD_MTA_DIR") or REPO / "build" / "mta").resolve()
BIN = Path(sys.executable).parent

# The test data, written with policyctl (see fill_store).
MEMBER = "carol@members.test.example"
MODERATED = "mod@members.test.example"
NONMEMBER = "eve@outside.example"
ANNOUNCE = f"announce@{LIST_DOMAIN}"
QUIET = f"quiet@{LIST_DOMAIN}"
OTHER = f"other@{LIST_DOMAIN}"
NOTICE = "Only members of announce may post; see https://lists.test.example/announce"
EXIM_TIMEOUT = "2s"
POSTFIX_TIMEOUT = "2s"


def command_line(name: str) -> list[str]:
    """The venv's console script, or the module when the script is not installed."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"policyd": "policyd.daemon", "policyctl": "policyd.ctl"}[name]]


# --- the MTAs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mtas:
    exim_bin: Path         # as install-mtas.sh unpacked it, under the checkout's build folder
    postfix: str


@pytest.fixture(scope="session")
def mtas() -> Mtas:
    require(os.geteuid() == 0,
            "the real-MTA tests start Exim and Postfix and must run as root")
    exim_bin = MTA_DIR / "exim-root" / "usr" / "sbin" / "exim4"
    done = subprocess.run(["bash", str(HERE / "install-mtas.sh"), str(MTA_DIR)],
                          capture_output=True, text=True, timeout=900)
    require(done.returncode == 0,
            f"install-mtas.sh {MTA_DIR} failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}")
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"
    require(exim_bin.exists() and Path(postfix).exists(),
            f"Exim ({exim_bin}) or Postfix ({postfix}) is missing after install-mtas.sh")
    return Mtas(exim_bin, postfix)


# --- the run directory and policyd ----------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    run: Path
    exim_socket: Path
    postfix_dir: Path
    postfix_socket: Path   # inside the Postfix queue directory (smtpd is chrooted there)
    policyd_dir: Path
    contrib: Path          # a copy of contrib/exim/: Exim opens .include files as Debian-exim
    exim_bin: Path         # a copy of mtas.exim_bin: Exim re-executes it as Debian-exim
    exim_conf: Path        # listed in Exim's trusted configurations for the session


def run_parents() -> tuple[str, ...]:
    chosen = os.environ.get("POLICYD_MTA_RUN_PARENT")
    return (chosen,) if chosen else RUN_PARENTS


@pytest.fixture(scope="session")
def layout(mtas) -> Layout:
    run = make_run_folder(run_parents())
    try:
        postfix_dir = run / "postfix"
        (postfix_dir / "spool" / "policyd").mkdir(parents=True)
        (run / "policyd").mkdir()
        contrib = run / "contrib"
        shutil.copytree(CONTRIB / "exim", contrib / "exim")
        exim_bin = run / "exim-bin" / "exim4"
        exim_bin.parent.mkdir()
        shutil.copyfile(mtas.exim_bin, exim_bin)
        os.chown(exim_bin, 0, 0)
        exim_bin.chmod(0o4755)     # setuid root, as Debian installs it
        (run / "exim").mkdir()
        exim_conf = run / "exim" / "exim.conf"
        trust_exim_config(exim_conf)
        try:
            yield Layout(run, run / "exim.sock", postfix_dir,
                         postfix_dir / "spool" / "policyd" / "postfix.sock", run / "policyd",
                         contrib, exim_bin, exim_conf)
        finally:
            trust_exim_config(exim_conf, trusted=False)
    finally:
        if not os.environ.get("POLICYD_KEEP_MTA_RUN"):
            shutil.rmtree(run, ignore_errors=True)


def policyctl(config: Path, *args: str, input: str | None = None) -> str:
    done = subprocess.run(command_line("policyctl") + ["--config", str(config), *args],
                          capture_output=True, text=True, input=input, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"policyctl {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}{done.stderr}")
    return done.stdout


def write_policyd_config(layout: Layout, name: str, postfix_mode: str) -> Path:
    state = layout.policyd_dir
    path = state / name
    path.write_text(f"""\
[store]
url = sqlite:///{state}/store.sqlite
refresh_interval = 0.5

[daemon]
state_dir = {state}
control_socket = {state}/control.sock
log_file = {state}/policyd.log
shutdown_grace = 1

[exim]
listen = unix:{layout.exim_socket}:mode=666

[postfix]
listen = unix:{layout.postfix_socket}:mode=666
mode = {postfix_mode}
""", encoding="utf-8")
    return path


def fill_store(config: Path) -> None:
    """The lists the tests post to, written the way an admin would: with policyctl."""
    policyctl(config, "init")
    policyctl(config, "list", "add", ANNOUNCE, "--default-nonmember-action", "reject",
              "--rejection-notice", NOTICE)
    # Bulk form: one address per line, optionally followed by its moderation action.
    policyctl(config, "member", "add", ANNOUNCE, "--file", "-",
              input=f"{MEMBER}\n{MODERATED} hold\n")
    policyctl(config, "list", "add", QUIET, "--default-nonmember-action", "discard")
    policyctl(config, "member", "add", QUIET, MEMBER)
    policyctl(config, "list", "add", OTHER)
    policyctl(config, "member", "add", OTHER, MEMBER)


class Policyd:
    """The real daemon, ``policyd --config PATH``, as a child process."""

    def __init__(self, layout: Layout, config: Path) -> None:
        self.layout = layout
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.output = layout.policyd_dir / "policyd.out"

    def start(self, config: Path | None = None) -> None:
        from policyd import control_client

        if config is not None:
            self.config = config
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(command_line("policyd") + ["--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        control = self.layout.policyd_dir / "control.sock"

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"policyd exited with {self.proc.returncode}: "
                                   f"{self.output.read_text(errors='replace')[-3000:]}")
            try:
                status = control_client.status(str(control), timeout=2)
            except control_client.ControlError:
                return False
            return (status.get("snapshot") and status["snapshot"]["lists"] > 0
                    and self.layout.exim_socket.exists() and self.layout.postfix_socket.exists())

        try:
            wait_until(ready, 30, "policyd to answer on its control socket with data loaded",
                       interval=0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
            self.proc = None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def policyd(layout) -> Policyd:
    config = write_policyd_config(layout, "policyd.conf", "safe")
    fill_store(config)
    daemon = Policyd(layout, config)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


# --- Exim -----------------------------------------------------------------------------------


class Exim:
    """contrib/exim/ included unchanged into a site configuration (exim.conf.in)."""

    def __init__(self, mtas: Mtas, layout: Layout) -> None:
        self.bin = layout.exim_bin
        self.conf = layout.exim_conf
        self.run = layout.run / "exim"
        self.maildir = self.run / "mail"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        exim_user = pwd.getpwnam("Debian-exim")
        for sub in ("spool", "log", "mail"):
            (self.run / sub).mkdir(parents=True, exist_ok=True)
            os.chown(self.run / sub, exim_user.pw_uid, exim_user.pw_gid)
        text = render(HERE / "exim.conf.in", {
            "RUN": str(self.run), "EXIM_BIN": str(self.bin),
            "CONTRIB": str(layout.contrib / "exim"),
            "SOCKET": str(layout.exim_socket), "TIMEOUT": EXIM_TIMEOUT,
        })
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)           # Exim refuses a configuration others may write
        os.replace(tmp, self.conf)
        check = subprocess.run([str(self.bin), "-C", str(self.conf), "-bV"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"exim -bV rejects the configuration:\n{check.stdout}{check.stderr}")

    def bh(self, message: Message, *defines: str) -> tuple[Result, str]:
        """One SMTP session in host-checking mode (``exim -bh``); returns the replies and
        Exim's debug output (stderr)."""
        session = "EHLO client.test.example\r\n" + f"MAIL FROM:<{message.sender}>\r\n"
        session += "".join(f"RCPT TO:<{r}>\r\n" for r in message.recipients)
        session += "DATA\r\n" + message.data().replace("\r\n.", "\r\n..") + "\r\n.\r\nQUIT\r\n"
        done = subprocess.run(
            [str(self.bin), "-C", str(self.conf), *(f"-D{d}" for d in defines),
             "-bh", "127.0.0.1"],
            input=session.encode(), capture_output=True, timeout=60)
        stderr = done.stderr.decode(errors="replace")
        return parse_bh(done.stdout.decode(errors="replace"), message, stderr,
                        done.returncode), stderr

    def start(self) -> None:
        self.port = free_port()
        with open(self.run / "daemon.out", "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bin), "-C", str(self.conf), "-bdf", "-oX", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 15,
                   f"Exim to listen on 127.0.0.1:{self.port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"exim -bdf exited: {(self.run / 'daemon.out').read_text()}")

    def send(self, message: Message) -> Result:
        return smtp_send(self.port, message)

    def stop(self) -> None:
        if self.proc is not None:
            # Exim's daemon and the processes it forked (reception, delivery) are the
            # process group we created with start_new_session.
            stop_process(self.proc, timeout=15, group=True)
            self.proc = None

    def mainlog(self) -> str:
        path = self.run / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def paniclog(self) -> str:
        path = self.run / "log" / "paniclog"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove_from_queue(self, message_id: str) -> None:
        subprocess.run([str(self.bin), "-C", str(self.conf), "-Mrm", message_id],
                       capture_output=True, text=True)

    def queue(self) -> str:
        return subprocess.run([str(self.bin), "-C", str(self.conf), "-bp"],
                              capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def exim(mtas, layout, policyd) -> Exim:
    server = Exim(mtas, layout)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        panic = server.paniclog()
        assert panic == "", f"Exim's paniclog is not empty:\n{panic}"


# --- Postfix ----------------------------------------------------------------------------------


class Postfix:
    """A private instance: this run's paths, then contrib/postfix/main.cf.policyd appended."""

    def __init__(self, mtas: Mtas, layout: Layout) -> None:
        self.postfix = mtas.postfix
        self.dir = layout.postfix_dir
        self.etc = self.dir / "etc"
        self.maildir = self.dir / "mail"
        self.port = free_port()
        self.master: int | None = None
        owner = pwd.getpwnam("postfix")
        for sub in ("etc", "spool", "data", "log", "mail"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("data", "mail"):
            os.chown(self.dir / sub, owner.pw_uid, owner.pw_gid)
        contrib = (CONTRIB / "postfix" / "main.cf.policyd").read_text(encoding="utf-8")
        # The one value changed: the per-request timeout, so the "too slow" case is short.
        assert "timeout=10s," in contrib
        contrib = contrib.replace("timeout=10s,", f"timeout={POSTFIX_TIMEOUT},")
        main = render(HERE / "postfix-main.cf.in", {
            "RUN": str(self.dir), "PF_UID": str(owner.pw_uid), "PF_GID": str(owner.pw_gid),
        })
        (self.etc / "main.cf").write_text(main + contrib, encoding="utf-8")
        (self.etc / "master.cf").write_text(
            render(HERE / "postfix-master.cf.in", {"PORT": str(self.port)}), encoding="utf-8")
        (self.etc / "mailboxes").write_text(
            "/@lists\\.test\\.example$/ lists/\n/@users\\.test\\.example$/ users/\n",
            encoding="utf-8")

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.postfix, "-c", str(self.etc), *args],
                              capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        for args in (("check",), ("start",)):
            done = self.command(*args)
            if done.returncode != 0:
                raise RuntimeError(f"postfix {args[0]} failed:\n{done.stdout}{done.stderr}\n"
                                   f"{self.maillog()}")
        pid_file = self.dir / "spool" / "pid" / "master.pid"
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 15,
                   "Postfix's master.pid")
        self.master = int(pid_file.read_text().split()[0])
        wait_until(lambda: port_open(self.port), 15, f"Postfix on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.master is None:
            return
        self.command("stop")
        # `postfix stop` may return before master has exited: wait for that pid.
        try:
            wait_until(lambda: not pid_alive(self.master), 15, "Postfix's master to exit",
                       interval=0.05)
        except TimeoutError:
            os.kill(self.master, signal.SIGKILL)
        self.master = None

    def send(self, message: Message) -> Result:
        return smtp_send(self.port, message)

    def maillog(self) -> str:
        path = self.dir / "log" / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def postfix(mtas, layout, policyd) -> Postfix:
    server = Postfix(mtas, layout)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        log = server.maillog()
        assert " fatal: " not in log and " panic: " not in log, log[-4000:]

