"""contrib/systemd/: the units pass ``systemd-analyze verify``, the sysusers.d and
tmpfiles.d files create what the README says, and socket activation as the .socket units
describe it (named file descriptors) works with the real policyd and a real Exim.

No systemd runs as PID 1 here: ``systemd-socket-activate`` passes the sockets the way
systemd does (LISTEN_FDS, LISTEN_FDNAMES) and starts policyd on the first connection.
"""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import stat
import subprocess

import pytest

from tests.requirements import require

from .conftest import ANNOUNCE, MEMBER, NONMEMBER, NOTICE, command_line
from .harness import CONTRIB, LIST_DOMAIN, Message, stop_process, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

SYSTEMD = CONTRIB / "systemd"


def tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} (Debian package systemd) is not installed")
    return path


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(SYSTEMD / name, encoding="utf-8")
    return parser


def test_units_verify(tmp_path):
    """``systemd-analyze verify`` is silent (no unknown key, no bad value); only the
    ExecStart path is pointed at this checkout's policyd."""
    analyze = tool("systemd-analyze")
    names = ["policyd.service", "policyd-exim.socket", "policyd-postfix.socket"]
    for name in names:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        if name == "policyd.service":
            assert "ExecStart=/usr/bin/policyd --config /etc/policyd/policyd.conf" in text
            text = text.replace("/usr/bin/policyd", command_line("policyd")[0])
        (tmp_path / name).write_text(text, encoding="utf-8")
    done = subprocess.run([analyze, "verify", "--man=no", "--generators=no",
                           *(str(tmp_path / n) for n in names)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stdout + done.stderr


def test_service_runs_unprivileged():
    service = unit("policyd.service")["Service"]
    assert service["User"] == "policyd" and service["Group"] == "policyd"
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] == "yes"


def test_sysusers_and_tmpfiles(tmp_path):
    """In an empty root: the user policyd, and Postfix's socket directory 2750
    policyd:postfix (group postfix inherited by the socket policyd creates there)."""
    require(os.geteuid() == 0, "systemd-tmpfiles must run as root to set owners")
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    for args in (["--inline", "g postfix -"], [str(SYSTEMD / "policyd.sysusers")]):
        done = subprocess.run([sysusers, f"--root={tmp_path}", *args],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert passwd["policyd"][5:] == ["/var/lib/policyd", "/usr/sbin/nologin"]
    done = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create",
                           str(SYSTEMD / "policyd.tmpfiles")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = (tmp_path / "var" / "spool" / "postfix" / "policyd").stat()
    assert stat.S_IMODE(info.st_mode) == 0o2750
    assert (info.st_uid, info.st_gid) == (int(passwd["policyd"][2]), int(groups["postfix"][2]))


def _listen_stream(name: str) -> tuple[str, str]:
    socket_section = unit(name)["Socket"]
    return socket_section["ListenStream"], socket_section["FileDescriptorName"]


def test_socket_activation(exim, policyd, layout):
    """Two sockets named as in the .socket units; policyd.conf listens on
    ``systemd:domain=UNIX:name=...``; policyd starts on the first connection and answers
    Exim (contrib ACLs, real Exim) and a Postfix-protocol request."""
    activate = tool("systemd-socket-activate")
    exim_path, exim_name = _listen_stream("policyd-exim.socket")
    postfix_path, postfix_name = _listen_stream("policyd-postfix.socket")
    assert (exim_path, exim_name) == ("/run/policyd/exim.sock", "exim")
    assert postfix_path == "/var/spool/postfix/policyd/postfix.sock"
    state = layout.run / "activated"
    state.mkdir()
    state.chmod(0o755)
    exim_socket, postfix_socket = state / "exim.sock", state / "postfix.sock"
    config = state / "policyd.conf"
    config.write_text(f"""\
[store]
url = sqlite:///{layout.policyd_dir}/store.sqlite

[daemon]
state_dir = {state}
control_socket = {state}/control.sock
log_file = {state}/policyd.log

[exim]
listen = systemd:domain=UNIX:name={exim_name}

[postfix]
listen = systemd:domain=UNIX:name={postfix_name}
""", encoding="utf-8")
    with open(state / "out.txt", "wb") as out:
        proc = subprocess.Popen(
            [activate, "-l", str(exim_socket), "-l", str(postfix_socket),
             f"--fdname={exim_name}:{postfix_name}",
             *command_line("policyd"), "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: exim_socket.exists() and postfix_socket.exists(), 15,
                   "systemd-socket-activate's sockets")
        os.chmod(exim_socket, 0o666)     # Exim's daemon side runs as Debian-exim

        def exim_answer():
            result, _ = exim.bh(Message(NONMEMBER, [ANNOUNCE], [f"From: <{NONMEMBER}>"]),
                                f"POLICYD_SOCKET={exim_socket}")
            # Until policyd has loaded its first snapshot it answers 451 (fail safe).
            return result if result.data is not None else None

        result = wait_until(exim_answer, 30, "the activated policyd to decide", interval=0.2)
        assert result.data == (550, f"5.7.1 {NOTICE}"), result
        member, _ = exim.bh(Message(MEMBER, [ANNOUNCE], [f"From: <{MEMBER}>"]),
                            f"POLICYD_SOCKET={exim_socket}")
        assert member.accepted, member

        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(postfix_socket))
            client.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                           b"sender=\nrecipient=nolist@" + LIST_DOMAIN.encode() + b"\n\n")
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = client.recv(4096)
                assert chunk, reply
                reply += chunk
        assert reply == f"action=550 5.1.1 No such list: nolist@{LIST_DOMAIN}\n\n".encode()
        assert proc.poll() is None, (state / "out.txt").read_text()
    finally:
        stop_process(proc, timeout=15, group=True)
    out = (state / "out.txt").read_text(errors="replace")
    assert "Execing" in out, out     # started by the activation, not before
