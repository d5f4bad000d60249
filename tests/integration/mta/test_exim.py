"""contrib/exim/ in a real Exim 4 against the real policyd and a store filled by policyctl.

Every case runs twice: through ``exim -bh`` (host-checking mode: the full ACLs, the
``${readsocket}`` questions included, no delivery) and through a real Exim daemon on a
loopback port driven by smtplib, where accepted mail must then arrive in the maildir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from .conftest import ANNOUNCE, MEMBER, MODERATED, NONMEMBER, NOTICE, OTHER, QUIET
from .harness import LIST_DOMAIN, USER_DOMAIN, Message, find_in_maildir, wait_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mta]

SOMEONE = f"someone@{USER_DOMAIN}"


@dataclass(frozen=True)
class Case:
    sender: str
    recipients: tuple[str, ...]
    headers: tuple[str, ...]
    rcpt: tuple[tuple[int, str], ...]       # per recipient: code, text the reply contains
    data: tuple[int, str] | None             # DATA reply, None: no DATA (all RCPTs refused)
    delivered: str | None                    # maildir ("lists", "users"), "discarded", None
    body: str = ""                           # more body lines

    def message(self) -> Message:
        return Message(self.sender, list(self.recipients), list(self.headers), body=self.body)


OK = (250, "")

# Trace fields as list traffic carries them above From: (DKIM and ARC signatures of each
# hop; Exim's own loop check counts Received: lines, so not those): some 45 KB, past
# contrib/exim's POLICYD_MAX_HEADERS.
TRACE = tuple(f"ARC-Message-Signature: i={i}; a=rsa-sha256; c=relaxed/relaxed; "
              f"d=relay{i}.example.net; s=arc;\r\n\tb={'Q' * 64}\r\n\t{'w' * 40}"
              for i in range(300))
# A Reply-To: of 44 named mailboxes (some 4 KB, well within what policyd reads of the
# address fields): a big request once the block is cut.
REPLY_TO = "Reply-To: " + ", ".join(
    f"Somebody With A Rather Long Name Number{i:02d} <somebody.number{i:02d}@"
    "a-subdomain.elsewhere.example>" for i in range(44))

CASES = {
    "member-accepted-and-delivered": Case(
        MEMBER, (ANNOUNCE,), (f"From: Carol <{MEMBER}>",), (OK,), OK, "lists"),
    "moderated-member-hold-is-accepted": Case(
        MODERATED, (ANNOUNCE,), (f"From: <{MODERATED}>",), (OK,), OK, "lists"),
    "nonmember-rejected-with-the-lists-notice": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: Eve <{NONMEMBER}>",), (OK,),
        (550, f"5.7.1 {NOTICE}"), None),
    "nonmember-on-a-discard-list": Case(
        NONMEMBER, (QUIET,), (f"From: Eve <{NONMEMBER}>",), (OK,), OK, "discarded"),
    "unknown-list-5.1.1-at-rcpt-other-recipient-unaffected": Case(
        NONMEMBER, (f"nolist@{LIST_DOMAIN}", SOMEONE), (f"From: <{NONMEMBER}>",),
        ((550, f"5.1.1 No such list: nolist@{LIST_DOMAIN}"), OK), OK, "users"),
    "null-sender-to-list-and-request-address-rejected": Case(
        "", (ANNOUNCE, f"announce-request@{LIST_DOMAIN}"), ("From: <mailer-daemon@x.example>",),
        ((550, "5.7.1 The null sender may not write"),
         (550, "5.7.1 The null sender may not write")), None, None),
    "null-sender-to-bounces-accepted": Case(
        "", (f"announce-bounces@{LIST_DOMAIN}",), ("From: <mailer-daemon@x.example>",),
        (OK,), OK, "lists"),
    "from-member-envelope-nonmember-accepted": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: Carol <{MEMBER}>",), (OK,), OK, "lists"),
    "rfc2047-display-name-with-comma": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: =?utf-8?Q?Member=2C_Carol_=C3=A9?= <{MEMBER}>",),
        (OK,), OK, "lists"),
    # Mailman decodes before it splits: the encoded comma makes the member a sender of
    # its own, and a current (strict) Mailman accepts the post, so policyd does too.
    "member-address-inside-an-encoded-display-name-counts-as-mailman-reads-it": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: =?utf-8?Q?{MEMBER}=2C?= <{NONMEMBER}>",), (OK,),
        OK, "lists"),
    "member-address-as-an-encoded-display-name-is-not-a-sender": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: =?utf-8?Q?{MEMBER}?= <{NONMEMBER}>",), (OK,),
        (550, f"5.7.1 {NOTICE}"), None),
    "member-in-the-second-of-two-from-headers": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: Eve <{NONMEMBER}>", f"From: Carol <{MEMBER}>"),
        (OK,), OK, "lists"),
    "member-in-reply-to-only-is-not-enough-for-nonmember-from": Case(
        NONMEMBER, (ANNOUNCE,), (f"From: Eve <{NONMEMBER}>", "Reply-To: nobody@x.example"),
        (OK,), (550, f"5.7.1 {NOTICE}"), None),
    "two-lists-in-one-transaction-second-deferred": Case(
        MEMBER, (ANNOUNCE, OTHER, SOMEONE), (f"From: <{MEMBER}>",),
        (OK, (452, f"4.5.3 One list per message: please send to {OTHER} separately"), OK),
        OK, "lists"),
    # RFC 5321 section 4.5.1 and RFC 2142: policyd has no opinion (rule role-address);
    # they are not a list either (no "one list per message" with the list after them).
    # They were 550 5.1.1 No such list.
    "postmaster-and-abuse-of-the-list-domain-not-rejected-and-not-a-list": Case(
        MEMBER, (f"postmaster@{LIST_DOMAIN}", f"abuse@{LIST_DOMAIN}", ANNOUNCE),
        (f"From: <{MEMBER}>",), (OK, OK, OK), OK, "lists"),
    "null-sender-to-postmaster-of-the-list-domain-accepted": Case(
        "", (f"postmaster@{LIST_DOMAIN}",), ("From: <mailer-daemon@x.example>",), (OK,), OK,
        "lists"),
    "administrative-address-is-not-a-post": Case(
        NONMEMBER, (f"announce-request@{LIST_DOMAIN}",), (f"From: <{NONMEMBER}>",),
        (OK,), OK, "lists"),
    # contrib/exim cuts a header block over POLICYD_MAX_HEADERS: From: (past the cut) is
    # sent whole beside it, so the member's post is accepted as with small headers.
    "header-block-past-the-acls-limit-member-from-at-its-end": Case(
        NONMEMBER, (ANNOUNCE,), TRACE + (f"From: Carol <{MEMBER}>",), (OK,), OK, "lists"),
    "header-block-past-the-acls-limit-nonmember-still-rejected": Case(
        NONMEMBER, (ANNOUNCE,), TRACE + (f"From: Eve <{NONMEMBER}>",), (OK,),
        (550, f"5.7.1 {NOTICE}"), None),
    # The cut block, a 4 KB Reply-To: whole beside it and 4 KB of body stay under
    # policyd's max_request (it was "451 Malformed policy request" on every retry).
    "big-header-block-long-reply-to-and-body-fit-the-request": Case(
        MEMBER, (ANNOUNCE,), TRACE + (f"From: Carol <{MEMBER}>", REPLY_TO), (OK,), OK,
        "lists", body="\n".join("body line %04d %s" % (i, "y" * 60) for i in range(90))),
    # A Reply-To: of some 100 KB (Exim takes it; sent whole beside the cut block): the
    # request passes policyd's max_request, and Exim gets policyd's own 451 with the
    # reason, its request read to the end (closed at once, Exim's write failed and the
    # ACL's fail string answered: "List policy service unavailable").
    "request-past-max-request-gets-policyds-451-with-the-reason": Case(
        MEMBER, (ANNOUNCE,), TRACE + (f"From: Carol <{MEMBER}>", "Reply-To: " + ", ".join(
            f"<somebody.number{i:04d}@a-subdomain.elsewhere.example>" for i in range(2000))),
        (OK,), (451, "4.3.0 Malformed policy request: request longer than 65536 bytes"),
        None),
    "non-list-domain-untouched": Case(
        NONMEMBER, (SOMEONE,), (f"From: <{NONMEMBER}>",), (OK,), OK, "users"),
}


def check(result, case: Case) -> None:
    assert [code for code, _ in result.rcpt] == [code for code, _ in case.rcpt], result
    for (_, got), (_, want) in zip(result.rcpt, case.rcpt):
        assert want in got, result
    if case.data is None:
        assert result.data is None, result
    else:
        assert result.data is not None, result
        assert result.data[0] == case.data[0], result
        assert case.data[1] in result.data[1], result


@pytest.mark.parametrize("name", CASES)
def test_exim_bh(exim, name):
    """``exim -bh``: the RCPT and DATA ACL parts answer as policyd decides."""
    case = CASES[name]
    result, trace = exim.bh(case.message())
    check(result, case)


@pytest.mark.parametrize("name", CASES)
def test_exim_daemon(exim, name):
    """A real Exim daemon: the same answers over SMTP, and accepted mail is delivered."""
    case = CASES[name]
    message = case.message()
    result = exim.send(message)
    check(result, case)
    if case.delivered in ("lists", "users"):
        wait_delivered(exim.maildir / case.delivered, message.tag)
    elif case.delivered == "discarded":
        # Accepted with 250 and then thrown away: logged, never in a maildir.
        message_id = result.data[1].split("id=")[-1]
        wait_until(lambda: f"{message_id} Completed" in exim.mainlog(), 10,
                   f"Exim to finish {message_id}")
        assert f"{message_id} => blackhole (DATA ACL discarded recipients): policyd: DISCARD" \
            in exim.mainlog(), exim.mainlog()[-2000:]
        assert find_in_maildir(exim.maildir / "lists", message.tag) is None



def test_policyctl_query_shows_what_exim_was_told(exim, policyd):
    """``policyctl query`` (the README's check command) asks the running daemon and prints
    the Exim answer line; the SMTP client sees exactly its code and text."""
    from .conftest import policyctl

    headers = f"Eve <{NONMEMBER}>"
    answer = json.loads(policyctl(policyd.config, "query", "--json", "--from", headers,
                                  ANNOUNCE, NONMEMBER))
    assert answer["exim"] == f"REJECT 550 5.7.1 {NOTICE}"
    result, _ = exim.bh(Message(NONMEMBER, [ANNOUNCE], [f"From: {headers}"]))
    assert f"{result.data[0]} {result.data[1]}" == answer["exim"].split(" ", 1)[1], result
