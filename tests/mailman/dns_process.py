"""The test's authoritative DNS server (``dns_server.py``) as a child process: one
launcher for every test that needs DNS on 127.0.0.1 (the DMARC agreement suite, the
daemon's DMARC test)."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVER = Path(__file__).with_name("dns_server.py")


@contextmanager
def serving(zone: dict) -> Iterator[int]:
    """Serve ``zone`` (``dns_server.py``'s JSON shape); yields the port on 127.0.0.1.
    The server stops when its standard input closes, on the way out."""
    proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps(zone) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield int(line.split()[1])
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
