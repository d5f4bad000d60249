"""Agreement cases with whole messages (headers and body): the rules of Mailman's chain
that read the message (approved, loop, header-match, the content holds).

Plain JSON-able data, stdlib only (the oracle reads it inside Mailman's virtualenv).  A
list's ``content`` holds the settings of those rules (set through Mailman's API by the
oracle); a case's ``raw`` is the whole message Mailman parses, and the harness sends
policyd the same message as the Exim DATA ACL does (``headers=``, ``body=``, ``size=``).
Each case names in ``rule`` the rule it exercises (for the per-rule counts).
"""

from __future__ import annotations

import base64

HOST = "lists.example.com"
PASSWORD = "s3cret-Pw"
STRANGER = "boss@outside.example"
MEMBER = "pat@example.com"

ANNOUNCE = f"announce@{HOST}"
LOOPY = f"loopy@{HOST}"
HM = f"hm@{HOST}"
HOLDS = f"holds@{HOST}"
NEWS = f"news@{HOST}"
RELAXED = f"relaxed@{HOST}"
RECIPS = f"recips@{HOST}"
APPROVED_VIEW = f"apprview@{HOST}"
LMTP = f"lmtp@{HOST}"
TRUSTED = "boss@trusted.example"

# Mailman's defaults for a new list, stated, so both sides see the same thing.
_OFF = {"max_num_recipients": 0, "max_message_size": 0,
        "require_explicit_destination": False, "administrivia": False}


def content_lists() -> list[dict]:
    return [
        {"fqdn": ANNOUNCE, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"moderator_password": PASSWORD}},
        {"fqdn": LOOPY, "default_member_action": "defer",
         "default_nonmember_action": "accept", "members": [{"address": MEMBER}]},
        {"fqdn": HM, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"header_matches": [
             ["X-Spam", "yes", "discard"],
             ["X-Spam", "maybe", None],
             ["Subject", "buy now", "reject"],
             ["X-Whitelist", "^ok$", "accept"],
             ["X-Bad", "[unclosed", "reject"],
             ["Content-Type", "application/x-evil", "hold"],
         ]}},
        {"fqdn": HOLDS, "default_member_action": "defer",
         "default_nonmember_action": "defer",
         "members": [{"address": MEMBER, "action": "accept"}],
         "content": {"max_num_recipients": 3, "max_message_size": 1,
                     "require_explicit_destination": True, "administrivia": True,
                     "acceptable_aliases": [f"alias@{HOST}", r"^.*@aliases\.example$"],
                     "bounce_matching_headers": "# a comment\nX-Bounce-Me: ^yes\n"
                                                "bad line without colon\n"}},
        {"fqdn": NEWS, "default_member_action": "defer",
         "default_nonmember_action": "defer",
         "content": {"newsgroup_moderation": "moderated"}},
        {"fqdn": RELAXED, "default_member_action": "defer",
         "default_nonmember_action": "defer", "content": dict(_OFF)},
        # Only a recipient limit: a long To: is over holds@'s 1 KB too, and Mailman's
        # last hit would be max-size.
        {"fqdn": RECIPS, "default_member_action": "defer",
         "default_nonmember_action": "defer", "content": {**_OFF, "max_num_recipients": 3}},
        # What the rules after approved read: the Approved: headers and line gone.
        {"fqdn": APPROVED_VIEW, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"moderator_password": PASSWORD, "administrivia": True,
                     "header_matches": [["Approved", ".", "discard"],
                                        ["X-Approve", ".", "discard"]],
                     "bounce_matching_headers": "Approve: .\n"}},
        # ... and the fields Mailman's LMTP runner appends (X-MailFrom, the hashes).
        {"fqdn": LMTP, "default_member_action": "defer",
         "default_nonmember_action": "reject", "members": [{"address": MEMBER}],
         "content": {"header_matches": [["X-MailFrom", r"@trusted\.example$", "accept"],
                                        ["Approved", ".", "discard"],
                                        # a hash the message itself carries: Mailman's
                                        # LMTP runner deletes it before adding its own
                                        ["Message-ID-Hash", "^FORGED$", "discard"],
                                        ["X-Message-ID-Hash", "^FORGED$", "discard"],
                                        ["X-Message-ID-Hash", "^[A-Z2-7]{32}$", "hold"]]}},
    ]


def message(headers, body="Hello from the agreement suite.\n") -> str:
    return "".join(f"{name}: {value}\n" for name, value in headers) + "\n" + body


def _std(listaddr, sender=STRANGER, subject="A post", to=None, extra=()):
    headers = [("From", sender), ("To", to or listaddr), ("Subject", subject),
               ("Message-ID", "<x@agreement.invalid>"),
               ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")]
    return [h for h in headers if h[1] is not None] + list(extra)


def _case(cid, rule, listaddr, raw, sender=STRANGER, why=""):
    return {"id": f"msg-{cid}", "rule": rule, "recipient": listaddr,
            "envelope_sender": sender, "raw": raw, "why": why}


def _multipart(first_text, subtype="alternative", first_cte=None, part_headers=()):
    extra = ""
    body_text = first_text
    if first_cte == "base64":
        extra = "Content-Transfer-Encoding: base64\n"
        body_text = base64.encodebytes(first_text.encode()).decode()
    parts = "".join(f"{name}: {value}\n" for name, value in part_headers)
    return ("--BOUNDARY\nContent-Type: text/plain; charset=us-ascii\n" + extra + "\n"
            + body_text + "\n--BOUNDARY\n" + (parts or "Content-Type: text/html\n")
            + "\n<p>html</p>\n--BOUNDARY--\n")


def content_cases() -> list[dict]:
    cases = []
    add = cases.append
    mp = [("MIME-Version", "1.0"),
          ("Content-Type", 'multipart/alternative; boundary="BOUNDARY"')]
    # approved
    for cid, extra, body, why in [
        ("appr-header", [("Approved", PASSWORD)], None, "right password in Approved:"),
        ("appr-approve", [("Approve", PASSWORD)], None, "Approve: spelling"),
        ("appr-x", [("X-Approved", PASSWORD)], None, "X-Approved:"),
        ("appr-wrong", [("Approved", "wrong")], None, "wrong password: nonmember reject"),
        ("appr-trailing", [("Approved", PASSWORD + " ")], None,
         "Mailman keeps the trailing space: a mismatch"),
        ("appr-empty", [("Approved", "")], None, "empty Approved:"),
        ("appr-first-wins", [("Approve", "wrong"), ("Approved", PASSWORD)], None,
         "Approve: is looked at before Approved:"),
        ("appr-body", [], f"Approved: {PASSWORD}\nThe announcement.\n", "first body line"),
        ("appr-body-blank", [], f"\n  \nApproved: {PASSWORD}\nThe announcement.\n",
         "blank lines before it"),
        ("appr-body-second", [], f"Hello\nApproved: {PASSWORD}\n", "not the first line"),
        ("appr-body-indent", [], f"  Approved: {PASSWORD}\n", "indented header name"),
        ("appr-body-wrong", [], "approve: nope\nx\n", "wrong password in the body"),
    ]:
        add(_case(cid, "approved", ANNOUNCE,
                  message(_std(ANNOUNCE, extra=extra),
                          body if body is not None else "The announcement.\n"), why=why))
    add(_case("appr-mime", "approved", ANNOUNCE,
              message(_std(ANNOUNCE, extra=mp), _multipart(f"Approved: {PASSWORD}\nhi")),
              why="first text/plain part of multipart/alternative"))
    add(_case("appr-mime-b64", "approved", ANNOUNCE,
              message(_std(ANNOUNCE, extra=mp),
                      _multipart(f"Approved: {PASSWORD}\nhi", first_cte="base64")),
              why="base64 text/plain"))
    add(_case("appr-member-wrong", "approved", ANNOUNCE,
              message(_std(ANNOUNCE, sender=MEMBER, extra=[("Approved", "x")])),
              sender=MEMBER, why="member with a wrong password: member defer"))
    add(_case("appr-no-password", "approved", HM,
              message(_std(HM, extra=[("Approved", PASSWORD)])),
              why="a list without a moderator password ignores Approved:"))
    add(_case("appr-beats-loop", "approved", ANNOUNCE,
              message(_std(ANNOUNCE, extra=[("Approved", PASSWORD), ("List-Post", ANNOUNCE)])),
              why="approved comes before loop"))
    # loop
    for cid, value, why in [
        ("loop-plain", LOOPY, "List-Post: the posting address"),
        ("loop-case", "  LOOPY@Lists.Example.COM  ", "stripped and lower-cased"),
        ("loop-mailto", f"<mailto:{LOOPY}>", "Mailman compares the raw value: no loop"),
        ("loop-other", f"other@{HOST}", "another list"),
    ]:
        add(_case(cid, "loop", LOOPY,
                  message(_std(LOOPY, extra=[("List-Post", value)])), why=why))
    add(_case("loop-second", "loop", LOOPY,
              message(_std(LOOPY, extra=[("List-Post", "<mailto:x@y>"), ("List-Post", LOOPY)])),
              why="any List-Post: field"))
    # header-match
    for cid, extra, subject, why in [
        ("hm-discard", [("X-Spam", "yes")], "A post", "discard"),
        ("hm-case", [("X-Spam", "YES sir")], "A post", "case-insensitive search"),
        ("hm-jump", [("X-Spam", "maybe")], "A post", "no action: jump_chain hold"),
        ("hm-subject", [], "Buy Now cheap", "reject"),
        ("hm-encoded", [], "=?utf-8?q?Buy_now_please?=", "RFC 2047-decoded first"),
        ("hm-accept", [("X-Whitelist", "ok")], "A post", "accept a nonmember"),
        ("hm-accept-anchor", [("X-Whitelist", "ok!")], "A post", "anchored: no match"),
        ("hm-order", [("X-Whitelist", "ok"), ("X-Spam", "yes")], "A post",
         "the first entry that matches wins"),
        ("hm-badregex", [("X-Bad", "[unclosed")], "A post", "a bad pattern is skipped"),
        ("hm-none", [("X-Other", "yes")], "A post", "no match: nonmember reject"),
        ("hm-second-field", [("X-Spam", "no"), ("X-Spam", "yes")], "A post",
         "every field of the header"),
        # 8-bit bytes: compat32's Header, whose encode() joins the lines
        ("hm-8bit-folded", [], "Buy\n\tnow caf\u00e9", "folded 8-bit Subject: joined"),
        ("hm-8bit-formfeed", [], "Buy\x0cnow caf\u00e9", "a form feed splits a line too"),
        ("hm-8bit-encoded", [], "=?utf-8?q?Buy_now?= caf\u00e9",
         "beside 8-bit bytes an encoded word stays encoded: no match"),
        ("hm-8bit-spaces", [], "Buy now\n      caf\u00e9",
         "8-bit Subject whose continuation line is indented"),
    ]:
        add(_case(cid, "header-match", HM,
                  message(_std(HM, subject=subject, extra=extra)), why=why))
    add(_case("hm-part-header", "header-match", HM,
              message(_std(HM, extra=[("MIME-Version", "1.0"),
                                      ("Content-Type", 'multipart/mixed; boundary="BOUNDARY"')]),
                      _multipart("hi", part_headers=[("Content-Type",
                                                      "application/x-evil")])),
              why="a MIME part's header counts"))
    add(_case("hm-member", "header-match", HM,
              message(_std(HM, sender=MEMBER, extra=[("X-Spam", "maybe")])), sender=MEMBER,
              why="header-match comes before member moderation"))
    # the holds (nonmember defer on HOLDS, so they are reached)
    big = "x" * 70 + "\n"
    for cid, rule, headers, body, why in [
        ("hold-baseline", "accept", _std(HOLDS), None, "nothing to hold"),
        ("hold-nosubject", "no-subject", _std(HOLDS, subject=None), None, "no Subject:"),
        ("hold-blanksubject", "no-subject", _std(HOLDS, subject="   "), None, "blank"),
        ("hold-implicit", "implicit-dest", _std(HOLDS, to="someone@else.example"), None,
         "the list is not a recipient"),
        ("hold-alias", "implicit-dest", _std(HOLDS, to=f"Alias <ALIAS@{HOST}>"), None,
         "an acceptable alias"),
        ("hold-alias-rx", "implicit-dest", _std(HOLDS, to="x@aliases.example"), None,
         "an acceptable alias pattern"),
        ("hold-cc", "implicit-dest", _std(HOLDS, to="a@b.example",
                                          extra=[("Cc", HOLDS)]), None, "in Cc:"),
        ("hold-resent", "implicit-dest", _std(HOLDS, to="a@b.example",
                                              extra=[("Resent-To", HOLDS)]), None,
         "in Resent-To:"),
        ("hold-bad-to", "implicit-dest", _std(HOLDS, to=f"{HOLDS} <x@y.example>"), None,
         "a To: the strict parser refuses"),
        ("hold-recips", "max-recipients", _std(HOLDS, to=f"{HOLDS}, a@b.example",
                                               extra=[("Cc", "c@d.example")]), None,
         "three recipients: at the limit"),
        ("hold-recips-ok", "max-recipients", _std(HOLDS, to=f"{HOLDS}, a@b.example"), None,
         "two recipients"),
        ("hold-group-cc", "implicit-dest", _std(HOLDS, to="undisclosed-recipients:;",
                                                extra=[("Cc", HOLDS)]), None,
         "an empty group in To: (the tokenizer), the list in Cc:"),
        ("hold-comment-comma", "implicit-dest",
         _std(HOLDS, to=f"{HOLDS} (The List, really)"), None,
         "a comma in a comment: the strict parser refuses the To:"),
        ("hold-size", "max-size", _std(HOLDS), big * 20, "over 1 KB"),
        ("hold-size-ok", "max-size", _std(HOLDS), big * 5, "under 1 KB"),
        ("hold-adm-subject", "administrivia", _std(HOLDS, subject="unsubscribe"), None,
         "a command as Subject:"),
        ("hold-adm-args", "administrivia", _std(HOLDS, subject="help me please"), None,
         "help takes no argument"),
        ("hold-adm-body", "administrivia", _std(HOLDS), "\nsubscribe\n", "body line"),
        ("hold-adm-late", "administrivia", _std(HOLDS),
         "".join(f"line {n}\n" for n in range(10)) + "subscribe\n", "past 10 lines"),
        ("hold-suspicious", "suspicious-header", _std(HOLDS, extra=[("X-Bounce-Me", "Yes")]),
         None, "bounce_matching_headers"),
        ("hold-suspicious-no", "suspicious-header",
         _std(HOLDS, extra=[("X-Bounce-Me", "no yes")]), None, "anchored"),
    ]:
        add(_case(cid, rule, HOLDS, message(headers, body if body is not None
                                            else "Hello from the agreement suite.\n"),
                  why=why))
    add(_case("recips-many", "max-recipients", RECIPS, message(_std(RECIPS, to=",\n ".join(
        [f'"Person, {i}" <person.{i}@example.org>' for i in range(150)]
        + [f"person.{i}@example.org (Person {i})" for i in range(150)] + [RECIPS]))),
        why="a long ordinary To: (read without the tokenizer), the list last"))
    add(_case("hold-member-accept", "member-moderation", HOLDS,
              message(_std(HOLDS, sender=MEMBER, subject=None, to="x@y.example")),
              sender=MEMBER, why="a member accepted by moderation skips the holds"))
    add(_case("news-any", "news-moderation", NEWS, message(_std(NEWS)),
              why="a moderated newsgroup gateway"))
    add(_case("relaxed-all", "accept", RELAXED,
              message(_std(RELAXED, subject="subscribe", to="a@b.example, c@d.example, "
                           "e@f.example, g@h.example"), big * 100),
              why="every hold off but no-subject"))
    add(_case("relaxed-nosubject", "no-subject", RELAXED,
              message(_std(RELAXED, subject=None)), why="no-subject cannot be turned off"))
    # approved removes the Approve: headers and line before the later rules read them
    ten = "".join(f"line {n}\n" for n in range(9))
    for cid, rule, extra, body, why in [
        ("view-approved-wrong", "accept", [("Approved", "wrong")], None,
         "deleted though wrong: no header-match, no bounce_matching_headers"),
        ("view-approve-wrong", "accept", [("Approve", "wrong")], None, "Approve: too"),
        ("view-x-approve-wrong", "accept", [("X-Approve", "wrong"), ("Approved", "x")],
         None, "every spelling deleted"),
        ("view-x-approve-right", "approved", [("X-Approve", PASSWORD)], None, "right"),
        ("view-body-shift", "administrivia", [], "Approved: wrong\n" + ten + "help\n",
         "the line deleted: help becomes the tenth line"),
        ("view-body-no-shift", "accept", [], "Hello\n" + ten + "help\n",
         "no Approved: line: help is the eleventh line"),
        ("view-body-right", "approved", [], f"Approved: {PASSWORD}\n" + ten + "help\n",
         "the right password in the body"),
    ]:
        add(_case(cid, rule, APPROVED_VIEW,
                  message(_std(APPROVED_VIEW, sender=MEMBER, extra=extra),
                          body if body is not None else "The announcement.\n"),
                  sender=MEMBER, why=why))
    add(_case("view-body-mime", "administrivia", APPROVED_VIEW,
              message(_std(APPROVED_VIEW, sender=MEMBER, extra=mp),
                      _multipart("Approved: wrong\n" + ten + "help")),
              sender=MEMBER, why="the first text/plain part of a multipart message"))
    for cid, rule, headers, sender, why in [
        ("lmtp-xmailfrom", "header-match", _std(LMTP, sender=TRUSTED), TRUSTED,
         "X-MailFrom: the envelope sender"),
        ("lmtp-xmailfrom-from-only", "header-match", _std(LMTP, sender=TRUSTED), STRANGER,
         "From: alone is not X-MailFrom: the hash entry holds"),
        ("lmtp-xmailfrom-written", "header-match",
         _std(LMTP, extra=[("X-MailFrom", TRUSTED)]), STRANGER,
         "an X-MailFrom: in the message counts too"),
        ("lmtp-approved-no-password", "header-match",
         _std(LMTP, extra=[("Approved", "x")]), STRANGER,
         "no moderator password: Approved: stays"),
        ("lmtp-hash", "header-match", _std(LMTP), STRANGER, "X-Message-ID-Hash:"),
        ("lmtp-hash-written", "header-match",
         _std(LMTP, extra=[("X-Message-ID-Hash", "FORGED")]), STRANGER,
         "an X-Message-ID-Hash: of the message's own is replaced by Mailman's"),
        ("lmtp-hash-written-both", "header-match",
         _std(LMTP, extra=[("Message-ID-Hash", "FORGED"), ("x-message-id-hash", "FORGED")]),
         STRANGER, "both hash fields of the message's own, any case, are replaced"),
        ("lmtp-hash-written-no-message-id", "header-match",
         [h for h in _std(LMTP, extra=[("Message-ID-Hash", "FORGED")])
          if h[0] != "Message-ID"], STRANGER,
         "no Message-ID: Mailman makes one, then replaces the hash fields"),
        ("lmtp-no-message-id", "header-match",
         [h for h in _std(LMTP) if h[0] != "Message-ID"], STRANGER,
         "Mailman makes a Message-ID, and its hash"),
    ]:
        add(_case(cid, rule, LMTP, message(headers), sender=sender, why=why))
    # 8-bit bytes beside encoded words in the sender fields (compat32's Header)
    for n, word in enumerate(["=28", "=22", "=3C", "=2C", "=40"]):
        for field in ("From", "Reply-To", "Sender"):
            headers = [("From", STRANGER)] if field != "From" else []
            headers += [(field, f"=?utf-8?q?J{word}x?= J\u00f6rg <{MEMBER}>"),
                        ("To", ANNOUNCE), ("Subject", "x"), ("Message-ID", "<m@x.invalid>")]
            add(_case(f"senders-8bit-{field.lower()}-{n}", "accept", ANNOUNCE,
                      message(headers), why="the encoded word stays encoded"))
    # senders read field by field from the header block
    add(_case("senders-repeated", "member-moderation", ANNOUNCE,
              message([("From", STRANGER), ("From", MEMBER), ("To", ANNOUNCE),
                       ("Subject", "x")]), why="two From: fields, the second a member"))
    add(_case("senders-comma", "nonmember-moderation", ANNOUNCE,
              message([("From", f"{STRANGER},"), ("To", ANNOUNCE), ("Subject", "x")]),
              why="a trailing comma in one field: the strict parser finds nothing"))
    return cases


def moderator_announcement_cases() -> list[dict]:
    """The announcement case of issue 16 (used through the protocol too)."""
    return [c for c in content_cases() if c["id"] in ("msg-appr-header", "msg-appr-wrong")]
