"""The recipients of To:, Cc:, Resent-To: and Resent-Cc: as Mailman's implicit-dest and
max-recipients rules read them (``mailman_headers.recipient_addresses``): the same
addresses as the strict ``getaddresses``, for a bounded amount of work however the fields
are crafted."""

from __future__ import annotations

import email._parseaddr
import email.utils
import re

import pytest
from hypothesis import given, settings, strategies as st

from policyd.core.chain import decide
from policyd.core.mailman_headers import strict_getaddresses_list
from policyd.core.message import parse_message
from policyd.core.message_rules import ImplicitDestination, MaximumRecipients
from policyd.core.rules import Context, Hit
from policyd.core.snapshot import ListSpec, build
from policyd.core.verdict import Action, Query, Verdict

LIST = "test@lists.example.com"
ALIAS = "alias@lists.example.com"
STRICT = getattr(email.utils, "supports_strict_parsing", False)

# --- generated fields: ordinary mailboxes, and everything around them -----------------

_atom = st.sampled_from(["pat", "a", "J.", "o'neil", "x=y", "Pät", "=?utf-8?q?P=C3=A4t?=",
                         "user+tag", "\x0b", "a\\b"])
_local = st.one_of(_atom, st.sampled_from(['"john doe"', '"a,b"', '"x[y"', '"q\\"x"',
                                           "a.b", "a..b", ".a", '"a".b']))
_domain = st.sampled_from(["example.com", "lists.example.com", "b", "[192.0.2.1]", "x.",
                           "LISTS.Example.COM", "a-b.example"])
_spec = st.one_of(st.tuples(_local, st.just("@"), _domain).map("".join),
                  st.sampled_from([LIST, LIST.upper(), ALIAS, "x@aliases.example"]))
_space = st.sampled_from(["", " ", "  ", "\t", "\n ", "\r\n\t", " \n "])
_comment = st.sampled_from(["(Pat)", "(Doe, John)", "(a (nested) one)", "(\\))", "()",
                            '("q")', "(unclosed"])
_phrase = st.sampled_from(["", "Pat", "Pat Smith", '"Smith, Pat"', '"O\\"Brien"', "J. R.",
                           "=?utf-8?b?UMOkdA==?=", '"a\\\\b"', "Re: x", "(c) Pat", "a@b"])
_mailbox = st.one_of(
    st.tuples(_space, _spec, _space).map("".join),
    st.tuples(_space, _spec, _space, _comment, _space).map("".join),
    st.tuples(_space, _comment, _space, _spec, _space).map("".join),
    st.tuples(_space, _phrase, _space, st.just("<"), _spec, st.just(">"), _space).map(
        "".join),
    st.tuples(_phrase, _space, _comment, _space, st.just("<"), _spec, st.just(">"),
              st.sampled_from(["", " ", " (c)", "garbage"])).map("".join),
    st.sampled_from(["", " ", "undisclosed-recipients:;", "g: a@b, c@d;", "<>", "@",
                     "<@route,@r2:a@b>", "a@b c@d", ";", "(", ")", '"', "\\", "[", "<a@b",
                     "a@b>", ":"]),
)
_separator = st.sampled_from([",", ", ", ",\n ", ",,", " ", ""])


@st.composite
def _field(draw):
    boxes = draw(st.lists(_mailbox, min_size=1, max_size=4))
    out = boxes[0]
    for box in boxes[1:]:
        out += draw(_separator) + box
    return out


_fields = st.lists(_field(), max_size=3)


def _reference(values) -> tuple[str, ...]:
    return tuple(address for _, address in strict_getaddresses_list(values))


@settings(max_examples=2000, deadline=None)
@given(_fields)
def test_recipient_addresses_are_the_strict_getaddresses(values):
    """Ordinary fields, odd ones and mixtures give exactly the addresses of the strict
    ``getaddresses`` (policyd's copy, and the running Python's where it parses strictly),
    ``("",)`` where it gives ``[("", "")]``."""
    from policyd.core.mailman_headers import recipient_addresses

    expected = _reference(values)
    if STRICT:
        assert expected == tuple(a for _, a in email.utils.getaddresses(values))
    assert recipient_addresses(values) == expected


@settings(max_examples=2000, deadline=None)
@given(_fields)
def test_expected_count_bounds_what_mailman_counts(values):
    """Mailman counts ``expected_count`` addresses or one (none without a field): what
    lets max-recipients skip the parse below the limit."""
    from policyd.core.mailman_headers import expected_count

    most = expected_count(values)
    assert len(_reference(values)) in ({most, 1} if values else {0})


@settings(max_examples=2000, deadline=None)
@given(st.text(st.sampled_from(list('a"\\(), \n')), max_size=30))
def test_strip_and_balance_are_the_standard_librarys(text):
    from policyd.core import mailman_headers as m

    assert m.strip_quoted(text) == m._strip_quoted_realnames(text)
    assert m.balanced(text) == m._balanced_parentheses(text)


# --- the rules: Mailman 3.3.10's own code over the strict getaddresses -----------------


def _mailman_implicit_dest(message, aliases_and_patterns, posting) -> bool:
    """mailman/rules/implicit_dest.py ``ImplicitDestination.check`` (True: hold)."""
    aliases, alias_patterns = set(), set()
    for alias in aliases_and_patterns:
        (alias_patterns if alias.startswith("^") else aliases).add(alias)
    aliases.add(posting)
    recipients = set()
    for header in ("to", "cc", "resent-to", "resent-cc"):
        for _, address in strict_getaddresses_list(message.get_all(header)):
            address = address.lower()
            if address in aliases:
                return False
            recipients.add(address)
    for pattern in alias_patterns:
        for recipient in recipients:
            try:
                if re.match(pattern, recipient, re.IGNORECASE):
                    return False
            except re.error:
                if re.match(re.escape(pattern), recipient, re.IGNORECASE):
                    return False
    return True


def _mailman_max_recipients(message, limit) -> bool:
    """mailman/rules/max_recipients.py ``MaximumRecipients.check`` (True: hold)."""
    if limit == 0:
        return False
    recipients = strict_getaddresses_list(message.get_all("to") + message.get_all("cc"))
    return len(recipients) >= limit


def _ctx(message, explain, limit=10, aliases=(ALIAS, r"^.*@aliases\.example$")):
    snapshot = build([ListSpec(LIST, max_num_recipients=limit,
                               require_explicit_destination=True,
                               acceptable_aliases=aliases)], version="v", built_at=0.0)
    query = Query(LIST, "someone@x.example", message=message)
    return Context(snapshot, query, snapshot.resolve(LIST), ("someone@x.example",), None,
                   explain)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["To", "Cc", "Resent-To", "Resent-Cc", "cc"]),
                          _field()), max_size=4),
       st.sampled_from([1, 2, 3, 4, 10]), st.booleans())
def test_rules_answer_as_mailmans(headers, limit, explain):
    """implicit-dest and max-recipients hold exactly where Mailman's rules hold."""
    block = "".join(f"{name}: {value.strip()}\n".replace("\r", "") for name, value in headers)
    message = parse_message(("Subject: x\n" + block).encode("utf-8", "surrogateescape"))
    ctx = _ctx(message, explain, limit)
    dest = ImplicitDestination().check(ctx)
    assert (type(dest) is Hit) == _mailman_implicit_dest(
        message, (ALIAS, r"^.*@aliases\.example$"), LIST)
    assert type(dest) is not Hit or dest.verdict is Verdict.HOLD
    most = MaximumRecipients().check(ctx)
    assert (type(most) is Hit) == _mailman_max_recipients(message, limit)


# --- bounded work on crafted fields ----------------------------------------------------

# A To: within Exim's request limit ([exim] max_request, 64 KiB of base64).
_SIZE = 46000
_CRAFTED = {
    "ats": "@" * _SIZE,
    "commas": "," * _SIZE,
    "angles": "<" * _SIZE,
    "semicolons": ";" * _SIZE,
    "group of empties": "g:" + "@" * _SIZE,
    "group of atoms": "g:" + "a," * (_SIZE // 2),
    "nested groups": "g:" * (_SIZE // 2),
    "nested comments": "(" * (_SIZE // 2) + ")" * (_SIZE // 2),
    "open quotes": '"a,' * (_SIZE // 3),
    "addresses then garbage": "a@b," * (_SIZE // 4) + "@",
}
#: Tokenizer calls allowed for one query: a linear budget of the characters the fallback
#: may read (8192), whatever the field's size.
_BUDGET = 8192


def _count_calls(monkeypatch):
    calls = [0]
    original = email._parseaddr.AddrlistClass.gotonext

    def counted(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(email._parseaddr.AddrlistClass, "gotonext", counted)
    return calls


def _decide(to, limit, aliases=(), cc=None):
    snapshot = build([ListSpec(LIST, max_num_recipients=limit,
                               require_explicit_destination=limit == 0,
                               acceptable_aliases=aliases,
                               default_nonmember_action=Action.DEFER)],
                     version="v", built_at=0.0)
    block = f"From: someone@x.example\nSubject: hi\nTo: {to}\n"
    if cc is not None:
        block += f"Cc: {cc}\n"
    return decide(snapshot, Query(LIST, "someone@x.example",
                                  message=parse_message(block.encode())), explain=True)


@pytest.mark.parametrize("shape", sorted(_CRAFTED))
@pytest.mark.parametrize("rule", ["implicit-dest", "max-recipients"])
def test_crafted_to_costs_a_bounded_parse_and_never_an_accept(shape, rule, monkeypatch):
    """A crafted To: of 46 KB: the tokenizer does at most a bounded amount of work, and
    the rule answers the temporary failure or Mailman's answer: a hold, or for
    max-recipients an accept where Mailman cannot count 10 (fewer commas outside quoted
    strings), never an accept by skipping the rule."""
    from policyd.core.mailman_headers import _strip_quoted_realnames

    to = _CRAFTED[shape]
    calls = _count_calls(monkeypatch)
    decision = _decide(to, 0 if rule == "implicit-dest" else 10)
    assert calls[0] <= _BUDGET, calls[0]
    if rule == "max-recipients" and 1 + _strip_quoted_realnames(to).count(",") < 10:
        assert decision.verdict is Verdict.ACCEPT, decision
    else:
        assert decision.rule == rule, decision
        assert decision.verdict in (Verdict.DEFER, Verdict.HOLD), decision


def test_a_long_ordinary_to_is_read_without_the_tokenizer(monkeypatch):
    """Hundreds of ordinary recipients (names, quotes, comments, folding): no tokenizer
    call at all, and the answers Mailman gives."""
    boxes = [f'"Person, {i}" <person.{i}@example.org>' if i % 3 else
             f"person.{i}@example.org (Person {i})" for i in range(2000)]
    to = ",\n ".join(boxes + [f"The List <{LIST}>"])
    calls = _count_calls(monkeypatch)
    explicit = _decide(to, 0)
    held = _decide(to, 10)
    assert calls[0] == 0
    assert explicit.rule == "accept" and explicit.verdict is Verdict.ACCEPT, explicit
    assert held.rule == "max-recipients" and held.verdict is Verdict.HOLD, held
    assert held.reason.startswith("2001 recipients")


def test_max_recipients_below_the_limit_needs_no_parse(monkeypatch):
    """Fewer commas than the limit: Mailman cannot count that many, whatever the field
    holds, so nothing is parsed (the MTA path)."""
    calls = _count_calls(monkeypatch)
    snapshot = build([ListSpec(LIST, max_num_recipients=50,
                               default_nonmember_action=Action.DEFER)],
                     version="v", built_at=0.0)
    query = Query(LIST, "someone@x.example", message=parse_message(
        ("From: someone@x.example\nSubject: hi\nTo: " + "@" * _SIZE + "\n").encode()))
    decision = decide(snapshot, query, explain=False)
    assert calls[0] == 0
    assert decision.verdict is Verdict.ACCEPT


def test_an_unread_to_does_not_hide_the_list_in_cc():
    """The list named in a Cc: that is read decides implicit-dest, whatever the To:."""
    decision = _decide("@" * _SIZE, 0, cc=LIST)
    assert decision.verdict is Verdict.ACCEPT, decision
    unread = _decide("@" * _SIZE, 0, cc="someone@else.example")
    assert unread.verdict is Verdict.DEFER and unread.rule == "implicit-dest"
    assert "temporary failure" in unread.reason
