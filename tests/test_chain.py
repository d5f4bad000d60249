"""Table-driven tests of every rule and every action value, in both Mailman modes, and of
the SMTP-time rules."""

import dataclasses

import pytest

from policyd.core.chain import ALL_RULES, MAILMAN2_CHAIN, MAILMAN3_CHAIN, decide
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action, Mode, Query, Role, Verdict

A, H, R, D, DEF = Action.ACCEPT, Action.HOLD, Action.REJECT, Action.DISCARD, Action.DEFER
LIST = "test@lists.example.com"


def snap(mode=Mode.MAILMAN3, site_bans=(), others=(), **settings):
    spec = ListSpec(LIST, mode=mode, **settings)
    other = ListSpec("other@lists.example.com", members=(MemberSpec("friend@x.example"),))
    return build([spec, other, *others], domains={"lists.example.com": "lists.example.com",
                                                  "alias.example.com": "lists.example.com"},
                 site_bans=site_bans)


def q(envelope="nobody@x.example", frm=None, reply_to=None, sender=None, to=LIST):
    return Query(to, envelope, frm, reply_to, sender)


def check(snapshot, query, verdict, rule, sender=None):
    decision = decide(snapshot, query)
    assert (decision.verdict, decision.rule) == (verdict, rule), decision.trace
    if sender is not None:
        assert decision.sender == sender
    assert decision.trace[-1].hit and decision.trace[-1].rule == rule
    # The MTA path decides the same without writing anything down.
    quiet = decide(snapshot, query, explain=False)
    assert quiet.trace == ()
    assert quiet == decision._replace(reason=quiet.reason, trace=())
    return decision


# --- SMTP-time rules ---------------------------------------------------------------------

def test_not_managed_domain_has_no_opinion():
    """A recipient outside the list domains is not ours: accept with no list."""
    d = check(snap(), q(to="someone@elsewhere.example"), Verdict.ACCEPT, "not-managed")
    assert d.list is None and not d.managed


@pytest.mark.parametrize("to", ["nolist@lists.example.com", "test-nosuch@lists.example.com",
                                "nolist-request@lists.example.com"])
def test_unknown_list_rejected(to):
    """An address in a list domain that is no list (or no list suffix) is rejected."""
    check(snap(), q(to=to), Verdict.REJECT, "unknown-list")


@pytest.mark.parametrize("to, role", [
    ("TEST@Lists.Example.COM", Role.POST),
    ("test+tag@lists.example.com", Role.POST),
    ("test@alias.example.com", Role.POST),
    ("test-request@lists.example.com", Role.REQUEST),
    ("test-owner@lists.example.com", Role.OWNER),
    ("test-join@lists.example.com", Role.JOIN),
    ("test-leave@lists.example.com", Role.LEAVE),
    ("test-confirm+abc123@lists.example.com", Role.CONFIRM),
    ("test-subscribe@lists.example.com", Role.SUBSCRIBE),
    ("test-unsubscribe@lists.example.com", Role.UNSUBSCRIBE),
    ("test-bounces+bob=x.example@lists.example.com", Role.BOUNCES),
])
def test_recipient_resolution(to, role):
    """Case, +tag, alias domains and every administrative suffix resolve to the list."""
    s = snap(default_nonmember_action=R)
    d = decide(s, q(to=to))
    assert d.list == LIST and d.role is role
    if role is not Role.POST:
        assert (d.verdict, d.rule) == (Verdict.ACCEPT, "administrative-address")
    else:
        assert (d.verdict, d.rule) == (Verdict.REJECT, "nonmember-moderation")


@pytest.mark.parametrize("to", [LIST, "test-request@lists.example.com",
                                "test-owner@lists.example.com", "test-join@lists.example.com"])
@pytest.mark.parametrize("null", ["", "<>"])
def test_null_sender_rejected_except_to_bounces(to, null):
    """<> may not post or write to administrative addresses..."""
    check(snap(members=(MemberSpec("a@x.example"),)), q(envelope=null, frm="a@x.example",
                                                        to=to), Verdict.REJECT, "null-sender")


def test_null_sender_to_bounces_accepted():
    """...but bounces to -bounces stay accepted."""
    check(snap(), q(envelope="", to="test-bounces+u=x.example@lists.example.com"),
          Verdict.ACCEPT, "administrative-address")


def test_list_named_like_a_suffix():
    """An exact list name wins over suffix stripping."""
    s = build([ListSpec(LIST), ListSpec("test-request@lists.example.com",
                                        default_nonmember_action=R)])
    d = check(s, q(to="test-request@lists.example.com"), Verdict.REJECT,
              "nonmember-moderation")
    assert d.role is Role.POST


# --- a list whose rows could not be read --------------------------------------------------

@pytest.mark.parametrize("mode", [Mode.MAILMAN3, Mode.MAILMAN2])
def test_broken_list_defers_its_posts_alone(mode):
    """A list a loader marked broken answers every post with DEFER (broken-list, the
    reason in the trace), whatever the sender; the other lists decide as usual."""
    s = snap(mode, members=(MemberSpec("m@x.example", A),), default_nonmember_action=A,
             broken="mailinglist.accept_these_nonmembers holds a pickle policyd will not "
                    "load: not a readable pickle")
    assert dict(s.broken) == {LIST: s.lists[LIST].broken}
    for sender in ("m@x.example", "n@y.example"):
        d = check(s, q(sender), Verdict.DEFER, "broken-list")
        assert "not a readable pickle" in d.trace[-1].detail and d.list == LIST
    check(s, q("friend@x.example", to="other@lists.example.com"), Verdict.ACCEPT, "accept")
    check(s, q("n@y.example", to="other@lists.example.com"), Verdict.HOLD,
          "nonmember-moderation")
    # What does not read the list's rows still answers: the null sender, the -owner.
    check(s, q(""), Verdict.REJECT, "null-sender")
    check(s, q(to="test-owner@lists.example.com"), Verdict.ACCEPT, "administrative-address")


@pytest.mark.parametrize("mode", [Mode.MAILMAN3, Mode.MAILMAN2])
def test_at_list_entry_naming_a_broken_list_defers(mode):
    """An ``@list`` entry whose list's rows could not be read cannot say whether the
    sender is a member of it: the post gets the temporary failure (never the nonmember
    action, a permanent rejection from policyd's own trouble), unless another entry of
    the same group matches (its action is the answer whatever the broken list holds)."""
    broken = ListSpec("friends@lists.example.com", mode=mode,
                      members=(MemberSpec("friend@y.example"),),
                      broken="mailinglist.members holds a pickle policyd will not load")
    s = snap(mode, others=(broken,), default_nonmember_action=R,
             accept_these_nonmembers=("@friends@lists.example.com", "^known@"),
             hold_these_nonmembers=("held@z.example",))
    d = check(s, q("friend@y.example"), Verdict.DEFER, "nonmember-moderation",
              sender="friend@y.example")
    assert "friends@lists.example.com" in d.reason and "could not be read" in d.reason
    assert "will not load" in d.reason
    # Another entry of the group matches: accepted whatever the broken list holds.
    check(s, q("known@y.example"), Verdict.ACCEPT, "accept")
    # Not named by any entry of the accept group and the list default applies only
    # after the groups: the unread membership still decides first.
    check(s, q("held@z.example"), Verdict.DEFER, "nonmember-moderation")
    # A member of the list itself never reaches the nonmember entries.
    s2 = snap(mode, others=(broken,), members=(MemberSpec("m@x.example", A),),
              default_nonmember_action=R,
              accept_these_nonmembers=("@friends@lists.example.com",))
    check(s2, q("m@x.example"), Verdict.ACCEPT,
          "member-moderation" if mode is Mode.MAILMAN3 else "accept")


def test_a_list_that_cannot_be_built_is_broken_not_the_snapshot():
    """An exception while building one list (here: members that are not addresses or
    specs) marks that list broken instead of failing the whole build."""
    bad = ListSpec("bad@lists.example.com", members=(object(),))
    s = snap(others=(bad,))
    assert list(s.broken) == ["bad@lists.example.com"]
    assert "cannot build the list" in s.broken["bad@lists.example.com"]
    check(s, q(to="bad@lists.example.com"), Verdict.DEFER, "broken-list")
    check(s, q("friend@x.example", to="other@lists.example.com"), Verdict.ACCEPT, "accept")


def test_replace_lists_tracks_broken_lists():
    """An incremental rebuild marks a list broken, and clears the mark once it is read
    again, exactly as a full build would."""
    from policyd.core.snapshot import replace_lists

    s = snap()
    broke = replace_lists(s, [ListSpec(LIST, broken="unknown Mailman action 9")],
                          version="2")
    assert dict(broke.broken) == {LIST: "unknown Mailman action 9"}
    assert broke.lists["other@lists.example.com"] is s.lists["other@lists.example.com"]
    check(broke, q(), Verdict.DEFER, "broken-list")
    fixed = replace_lists(broke, [ListSpec(LIST)], version="3")
    assert dict(fixed.broken) == {}
    check(fixed, q(), Verdict.HOLD, "nonmember-moderation")
    gone = replace_lists(broke, [], [LIST], version="4")
    assert dict(gone.broken) == {}


# --- Mailman 3 mode ----------------------------------------------------------------------

def _with_message(query, headers=b"To: test@lists.example.com\nSubject: x\n"):
    from policyd.core.message import parse_message
    return query._replace(message=parse_message(headers, b"hi\n"))


def test_no_senders_discarded():
    """Mailman 3 discards a message with no valid sender address (seen in the message)."""
    check(snap(), _with_message(q(envelope="\"quoted part\"@x.example"),
                                b"From: John Doe\nSubject: x\n"),
          Verdict.DISCARD, "no-senders")


@pytest.mark.parametrize("envelope", ["pat@example.com.", "pat@@example.com",
                                      "p\u00e4t@example.com", "pat@b\u00fccher.example", ""])
@pytest.mark.parametrize("nonmember", [R, D, H])
def test_no_senders_without_a_message_is_no_opinion(envelope, nonmember):
    """Without the message (Postfix) an envelope sender that Mailman's validator drops
    (or the null sender, with null_sender = mailman) leaves no sender policyd can see,
    but Mailman takes the post from From:, which the MTA did not send: neither
    ``no-senders`` (discard) nor the default nonmember action decides; no opinion."""
    s = snap(members=(MemberSpec("pat@example.com"),), default_nonmember_action=nonmember)
    for explain in (True, False):
        d = decide(s, q(envelope=envelope), explain=explain, null_sender="mailman")
        assert (d.verdict, d.rule) == (Verdict.ACCEPT, "accept"), d.trace
    trace = {step.rule: step for step in decide(s, q(envelope=envelope),
                                                null_sender="mailman").trace}
    assert not trace["no-senders"].hit and "not evaluated" in trace["no-senders"].detail
    assert "not evaluated" in trace["nonmember-moderation"].detail
    # With the message, the same envelope and no From: is Mailman's no-senders discard.
    d = decide(s, _with_message(q(envelope=envelope)), null_sender="mailman")
    assert (d.verdict, d.rule) == (Verdict.DISCARD, "no-senders")


@pytest.mark.parametrize("bans, site, sender", [
    (("bad@x.example",), (), "bad@x.example"),
    (("^.*@spam\\.example$",), (), "a@spam.example"),
    (("^.*@SPAM\\.example$",), (), "a@spam.example"),  # IGNORECASE
    ((), ("bad@x.example",), "bad@x.example"),
    ((), ("^bad",), "bad@x.example"),
])
def test_banned_discarded(bans, site, sender):
    """List and site bans, exact and ^regex, discard — even for members, even in an
    emergency (Mailman 3.3.10's chain checks bans first)."""
    s = snap(bans=bans, site_bans=site, emergency=True,
             members=(MemberSpec(sender, A),))
    check(s, q(envelope=sender), Verdict.DISCARD, "banned-address", sender)


def test_any_banned_sender_discards():
    """A banned Reply-To: discards a post from a member."""
    s = snap(bans=("bad@x.example",), members=(MemberSpec("m@x.example", A),))
    check(s, q(envelope="m@x.example", reply_to="bad@x.example"), Verdict.DISCARD,
          "banned-address", "bad@x.example")


@pytest.mark.parametrize("bans, site, sender, verdict", [
    # Mailman's is_banned: exact bans (list, then site) before any pattern: no error.
    (("^(bad", "bad@x.example"), (), "bad@x.example", Verdict.DISCARD),
    (("^(bad",), ("bad@x.example",), "bad@x.example", Verdict.DISCARD),
    # Else it reaches the entry that does not compile and raises: the post is shunted.
    (("^(bad",), (), "anyone@x.example", Verdict.DEFER),
    ((), ("^[bad",), "anyone@x.example", Verdict.DEFER),
    # A list pattern that bans the sender comes before the site's patterns ...
    (("^any",), ("^[bad",), "anyone@x.example", Verdict.DISCARD),
    # ... but beside a bad list entry, the rows' order decides: doubt.
    (("^any", "^(bad"), (), "anyone@x.example", Verdict.DEFER),
])
def test_a_ban_that_does_not_compile_is_doubt(bans, site, sender, verdict):
    """Unlike a ``*_these_nonmembers`` entry, a ``^`` ban that does not compile is not
    skipped by Mailman 3.3.10: ``BanManager.is_banned`` calls ``re.match`` on it, which
    raises for every sender not banned exactly, and the post is shunted. policyd answers
    the temporary failure (never an accept or a reject it cannot know), and says which."""
    s = snap(bans=bans, site_bans=site, members=(MemberSpec("anyone@x.example", A),))
    d = check(s, q(envelope=sender), verdict, "banned-address", sender)
    if verdict is Verdict.DEFER:
        assert "not a valid regular expression" in d.reason
    assert any("not a valid regular expression" in p for p in s.problems)


def test_a_ban_that_does_not_compile_waits_for_the_message_on_a_list_with_a_password():
    """Mailman's ``approved`` runs before ``banned-address``: on a list with a moderator
    password the envelope-only question (Exim's RCPT ACL, Postfix) cannot know that the
    post will not pass, so the bad ban is no 4xx there; with the message, it is."""
    from policyd.core.passwords import hash_password
    from policyd.core.message import parse_message

    s = snap(bans=("^(bad",), members=(MemberSpec("m@x.example", A),),
             moderator_password=hash_password("secret"))
    check(s, q(envelope="m@x.example"), Verdict.ACCEPT, "member-moderation")
    message = parse_message(b"From: m@x.example\nSubject: hi\nMessage-ID: <1@x>\n")
    check(s, Query(LIST, "m@x.example", message=message), Verdict.DEFER, "banned-address")


def test_emergency_holds_members():
    check(snap(emergency=True, members=(MemberSpec("m@x.example", A),)),
          q("m@x.example"), Verdict.HOLD, "emergency")


@pytest.mark.parametrize("own, default, verdict, rule", [
    (A, DEF, Verdict.ACCEPT, "member-moderation"),
    (H, DEF, Verdict.HOLD, "member-moderation"),
    (R, DEF, Verdict.REJECT, "member-moderation"),
    (D, DEF, Verdict.DISCARD, "member-moderation"),
    (DEF, R, Verdict.ACCEPT, "accept"),
    (None, A, Verdict.ACCEPT, "member-moderation"),
    (None, H, Verdict.HOLD, "member-moderation"),
    (None, R, Verdict.REJECT, "member-moderation"),
    (None, D, Verdict.DISCARD, "member-moderation"),
    (None, DEF, Verdict.ACCEPT, "accept"),
])
def test_member_actions(own, default, verdict, rule):
    """The member's own action, else the list default; defer is no opinion."""
    s = snap(members=(MemberSpec("m@x.example", own),), default_member_action=default,
             default_nonmember_action=R)
    d = check(s, q("m@x.example"), verdict, rule, "m@x.example")
    assert d.action is (own if own is not None else default)


def test_first_member_in_sender_order_decides():
    """From: comes before the envelope: a held From: member beats an accepted envelope."""
    s = snap(members=(MemberSpec("a@x.example", A), MemberSpec("h@x.example", H)))
    check(s, q("a@x.example", frm="h@x.example"), Verdict.HOLD, "member-moderation",
          "h@x.example")
    check(s, q("h@x.example", frm="a@x.example"), Verdict.ACCEPT, "member-moderation",
          "a@x.example")


@pytest.mark.parametrize("field", ["envelope", "frm", "reply_to", "sender"])
def test_member_found_in_any_sender_field(field):
    """A member in From:, envelope, Reply-To: or Sender: is a member post."""
    s = snap(members=(MemberSpec("m@x.example", A),), default_nonmember_action=R)
    value = "M@X.example" if field == "envelope" else "Member <M@X.example>"
    kwargs = {"envelope": "stranger@y.example", field: value}
    check(s, q(**kwargs), Verdict.ACCEPT, "member-moderation", "m@x.example")


def test_member_through_another_address_of_the_same_user():
    """Mailman 3: an address of a subscribed user's account counts as that member."""
    s = snap(members=(MemberSpec("work@x.example", H),),
             user_aliases={"home@y.example": "work@x.example"}, default_nonmember_action=R)
    d = check(s, q("home@y.example"), Verdict.HOLD, "member-moderation", "home@y.example")
    assert "work@x.example" in d.reason


@pytest.mark.parametrize("own, verdict, rule", [
    (A, Verdict.ACCEPT, "nonmember-moderation"),
    (H, Verdict.HOLD, "nonmember-moderation"),
    (R, Verdict.REJECT, "nonmember-moderation"),
    (D, Verdict.DISCARD, "nonmember-moderation"),
    (DEF, Verdict.ACCEPT, "accept"),
    (None, Verdict.REJECT, "nonmember-moderation"),
])
def test_nonmember_own_action(own, verdict, rule):
    """A nonmember's own action beats the patterns and the list default."""
    s = snap(nonmembers=(MemberSpec("n@y.example", own),), default_nonmember_action=R,
             discard_these_nonmembers=("n@y.example",) if own is not None else ())
    check(s, q("n@y.example"), verdict, rule, "n@y.example")


@pytest.mark.parametrize("field, entry, verdict, rule", [
    ("accept_these_nonmembers", "n@y.example", Verdict.ACCEPT, "accept"),
    ("hold_these_nonmembers", "n@y.example", Verdict.HOLD, "nonmember-moderation"),
    ("reject_these_nonmembers", "n@y.example", Verdict.REJECT, "nonmember-moderation"),
    ("discard_these_nonmembers", "n@y.example", Verdict.DISCARD, "nonmember-moderation"),
    ("hold_these_nonmembers", "^n@.*", Verdict.HOLD, "nonmember-moderation"),
    ("discard_these_nonmembers", "^.*@y\\.example$", Verdict.DISCARD, "nonmember-moderation"),
    ("accept_these_nonmembers", "@other@lists.example.com", Verdict.REJECT,
     "nonmember-moderation"),  # n@y is not a member of other@
    ("hold_these_nonmembers", "N@Y.example", Verdict.REJECT, "nonmember-moderation"),
    ("hold_these_nonmembers", "^N@", Verdict.REJECT, "nonmember-moderation"),
    ("hold_these_nonmembers", "^n@(", Verdict.REJECT, "nonmember-moderation"),
])
def test_nonmember_patterns(field, entry, verdict, rule):
    """Exact and ^regex entries; Mailman 3 matches them case-sensitively (re.match) on the
    lower-cased sender; a bad regex is skipped; otherwise the list default applies."""
    s = snap(default_nonmember_action=R, **{field: (entry,)})
    check(s, q("n@y.example"), verdict, rule)


def test_at_list_entry_accepts_members_of_the_other_list():
    """@otherlist in accept_these_nonmembers admits that list's members."""
    s = snap(default_nonmember_action=R, accept_these_nonmembers=("@other@lists.example.com",))
    check(s, q("friend@x.example"), Verdict.ACCEPT, "accept")
    check(s, q("stranger@x.example"), Verdict.REJECT, "nonmember-moderation")


def test_pattern_lists_in_order_accept_first():
    """accept, hold, reject, discard: the first list that matches wins."""
    s = snap(default_nonmember_action=D, hold_these_nonmembers=("n@y.example",),
             reject_these_nonmembers=("n@y.example",))
    check(s, q("n@y.example"), Verdict.HOLD, "nonmember-moderation")


def test_nonmember_senders_checked_in_order():
    """For each sender in turn: its own action, then the pattern lists."""
    s = snap(default_nonmember_action=A, reject_these_nonmembers=("first@y.example",),
             nonmembers=(MemberSpec("second@y.example", H),))
    check(s, q("second@y.example", frm="first@y.example"), Verdict.REJECT,
          "nonmember-moderation", "first@y.example")
    check(s, q("first@y.example", frm="second@y.example"), Verdict.HOLD,
          "nonmember-moderation", "second@y.example")


@pytest.mark.parametrize("default, verdict, rule", [
    (A, Verdict.ACCEPT, "nonmember-moderation"),
    (H, Verdict.HOLD, "nonmember-moderation"),
    (R, Verdict.REJECT, "nonmember-moderation"),
    (D, Verdict.DISCARD, "nonmember-moderation"),
    (DEF, Verdict.ACCEPT, "accept"),
])
def test_nonmember_default_action(default, verdict, rule):
    check(snap(default_nonmember_action=default), q("n@y.example"), verdict, rule)


def test_rejection_notice_carried():
    s = snap(default_nonmember_action=R, rejection_notice="Members only, sorry.")
    assert decide(s, q("n@y.example")).rejection_notice == "Members only, sorry."


# --- Mailman 2.1 mode --------------------------------------------------------------------

MM2 = Mode.MAILMAN2


def test_mm2_admin_alias_is_the_bounces_address_not_an_unknown_list():
    """Mailman 2.1 makes LIST-admin (its old name of LIST-bounces): not a post, and the
    null sender may write to it.  It was ``550 5.1.1 No such list`` (a permanent
    rejection of mail Mailman takes).  Mailman 3 has no -admin address."""
    admin = LIST.replace("@", "-admin@")
    check(snap(mode=MM2, default_nonmember_action=R), q("n@y.example", to=admin),
          Verdict.ACCEPT, "administrative-address")
    check(snap(mode=MM2), q("", to=admin), Verdict.ACCEPT, "administrative-address")
    check(snap(default_nonmember_action=R), q("n@y.example", to=admin), Verdict.REJECT,
          "unknown-list")


@pytest.mark.parametrize("moderation, verdict, rule", [
    (None, Verdict.ACCEPT, "accept"),
    (A, Verdict.ACCEPT, "accept"),
    (H, Verdict.HOLD, "member-moderation"),
    (R, Verdict.REJECT, "member-moderation"),
    (D, Verdict.DISCARD, "member-moderation"),
])
def test_mm2_member_moderation(moderation, verdict, rule):
    """Moderate bit set: member_moderation_action; otherwise the member is accepted."""
    s = snap(MM2, members=(MemberSpec("m@x.example", moderation),),
             default_nonmember_action=R)
    check(s, q("m@x.example"), verdict, rule)


@pytest.mark.parametrize("moderation, verdict, rule", [
    (None, Verdict.HOLD, "emergency"),
    (R, Verdict.REJECT, "member-moderation"),
    (D, Verdict.DISCARD, "member-moderation"),
])
def test_mm2_emergency_after_moderation(moderation, verdict, rule):
    """Mailman 2 runs Moderate before Emergency."""
    s = snap(MM2, emergency=True, members=(MemberSpec("m@x.example", moderation),))
    check(s, q("m@x.example"), verdict, rule)


def test_mm2_bans_do_not_apply_to_posts():
    """Mailman 2's ban_list only blocks subscription."""
    s = snap(MM2, bans=("m@x.example",), members=(MemberSpec("m@x.example"),))
    check(s, q("m@x.example"), Verdict.ACCEPT, "accept")


@pytest.mark.parametrize("field, entry, verdict, rule", [
    ("accept_these_nonmembers", "N@Y.example", Verdict.ACCEPT, "accept"),
    ("hold_these_nonmembers", "n@y.example", Verdict.HOLD, "nonmember-moderation"),
    ("reject_these_nonmembers", "^N@", Verdict.REJECT, "nonmember-moderation"),
    ("discard_these_nonmembers", "y\\.EXAMPLE$", Verdict.HOLD, "nonmember-moderation"),
    ("discard_these_nonmembers", "^.*Y\\.EXAMPLE$", Verdict.DISCARD, "nonmember-moderation"),
    ("accept_these_nonmembers", "@other@lists.example.com", Verdict.HOLD,
     "nonmember-moderation"),
])
def test_mm2_nonmember_lists(field, entry, verdict, rule):
    """Mailman 2's GetPattern: case-insensitive exact, ^regex with re.search IGNORECASE,
    @list; then generic_nonmember_action (hold here)."""
    s = snap(MM2, default_nonmember_action=H, **{field: (entry,)})
    check(s, q("n@y.example"), verdict, rule)


def test_mm2_nonmember_lists_use_from_not_envelope():
    """get_sender(): From: first, then Sender:, then the envelope."""
    s = snap(MM2, default_nonmember_action=H, reject_these_nonmembers=("env@y.example",),
             discard_these_nonmembers=("snd@y.example",))
    check(s, q("env@y.example", frm="from@y.example"), Verdict.HOLD, "nonmember-moderation")
    check(s, q("env@y.example"), Verdict.REJECT, "nonmember-moderation")
    check(s, q("env@y.example", sender="snd@y.example"), Verdict.DISCARD,
          "nonmember-moderation")


@pytest.mark.parametrize("generic, verdict, rule", [
    (A, Verdict.ACCEPT, "accept"),
    (H, Verdict.HOLD, "nonmember-moderation"),
    (R, Verdict.REJECT, "nonmember-moderation"),
    (D, Verdict.DISCARD, "nonmember-moderation"),
])
def test_mm2_generic_nonmember_action(generic, verdict, rule):
    check(snap(MM2, default_nonmember_action=generic), q("n@y.example"), verdict, rule)


def test_mm2_accepted_nonmember_still_held_in_emergency():
    s = snap(MM2, emergency=True, accept_these_nonmembers=("n@y.example",))
    check(s, q("n@y.example"), Verdict.HOLD, "emergency")


def test_mm2_member_case_insensitive_and_reply_to():
    """Mailman 2 lower-cases senders; Reply-To: can make the post a member post."""
    s = snap(MM2, members=(MemberSpec("M@X.example", H),), default_nonmember_action=R)
    check(s, q("n@y.example", reply_to="m@x.EXAMPLE"), Verdict.HOLD, "member-moderation")


@pytest.mark.parametrize("field", ["envelope", "frm", "reply_to", "sender"])
def test_mm2_trailing_dot_domain_is_not_the_member(field):
    """Mailman 2.1 looks a sender up lower-cased and otherwise as written
    (``OldStyleMemberships.__get_cp_member``), so ``m@x.example.`` is a nonmember where
    ``m@x.example`` is subscribed; Mailman 3 drops such an address (its validator)."""
    s = snap(MM2, members=(MemberSpec("m@x.example"),), default_nonmember_action=R)
    fields = {"envelope": "n@y.example", field: "M@X.example."}
    check(s, q(**fields), Verdict.REJECT, "nonmember-moderation")
    fields[field] = "M@X.example"
    check(s, q(**fields), Verdict.ACCEPT, "accept")


def test_mm2_trailing_dot_sender_meets_the_nonmember_entries_as_written():
    """Mailman 2.1 compares the nonmember entries with the address as written: an
    entry without the dot does not match, one with it does, and a ``$``-anchored
    regex for the dotless domain does not."""
    s = snap(MM2, default_nonmember_action=H, reject_these_nonmembers=("n@y.example",),
             discard_these_nonmembers=("n@y.example.",))
    check(s, q("n@y.example."), Verdict.DISCARD, "nonmember-moderation")
    s = snap(MM2, default_nonmember_action=H, reject_these_nonmembers=("^n@y\\.example$",))
    check(s, q("N@Y.example."), Verdict.HOLD, "nonmember-moderation")
    check(s, q("N@Y.example"), Verdict.REJECT, "nonmember-moderation")


def test_mm3_trailing_dot_domain_is_dropped_not_kept():
    """Mailman 3's validator drops the address: with no other sender in the message that
    is no-senders (not a nonmember spelled with a dot); without the message (Postfix)
    no opinion, Mailman decides from the From: policyd did not see."""
    s = snap(members=(MemberSpec("m@x.example"),), default_nonmember_action=R)
    check(s, _with_message(q("m@x.example.")), Verdict.DISCARD, "no-senders")
    check(s, q("m@x.example."), Verdict.ACCEPT, "accept")


# --- the trace ---------------------------------------------------------------------------

def test_trace_records_hits_and_misses_in_chain_order():
    s = snap(default_nonmember_action=R)
    d = decide(s, q("n@y.example"))
    names = [step.rule for step in d.trace]
    chain = [r.name for r in MAILMAN3_CHAIN]
    assert names == ["role-address", "unknown-list", "null-sender", "administrative-address",
                     "broken-list", *chain[:chain.index("nonmember-moderation") + 1]]
    assert [step.hit for step in d.trace] == [False] * (len(names) - 1) + [True]
    assert d.to_dict()["trace"][-1]["rule"] == "nonmember-moderation"


def test_every_rule_is_named_and_described():
    for rule in ALL_RULES + MAILMAN2_CHAIN:
        assert rule.name and rule.description


# --- the MTA path's chain for a query without a message -------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from policyd.core.chain import MISS_WITHOUT_MESSAGE  # noqa: E402
from policyd.core.rules import Context, Miss, first_member, mode_senders  # noqa: E402

_list_settings = st.fixed_dictionaries({
    "mode": st.sampled_from(list(Mode)),
    "emergency": st.booleans(),
    "default_member_action": st.sampled_from(list(Action)),
    "default_nonmember_action": st.sampled_from(list(Action)),
    "moderator_password": st.sampled_from([None, "{plaintext}secret"]),
    "header_matches": st.sampled_from([(), (("x-spam", "yes", Action.DISCARD),),
                                       (("subject", ".", None),)]),
    "max_message_size": st.sampled_from([0, 1, 40]),
    "max_num_recipients": st.sampled_from([0, 1, 10]),
    "require_explicit_destination": st.booleans(),
    "administrivia": st.booleans(),
    "bounce_matching_headers": st.sampled_from(["", "X-Bad: yes"]),
    "newsgroup_moderated": st.booleans(),
    "dmarc_mitigate_action": st.sampled_from([0, 1, 2, 3, 4]),
    "dmarc_mitigate_unconditionally": st.booleans(),
    "nonmembers": st.sampled_from([(), (MemberSpec("carol@example.org", Action.ACCEPT),)]),
    "bans": st.sampled_from([(), ("^.*@spam\\.example$",)]),
})
_senders = st.sampled_from(["alice@example.com", "carol@example.org", "eve@spam.example",
                            "", "nobody@elsewhere.example"])


def _content_list(settings_: dict):
    known = {f for f in ListSpec.__dataclass_fields__}
    spec = {k: v for k, v in settings_.items() if k in known}
    return ListSpec(LIST, members=(MemberSpec("alice@example.com"),), **spec)


@settings(max_examples=400, deadline=None)
@given(_list_settings, _senders, _senders, st.sampled_from(
    [LIST, "test-owner@lists.example.com", "test-bounces@lists.example.com"]))
def test_envelope_only_chain_decides_like_the_full_chain(settings_, envelope, header, to):
    """A query without a message: the MTA path's shorter chain gives exactly the decision
    the full chain (``policyctl query``'s) gives, less the trace."""
    snapshot = build([_content_list(settings_)], version="v", built_at=0.0)
    query = Query(to, envelope, f"<{header}>" if header else None)
    for null_sender in ("reject", "mailman"):
        fast = decide(snapshot, query, explain=False, null_sender=null_sender)
        full = decide(snapshot, query, explain=True, null_sender=null_sender)
        assert fast._replace(reason="", trace=()) == full._replace(reason="", trace=())


@settings(max_examples=300, deadline=None)
@given(_list_settings, _senders)
def test_rules_left_out_without_a_message_only_miss_without_a_note(settings_, sender):
    snapshot = build([_content_list(settings_)], version="v", built_at=0.0)
    query = Query(LIST, sender, f"<{sender}>" if sender else None)
    target = snapshot.resolve(LIST)
    rules = [rule for rule in ALL_RULES if rule.name in MISS_WITHOUT_MESSAGE]
    assert {rule.name for rule in rules} == MISS_WITHOUT_MESSAGE
    for explain in (True, False):
        ctx = Context(snapshot, query, target, (sender,) if sender else (), None, explain)
        for rule in rules:
            result = rule.check(ctx)
            assert type(result) is Miss and result.note is None, rule.name


# --- the rules a list's MTA-path chain leaves out (``quiet``) --------------------------

_QUIET_RULES = [rule for rule in ALL_RULES if hasattr(rule, "quiet")]


@settings(max_examples=300, deadline=None)
@given(_list_settings, _senders, _senders, st.booleans(),
       st.sampled_from([None, "an unreadable pickle"]))
def test_a_quiet_rule_misses_without_a_note_whatever_the_query(settings_, envelope, header,
                                                                site_ban, broken):
    """``quiet(policy, snapshot)`` promises a miss without a note for every query to that
    list, with or without a message: the MTA path may leave the rule out."""
    from policyd.core.message import parse_message

    spec = _content_list(settings_)
    if broken:
        spec = dataclasses.replace(spec, broken=broken)
    snapshot = build([spec], version="v", built_at=0.0,
                     site_bans=("eve@spam.example",) if site_ban else ())
    target = snapshot.resolve(LIST)
    policy = target.list
    message = parse_message(f"From: <{header or 'x@y.example'}>\r\nSubject: hi\r\n"
                            .encode(), b"body\r\n", 100)
    queries = [Query(LIST, envelope, f"<{header}>" if header else None),
               Query(LIST, envelope, message=message)]
    assert {rule.name for rule in _QUIET_RULES} >= {"unknown-list", "broken-list",
                                                    "banned-address", "emergency",
                                                    "news-moderation"}
    for rule in _QUIET_RULES:
        if not rule.quiet(policy, snapshot):
            continue
        for query in queries:
            senders = mode_senders(policy.mode, query)
            for explain in (True, False):
                ctx = Context(snapshot, query, target, senders,
                              first_member(policy, senders), explain)
                result = rule.check(ctx)
                assert type(result) is Miss and result.note is None, (rule.name, result)


def test_a_lists_mta_chain_follows_the_site_bans_of_the_snapshot():
    """A list carried over into a snapshot with other site bans (an incremental refresh
    keeps unchanged lists) is decided with those bans, not with the chain made before."""
    clean = snap()
    query = q(envelope="eve@spam.example")
    assert decide(clean, query, explain=False).rule == "nonmember-moderation"
    policy = clean.lists[LIST]
    banned = dataclasses.replace(
        clean, site_bans=snap(site_bans=("eve@spam.example",)).site_bans)
    assert banned.lists[LIST] is policy  # the same list, with what it derived
    assert decide(banned, query, explain=False).rule == "banned-address"
    assert decide(clean, query, explain=False).rule == "nonmember-moderation"


def test_replacing_a_list_does_not_carry_what_it_derived():
    snapshot = snap()
    decide(snapshot, q(), explain=False)
    policy = snapshot.lists[LIST]
    assert policy.derived
    emergency = dataclasses.replace(policy, emergency=True)
    assert emergency.derived == {} and emergency == dataclasses.replace(
        policy, emergency=True)


# --- address fields too large to read at SMTP time (``address-headers``) ---------------

from policyd.core.message import parse_message  # noqa: E402
from policyd.core.rules import (  # noqa: E402
    MAX_ADDRESS_CHARS,
    MAX_ADDRESS_FIELDS,
    MAX_ADDRESS_SPECIALS,
    TOO_DEEP,
)

MEMBER = "pat@example.com"


def _members_snap(mode, **settings):
    return snap(mode, members=(MemberSpec(MEMBER),), default_nonmember_action=R, **settings)


def _in_message(frm=None, reply_to=None, sender=None, envelope="nobody@x.example", to=LIST):
    block = "".join(f"{name}: {value}\n" for name, value in
                    (("From", frm), ("Reply-To", reply_to), ("Sender", sender))
                    if value is not None) + "Subject: hi\n"
    return Query(to, envelope, message=parse_message(block.encode()))


def _reply_to(count: int, name_length: int) -> str:
    """A Reply-To: of ``count`` quoted mailboxes, folded, the member's last."""
    boxes = [f'"{"N" * name_length} {i}" <someone.{i}@department.example.org>'
             for i in range(count - 1)] + [f"Pat <{MEMBER}>"]
    return ",\n ".join(boxes)


_HEADER_SLOTS = {"from": 0, "reply_to": 1, "sender": 2}


def _one_line(slot: str, value: str, envelope="nobody@x.example", to=LIST) -> Query:
    fields = [None, None, None]
    fields[_HEADER_SLOTS[slot]] = value
    return Query(to, envelope, *fields)


def _message_query(slot: str, value: str, **kwargs) -> Query:
    return _in_message(**{{"from": "frm", "reply_to": "reply_to",
                           "sender": "sender"}[slot]: value}, **kwargs)


def _deferred(decision, why: str):
    assert (decision.verdict, decision.rule) == (Verdict.DEFER, "address-headers"), \
        decision.trace
    step = decision.trace[-1]
    assert step.rule == "address-headers" and step.hit and why in step.detail, step
    assert decision.senders == ()


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("slot", ["from", "reply_to", "sender"])
@pytest.mark.parametrize("make", [_one_line, _message_query])
def test_address_fields_too_long_to_read_get_the_temporary_failure(mode, slot, make):
    """A From:, Reply-To: or Sender: over MAX_ADDRESS_CHARS (a plain member address at its
    end, so no silent skip could accept it) is deferred, whether it came as Exim's
    one-line ``from=`` and the like or in ``headers=``, and the trace says why."""
    value = "x" * MAX_ADDRESS_CHARS + f" <{MEMBER}>"
    s = _members_snap(mode)
    d = check(s, make(slot, value), Verdict.DEFER, "address-headers")
    _deferred(d, f"more than {MAX_ADDRESS_CHARS}")
    assert [step.rule for step in d.trace] == ["role-address", "unknown-list", "null-sender",
                                               "administrative-address", "broken-list",
                                               "address-headers"]
    # Crafted specials (the parser's expensive characters) count sooner than length.
    d = decide(s, make(slot, "@" * (MAX_ADDRESS_SPECIALS + 1)))
    _deferred(d, f"hold {MAX_ADDRESS_SPECIALS + 1} of")


@pytest.mark.parametrize("mode", list(Mode))
def test_the_bound_counts_every_address_field_together(mode):
    """Three fields each under the bound, over it together."""
    third = "x" * (MAX_ADDRESS_CHARS // 3 + 10)
    for q_ in (_one_line("from", third)._replace(reply_to_header=third, sender_header=third),
               _in_message(third, third, third)):
        _deferred(decide(_members_snap(mode), q_), "(From: ")


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("make", [_one_line, _message_query])
def test_long_real_address_fields_under_the_bound_are_decided(mode, make):
    """A Reply-To: of many mailboxes with long names, folded, just under both bounds (its
    unfolded length and its specials), is read: its member makes the post a member's."""
    value = _reply_to(60, 95)
    unfolded = value.replace("\n", "")
    assert MAX_ADDRESS_CHARS - 200 < len(unfolded) <= MAX_ADDRESS_CHARS - 20
    assert sum(map(unfolded.count, '@<>[]:;,()\\"')) < MAX_ADDRESS_SPECIALS
    value += " " * (MAX_ADDRESS_CHARS - len(unfolded) - 7)   # From: "a@x.ex" (6) too
    s = _members_snap(mode)
    q_ = make("reply_to", value)
    q_ = q_._replace(from_header="a@x.ex") if q_.message is None else _in_message(
        "a@x.ex", value)
    d = check(s, q_, Verdict.ACCEPT, "accept")
    assert MEMBER in d.senders
    # Just under the specials bound: a Reply-To: of bare angle addresses.
    boxes = ", ".join([f"<u{i}@x.example>" for i in range(MAX_ADDRESS_SPECIALS // 4 - 1)]
                      + [f"<{MEMBER}>"])
    assert sum(map(boxes.count, '@<>,')) <= MAX_ADDRESS_SPECIALS
    check(s, make("reply_to", boxes), Verdict.ACCEPT, "accept")


@pytest.mark.parametrize("mode", list(Mode))
def test_too_many_fields_of_one_name_get_the_temporary_failure(mode):
    many = "".join(f"Reply-To: <u{i}@x.example>\n" for i in range(MAX_ADDRESS_FIELDS + 1))
    q_ = Query(LIST, MEMBER, message=parse_message(
        f"From: <{MEMBER}>\n{many}Subject: hi\n".encode()))
    _deferred(decide(_members_snap(mode), q_), f"{MAX_ADDRESS_FIELDS + 1} Reply-To: fields")
    fewer = "".join(f"Reply-To: <u{i}@x.example>\n" for i in range(MAX_ADDRESS_FIELDS))
    q_ = Query(LIST, MEMBER, message=parse_message(
        f"From: <{MEMBER}>\n{fewer}Subject: hi\n".encode()))
    check(_members_snap(mode), q_, Verdict.ACCEPT, "accept")
    # Exim's one-line reply_to= (``$rh_reply-to:``): repeated fields joined by newlines.
    joined = "\n".join(f"<u{i}@x.example>" for i in range(MAX_ADDRESS_FIELDS + 1))
    _deferred(decide(_members_snap(mode), q(MEMBER, reply_to=joined)),
              f"{MAX_ADDRESS_FIELDS + 1} Reply-To: fields")
    joined = "\n".join(f"<u{i}@x.example>" for i in range(MAX_ADDRESS_FIELDS))
    check(_members_snap(mode), q(MEMBER, reply_to=joined), Verdict.ACCEPT, "accept")


@pytest.mark.parametrize("mode", list(Mode))
def test_nesting_the_parser_cannot_follow_gets_the_temporary_failure(mode):
    """Groups in groups (the tokenizer recurses once per level) past MAX_GROUP_DEPTH; in
    Mailman 2 mode also an unclosed comment in comments (Python 2.7's tokenizer recurses
    without the strict parser's balance check) past the interpreter's recursion limit,
    within the specials bound."""
    values = ["a:" * 40 + f"<{MEMBER}>"]
    if mode is Mode.MAILMAN2:
        values.append("(" * 1000 + f"<{MEMBER}>")
    for value in values:
        for q_ in (_one_line("from", value), _message_query("from", value)):
            _deferred(decide(_members_snap(mode), q_), TOO_DEEP)


@pytest.mark.parametrize("mode", list(Mode))
def test_a_colon_in_an_unquoted_name_is_still_read(mode):
    """``Re: Pat <pat@...>`` is a group to the tokenizer, one level deep: read as ever."""
    check(_members_snap(mode), q(frm=f"Re: Meeting: Pat <{MEMBER}>"), Verdict.ACCEPT,
          "accept")


@pytest.mark.parametrize("mode", list(Mode))
def test_the_recipient_rules_still_decide_first(mode):
    """Too large address fields: an administrative address is accepted as ever (its
    answer reads no header), the null sender rejected, an unknown list rejected."""
    value = "@" * (MAX_ADDRESS_CHARS + 1)
    s = _members_snap(mode)
    check(s, _one_line("from", value, to="test-owner@lists.example.com"), Verdict.ACCEPT,
          "administrative-address")
    check(s, _one_line("from", value, envelope=""), Verdict.REJECT, "null-sender")
    check(s, _one_line("from", value, to="nolist@lists.example.com"), Verdict.REJECT,
          "unknown-list")


# --- role addresses (RFC 5321 section 4.5.1, RFC 2142) ----------------------------------

@pytest.mark.parametrize("to", ["postmaster@lists.example.com", "Postmaster@Lists.Example.COM",
                                "abuse@alias.example.com", "postmaster+x@lists.example.com"])
@pytest.mark.parametrize("envelope", ["nobody@x.example", ""])
def test_role_address_in_a_list_domain_is_left_to_the_mta(to, envelope):
    """postmaster@ and abuse@ of a list domain are no list: no opinion (as for a domain
    policyd does not manage), whoever the sender is, the null sender included (bounces go
    to postmaster), and the trace says why.  It was ``unknown-list``: 550 5.1.1 at RCPT,
    before the MTA's own aliases could take the address."""
    d = check(snap(), q(envelope, to=to), Verdict.ACCEPT, "role-address")
    assert d.list is None and not d.managed
    assert "role address" in d.trace[-1].detail


def test_a_list_named_like_a_role_keeps_its_list():
    """A list called abuse@ is a list: the role rule misses for it."""
    s = snap(others=(ListSpec("abuse@lists.example.com", default_nonmember_action=R),))
    d = check(s, q(to="abuse@lists.example.com"), Verdict.REJECT, "nonmember-moderation")
    assert d.list == "abuse@lists.example.com"
    assert [step.hit for step in d.trace[:1]] == [False]
    assert d.trace[0].rule == "role-address"


def test_role_addresses_are_configurable():
    """``roles`` (``[rules] role_addresses``): only the local parts given; empty: none."""
    s = snap()
    hostmaster = Query("hostmaster@lists.example.com", "a@x.example")
    postmaster = Query("postmaster@lists.example.com", "a@x.example")
    roles = frozenset({"hostmaster"})
    for explain in (True, False):
        assert decide(s, hostmaster, explain=explain, roles=roles).rule == "role-address"
        assert decide(s, postmaster, explain=explain, roles=roles).rule == "unknown-list"
        assert decide(s, postmaster, explain=explain, roles=frozenset()).rule == \
            "unknown-list"
        assert decide(s, hostmaster, explain=explain).rule == "unknown-list"
        assert decide(s, postmaster, explain=explain, null_sender="mailman",
                      roles=roles).rule == "unknown-list"
