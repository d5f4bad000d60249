"""The agreement scenario: Mailman 3 lists, users, members, patterns and bans, plus a few
hundred (recipient, envelope sender, From:, Reply-To:, Sender:) cases, generated
deterministically from a seed.

Plain JSON-able data (stdlib only), read by the oracle inside Mailman's virtualenv and by
the harness in policyd's.  The scenario format:

``domains``     ``[{"mail_host", "alias_domain"}]``
``users``       ``[{"key", "addresses": [first is the user's own], "preferred"}]``
``addresses``   addresses to register without a user
``lists``       ``[{"fqdn", "default_member_action", "default_nonmember_action",
                "emergency", "members": [{"address"|"user", "action"}],
                "nonmembers": [{"address", "action"}], "moderators": [...],
                "accept_these_nonmembers"... "discard_these_nonmembers", "bans"}]``
``site_bans``   site-wide ban entries
``cases``       ``[{"id", "recipient", "envelope_sender", "from", "reply_to", "sender",
                "why"}]``; a header value is ``None`` (absent), a string (one header) or
                a list of strings (that header repeated)

Cases whose answer intentionally differs from Mailman's are built by
``intended_differences()``: each carries ``expect_mailman`` and ``expect_policyd``
(verdicts) and ``difference`` (the key of its section in docs/mailman-differences.md).
"""

from __future__ import annotations

import random

try:  # the oracle imports this file as a top-level module inside Mailman's virtualenv
    from .message_cases import content_cases, content_lists
except ImportError:
    from message_cases import content_cases, content_lists

ACTIONS = ("accept", "hold", "reject", "discard", "defer")
MEMBER_ACTIONS = (None,) + ACTIONS
HOST = "lists.example.com"
ALIAS = "lists.example.net"
HOST2 = "other.example.org"

# Users with several addresses: key -> (addresses, preferred).
USERS = {
    "ann": (["ann@example.com", "ann.work@corp.example", "Ann.Home@Home.Example"],
            "ann@example.com"),
    "ben": (["ben@example.com", "ben.alt@example.com"], "ben@example.com"),
    "cat": (["cat@example.com", "cat.alt@example.com", "cat.third@example.com"],
            "cat.alt@example.com"),
    "dan": (["dan1@example.com", "dan2@example.com", "dan3@example.com"],
            "dan1@example.com"),
    "eve": (["eve@example.com", "eve.alt@example.com"], None),
    "fay": (["Fay.Mixed@Example.COM", "fay.other@example.com"], "fay.mixed@example.com"),
}

PLAIN_MEMBERS = ["pat@example.com", "Quinn.Case@Example.Org", "rob@sub.example.net"]
NONMEMBER_ROWS = {action: f"nm-{action}@outside.example" for action in ("none",) + ACTIONS}
STRANGERS = ["stranger@outside.example", "Other.Stranger@Outside.Example",
             "nobody@nowhere.example"]
MODERATOR = "mod@example.com"

# Entries of the four *_these_nonmembers lists, and the senders that exercise them.
PATTERN_POOL = {
    "accept": ["acc-exact@outside.example", r"^acc-rx-.*@outside\.example$",
               f"@friends@{HOST}", r"^bad[regex", r"^ACC-UPPER.*", "Acc-Upper@Outside.Example",
               f"@Friends@{HOST.upper()}", f"@nosuchlist@{HOST}"],
    "hold": ["hold-exact@outside.example", r"^hold-rx-\d+@outside\.example$",
             f"@friends@{HOST}"],
    "reject": ["reject-exact@outside.example", r"^reject-rx-.*", r"^(unbalanced"],
    "discard": ["discard-exact@outside.example", r"^discard-rx-.*@outside\.example$",
                "Discard-Upper@Outside.Example"],
}
PATTERN_SENDERS = [
    "acc-exact@outside.example", "acc-rx-7@outside.example", "ACC-RX-8@Outside.Example",
    "acc-upper@outside.example", "hold-exact@outside.example", "hold-rx-42@outside.example",
    "hold-rx-x@outside.example", "reject-exact@outside.example", "reject-rx-1@any.example",
    "discard-exact@outside.example", "discard-rx-9@outside.example",
    "discard-upper@outside.example", "friend@example.com",
]

LIST_BANS = ["banned@outside.example", r"^spam.*@outside\.example$", "Banned-Upper@Outside.Example",
             r"^MixedBan@"]
SITE_BANS = ["sitebanned@outside.example", r"^.*@banned-domain\.example$"]
BAN_SENDERS = ["banned@outside.example", "spammer@outside.example", "SPAM2@Outside.Example",
               "banned-upper@outside.example", "mixedban@x.example", "sitebanned@outside.example",
               "anyone@banned-domain.example"]


def _user_addresses():
    return [a for addresses, _ in USERS.values() for a in addresses]


def scenario(seed: int = 20240601, per_list: int = 12) -> dict:
    """The whole scenario with its generated cases (no intended differences)."""
    rng = random.Random(seed)
    lists = []
    # The helper list that @friends entries point at.
    lists.append({
        "fqdn": f"friends@{HOST}",
        "default_member_action": "defer",
        "default_nonmember_action": "hold",
        "members": [{"address": "friend@example.com"}, {"user": "ben", "action": "hold"}],
    })
    combos = [(m, n) for m in ACTIONS for n in ACTIONS]
    for index, (member_default, nonmember_default) in enumerate(combos):
        lists.append(_list(rng, index, member_default, nonmember_default))
    # A second domain, and an emergency list with a default that would otherwise accept.
    lists.append(_list(rng, len(combos), "accept", "accept", host=HOST2))
    lists.append(_list(rng, len(combos) + 1, "accept", "accept", emergency=True))
    lists.extend(fixed_lists())
    cases = []
    for spec in lists:
        if spec["fqdn"] in (TARGETS, ATLIST, DIFFS):
            continue
        for n in range(per_list if spec["fqdn"] != f"friends@{HOST}" else 4):
            cases.append(_random_case(rng, spec, f"{spec['fqdn'].split('@')[0]}-{n}"))
    cases.extend(targeted_cases())
    # Whole messages for the rules that read the message (tests/mailman/message_cases.py).
    lists.extend(content_lists())
    cases.extend(content_cases())
    return {
        "domains": [{"mail_host": HOST, "alias_domain": ALIAS},
                    {"mail_host": HOST2, "alias_domain": None}],
        "users": [{"key": key, "addresses": addresses, "preferred": preferred}
                  for key, (addresses, preferred) in USERS.items()],
        "addresses": list(NONMEMBER_ROWS.values()),
        "lists": lists,
        "site_bans": list(SITE_BANS),
        "cases": cases,
    }


def _list(rng, index, member_default, nonmember_default, host=HOST, emergency=None):
    """One list: every kind of membership, with actions cycling through every value so
    that across the lists each persona has each action."""
    def action(offset):
        return MEMBER_ACTIONS[(index + offset) % len(MEMBER_ACTIONS)]

    members = [
        {"user": "ann", "action": action(0)},                  # by user (preferred address)
        {"address": "ben.alt@example.com", "action": action(1)},  # a non-preferred address
        {"user": "cat", "action": action(2)},                  # preferred is not the first
        {"address": "dan2@example.com", "action": action(3)},  # two addresses of one user
        {"address": "dan3@example.com", "action": action(4)},
        {"address": "eve.alt@example.com", "action": action(5)},  # user without preferred
        {"user": "fay", "action": action(1)},
        {"address": "fay.mixed@example.com", "action": action(3)},  # direct and by user
    ]
    members += [{"address": a, "action": action(i + 2)} for i, a in enumerate(PLAIN_MEMBERS)]
    if index % 3 == 0:
        # A banned member: the ban wins.
        members.append({"address": "banned@outside.example", "action": "accept"})
    nonmembers = [{"address": a, "action": (None if key == "none" else key)}
                  for key, a in NONMEMBER_ROWS.items()]
    # A nonmember row for an address that also matches a pattern: the row wins.
    nonmembers.append({"address": "hold-exact@outside.example", "action": action(0)})
    spec = {
        "fqdn": f"l{index:02d}-{member_default}-{nonmember_default}@{host}",
        "default_member_action": member_default,
        "default_nonmember_action": nonmember_default,
        "emergency": bool(emergency if emergency is not None else index % 7 == 3),
        "members": members,
        "nonmembers": nonmembers,
        "moderators": [MODERATOR],
        "bans": [b for b in LIST_BANS if rng.random() < 0.75],
    }
    for key, pool in PATTERN_POOL.items():
        spec[f"{key}_these_nonmembers"] = [entry for entry in pool if rng.random() < 0.6]
    return spec


def _sender_pool(spec):
    return (_user_addresses() + PLAIN_MEMBERS + list(NONMEMBER_ROWS.values()) + STRANGERS
            + PATTERN_SENDERS + BAN_SENDERS + [MODERATOR])


def _render(rng, address):
    """One way a mail client writes ``address`` in a header."""
    variant = rng.randrange(10)
    if variant == 0:
        return address.upper()
    if variant == 1:
        return f"<{address}>"
    if variant == 2:
        return f"Some Name <{address}>"
    if variant == 3:
        return f'"Last, First" <{address}>'
    if variant == 4:
        return f"=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <{address}>"
    if variant == 5:
        return f"=?utf-8?q?Last=2C_First?= <{address}>"
    if variant == 6:
        return f"{address} (a comment)"
    if variant == 7:
        return f'"Quoted \\"Name\\"" <{address.title()}>'
    return address


def _random_case(rng, spec, case_id):
    pool = _sender_pool(spec)
    pick = lambda: rng.choice(pool)  # noqa: E731
    shape = rng.randrange(9)
    envelope = pick()
    case = {"id": case_id, "recipient": spec["fqdn"], "envelope_sender": envelope,
            "from": None, "reply_to": None, "sender": None, "why": f"random shape {shape}"}
    if shape == 0:
        case["from"] = _render(rng, envelope)
    elif shape == 1:
        case["from"] = _render(rng, pick())
    elif shape == 2:
        pass  # no From: at all: the envelope decides
    elif shape == 3:
        case["from"] = f"{_render(rng, pick())}, {_render(rng, pick())}"
    elif shape == 4:
        case["from"] = _render(rng, pick())
        case["reply_to"] = _render(rng, pick())
    elif shape == 5:
        case["from"] = _render(rng, pick())
        case["sender"] = _render(rng, pick())
    elif shape == 6:
        case["from"] = [_render(rng, pick()), _render(rng, pick())]
    elif shape == 7:
        case["from"] = rng.choice(["", "undisclosed-recipients:;", "Just A Name",
                                   "not an address", "@", "<>"])
    else:
        case["from"] = _render(rng, pick())
        case["reply_to"] = _render(rng, pick())
        case["sender"] = _render(rng, pick())
    # The recipient as an MTA may see it: any case, alias domain, +tag.
    local, host = spec["fqdn"].split("@")
    variant = rng.randrange(6)
    if variant == 0:
        case["recipient"] = spec["fqdn"].upper()
    elif variant == 1 and host == HOST:
        case["recipient"] = f"{local}@{ALIAS}"
    elif variant == 2:
        case["recipient"] = f"{local}+tag@{host}"
    if rng.random() < 0.2:
        case["envelope_sender"] = envelope.upper()
    return case


TARGETS = f"targets@{HOST}"
ATLIST = f"atlist@{HOST}"
DIFFS = f"diffs@{HOST}"


def fixed_lists() -> list[dict]:
    """Two lists with fixed settings for the hand-written cases: members accepted by
    default, nonmembers rejected, a few members with their own actions, so that who is
    found to be the sender shows in the verdict."""
    targets = {
        "fqdn": TARGETS,
        "default_member_action": "accept",
        "default_nonmember_action": "reject",
        "members": [
            {"user": "ann"}, {"address": "ben.alt@example.com"}, {"user": "cat"},
            {"address": "dan2@example.com", "action": "hold"},
            {"address": "dan3@example.com", "action": "discard"},
            {"address": "eve.alt@example.com", "action": "hold"},
            {"user": "fay", "action": "discard"}, {"address": "fay.mixed@example.com"},
            {"address": "banned@outside.example"},
        ] + [{"address": a} for a in PLAIN_MEMBERS],
        "nonmembers": [{"address": a, "action": (None if key == "none" else key)}
                       for key, a in NONMEMBER_ROWS.items()],
        "moderators": [MODERATOR],
        "bans": list(LIST_BANS) + ["banned-ws@outside.example ", " ^ban-rx-ws"],
        "accept_these_nonmembers": [f"@friends@{HOST}", "acc-exact@outside.example"],
        "hold_these_nonmembers": [f"@friends@{HOST}", "hold-exact@outside.example",
                                  " hold-ws@outside.example", "^hold-rx-ws@ "],
        "reject_these_nonmembers": [],
        "discard_these_nonmembers": [r"^disc.*"],
    }
    targets["members"].append({"address": "idn@xn--bcher-kva.example"})
    targets["members"].append({"address": "n@xn--fa-hia.example"})
    atlist = {
        "fqdn": ATLIST,
        "default_member_action": "accept",
        "default_nonmember_action": "reject",
        "members": [{"address": "pat@example.com"}],
        # Mailman 3 reads @list entries only in accept_these_nonmembers, and finds the
        # list by its exact name; a reference to itself or to no list is skipped.
        "accept_these_nonmembers": [f"@{ATLIST}", f"@nosuchlist@{HOST}",
                                    f"@Friends@{HOST}", "^ACC.*", "Acc-Upper@Outside.Example",
                                    f"@friends@{HOST}"],
        "hold_these_nonmembers": [f"@friends@{HOST}"],
        "discard_these_nonmembers": [f"@friends@{HOST}", "^bad[regex", "disc@outside.example"],
    }
    diffs = {
        "fqdn": DIFFS,
        "default_member_action": "accept",
        "default_nonmember_action": "reject",
        "members": [{"address": "pat@example.com"}],
    }
    return [targets, atlist, diffs]


def targeted_cases() -> list[dict]:
    """Hand-written cases for the header, sender and recipient pitfalls."""
    rej = TARGETS
    local = TARGETS.split("@")[0]
    out = []

    def case(case_id, frm=None, envelope="stranger@outside.example", reply_to=None,
             sender=None, recipient=rej, why="", postfix=False):
        out.append({"id": f"t-{case_id}", "recipient": recipient, "envelope_sender": envelope,
                    "from": frm, "reply_to": reply_to, "sender": sender, "why": why,
                    **({"postfix": True} if postfix else {})})

    member = "pat@example.com"
    case("plain-member", member, why="a member in From:")
    case("member-envelope-only", None, envelope=member, why="no From:, member envelope")
    case("member-envelope-stranger-from", "stranger@outside.example", envelope=member,
         why="nonmember From:, member envelope: any sender that is a member counts")
    case("stranger-envelope-member-from", member, envelope="stranger@outside.example")
    case("member-in-reply-to", "stranger@outside.example", reply_to=member)
    case("member-in-sender", "stranger@outside.example", sender=member)
    case("two-from-second-member", f"stranger@outside.example, {member}")
    case("two-from-headers", ["stranger@outside.example", member])
    case("mixed-case", "PAT@EXAMPLE.COM")
    case("mixed-case-member-stored-mixed", "quinn.case@example.org")
    case("user-other-address", "ann.work@corp.example", why="another address of a user "
         "subscribed by user")
    case("user-other-address-mixed", "ANN.HOME@home.example")
    case("user-first-member-address", "dan1@example.com",
         why="dan2 and dan3 are both members: the first in Mailman's order decides")
    case("user-no-preferred", "eve@example.com")
    case("direct-and-user", "fay.mixed@example.com", why="direct membership wins")
    case("direct-and-user-other", "fay.other@example.com")
    case("encoded-comma-member", f"=?utf-8?q?Doe=2C_Pat?= <{member}>")
    case("encoded-comma-stranger", "=?utf-8?q?Doe=2C_Jane?= <stranger@outside.example>")
    case("encoded-name-member", f"=?iso-8859-1?q?P=E4t?= <{member}>")
    case("raw-utf8-name-member", f"Pät Ünïcode <{member}>")
    case("quoted-local-space", '"pat smith"@example.com', envelope="nobody@nowhere.example")
    case("quoted-display-with-at", f'"stranger@outside.example" <{member}>')
    case("quoted-display-with-angle", f'"<{member}>" <stranger@outside.example>')
    case("comment-with-address", f"stranger@outside.example ({member})")
    case("group-with-member", f"Team: {member}, stranger@outside.example;")
    case("empty-group", "undisclosed-recipients:;", envelope=member)
    case("empty-from", "", envelope=member)
    case("empty-from-stranger", "", envelope="stranger@outside.example")
    case("unparseable-from", "this is not an address", envelope="nobody@nowhere.example")
    case("only-angle", "<>", envelope="nobody@nowhere.example")
    case("folded-from", f"Pat\n <{member}>")
    case("utf8-local", "pät@example.com", envelope="nobody@nowhere.example",
         why="Mailman's validator drops non-ASCII local parts")
    case("no-valid-sender", "junk", envelope="also junk")
    case("underscore-plus", "pat+tag@example.com", why="a +tag sender is a different address")
    case("moderator-is-not-member", MODERATOR)
    case("banned-member", "banned@outside.example", recipient=f"l00-accept-accept@{HOST}")
    case("site-ban-regex", "x@banned-domain.example")
    case("site-ban-exact-upper", "SITEBANNED@OUTSIDE.EXAMPLE")
    case("ban-in-reply-to", member, reply_to="sitebanned@outside.example",
         why="a banned sender anywhere discards")
    case("nonmember-row-first", "nm-discard@outside.example", envelope="nm-accept@outside.example")
    case("nonmember-row-defer-first", "nm-defer@outside.example",
         envelope="nm-reject@outside.example", why="defer on the first sender ends the rule")
    case("nonmember-none-then-row", "nm-none@outside.example",
         envelope="nm-discard@outside.example")
    case("pattern-then-row", "reject-exact@outside.example", envelope="nm-accept@outside.example")
    case("accept-pattern-first", "acc-exact@outside.example", envelope="nm-reject@outside.example")
    case("friends-member", "friend@example.com", why="@friends in accept_these_nonmembers")
    case("friends-user-member", "ben@example.com", why="user member of @friends")
    case("friends-user-alias", "ben.alt@example.com",
         why="@list entries see members' subscribed addresses only, no user aliases")
    case("idn-u-label-member", "idn@bücher.example",
         why="Mailman's validator drops a U-label domain; the A-label member is not found")
    case("idn-a-label-member", "idn@xn--bcher-kva.example")
    case("idn-sharp-s-u-label", "n@faß.example", envelope="nobody@nowhere.example",
         why="IDNA 2008 gives xn--fa-hia, IDNA 2003 fass; Mailman drops U-labels anyway")
    case("idn-sharp-s-a-label", "n@xn--fa-hia.example", envelope="nobody@nowhere.example")
    case("trailing-dot-member", "pat@example.com.", why="Mailman drops a trailing-dot domain")
    case("double-at", "pat@x@example.com", envelope="nobody@nowhere.example")
    case("source-route", "<@relay.example:pat@example.com>")
    case("spaces-around-at", "pat @ example.com")
    case("comment-in-local", "pat(comment)@example.com")
    case("domain-literal", "pat@[192.0.2.1]", envelope="nobody@nowhere.example")
    case("single-label-domain", "pat@example", envelope="nobody@nowhere.example")
    case("dots-in-local", "p..at@example.com", envelope="nobody@nowhere.example")
    case("stray-after-angle", f"<{member}>garbage")
    case("unclosed-angle", f"<{member}")
    # What a strict-parsing Python (the CVE-2023-27043 fix: Debian 12's 3.11.2, 3.11.10+,
    # 3.12.6+, 3.13) makes of malformed and encoded headers: Mailman decodes encoded words
    # first, then drops a field whose mailbox count does not match its commas.
    stranger = "stranger@outside.example"
    for who, address in (("member", member), ("stranger", stranger)):
        other = stranger if who == "member" else member
        case(f"strict-trailing-text-{who}", f"<{address}> trailing words",
             envelope="nobody@nowhere.example")
        case(f"strict-trailing-text-envelope-{who}", f"<{other}>garbage", envelope=address)
        case(f"strict-two-angles-{who}-first", f"<{address}> <{other}>",
             envelope="nobody@nowhere.example")
        case(f"strict-unterminated-quote-{who}", f'"{address}',
             envelope="nobody@nowhere.example")
        case(f"strict-unterminated-quote-name-{who}", f'"Pat <{address}>',
             envelope="nobody@nowhere.example")
        case(f"strict-address-as-name-{who}", f"{address} <{other}>",
             envelope="nobody@nowhere.example")
        case(f"strict-quoted-address-as-name-{who}", f'"{address}" <{other}>',
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-angle-{who}",
             f"=?utf-8?q?=3C{address.replace('@', '=40')}=3E?= <{other}>",
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-address-{who}",
             "=?utf-8?q?" + address.replace("@", "=40").replace(".", "=2E") + "?=",
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-comma-{who}",
             f"=?utf-8?q?x=2C_{address.replace('@', '=40')}?= <{other}>",
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-comma-name-{who}", f"=?utf-8?q?Doe=2C_Jo?= <{address}>",
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-local-part-{who}",
             f"<=?utf-8?q?{address.split('@')[0]}?=@{address.split('@')[1]}>",
             envelope="nobody@nowhere.example")
        case(f"strict-encoded-quote-{who}", f"=?utf-8?q?=22?={address}",
             envelope="nobody@nowhere.example")
        case(f"strict-comment-with-comma-{who}", f"{address} (Doe, Jo)",
             envelope="nobody@nowhere.example")
        case(f"strict-unbalanced-comment-{who}", f"{address} (Doe",
             envelope="nobody@nowhere.example")
        case(f"strict-folded-no-comma-{who}", f"{address}\n\t{other}",
             envelope="nobody@nowhere.example")
        case(f"strict-folded-name-{who}", f"=?utf-8?q?Jo_Doe?=\n <{address}>",
             envelope="nobody@nowhere.example")
        case(f"strict-empty-group-{who}", "undisclosed-recipients:;", envelope=address)
        case(f"strict-group-{who}", f"team: {address};", envelope="nobody@nowhere.example")
        case(f"strict-group-two-{who}", f"team: {address}, {other};",
             envelope="nobody@nowhere.example")
        case(f"strict-domain-literal-{who}", f"{address.split('@')[0]}@[192.0.2.1]",
             envelope=address)
        case(f"strict-bad-from-good-reply-to-{who}", f"<{other}>x", reply_to=address,
             envelope="nobody@nowhere.example")
        case(f"strict-two-from-one-bad-{who}", [f"<{other}>x", address],
             envelope="nobody@nowhere.example")
    # Headers glued from fragments at random (fixed seed): whatever a strict parser does
    # with them, policyd must do the same.
    rng = random.Random(27043)
    fragments = [member, stranger, f"<{member}>", f"<{stranger}>", "Pat", '"', "'", ",",
                 ";", ":", "(", ")", "<", ">", " ", "\t", "@", "[x]", "=?utf-8?q?=3C?=",
                 "=?utf-8?q?pat=40example.com?=", "=?utf-8?b?IiI=?=", "\\", "\n\t", "."]
    for n in range(40):
        frm = "".join(rng.choice(fragments) for _ in range(rng.randint(2, 6)))
        case(f"strict-fuzz-{n}", frm, envelope="nobody@nowhere.example")
    case("empty-quoted-name", f'"" <{member}>')
    # Postfix (no header sent): an envelope Mailman's validator drops, a member's From:.
    # Mailman accepts from From:; policyd has no opinion (senders it cannot see).
    for n, envelope in enumerate(["pat@example.com.", "pat@@example.com",
                                  "idn@b\u00fccher.example", "p\u00e4t@example.com"]):
        case(f"postfix-dropped-envelope-{n}", member, envelope=envelope, postfix=True,
             why="Postfix sends no From:: no-senders must not discard")
    # Raw 8-bit bytes beside encoded words: Mailman (compat32) gets a Header whose decode
    # leaves the encoded words as they are; the 8-bit bytes become U+FFFD.
    for n, word in enumerate(["=28", "=29", "=22", "=3C", "=3E", "=3A", "=2C", "=40", "_"]):
        case(f"mixed-8bit-{n}", f"=?utf-8?q?J{word}x?= J\u00f6rg <{member}>",
             why="encoded word and 8-bit name: the word stays encoded in Mailman")
        case(f"encoded-only-{n}", f"=?utf-8?q?J{word}x?= Joerg <{member}>",
             why="the same all ASCII: decoded first")
    case("mixed-8bit-unknown-charset", f"=?x-unknown?q?a?= J\u00f6rg <{member}>")
    case("mixed-8bit-siteban", f"=?utf-8?q?sitebanned=40outside.example?=, J\u00f6rg "
         f"<{member}>", why="an encoded banned address stays encoded: no ban")
    case("mixed-8bit-reply-to", "stranger@outside.example",
         reply_to=f"=?utf-8?q?J=28?= J\u00f6rg <{member}>")
    case("mixed-8bit-sender", "stranger@outside.example",
         sender=f"=?utf-8?q?J=28?= J\u00f6rg <{member}>")
    case("mixed-8bit-folded", f"=?utf-8?q?J=22x?=\n J\u00f6rg <{member}>")
    for sender in ("friend@example.com", "ben@example.com", "ben.alt@example.com",
                   "acc-upper@outside.example", "ACC-X@outside.example",
                   "disc@outside.example", "pat@example.com", "stranger@outside.example"):
        case(f"atlist-{sender.split('@')[0].lower()}", sender, recipient=ATLIST,
             why="@list only in accept_these_nonmembers, by exact list name")
    case("reply-to-the-list", member, reply_to=TARGETS,
         why="a list's own address among the senders (Mailman makes it a nonmember row)")
    case("from-the-list", TARGETS, envelope=f"{local}-bounces@{HOST}")
    case("sender-other-list-bounces", "stranger@outside.example",
         sender=f"friends-bounces@{HOST}", envelope=f"friends-bounces@{HOST}")
    for sender in ("hold-ws@outside.example", "hold-rx-ws@outside.example",
                   "banned-ws@outside.example", "ban-rx-ws@outside.example"):
        case(f"whitespace-{sender.split('@')[0]}", sender,
             why="entries with stray white space compare verbatim in Mailman")
    case("disc-pattern", "disco@outside.example")
    case("disc-pattern-upper", "DISCO@outside.example")
    # Recipients.
    case("rcpt-alias-domain", member, recipient=f"{local}@{ALIAS}")
    case("rcpt-upper", member, recipient=TARGETS.upper())
    case("rcpt-tag", "stranger@outside.example", recipient=f"{local}+x@{HOST}")
    case("rcpt-request", "stranger@outside.example", recipient=f"{local}-request@{HOST}")
    case("rcpt-owner-banned", "banned@outside.example", recipient=f"{local}-owner@{HOST}")
    case("rcpt-bounces", "stranger@outside.example",
         recipient=f"{local}-bounces+x=y.example@{HOST}")
    case("rcpt-join-alias", "stranger@outside.example", recipient=f"{local}-join@{ALIAS}")
    case("rcpt-subscribe", "stranger@outside.example", recipient=f"{local}-subscribe@{HOST}")
    case("rcpt-confirm", "stranger@outside.example", recipient=f"{local}-confirm+abc@{HOST}")
    case("rcpt-unknown", "stranger@outside.example", recipient=f"nolist@{HOST}")
    case("rcpt-bad-suffix", "stranger@outside.example", recipient=f"{local}-bogus@{HOST}")
    case("rcpt-other-host", member, recipient=f"{local}@{HOST2}")
    case("rcpt-second-domain", member, recipient=f"l25-accept-accept@{HOST2}")
    case("emergency-member", member, recipient=f"l26-accept-accept@{HOST}")
    return out


def intended_differences() -> list[dict]:
    """Cases where policyd answers differently from Mailman on purpose (see
    docs/mailman-differences.md).  Each names the difference, Mailman's expected outcome
    and policyd's expected verdict."""
    rej = DIFFS
    member = "pat@example.com"
    out = []

    def case(case_id, difference, expect_mailman, expect_policyd, frm=None,
             envelope="stranger@outside.example", reply_to=None, sender=None,
             recipient=rej, why=""):
        out.append({"id": f"x-{case_id}", "recipient": recipient, "envelope_sender": envelope,
                    "from": frm, "reply_to": reply_to, "sender": sender, "why": why,
                    "difference": difference, "expect_mailman": expect_mailman,
                    "expect_policyd": expect_policyd})

    case("quoted-local-header", "quoted-local", "reject", "accept", frm='"pat"@example.com',
         why="Mailman keeps the quotes: \"pat\"@example.com is a nonmember there")
    case("quoted-local-envelope", "quoted-local", "reject", "accept", frm=None,
         envelope='"pat"@example.com')
    case("null-sender-post", "null-sender", "accept", "reject", frm=member, envelope="",
         why="Mailman decides a bounce-less <> post from From:; policyd refuses <> at SMTP")
    case("null-sender-request", "null-sender", "not-a-post:request", "reject", frm=member,
         envelope="", recipient=f"diffs-request@{HOST}")
    # No From:, Reply-To: or Sender: value and no message (a Postfix query looks the
    # same): an envelope Mailman drops leaves no sender policyd can see.
    for n, envelope in enumerate(["not-an-address", "idn@b\u00fccher.example",
                                  "pat@example.com."]):
        case(f"senders-unseen-{n}", "senders-unseen", "discard", "accept", frm=None,
             envelope=envelope, why="Mailman's no-senders; policyd: no opinion")
    # Postfix: a nonmember's From:, unseen; the default nonmember action (reject) does
    # not decide on no sender at all.
    case("senders-unseen-postfix", "senders-unseen", "reject", "accept",
         frm="stranger@outside.example", envelope="stranger@outside.example.")
    out[-1]["postfix"] = True
    return out
