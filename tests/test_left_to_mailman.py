"""A rule that could not read what it needs never lets a later rule refuse a post Mailman
would take: with the header block cut (Exim's POLICYD_MAX_HEADERS), a body cut before
the first text/plain part or its first line, or MIME parts past the visible body, an
``approved`` that might accept and a ``header-match`` that might accept or hold leave a
later reject, discard (or, for ``approved``, hold) to Mailman (``left-to-mailman``, an
accept); a header value Mailman cannot decode is Mailman's shunt, also passed on; a
Mailman 2 list's ``Approved:`` password policyd cannot verify is left to Mailman 2.
Before, each of these was refused at SMTP time (a 550 for a moderator's approved post)."""

from __future__ import annotations

import pytest

from policyd.core.chain import LEFT_TO_MAILMAN, decide
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
def test_cut_header_block_with_a_moderator_password_is_left_to_mailman(explain):
    """The Approved: header may lie past the cut: not a 550 for a nonmember."""
    decision = decide(snapshot(moderator_password=HASHED), query(HEAD, cut=True),
                      explain=explain)
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)
    if explain:
        assert "nonmember-moderation would reject" in decision.reason
        assert [s.rule for s in decision.trace if s.hit][-2:] == \
            ["nonmember-moderation", LEFT_TO_MAILMAN]


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
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)


def test_cut_header_block_site_lines_jump_to_hold():
    checks = SiteHeaderChecks(((1, HeaderMatch("x-spam", "yes", None, None)),), Action.HOLD)
    spec = ListSpec(LIST, members=(MemberSpec(MEMBER),),
                    default_nonmember_action=Action.DISCARD)
    decision = decide(build([spec], site_header_checks=checks), query(HEAD, cut=True),
                      explain=False)
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)


def test_a_hold_is_left_to_mailman_only_for_what_could_accept():
    """Emergency moderation holds; an unseen approved could accept (Mailman's approved
    comes first), an unseen hold-only header-match could not change a hold."""
    held = decide(snapshot(moderator_password=HASHED, emergency=True,
                           default_nonmember_action=Action.ACCEPT), query(HEAD, cut=True))
    assert (held.verdict, held.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)
    kept = decide(snapshot(emergency=True, default_nonmember_action=Action.ACCEPT,
                           header_matches=(("x-ok", "yes", Action.HOLD),)),
                  query(HEAD, cut=True))
    assert (kept.verdict, kept.rule) == (Verdict.HOLD, "emergency")


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


def test_approved_in_a_text_part_past_the_visible_body_is_left_to_mailman():
    q = body_cut_query()
    assert not q.message.body_complete
    decision = decide(snapshot(moderator_password=HASHED), q)
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)
    assert "first text/plain part was not seen" in decision.reason


def test_header_match_in_a_part_past_the_visible_body_is_left_to_mailman():
    decision = decide(snapshot(header_matches=(("x-ok", "yes", Action.ACCEPT),)),
                      body_cut_query())
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)
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


def test_a_header_value_mailman_cannot_decode_is_its_shunt_not_a_discard():
    """Mailman's HeaderMatchRule raises on the first X-Spam: value (the message is
    shunted); policyd skipped it and discarded on the second."""
    q = query(HEAD + "X-Spam: =?utf-8?b?a?=\nX-Spam: yes\n")
    decision = decide(snapshot(header_matches=(("x-spam", "yes", Action.DISCARD),)), q)
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, "header-match")
    assert "shunts" in decision.reason
    # A match before the bad value decides, as in Mailman.
    first = query(HEAD + "X-Spam: yes\nX-Spam: =?utf-8?b?a?=\n")
    assert decide(snapshot(header_matches=(("x-spam", "yes", Action.DISCARD),)),
                  first).verdict is Verdict.DISCARD


@pytest.mark.parametrize("explain", [True, False])
def test_mailman2_list_approved_password_is_left_to_mailman2(explain):
    """Mailman 2.1's Approve handler takes the moderator or the administrator password,
    neither of which policyd has: an Approved: post is not refused; the moderator
    password set with policyctl is verified; no Approved: is refused as before."""
    mm2 = dict(mode=Mode.MAILMAN2)
    approved = query(HEAD + "Approved: admin-pw\n")
    decision = decide(snapshot(**mm2), approved, explain=explain)
    assert (decision.verdict, decision.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)
    known = decide(snapshot(moderator_password=HASHED, **mm2),
                   query(HEAD + f"Approved: {PASSWORD}\n"), explain=explain)
    assert (known.verdict, known.rule) == (Verdict.ACCEPT, "approved")
    plain = decide(snapshot(**mm2), query(HEAD), explain=explain)
    assert plain.verdict is Verdict.REJECT
    cut = decide(snapshot(**mm2), query(HEAD, cut=True), explain=explain)
    assert (cut.verdict, cut.rule) == (Verdict.ACCEPT, LEFT_TO_MAILMAN)


def test_envelope_only_queries_are_unchanged():
    """Postfix (no message): the documented trade-off stands, a nonmember is refused."""
    q = Query(LIST, STRANGER, None, None, None)
    assert decide(snapshot(moderator_password=HASHED), q, explain=False).verdict \
        is Verdict.REJECT
