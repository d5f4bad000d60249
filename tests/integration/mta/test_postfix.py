"""contrib/postfix/main.cf.policyd in a real Postfix 3 against the real policyd.

The instance's smtpd is chrooted into its queue directory (like Debian's stock
master.cf), so policyd is reached through the relative ``unix:policyd/postfix.sock`` of
the contrib lines.  Postfix never shows policyd a header: in policyd's default ``safe``
mode only the envelope-only rules act (unknown list, null sender) and every posting
question is left to Mailman (DUNNO); ``envelope`` mode is in test_postfix_envelope.py.
"""

from __future__ import annotations

import json

import pytest

from .conftest import ANNOUNCE, MEMBER, MODERATED, NONMEMBER, OTHER, QUIET
from .harness import LIST_DOMAIN, USER_DOMAIN, Message, wait_delivered

pytestmark = [pytest.mark.integration, pytest.mark.mta]

SOMEONE = f"someone@{USER_DOMAIN}"
OK = (250, "")


def rejected_rcpt(code: int, status: str, recipient: str, text: str) -> tuple[int, str]:
    return code, f"{status} <{recipient}>: Recipient address rejected: {text}"


# name: sender, recipients, headers, RCPT replies, DATA reply (None: no DATA), maildir
CASES = {
    "member-accepted-and-delivered": (
        MEMBER, [ANNOUNCE], [f"From: <{MEMBER}>"], [OK], OK, "lists"),
    "moderated-member-accepted": (
        MODERATED, [ANNOUNCE], [f"From: <{MODERATED}>"], [OK], OK, "lists"),
    "nonmember-left-to-mailman-in-safe-mode": (
        NONMEMBER, [ANNOUNCE], [f"From: <{NONMEMBER}>"], [OK], OK, "lists"),
    "discard-list-left-to-mailman-in-safe-mode": (
        NONMEMBER, [QUIET], [f"From: <{NONMEMBER}>"], [OK], OK, "lists"),
    "from-member-envelope-nonmember-accepted-in-safe-mode": (
        NONMEMBER, [ANNOUNCE], [f"From: Carol <{MEMBER}>"], [OK], OK, "lists"),
    "unknown-list-5.1.1-at-rcpt-other-recipient-unaffected": (
        NONMEMBER, [f"nolist@{LIST_DOMAIN}", SOMEONE], [],
        [rejected_rcpt(550, "5.1.1", f"nolist@{LIST_DOMAIN}",
                       f"No such list: nolist@{LIST_DOMAIN}"), OK], OK, "users"),
    "null-sender-to-list-rejected": (
        "", [ANNOUNCE], [],
        [rejected_rcpt(550, "5.7.1", ANNOUNCE, "The null sender may not write")], None, None),
    # RFC 5321 section 4.5.1 and RFC 2142: policyd answers DUNNO (rule role-address), the
    # instance's virtual maps take them.  They were 550 5.1.1 No such list.
    "postmaster-and-abuse-of-the-list-domain-not-rejected": (
        NONMEMBER, [f"postmaster@{LIST_DOMAIN}", f"abuse@{LIST_DOMAIN}"], [], [OK, OK], OK,
        "lists"),
    "null-sender-to-postmaster-of-the-list-domain-accepted": (
        "", [f"Postmaster@{LIST_DOMAIN}"], [], [OK], OK, "lists"),
    "null-sender-to-bounces-accepted": (
        "", [f"announce-bounces@{LIST_DOMAIN}"], [], [OK], OK, "lists"),
    "rfc2047-display-name-with-comma": (
        MEMBER, [ANNOUNCE], [f"From: =?utf-8?Q?Member=2C_Carol?= <{MEMBER}>"], [OK], OK,
        "lists"),
    # Postfix asks per recipient and has no "one list per message" rule to need.
    "two-lists-in-one-transaction": (
        MEMBER, [ANNOUNCE, OTHER], [f"From: <{MEMBER}>"], [OK, OK], OK, "lists"),
    # Relay control comes before policyd (smtpd_relay_restrictions).
    "relaying-denied-before-policyd": (
        NONMEMBER, ["someone@elsewhere.example"], [],
        [(554, "5.7.1 <someone@elsewhere.example>: Relay access denied")], None, None),
}


@pytest.mark.parametrize("name", CASES)
def test_postfix(postfix, name):
    """A real Postfix with the contrib lines: RCPT answers as policyd's safe mode says,
    accepted mail is delivered."""
    sender, recipients, headers, rcpt, data, maildir = CASES[name]
    message = Message(sender, recipients, headers)
    result = postfix.send(message)
    assert [c for c, _ in result.rcpt] == [c for c, _ in rcpt], result
    for (_, got), (_, want) in zip(result.rcpt, rcpt):
        assert want in got, result
    if data is None:
        assert result.data is None, result
    else:
        assert result.data is not None and result.data[0] == data[0], result
    if maildir:
        wait_delivered(postfix.maildir / maildir, message.tag)


def test_policyctl_query_shows_what_postfix_was_told(postfix, policyd):
    """``policyctl query`` prints the Postfix action; Postfix turned it into this reply."""
    from .conftest import policyctl

    recipient = f"nolist@{LIST_DOMAIN}"
    answer = json.loads(policyctl(policyd.config, "query", "--json", recipient, NONMEMBER))
    assert answer["postfix"] == f"550 5.1.1 No such list: {recipient}"
    result = postfix.send(Message(NONMEMBER, [recipient], []))
    assert result.rcpt == [(550, f"5.1.1 <{recipient}>: Recipient address rejected: "
                                 f"No such list: {recipient}")], result
    safe = json.loads(policyctl(policyd.config, "query", "--json", ANNOUNCE, NONMEMBER))
    assert safe["postfix"] == "DUNNO"
