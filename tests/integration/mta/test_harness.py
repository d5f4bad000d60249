"""The real-MTA harness's own helpers, checked without Exim, Postfix or root: reading
``exim -bh`` output, and choosing a run folder the MTAs' users can reach."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from .harness import (
    EximOutputError,
    Message,
    blocking_folder,
    make_run_folder,
    parse_bh,
    trust_exim_config,
)

BH_OUTPUT = """\
**** SMTP testing session as if from host 127.0.0.1
**** but without any ident (RFC 1413) callback.
**** This is not for real!

220 mx.test.example ESMTP Exim 4.96 Sat, 05 Dec 2026 21:15:18 +0000\r
250-mx.test.example Hello client.test.example [127.0.0.1]\r
250-SIZE 52428800\r
250 HELP\r
250 OK\r
250 Accepted\r
550-5.1.1 No such list:\r
550 5.1.1 nolist@lists.test.example\r
354 Enter message, ending with "." on a line by itself\r
550 5.7.1 Only members may post\r
221 mx.test.example closing connection\r
"""

# What Exim prints when it cannot open a file its configuration includes (the checkout
# under a 0700 folder, before the run folder existed); nothing on stdout.
CONFIG_ERROR = """\
2026-12-05 21:15:18.174 [8074] Exim configuration error in line 36 of /x/exim.conf:
  failed to open included configuration file /root/private/contrib/exim/policyd-rcpt.acl
"""


def _message(*recipients: str) -> Message:
    return Message("carol@members.test.example", list(recipients), tag="t")


def test_parse_bh_splits_the_replies():
    """Banner and EHLO are skipped; multi-line replies become one line each."""
    result = parse_bh(BH_OUTPUT, _message("announce@lists.test.example",
                                          "nolist@lists.test.example"))
    assert result.mail == (250, "OK")
    assert result.rcpt == [(250, "Accepted"),
                           (550, "5.1.1 No such list: nolist@lists.test.example")]
    assert result.data == (550, "5.7.1 Only members may post")


def test_parse_bh_shows_exims_output_when_it_has_no_replies():
    """Exim failed before the session: the error carries its stderr and exit status,
    not an IndexError."""
    with pytest.raises(EximOutputError) as caught:
        parse_bh("", _message("announce@lists.test.example"), CONFIG_ERROR, 1)
    text = str(caught.value)
    assert isinstance(caught.value, AssertionError)
    assert "exit status: 1" in text
    assert "failed to open included configuration file" in text
    assert "found 0 replies" in text


def test_parse_bh_shows_exims_output_when_the_session_is_cut_short():
    """A recipient was accepted, then Exim stopped answering (it crashed in the DATA ACL):
    the error shows what it did answer."""
    stdout = BH_OUTPUT.split("354 ")[0]
    with pytest.raises(EximOutputError) as caught:
        parse_bh(stdout, _message("announce@lists.test.example", "nolist@lists.test.example"),
                 "panic in the DATA ACL", -11)
    text = str(caught.value)
    assert "DATA got no reply" in text and "exit status: -11" in text
    assert "250 Accepted" in text and "panic in the DATA ACL" in text


@pytest.fixture
def private_folder():
    """A 0700 folder straight under /tmp (mode 1777), like ``mktemp -d`` makes."""
    folder = Path(tempfile.mkdtemp(prefix="policyd-private-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_blocking_folder_names_the_folder_a_user_cannot_enter(private_folder):
    """Judged by owner, group and other execute bits, along the whole path."""
    inner = private_folder / "checkout" / "build"
    inner.mkdir(parents=True)
    for folder in (inner.parent, inner):  # whatever the umask (077 made them 0700)
        folder.chmod(0o755)
    assert blocking_folder(inner, "nobody") == private_folder
    assert blocking_folder(inner, pwd.getpwuid(os.getuid()).pw_name) is None
    private_folder.chmod(0o711)
    assert blocking_folder(inner, "nobody") is None
    assert blocking_folder(inner, "root") is None


def test_make_run_folder_skips_a_parent_the_users_cannot_enter(private_folder):
    """The run folder goes under the first parent every MTA user can enter, mode 0755."""
    run = make_run_folder([private_folder, "/tmp"], users=("nobody",))
    try:
        assert run.parent == Path("/tmp").resolve()
        assert stat.S_IMODE(run.stat().st_mode) == 0o755
        assert blocking_folder(run, "nobody") is None
    finally:
        run.rmdir()


def test_make_run_folder_fails_naming_the_folder_and_the_user(private_folder):
    """With no usable parent the error says which user cannot enter which folder."""
    with pytest.raises(RuntimeError) as caught:
        make_run_folder([private_folder / "missing", private_folder], users=("nobody",))
    text = str(caught.value)
    assert f"{private_folder / 'missing'} is not a folder" in text
    assert f"user nobody cannot enter {private_folder}" in text
    assert "POLICYD_MTA_RUN_PARENT" in text
    assert list(private_folder.iterdir()) == []


def test_trusted_configurations_listed_and_taken_out(tmp_path):
    """Other lines stay; this run's line comes and goes; lines of runs whose folder is
    gone are dropped; the list stays 0644 (Exim ignores one that others may write)."""
    listing = tmp_path / "trusted_configs"
    live = tmp_path / "policyd-mta-live" / "exim"
    live.mkdir(parents=True)
    listing.write_text(f"/etc/exim4/site.conf\n{live}/exim.conf\n"
                       f"{tmp_path}/policyd-mta-gone/exim/exim.conf\n", encoding="utf-8")
    mine = tmp_path / "policyd-mta-mine" / "exim" / "exim.conf"
    mine.parent.mkdir(parents=True)
    trust_exim_config(mine, listing=listing)
    assert listing.read_text(encoding="utf-8").splitlines() == [
        "/etc/exim4/site.conf", f"{live}/exim.conf", str(mine)]
    assert stat.S_IMODE(listing.stat().st_mode) == 0o644
    trust_exim_config(mine, trusted=False, listing=listing)
    assert listing.read_text(encoding="utf-8").splitlines() == [
        "/etc/exim4/site.conf", f"{live}/exim.conf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "policyd-mta-live", "policyd-mta-mine", "trusted_configs"]
