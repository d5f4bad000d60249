"""What Mailman's rules read that the MTA never sent, and how it reads 8-bit sender
fields: the LMTP runner's fields (X-MailFrom, the Message-ID hashes), the message after
the ``approved`` rule deleted its Approve headers or line, and compat32's ``Header`` for
a field with raw bytes.  Each case was decided by the real Mailman 3.3.10 the same way
(tests/mailman/message_cases.py and cases.py hold them for the agreement suite)."""

import base64
from hashlib import sha1

import pytest

from policyd.core.chain import decide
from policyd.core.mailman_headers import decode_like_mailman
from policyd.core.message import parse_message
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action, Query, Verdict

LIST = "test@lists.example.com"
MEMBER = "pat@example.com"
PASSWORD = "{plaintext}secret"


def snap(**settings):
    settings.setdefault("members", (MemberSpec(MEMBER),))
    settings.setdefault("default_member_action", Action.DEFER)
    settings.setdefault("default_nonmember_action", Action.REJECT)
    return build([ListSpec(LIST, **settings)],
                 domains={"lists.example.com": "lists.example.com"})


def post(extra=(), body="Hello.\n", sender=MEMBER, frm=None, message_id="<m@x.example>"):
    headers = [("From", frm or sender), ("To", LIST), ("Subject", "A post")]
    if message_id is not None:
        headers.append(("Message-ID", message_id))
    block = "".join(f"{n}: {v}\n" for n, v in list(headers) + list(extra))
    return Query(LIST, sender, message=parse_message(block.encode(), body.encode()))


def verdict(s, query, **kwargs):
    d = decide(s, query, **kwargs)
    assert decide(s, query, explain=False, **kwargs).verdict is d.verdict
    return d.verdict, d.rule


@pytest.mark.parametrize("header", ["Approved", "Approve", "X-Approve", "X-Approved"])
def test_later_rules_do_not_see_approve_headers_of_a_list_with_a_password(header):
    """Mailman's approved rule deletes every Approve header, the password right or wrong,
    before header-match and suspicious-header read the message (a list without a
    moderator password keeps them)."""
    matches = ((header, ".", Action.DISCARD),)
    wrong = post([(header, "wrong")])
    assert verdict(snap(moderator_password=PASSWORD, header_matches=matches), wrong) == \
        (Verdict.ACCEPT, "accept")
    assert verdict(snap(header_matches=matches), wrong) == (Verdict.DISCARD, "header-match")
    assert verdict(snap(moderator_password=PASSWORD,
                        bounce_matching_headers=f"{header}: .\n"), wrong) == \
        (Verdict.ACCEPT, "accept")
    assert verdict(snap(bounce_matching_headers=f"{header}: .\n"), wrong) == \
        (Verdict.HOLD, "suspicious-header")


def test_administrivia_counts_lines_after_the_approved_line_is_deleted():
    """The Approved: first line is deleted: 'help' becomes the tenth line, in reach of
    administrivia (Mailman holds it), in a plain body and in a multipart one."""
    lines = "".join(f"line {n}\n" for n in range(9))
    s = snap(moderator_password=PASSWORD, administrivia=True)
    assert verdict(s, post(body="Approved: wrong\n" + lines + "help\n")) == \
        (Verdict.HOLD, "administrivia")
    assert verdict(s, post(body="Hello\n" + lines + "help\n")) == (Verdict.ACCEPT, "accept")
    assert verdict(snap(administrivia=True), post(body="Approved: wrong\n" + lines
                                                  + "help\n")) == (Verdict.ACCEPT, "accept")
    mime = [("MIME-Version", "1.0"),
            ("Content-Type", 'multipart/alternative; boundary="B"')]
    body = ("--B\nContent-Type: text/plain; charset=us-ascii\n\nApproved: wrong\n" + lines
            + "help\n--B\nContent-Type: text/html\n\n<p>x</p>\n--B--\n")
    assert verdict(s, post(mime, body)) == (Verdict.HOLD, "administrivia")


def test_header_matches_see_x_mailfrom():
    """Mailman's LMTP runner appends X-MailFrom: <envelope sender>; a header_matches
    entry on it decides in Mailman, so it does in policyd."""
    s = snap(header_matches=(("X-MailFrom", r"@trusted\.example$", Action.ACCEPT),))
    assert verdict(s, post(sender="boss@trusted.example")) == (Verdict.ACCEPT, "header-match")
    assert verdict(s, post(sender="boss@outside.example", frm="boss@trusted.example")) == \
        (Verdict.REJECT, "nonmember-moderation")
    # aiosmtpd's MAIL FROM:<> is "<>"; the null sender goes through the chain with
    # null_sender = mailman.
    s = snap(header_matches=(("X-MailFrom", "^<>$", Action.DISCARD),))
    assert verdict(s, post(sender="", frm=MEMBER), null_sender="mailman") == \
        (Verdict.DISCARD, "header-match")


def test_lmtp_fields_are_mailmans():
    """Message-ID-Hash and X-Message-ID-Hash as utilities/email.add_message_hash makes them
    (also of a Message-ID the runner rewrote or made), then X-MailFrom."""
    from policyd.core.message_rules import MADE_MESSAGE_ID, lmtp_fields
    digest = base64.b32encode(sha1(b"m@x.example").digest()).decode()
    message = post().message
    assert lmtp_fields(message, "Pat@Example.COM") == (
        ("Message-ID-Hash", digest), ("X-Message-ID-Hash", digest),
        ("X-MailFrom", "Pat@Example.COM"))
    assert lmtp_fields(post(message_id="<[m@x.example]>").message, "a@b.example")[0] == \
        ("Message-ID-Hash", digest)
    made = lmtp_fields(post(message_id=None).message, "")
    assert made[0] == ("Message-ID", MADE_MESSAGE_ID) and made[-1] == ("X-MailFrom", "<>")
    s = snap(header_matches=(("X-Message-ID-Hash", "^[A-Z2-7]{32}$", Action.HOLD),))
    assert verdict(s, post(message_id=None, sender="x@y.example")) == \
        (Verdict.HOLD, "header-match")


@pytest.mark.parametrize("field, expected", [
    # raw 8-bit text: the encoded words are not decoded, each byte is U+FFFD
    ("=?utf-8?q?J=28?= J\u00f6rg <pat@example.com>",
     "=?utf-8?q?J=28?= J\ufffd\ufffdrg <pat@example.com>"),
    ("=?utf-8?q?J=28?= J\udcc3\udcb6rg\n <pat@example.com>",
     "=?utf-8?q?J=28?= J\ufffd\ufffdrg <pat@example.com>"),
    # all ASCII: decoded first, as before
    ("=?utf-8?q?J=28?= Joerg <pat@example.com>", "J( Joerg <pat@example.com>"),
])
def test_a_field_with_8bit_bytes_is_not_rfc2047_decoded(field, expected):
    assert decode_like_mailman(field) == expected


@pytest.mark.parametrize("frm", [
    "=?utf-8?q?J=28?= J\u00f6rg <pat@example.com>",
    "=?x-unknown?q?a?= J\u00f6rg <pat@example.com>",
    "=?utf-8?q?banned=40outside.example?=, J\u00f6rg <pat@example.com>",
])
def test_an_8bit_sender_field_with_encoded_words_is_the_members(frm):
    """Mailman finds the member (it never sees the encoded '(' or the encoded banned
    address): a member's post, in the header block and in Exim's from=."""
    s = snap(default_member_action=Action.ACCEPT, bans=("banned@outside.example",))
    stranger = "stranger@outside.example"
    query = post(sender=stranger, frm=frm)
    assert verdict(s, query) == (Verdict.ACCEPT, "member-moderation")
    assert verdict(s, Query(LIST, stranger, frm)) == (Verdict.ACCEPT, "member-moderation")
