"""Exim and Postfix reach what they open without entering the checkout: checked with
their users' own credentials, from wherever the checkout lives.

``.ci/run`` runs the suite from a copy of the checkout under a 0700 folder and sets
POLICYD_EXPECT_PRIVATE_CHECKOUT=1; then the checkout must indeed be out of their reach,
so that a green CI run shows the tests do not depend on where the checkout lives.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

import pytest

from .harness import MTA_USERS, REPO, blocking_folder

pytestmark = [pytest.mark.integration, pytest.mark.mta]


def as_user(user: str, script: str, *args: str) -> subprocess.CompletedProcess:
    account = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    return subprocess.run(["sh", "-c", script, "sh", *args], user=account.pw_uid,
                          group=account.pw_gid, extra_groups=groups,
                          capture_output=True, text=True, timeout=30)


def test_mta_users_reach_what_they_open(layout, policyd, exim, postfix):
    """Debian-exim reads the configuration and its includes, runs the Exim binary and
    writes to policyd's Exim socket; postfix reads main.cf and writes to the Postfix
    socket.  None of these is under the checkout."""
    checks = {
        "Debian-exim": [("-r", layout.exim_conf),
                        ("-r", layout.contrib / "exim" / "policyd-rcpt.acl"),
                        ("-r", layout.contrib / "exim" / "policyd-data.acl"),
                        ("-x", layout.exim_bin), ("-w", layout.exim_socket)],
        "postfix": [("-r", postfix.etc / "main.cf"), ("-w", layout.postfix_socket)],
    }
    assert sorted(checks) == sorted(MTA_USERS)
    for user, tests in checks.items():
        for flag, path in tests:
            assert REPO not in path.parents, path
            done = as_user(user, f'test {flag} "$1"', str(path))
            assert done.returncode == 0, f"{user} fails test {flag} {path}: {done.stderr}"


def test_checkout_out_of_reach_when_ci_says_so():
    """In CI the MTA users cannot enter the checkout (the point of running from there)."""
    if not os.environ.get("POLICYD_EXPECT_PRIVATE_CHECKOUT"):
        pytest.skip("only .ci/run (POLICYD_EXPECT_PRIVATE_CHECKOUT=1) runs from a checkout "
                    "the MTA users cannot enter")
    for user in MTA_USERS:
        assert blocking_folder(REPO, user) is not None, \
            f"{user} can enter {REPO}: this run does not show that the checkout's place " \
            "does not matter"
