"""How Mailman 3 reads addresses out of a header (pure): the senders, and the recipients
its implicit-dest and max-recipients rules count (at the end).

Mailman 3.3.10's ``Message.senders`` takes each ``From:``, ``Reply-To:`` and ``Sender:``
field on its own, RFC 2047-decodes it (``make_header(decode_header(value))``), deletes
every CR and LF, and hands the result to ``email.utils.getaddresses``.  Every Python that
Mailman runs on today (Debian 12's patched 3.11.2, upstream 3.11.10+, 3.12.6+, 3.13)
parses strictly there, since the CVE-2023-27043 fix: a field whose mailbox count does not
match its comma count (``<a@x>garbage``, ``a@x <b@y>``, two angle addresses without a
comma), or with unbalanced parentheses, yields no address at all.

The strict wrapper is carried here rather than taken from the running interpreter, so the
daemon agrees with a current Mailman whatever Python runs policyd.  It is the standard
library's code (``email/utils.py`` of CPython 3.13, PSF licence) around the legacy
tokenizer ``email._parseaddr.AddressList``, which every Python 3 has unchanged.
"""

from __future__ import annotations

import re
from email._parseaddr import AddressList
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from functools import lru_cache
from itertools import accumulate

__all__ = ["decode_like_mailman", "fields", "strict_getaddresses", "recipient_addresses",
           "expected_count", "UnreadRecipients"]

# A newline that starts a header of its own (repeated headers are joined with newlines);
# a newline followed by white space folds one header.
_FIELD_BREAK = re.compile(r"\r?\n(?![ \t])")
_CRLF = re.compile(r"[\r\n]")
_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")


def _replacement(match: re.Match) -> str:
    # One U+FFFD per byte, as ``str(Header)`` decodes unknown-8bit bytes.
    return "\ufffd" * len(match.group().encode("utf-8", "surrogateescape"))


def fields(value: str) -> list[str]:
    """The header fields joined in ``value``, in order, empty ones dropped."""
    return [field for field in _FIELD_BREAK.split(value) if field.strip()]


def decode_like_mailman(field: str) -> str | None:
    """The field as Mailman hands it to ``getaddresses``, or ``None`` where Mailman's own
    decoding would raise (it would then never look at the addresses).

    A field with bytes that are not ASCII (surrogate escapes of the header block, or the
    UTF-8 text of ``from=``) is a ``Header`` to Mailman (``compat32`` makes one of a value
    with surrogates, charset ``unknown-8bit``): ``decode_header`` then hands back its raw
    text, encoded words not decoded, and ``str`` turns each such byte into U+FFFD."""
    if not field.isascii():
        return _CRLF.sub("", _NOT_ASCII.sub(_replacement, field))
    if "=?" in field:
        try:
            field = str(make_header(decode_header(field)))
        except (HeaderParseError, LookupError, UnicodeError, ValueError):
            return None
    return _CRLF.sub("", field)


#: Groups (``name: a@x, b@y;``) nested in groups, as deep as the sender fields are read.
#: RFC 5322 nests none, a colon in an unquoted display name (``Re: Pat <p@x>``) makes
#: one; the tokenizer recurses once per level, each level costs more the deeper it is
#: (several times a flat field's cost per character some hundreds deep), and about a
#: thousand levels, two thousand characters, pass the interpreter's recursion limit.
MAX_GROUP_DEPTH = 32


class NestedTooDeep(RecursionError):
    """A field nests groups deeper than ``MAX_GROUP_DEPTH`` (handled as the interpreter's
    own ``RecursionError`` is: the query gets the temporary failure)."""


class BoundedAddressList(AddressList):
    """``AddressList`` that gives up (``NestedTooDeep``) on groups nested deeper than
    ``MAX_GROUP_DEPTH``; what it returns otherwise is ``AddressList``'s."""

    _depth = 0

    def getaddress(self):
        if self._depth >= MAX_GROUP_DEPTH:
            raise NestedTooDeep(f"groups nested deeper than {MAX_GROUP_DEPTH}")
        self._depth += 1
        try:
            return super().getaddress()
        finally:
            self._depth -= 1


def _iter_escaped_chars(addr: str):
    pos = 0
    escape = False
    for pos, ch in enumerate(addr):
        if escape:
            yield (pos, "\\" + ch)
            escape = False
        elif ch == "\\":
            escape = True
        else:
            yield (pos, ch)
    if escape:
        yield (pos, "\\")


def _strip_quoted_realnames(addr: str) -> str:
    if '"' not in addr:
        return addr
    start = 0
    open_pos = None
    result = []
    for pos, ch in _iter_escaped_chars(addr):
        if ch == '"':
            if open_pos is None:
                open_pos = pos
            else:
                if start != open_pos:
                    result.append(addr[start:open_pos])
                start = pos + 1
                open_pos = None
    if start < len(addr):
        result.append(addr[start:])
    return "".join(result)


def _balanced_parentheses(addr: str) -> bool:
    opens = 0
    for _, ch in _iter_escaped_chars(_strip_quoted_realnames(addr)):
        if ch == "(":
            opens += 1
        elif ch == ")":
            opens -= 1
            if opens < 0:
                return False
    return opens == 0


def strict_getaddresses(field: str) -> list[tuple[str, str]]:
    """``email.utils.getaddresses([field], strict=True)`` as CPython 3.13 has it, up to
    ``MAX_GROUP_DEPTH`` (``NestedTooDeep`` beyond)."""
    if not _balanced_parentheses(field):
        field = "('', '')"
    parsed = [("", "") if "[" in address else (name, address)
              for name, address in BoundedAddressList(field).addresslist]
    if len(parsed) != 1 + _strip_quoted_realnames(field).count(","):
        return [("", "")]
    return parsed


def strict_getaddresses_list(values) -> list[tuple[str, str]]:
    """``email.utils.getaddresses(values)`` (strict) over several header fields at once,
    as Mailman's implicit-dest and max-recipients rules call it: each field validated, all
    joined with ``", "``, the mailbox count checked against the commas of every field.
    Unbounded: the reference ``recipient_addresses`` is tested against, not for the
    reactor."""
    fields = [str(v) for v in values]
    fields = [v if _balanced_parentheses(v) else "('', '')" for v in fields]
    parsed = [("", "") if "[" in address else (name, address)
              for name, address in AddressList(", ".join(fields)).addresslist]
    expected = sum(1 + _strip_quoted_realnames(v).count(",") for v in fields)
    if len(parsed) != expected:
        return [("", "")]
    return parsed


# --- The recipients of To:, Cc:, Resent-To:, Resent-Cc: ---------------------------------
#
# Mailman's implicit-dest and max-recipients rules hand every field of those headers to
# ``getaddresses`` (strict) at once, unbounded: they may legitimately be long (hundreds of
# recipients), and anyone can write them.  The tokenizer costs microseconds per special
# character and copies the list it has so far once per address inside a group (quadratic),
# so a crafted field of a few dozen KB would cost the reactor a good part of a second.
# ``recipient_addresses`` gives the same addresses for a fraction of that:
#
# * a field made of ordinary mailboxes (``addr-spec``, ``Name <addr-spec>``, ``"Quoted,
#   Name" <addr-spec>``, comments around them), each with its comma, is read by one
#   regular expression, in C, linear; for such a field the tokenizer gives exactly the
#   addr-specs it matched, one per item (tests/test_recipients.py holds it to the
#   tokenizer on generated fields);
# * any other field, and every field after it (the tokenizer's state at a field's end
#   decides how the next is read), is read by the tokenizer itself, exactly as Mailman
#   reads it, if that text is within ``MAX_SLOW_CHARS`` characters and
#   ``MAX_SLOW_SPECIALS`` specials and nests groups at most ``MAX_GROUP_DEPTH`` deep;
#   beyond them it is not read at all (``UnreadRecipients``: the rules answer the
#   temporary failure, never a skip).  Real mail carries no such text: odd syntax comes
#   in short fields (``undisclosed-recipients:;``).

#: Characters (specials) of the fields the tokenizer reads in one parse: as for the sender
#: fields (``rules.MAX_ADDRESS_CHARS``, ``rules.MAX_ADDRESS_SPECIALS``), a few ms at most.
MAX_SLOW_CHARS = 8192
MAX_SLOW_SPECIALS = 1024
_SPECIALS = '@<>[]:;,()\\"'

# No possessive quantifier or atomic group: Python 3.11 before 3.11.5 (Debian 12 has
# 3.11.2) can match wrongly with them (gh-106052).  The grammar is unambiguous instead
# (each run of a character class ends at a character that cannot continue it, each loop
# turn starts with a character no run before it takes), so a failed match gives back
# each choice once: linear.
_WS = r"[ \t\r\n]*"
# An atom as ``getatom`` reads it in an addr-spec (no "."); in a phrase "." is part of it.
# A backslash is left to the tokenizer (``getatom`` keeps it, the strict checks treat it as
# an escape), and so is any other white space (``getaddrspec`` drops an atom that
# ``str.strip`` empties).
_ATOM = r'[^()<>@,:;."\[\]\\\s]+'
_PHRASE_CHARS = r'[^()<>@,:;"\[\]\\]*'  # atoms and white space
# A quoted local part the tokenizer gives back as written: no backslash (it would undo
# and redo the escapes), no CR (it ends a quoted string), no "[" (strict: no address).
_QUOTED_LOCAL = r'"[^"\\\r\n\[\]]*"'
_QUOTED = r'"[^"\\\r]*(?:\\[^\r][^"\\\r]*)*"'
# A comment without nesting, quotes, escapes or CR (its commas count, as Mailman's strict
# check counts them).
_COMMENT = r'\([^()\\"\r]*\)'
_WORD = rf"(?:{_ATOM}|{_QUOTED_LOCAL})"
_ADDR_SPEC = rf"{_WORD}(?:\.{_WORD})*@{_ATOM}(?:\.{_ATOM})*"
_GAP = rf"{_WS}(?:{_COMMENT}{_WS})*"
_PHRASE = rf"{_PHRASE_CHARS}(?:(?:{_QUOTED}|{_COMMENT}){_PHRASE_CHARS})*"
# The bare addr-spec (after white space and comments) or a phrase and the angle address;
# never both (a phrase holds no "@" outside quotes, a bare addr-spec no "<").
_MAILBOX = rf"(?:{_GAP}({_ADDR_SPEC})|{_PHRASE}<({_ADDR_SPEC})>){_GAP}"
_ORDINARY = re.compile(rf"{_MAILBOX}(?:,{_MAILBOX})*")
_MAILBOXES = re.compile(rf"{_MAILBOX}(?:,|\Z)")
# ``_strip_quoted_realnames`` and the escapes of ``_iter_escaped_chars``, in C.
_ESCAPE_OR_QUOTED = re.compile(r'(\\[\s\S])|"[^"\\]*(?:\\[\s\S][^"\\]*)*"')
_ESCAPE = re.compile(r"\\[\s\S]")
_NOT_PAREN = re.compile(r"[^()]+")
_PAREN_STEP = {"(": 1, ")": -1}.__getitem__


def strip_quoted(field: str) -> str:
    """``_strip_quoted_realnames`` (the field without its quoted strings), in C."""
    return _ESCAPE_OR_QUOTED.sub(r"\1", field) if '"' in field else field


def balanced(field: str) -> bool:
    """``_balanced_parentheses`` (strict ``getaddresses``' check), in C."""
    if "(" not in field and ")" not in field:
        return True
    parens = _NOT_PAREN.sub("", _ESCAPE.sub("", strip_quoted(field)))
    return parens.count("(") * 2 == len(parens) and min(
        accumulate(map(_PAREN_STEP, parens)), default=0) >= 0


def expected_count(values) -> int:
    """How many addresses strict ``getaddresses(values)`` counts on: it returns that many,
    or one (``("", "")``: the count did not match), or none for no field."""
    return sum(1 + strip_quoted(value).count(",") if balanced(value) else 2
               for value in map(str, values))


class UnreadRecipients(Exception):
    """The fields are beyond what policyd reads at SMTP time (the message says why)."""


def recipient_addresses(values) -> tuple[str, ...]:
    """The addresses (as written) of ``email.utils.getaddresses(values)``, strict, as
    Mailman's implicit-dest and max-recipients rules read them: ``("",)`` where it returns
    ``[("", "")]``.  ``UnreadRecipients`` beyond the bounds above."""
    found = _recipient_addresses(tuple(map(str, values)))
    if isinstance(found, str):
        raise UnreadRecipients(found)  # a new one each time (a cached one keeps tracebacks)
    return found


@lru_cache(maxsize=16)
def _recipient_addresses(values: tuple[str, ...]) -> tuple[str, ...] | str:
    """The addresses, or why they are not read (cached: each list of a query and both
    rules ask; a few entries, each up to a request's size, are enough for that)."""
    addresses: list[str] = []
    expected = 0
    for index, value in enumerate(values):
        if _ORDINARY.fullmatch(value) is None:
            break
        addresses += [bare or angle for bare, angle in _MAILBOXES.findall(value)]
        expected += 1 + strip_quoted(value).count(",")
    else:
        return tuple(addresses) if len(addresses) == expected else ("",)
    # The tokenizer reads this field and the rest as it would after the fields before
    # (which it ends on their last address, the joining comma taken): from the space.
    rest = [value if balanced(value) else "('', '')" for value in values[index:]]
    text = (" " if index else "") + ", ".join(rest)
    specials = sum(map(text.count, _SPECIALS))
    if len(text) > MAX_SLOW_CHARS or specials > MAX_SLOW_SPECIALS:
        return (f"{len(text)} characters, {specials} of them {_SPECIALS}, in fields that "
                f"are not plain mailboxes (more than {MAX_SLOW_CHARS} or "
                f"{MAX_SLOW_SPECIALS}): too much to read at SMTP time")
    try:
        parsed = BoundedAddressList(text).addresslist
    except NestedTooDeep:
        return f"groups nested deeper than {MAX_GROUP_DEPTH}"
    addresses += ["" if "[" in address else address for _, address in parsed]
    expected += sum(1 + strip_quoted(value).count(",") for value in rest)
    return tuple(addresses) if len(addresses) == expected else ("",)
