"""Build what the benchmark runs that is not Python: the C load generator.

Idempotent: ``loadgen`` is compiled into the state directory once per source version
(the binary's name carries a hash of ``loadgen.c``).  gcc comes from Debian; when it is
missing and we are root, it is installed with apt-get (as ``make bench`` promises to
install what it needs), otherwise the error says what to install.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")


def ensure_tools() -> None:
    missing = [tool for tool in ("gcc", "taskset") if shutil.which(tool) is None]
    if not missing:
        return
    packages = {"gcc": "gcc", "taskset": "util-linux"}
    wanted = sorted({packages[tool] for tool in missing})
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install the Debian "
                         f"package(s) {' '.join(wanted)}")
    print(f"bench: installing {' '.join(wanted)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *wanted], check=True, env=env)


def loadgen(state_dir: Path) -> Path:
    """Path of the compiled load generator for the current source."""
    ensure_tools()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = state_dir / f"loadgen-{digest}"
    if not binary.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-lm"],
                       check=True)
        tmp.rename(binary)
        for old in state_dir.glob("loadgen-*"):
            if old != binary:
                old.unlink(missing_ok=True)
    return binary
