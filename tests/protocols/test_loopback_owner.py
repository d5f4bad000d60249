"""``loopback_owner.owner`` against the kernel: real loopback TCP connections, IPv4, IPv6
and IPv4-mapped, the client's socket owned by this process or, as root, by a process
running as ``nobody``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from policyd.protocols import loopback_owner

from ..requirements import require

CLIENT = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])));"
          " print('connected', flush=True); sys.stdin.read()")


def listening(family: int, host: str) -> socket.socket:
    try:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((host, 0))
    except OSError as error:
        require(False, f"cannot listen on {host}: {error}")
    server.listen()
    return server


@pytest.mark.parametrize("family, bind, connect", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    (socket.AF_INET6, "::1", "::1"),
    (socket.AF_INET6, "::", "127.0.0.1"),   # an IPv4 client of a dual-stack listener
])
def test_the_owner_of_a_loopback_client_is_this_process(family, bind, connect):
    server = listening(family, bind)
    with server, socket.create_connection((connect, server.getsockname()[1])):
        accepted, peer = server.accept()
        with accepted:
            local = accepted.getsockname()[:2]
            assert loopback_owner.owner(local, peer[:2]) == os.geteuid()
            # No connection from that port: no answer, never a guess.
            assert loopback_owner.owner(local, (peer[0], 1)) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root (setuid)")
@pytest.mark.parametrize("family, bind, connect", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    (socket.AF_INET6, "::", "127.0.0.1"),
])
def test_the_owner_is_the_clients_user_not_the_listeners(family, bind, connect):
    """The answer is about the client's socket (the listener's own accepted socket has
    the same two addresses swapped, and is owned by root)."""
    server = listening(family, bind)
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    with server:
        client = subprocess.Popen([python, "-c", CLIENT, connect,
                                   str(server.getsockname()[1])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  user=65534, group=65534, cwd="/")
        try:
            assert client.stdout.readline() == b"connected\n"
            accepted, peer = server.accept()
            with accepted:
                assert loopback_owner.owner(accepted.getsockname()[:2], peer[:2]) == 65534
        finally:
            client.stdin.close()
            client.wait(10)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.45.6.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.1", False), ("::ffff:192.0.2.1", False), ("2001:db8::1", False),
    ("1127.0.0.1", False),
])
def test_is_loopback(host, loopback):
    assert loopback_owner.is_loopback(host) is loopback
