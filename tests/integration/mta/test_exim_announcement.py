"""Issue 16's definition of done, end to end: a moderator's announcement through the real
Exim daemon, contrib/exim/ unchanged (its DATA ACL sends the header block and the body's
visible start), the real policyd and a list written with ``policyctl``.

The list rejects nonmembers and has a moderator password.  A nonmember's post with
``Approved: <the password>`` (a header, or the first line of the body) is accepted at DATA
and delivered to the list's transport; with a wrong password it is refused with 550 at
DATA, as any nonmember's post to that list; without any it is refused the same way.

The site's ``[antispam] header_checks`` (``[mailman] config_file``) are checked the same
way, with policyd restarted on a configuration that names a Mailman configuration file.
"""

from __future__ import annotations

import json

import pytest

from .conftest import MEMBER, NONMEMBER, OTHER, policyctl, write_policyd_config
from .harness import LIST_DOMAIN, Message, find_in_maildir, wait_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

NEWS = f"news-announce@{LIST_DOMAIN}"
PASSWORD = "Corr3ct horse battery"
NOTICE = "Only the moderators announce on news-announce"


class BodyMessage(Message):
    """A message whose body starts with the given lines (then the tag line)."""

    def __init__(self, sender, recipients, headers, first_lines):
        super().__init__(sender, recipients, headers)
        self.first_lines = first_lines

    def data(self) -> str:
        lines = list(self.headers) + [f"Subject: {self.tag}", f"Message-ID: <{self.tag}@test>",
                                      "", *self.first_lines, f"tag {self.tag}", ""]
        return "\r\n".join(lines)


@pytest.fixture(scope="module")
def announce_list(policyd):
    """``policyctl list add`` with a reject nonmember action, then ``list set
    --moderator-password`` reading the password from standard input; returned once the
    daemon's snapshot is the store's current version (it has the password)."""
    from policyd import control_client
    from policyd.store.native import NativeBackend

    policyctl(policyd.config, "list", "add", NEWS, "--default-nonmember-action", "reject",
              "--rejection-notice", NOTICE)
    policyctl(policyd.config, "list", "set", NEWS, "--moderator-password",
              input=PASSWORD + "\n")
    backend = NativeBackend(f"sqlite:///{policyd.layout.policyd_dir / 'store.sqlite'}")
    control = str(policyd.layout.policyd_dir / "control.sock")

    def current():
        status = control_client.status(control, timeout=5)
        return (status.get("snapshot") or {}).get("version") == backend.change_token()
    try:
        wait_until(current, 30, "the daemon to load the store's current version",
                   interval=0.2)
    finally:
        backend.close()
    answer = json.loads(policyctl(policyd.config, "query", "--json", NEWS, NONMEMBER))
    assert answer["decision"]["verdict"] == "reject", answer
    return NEWS


def headers(*extra: str) -> list[str]:
    return [f"From: The Boss <{NONMEMBER}>", f"To: {NEWS}", *extra]


def test_right_password_in_approved_header_is_accepted_and_delivered(exim, announce_list):
    """A nonmember's post with ``Approved: <password>``: 250 at DATA, delivered."""
    message = Message(NONMEMBER, [announce_list], headers(f"Approved: {PASSWORD}"))
    result = exim.send(message)
    assert result.rcpt[0][0] == 250, result
    assert result.data is not None and result.data[0] == 250, result
    wait_delivered(exim.maildir / "lists", message.tag)


def test_wrong_password_is_rejected_at_data(exim, announce_list):
    """The same post with a wrong password: 550 at DATA with the list's notice, nothing
    delivered."""
    message = Message(NONMEMBER, [announce_list], headers("Approved: not the password"))
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 550, result
    assert NOTICE in result.data[1], result
    assert find_in_maildir(exim.maildir / "lists", message.tag) is None


def test_no_password_is_rejected_at_data(exim, announce_list):
    message = Message(NONMEMBER, [announce_list], headers())
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 550, result


def test_right_password_as_the_first_body_line_is_accepted(exim, announce_list):
    """No Approved: header: the first non-blank line of the body (the ACL sends the
    body's visible start) carries the password; accepted and delivered."""
    message = BodyMessage(NONMEMBER, [announce_list], headers(),
                          ["", f"Approved: {PASSWORD}", "The announcement."])
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 250, result
    wait_delivered(exim.maildir / "lists", message.tag)


def test_wrong_password_as_the_first_body_line_is_rejected(exim, announce_list):
    message = BodyMessage(NONMEMBER, [announce_list], headers(),
                          ["Approved: guess", "The announcement."])
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 550, result
    assert find_in_maildir(exim.maildir / "lists", message.tag) is None


def test_a_password_on_the_second_body_line_does_not_count(exim, announce_list):
    """Mailman reads only the first non-blank line: later, it is text."""
    message = BodyMessage(NONMEMBER, [announce_list], headers(),
                          ["Hello all,", f"Approved: {PASSWORD}"])
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 550, result


# --- the site's [antispam] header_checks, read from [mailman] config_file ----------------

SITE_CFG = """\
[mailman]
site_owner: postmaster@lists.test.example

[antispam]
header_checks:
  X-Spam-Flag: ^yes
jump_chain: reject
"""


@pytest.fixture(scope="module")
def site_checks(policyd, layout, announce_list):
    """The session's policyd restarted with ``[mailman] config_file`` naming a Mailman
    configuration with one header check and ``jump_chain: reject``; restored after."""
    normal = policyd.config
    (layout.policyd_dir / "mailman.cfg").write_text(SITE_CFG, encoding="utf-8")
    config = write_policyd_config(layout, "policyd-site.conf", "safe")
    with open(config, "a", encoding="utf-8") as out:
        out.write("\n[mailman]\nconfig_file = mailman.cfg\n")
    policyd.stop()
    policyd.start(config)
    try:
        yield policyd
    finally:
        policyd.stop()
        policyd.start(normal)


def test_a_site_header_check_rejects_a_members_post(exim, site_checks):
    """A member's post that matches the site's header check gets jump_chain (reject):
    550 at DATA; the same post without the header is accepted and delivered."""
    flagged = Message(MEMBER, [OTHER], [f"From: <{MEMBER}>", f"To: {OTHER}",
                                        "X-Spam-Flag: YES, score 9"])
    result = exim.send(flagged)
    assert result.data is not None and result.data[0] == 550, result
    clean = Message(MEMBER, [OTHER], [f"From: <{MEMBER}>", f"To: {OTHER}",
                                      "X-Spam-Flag: no"])
    result = exim.send(clean)
    assert result.data is not None and result.data[0] == 250, result
    wait_delivered(exim.maildir / "lists", clean.tag)


def test_the_right_password_comes_before_the_site_checks(exim, site_checks):
    """Mailman's chain runs approved before header-match: the announcement with the
    right password is accepted even with the flagged header."""
    message = Message(NONMEMBER, [NEWS], headers(f"Approved: {PASSWORD}",
                                                 "X-Spam-Flag: yes"))
    result = exim.send(message)
    assert result.data is not None and result.data[0] == 250, result
    wait_delivered(exim.maildir / "lists", message.tag)
