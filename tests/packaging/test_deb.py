"""The Debian package, installed as a mail admin would install it.

``make deb``'s steps (the sdist, then ``dpkg-buildpackage`` in a Debian 13 chroot, then
lintian) build ``policyd_*_all.deb``; a fresh trixie chroot (debootstrap, cached as a
tarball under ``build/trixie``) installs it with ``apt-get install ./policyd_*.deb``, its
dependencies from Debian only.  In the chroot: ``policyctl init --demo``, ``policyd
--check-config``, the daemon started as the user ``policyd``, one Exim and one Postfix
request over its Unix sockets, ``policyctl query`` through the control socket, SIGTERM;
then ``apt-get purge policyd`` must leave the chroot as it was with only the
dependencies installed (the system user aside, which Debian keeps).

Needs root (debootstrap, chroot, mount): skipped otherwise, except in CI (``CI=true``),
where it fails.  The first run downloads a minimal trixie and the build dependencies
(a few minutes); later runs reuse them (about two minutes).
"""

from __future__ import annotations

import base64
import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ..reporting import report
from ..requirements import require

pytestmark = [pytest.mark.packaging, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("POLICYD_BUILD_DIR", ROOT / "build"))
# The chroots are cached here between runs (.ci/run may point it outside its fresh copy).
WORK = Path(os.environ.get("POLICYD_TRIXIE_CACHE", BUILD / "trixie"))
OUT = BUILD / "deb"
SCRIPT = ROOT / "tests" / "packaging" / "trixie.sh"

# What changes in a chroot without being anybody's file: apt's and dpkg's own state,
# logs, caches and the mounts the test makes.
NOT_COMPARED = ("proc", "tmp", "var/cache", "var/lib/apt", "var/lib/dpkg", "var/log",
                "var/tmp", "etc/ld.so.cache", "root/.cache")


def run(cmd, *, timeout=1800, check=True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-4000:]}")
    return result


def prerequisites() -> None:
    require(os.geteuid() == 0, "the package test needs root (debootstrap, chroot, mount)")
    require(shutil.which("debootstrap") is not None,
            "debootstrap is not installed (make packaging-deps installs it as root)")


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package, built as ``make deb`` builds it: from the sdist, in trixie."""
    prerequisites()
    sdist_dir = BUILD / "sdist"
    shutil.rmtree(sdist_dir, ignore_errors=True)
    started = time.monotonic()
    result = run([sys.executable, "-c",
                  "import sys; from setuptools import build_meta as b; "
                  "print(b.build_sdist(sys.argv[1]))", str(sdist_dir)], cwd=ROOT)
    sdist = sdist_dir / result.stdout.strip().splitlines()[-1]
    run(["bash", str(SCRIPT), "deb", str(WORK), str(sdist), str(OUT)])
    debs = sorted(OUT.glob("policyd_*_all.deb"))
    assert len(debs) == 1, debs
    report(f"packaging: built {debs[0].name} from {sdist.name} in the trixie builder "
           f"in {time.monotonic() - started:.0f} s")
    return debs[0]


def test_package_contents(deb):
    """The package has the programs on PATH, the three man pages, the conffile, the
    units, sysusers and tmpfiles entries, the docs; its Depends name Debian's packages for
    every install_requires of setup.cfg."""
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    (OUT / "contents.txt").write_text(listing)
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    paths |= {line.split()[-3].lstrip(".") for line in listing.splitlines() if " -> " in line}
    for expected in (
            "/usr/bin/policyd", "/usr/bin/policyctl",
            "/usr/share/man/man8/policyd.8.gz", "/usr/share/man/man8/policyctl.8.gz",
            "/usr/share/man/man5/policyd.conf.5.gz", "/etc/policyd/policyd.conf",
            "/usr/lib/systemd/system/policyd.service",
            "/usr/lib/systemd/system/policyd-exim.socket",
            "/usr/lib/systemd/system/policyd-postfix.socket",
            "/usr/lib/sysusers.d/policyd.conf", "/usr/lib/tmpfiles.d/policyd.conf",
            "/usr/lib/python3/dist-packages/policyd/__init__.py",
            "/usr/lib/python3/dist-packages/twisted/plugins/policyd_plugin.py",
            "/usr/share/doc/policyd/copyright"):
        assert expected in paths, f"{expected} is not in the package"
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/policyd/policyd.conf"]
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    for requirement in install_requires(next((BUILD / "sdist").glob("policyd-*.tar.gz"))):
        debian = debian_name(requirement)
        assert re.search(rf"\b{re.escape(debian)}\b", depends), (
            f"install_requires {requirement}: {debian} is not in Depends: {depends}")


def install_requires(sdist: Path | None = None) -> list[str]:
    """setup.cfg's install_requires: of the sdist the package was built from, or of the
    checkout."""
    setup = configparser.ConfigParser()
    if sdist is None:
        setup.read(ROOT / "setup.cfg")
    else:
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.count("/") == 1
                          and m.name.endswith("/setup.cfg"))
            setup.read_string(tar.extractfile(member).read().decode())
    return setup["options"]["install_requires"].split()


def debian_name(requirement: str) -> str:
    return "python3-" + re.split(r"[<>=!~ ;\[]", requirement)[0].lower().replace("_", "-")


def test_build_depends_cover_install_requires():
    """debian/control's Build-Depends name Debian's package for every install_requires
    (the man pages are generated from the imported code at build time)."""
    control = (ROOT / "debian" / "control").read_text()
    build_depends = control.split("Build-Depends:", 1)[1]
    build_depends = re.split(r"\n(?=\S)", build_depends)[0]
    missing = [r for r in install_requires()
               if not re.search(rf"\b{re.escape(debian_name(r))}\b", build_depends)]
    assert missing == [], f"add to Build-Depends in debian/control: {missing}"


def test_lintian(deb):
    """lintian (trixie's, as the archive runs it) finds no error and no warning; the
    pedantic and info tags left are listed in the run's summary."""
    text = (OUT / "lintian.txt").read_text()
    tags = [line for line in text.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    bad = [line for line in tags if line[0] in "EW"]
    report("packaging: lintian: " + (f"{len(tags)} info/pedantic tags" if tags else "clean"))
    for line in tags:
        report("  " + line)
    assert not bad, "lintian:\n" + "\n".join(bad)


class Chroot:
    def __init__(self, path: Path) -> None:
        self.path = path

    def sh(self, script: str, *, check=True, timeout=900) -> subprocess.CompletedProcess:
        return run(["chroot", str(self.path), "/usr/bin/env", "-i",
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8",
                    "DEBIAN_FRONTEND=noninteractive", "sh", "-ec", script],
                   check=check, timeout=timeout)

    def files(self) -> set[str]:
        found = set()
        for top, dirs, names in os.walk(self.path):
            rel = os.path.relpath(top, self.path)
            rel = "" if rel == "." else rel
            dirs[:] = [d for d in dirs if os.path.join(rel, d) not in NOT_COMPARED]
            for name in names + dirs:
                path = os.path.join(rel, name)
                if "__pycache__" in path or path.endswith((".pyc", ".dpkg-old")):
                    continue
                found.add("/" + path)
        return found


@pytest.fixture
def chroot():
    prerequisites()
    path = WORK / "install"
    run(["bash", str(SCRIPT), "fresh", str(WORK), str(path)])
    try:
        yield Chroot(path)
    finally:
        run(["bash", str(SCRIPT), "umount", str(path)], check=False)
        if not os.environ.get("POLICYD_KEEP_CHROOT"):
            shutil.rmtree(path, ignore_errors=True)


def ask(path: Path, request: bytes, *, half_close: bool, until: bytes | None = None,
        timeout: float = 20.0) -> bytes:
    """Send one request over a Unix socket and read the answer (Exim: half-close, read
    to EOF; Postfix: read to the empty line)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.connect(str(path))
            break
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        data = b""
        while until is None or until not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_install_run_purge(deb, chroot):
    """apt-get install ./policyd_*.deb in trixie, the demo store, --check-config, the
    daemon answering Exim, Postfix and policyctl, SIGTERM, then purge leaves nothing."""
    started = time.monotonic()
    shutil.copy(deb, chroot.path / "tmp" / deb.name)
    # The dependencies first, as apt resolves them for the package (from Debian only), so
    # that the comparison after the purge sees policyd's traces and not those of its
    # dependencies (systemd, pulled in for systemd-sysusers, leaves /etc/machine-id...).
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout.strip()
    installed = chroot.sh(f"apt-get -q update >/dev/null; apt-get -q -y satisfy '{depends}'")
    new = re.search(r"(\d+) newly installed", installed.stdout)
    before = chroot.files()
    installed = chroot.sh(f"apt-get -q -y install ./tmp/{deb.name}")
    assert re.search(r"\b1 newly installed", installed.stdout), installed.stdout
    report(f"packaging: apt-get install ./{deb.name} in trixie: "
           f"{new.group(1) if new else '?'} dependencies from Debian, then the package")
    versions = chroot.sh("dpkg-query -W -f '${Package} ${Version}\\n' python3 python3-twisted "
                         "python3-sqlalchemy python3-alembic python3-prometheus-client").stdout
    report("packaging: trixie versions: " + ", ".join(versions.split("\n")).strip(", "))

    facts = chroot.sh(
        "command -v policyd; command -v policyctl; getent passwd policyd; "
        "stat -c '%n %U:%G %a' /etc/policyd/policyd.conf /var/lib/policyd /run/policyd; "
        "policyctl --version").stdout
    assert "/usr/bin/policyd\n/usr/bin/policyctl\n" in facts
    assert re.search(r"^policyd:x:\d+:\d+:.*:/var/lib/policyd:/usr/sbin/nologin$", facts, re.M)
    assert "/etc/policyd/policyd.conf root:policyd 640" in facts
    assert "/var/lib/policyd policyd:policyd 750" in facts
    assert "/run/policyd policyd:policyd 750" in facts

    as_policyd = "setpriv --reuid=policyd --regid=policyd --init-groups --"
    init = chroot.sh(f"{as_policyd} policyctl init --demo").stdout
    assert "demo data: loaded" in init, init
    check = chroot.sh(f"{as_policyd} policyd --check-config").stdout
    assert "configuration OK" in check, check
    # trixie's Python has no crypt module: moderator passwords must still be computed by
    # libcrypt without the GIL (policyd.core.passwords), not in passlib's pure Python.
    backend = chroot.sh(
        "python3 -c 'from policyd.core import passwords; passwords._crypt_context(); "
        "from passlib.handlers import sha2_crypt as s; "
        "print(s.sha512_crypt.get_backend(), "
        "passwords.verify_password(\"policyd\", passwords._CHECK_HASH))'").stdout
    assert backend.split() == ["os_crypt", "True"], backend

    log = (chroot.path / "tmp" / "policyd.log").open("w")
    daemon = subprocess.Popen(
        ["chroot", str(chroot.path), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/bin",
         "LC_ALL=C.UTF-8", *as_policyd.split(), "policyd"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        run_dir = chroot.path / "run" / "policyd"
        exim = ask(run_dir / "exim.sock",
                   b"POLICYD/1 list=announce@lists.example.org sender="
                   + base64.b64encode(b"stranger@elsewhere.example") + b"\n",
                   half_close=True)
        assert exim == b"REJECT 550 5.7.1 Only the editors may post to announce@lists.example.org"
        postfix = ask(run_dir / "postfix.sock",
                      b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                      b"sender=a@b.example\nrecipient=nolist@lists.example.org\n\n",
                      half_close=False, until=b"\n\n")
        assert postfix == b"action=550 5.1.1 No such list: nolist@lists.example.org\n\n"
        query = chroot.sh(f"{as_policyd} policyctl query discuss@lists.example.org "
                          "dave@example.com --explain").stdout
        assert re.search(r"^verdict:\s+hold$", query, re.M), query
        assert re.search(r"^snapshot:\s+version ", query, re.M), query
        report("packaging: in the chroot: exim -> " + exim.decode()
               + " | postfix -> " + postfix.decode().strip()
               + " | policyctl query (control socket) -> verdict hold")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            status = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            status = daemon.wait()
        log.close()
    output = (chroot.path / "tmp" / "policyd.log").read_text()
    assert status == 0, output
    assert "started" in output, output

    chroot.sh("apt-get -q -y purge policyd")
    after = chroot.files()
    # The system user stays (Debian does not remove system users), and with it the
    # backups systemd-sysusers makes of the files it edits.
    user_files = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}
    left = sorted(after - before - user_files)
    gone = sorted(before - after)
    report(f"packaging: after apt-get purge policyd: {len(left)} new paths, "
           f"{len(gone)} missing ({time.monotonic() - started:.0f} s in the chroot)")
    assert not left, "left behind after purge:\n" + "\n".join(left)
    assert not gone, "removed by the package's life cycle:\n" + "\n".join(gone)
    user = chroot.sh("getent passwd policyd || true").stdout
    report("packaging: the system user policyd stays after purge (Debian keeps system "
           "users)" if user else "packaging: no policyd user after purge")

