"""A rule that could not read what it needs never lets a later rule refuse for good a post
Mailman might take: with the header block cut (Exim's POLICYD_MAX_HEADERS), a body cut
before the first text/plain part of a multipart message or before the first line, or MIME
parts past the visible body, an ``approved`` that might accept and a ``header-match``
that might accept or hold turn a later reject or discard into the temporary failure
(``incomplete-message``: doubt), never an accept anyone could get by padding a post.
Before, each of these was a 550 (a moderator's approved post refused for good).  What
cannot hide anything (a single part, a body whose size is not sent, a list without a
moderator password, a header value Mailman cannot decode) decides as before, and a
Mailman 2 list verifies the moderator password set with policyctl."""

from __future__ import annotations

import pytest

from policyd.core.chain import INCOMPLETE, decide
from policyd.core.message import parse_message
from policyd.core.passwords import hash_password
from policyd.core.snapshot import HeaderMatch, ListSpec, MemberSpec, SiteHeaderChecks, build
from policyd.core.verdict import Action, Mode, Query, Verdict

LIST = "rules@lists.example.com"
MEMBER = "alice@example.com"
STRANGER = "zed@outside.example"
PASSWORD = "s3cret"
HASHED = hash_password(PASSWORD)


def snapshot(**settings):
    settings.setdefault("default_nonmember_action", Action.REJECT)
    return build([ListSpec(LIST, members=(MemberSpec(MEMBER),), **settings)])


def query(headers: str, body: str | None = None, *, cut: bool = False,
          size: int | None = None) -> Query:
    message = parse_message(headers.encode(), None if body is None else body.encode(),
                            size)
    if cut:
        message = message._replace(headers_cut=True)
    return Query(LIST, STRANGER, STRANGER, None, None, message=message)


HEAD = f"From: <{STRANGER}>\nTo: {LIST}\nSubject: hi\n"


@pytest.mark.parametrize("explain", [True, False])
def test_cut_header_block_with_a_moderator_password_is_doubt(explain):
    """The Approved: header may lie past the cut: a 4xx for a nonmember, not a 550."""
    decision = decide(snapshot(moderator_password=HASHED), query(HEAD, cut=True),
                      explain=explain)
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, INCOMPLETE)
    if explain:
        assert "nonmember-moderation would reject" in decision.reason
        assert [s.rule for s in decision.trace if s.hit][-2:] == \
            ["nonmember-moderation", INCOMPLETE]


@pytest.mark.parametrize("explain", [True, False])
def test_cut_header_block_without_anything_to_pass_it_on_is_refused(explain):
    """No moderator password, header_matches that only refuse: nothing past the cut
    could pass the post on, and the nonmember's post is refused as before."""
    decision = decide(snapshot(header_matches=(("x-spam", "yes", Action.DISCARD),)),
                      query(HEAD, cut=True), explain=explain)
    assert (decision.verdict, decision.rule) == (Verdict.REJECT, "nonmember-moderation")


@pytest.mark.parametrize("action", [Action.ACCEPT, Action.HOLD, None])
def test_cut_header_block_with_a_passing_header_match_is_left_to_mailman(action):
    decision = decide(snapshot(header_matches=(("x-ok", "yes", action),)),
                      query(HEAD, cut=True), explain=False)
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, INCOMPLETE)


def test_cut_header_block_site_lines_jump_to_hold():
    checks = SiteHeaderChecks(((1, HeaderMatch("x-spam", "yes", None, None)),), Action.HOLD)
    spec = ListSpec(LIST, members=(MemberSpec(MEMBER),),
                    default_nonmember_action=Action.DISCARD)
    decision = decide(build([spec], site_header_checks=checks), query(HEAD, cut=True),
                      explain=False)
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, INCOMPLETE)


def test_a_hold_stays_a_hold():
    """Emergency moderation holds: the post reaches Mailman, which runs approved itself."""
    held = decide(snapshot(moderator_password=HASHED, emergency=True,
                           default_nonmember_action=Action.ACCEPT), query(HEAD, cut=True))
    assert (held.verdict, held.rule) == (Verdict.HOLD, "emergency")


MULTIPART = (HEAD + "MIME-Version: 1.0\n"
             'Content-Type: multipart/mixed; boundary="B"\n')
# A 15 KB octet-stream part first: the text/plain part with the Approved: line (or a
# part header a header_matches entry finds) comes past the visible 4096 bytes.
FIRST_PART = ("--B\nContent-Type: application/octet-stream\n"
              "Content-Transfer-Encoding: base64\n\n" + ("QUFB" * 19 + "\n") * 200)
SECOND_PART = f"--B\nContent-Type: text/plain\nX-Ok: yes\n\nApproved: {PASSWORD}\nhi\n--B--\n"


def body_cut_query() -> Query:
    body = FIRST_PART + SECOND_PART
    visible = body[:4096]
    headers = MULTIPART
    size = len(headers) + 1 + len(body)
    return query(headers, visible, size=size)


def test_approved_in_a_text_part_past_the_visible_body_is_doubt():
    q = body_cut_query()
    assert not q.message.body_complete
    decision = decide(snapshot(moderator_password=HASHED), q)
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, INCOMPLETE)
    assert "first text/plain part was not seen" in decision.reason


def test_header_match_in_a_part_past_the_visible_body_is_doubt():
    decision = decide(snapshot(header_matches=(("x-ok", "yes", Action.ACCEPT),)),
                      body_cut_query())
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, INCOMPLETE)
    refusing = decide(snapshot(header_matches=(("x-ok", "yes", Action.DISCARD),)),
                      body_cut_query())
    assert (refusing.verdict, refusing.rule) == (Verdict.REJECT, "nonmember-moderation")


def test_the_whole_body_decides_as_before():
    """Visible whole: the approved line is read and verified (a wrong one refuses)."""
    body = f"Approved: {PASSWORD}\nhi\n"
    right = query(HEAD, body, size=len(HEAD) + 1 + len(body))
    assert right.message.body_complete
    assert decide(snapshot(moderator_password=HASHED), right).rule == "approved"
    wrong = query(HEAD, "Approved: nope\nhi\n", size=len(HEAD) + 1 + 18)
    assert decide(snapshot(moderator_password=HASHED), wrong).verdict is Verdict.REJECT


def test_what_cannot_hide_anything_is_refused_as_before():
    """A single part (no part headers, no later text/plain part) and a body whose size
    the ACL did not send are no doubt: a padded nonmember post is refused."""
    big = "x" * 6000 + "\n"
    single = query(HEAD, big[:4096], size=len(HEAD) + 1 + len(big))
    assert not single.message.body_complete
    for settings in ({"moderator_password": HASHED},
                     {"header_matches": (("x-ok", "yes", Action.HOLD),)}):
        assert decide(snapshot(**settings), single).verdict is Verdict.REJECT, settings
    html = query(HEAD + "Content-Type: text/html\n", "<p>" + big[:4093],
                 size=len(HEAD) + 30 + len(big))
    assert decide(snapshot(moderator_password=HASHED), html).verdict is Verdict.REJECT
    unsized = body_cut_query().message._replace(size=None, body_complete=False)
    q = Query(LIST, STRANGER, STRANGER, None, None, message=unsized)
    assert decide(snapshot(moderator_password=HASHED), q).verdict is Verdict.REJECT
    assert decide(snapshot(header_matches=(("x-ok", "yes", Action.ACCEPT),)),
                  q).verdict is Verdict.REJECT


def test_a_header_value_mailman_cannot_decode_makes_the_entry_miss():
    """Mailman's HeaderMatchRule raises on the first X-Spam: value (it shunts the
    message): the entry misses there and the chain goes on; policyd used to read on and
    discard on the second value, which Mailman never reaches.  Never an accept: any
    sender could add such a header."""
    q = query(HEAD + "X-Spam: =?utf-8?b?a?=\nX-Spam: yes\n")
    decision = decide(snapshot(header_matches=(("x-spam", "yes", Action.DISCARD),)), q)
    assert (decision.verdict, decision.rule) == (Verdict.REJECT, "nonmember-moderation")
    # A match before the bad value decides, as in Mailman.
    first = query(HEAD + "X-Spam: yes\nX-Spam: =?utf-8?b?a?=\n")
    assert decide(snapshot(header_matches=(("x-spam", "yes", Action.DISCARD),)),
                  first).verdict is Verdict.DISCARD


@pytest.mark.parametrize("explain", [True, False])
def test_mailman2_list_verifies_the_moderator_password_set_with_policyctl(explain):
    """Mailman 2.1's Approve handler runs before Moderate: the moderator password set with
    policyctl approves a nonmember's post (before, a Mailman 2 list had no approved rule
    and refused it); any other password, an outsider's ``Approved: x`` included, is
    refused as before."""
    mm2 = dict(mode=Mode.MAILMAN2)
    known = decide(snapshot(moderator_password=HASHED, **mm2),
                   query(HEAD + f"Approved: {PASSWORD}\n"), explain=explain)
    assert (known.verdict, known.rule) == (Verdict.ACCEPT, "approved")
    other = decide(snapshot(moderator_password=HASHED, **mm2),
                   query(HEAD + "Approved: x\n"), explain=explain)
    assert other.verdict is Verdict.REJECT
    none = decide(snapshot(**mm2), query(HEAD + "Approved: x\n"), explain=explain)
    assert none.verdict is Verdict.REJECT
    cut = decide(snapshot(moderator_password=HASHED, **mm2), query(HEAD, cut=True),
                 explain=explain)
    assert (cut.verdict, cut.rule) == (Verdict.DEFER, INCOMPLETE)
    assert decide(snapshot(**mm2), query(HEAD, cut=True), explain=explain).verdict \
        is Verdict.REJECT


def test_envelope_only_queries_are_unchanged():
    """Postfix (no message): the documented trade-off stands, a nonmember is refused."""
    q = Query(LIST, STRANGER, None, None, None)
    assert decide(snapshot(moderator_password=HASHED), q, explain=False).verdict \
        is Verdict.REJECT
