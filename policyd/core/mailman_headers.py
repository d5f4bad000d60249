"""How Mailman 3 reads sender addresses out of a header (pure).

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

__all__ = ["decode_like_mailman", "fields", "strict_getaddresses"]

# A newline that starts a header of its own (repeated headers are joined with newlines);
# a newline followed by white space folds one header.
_FIELD_BREAK = re.compile(r"\r?\n(?![ \t])")
_CRLF = re.compile(r"[\r\n]")


def fields(value: str) -> list[str]:
    """The header fields joined in ``value``, in order, empty ones dropped."""
    return [field for field in _FIELD_BREAK.split(value) if field.strip()]


def decode_like_mailman(field: str) -> str | None:
    """The field as Mailman hands it to ``getaddresses``, or ``None`` where Mailman's own
    decoding would raise (it would then never look at the addresses)."""
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
    joined with ``", "``, the mailbox count checked against the commas of every field."""
    fields = [str(v) for v in values]
    fields = [v if _balanced_parentheses(v) else "('', '')" for v in fields]
    parsed = [("", "") if "[" in address else (name, address)
              for name, address in AddressList(", ".join(fields)).addresslist]
    expected = sum(1 + _strip_quoted_realnames(v).count(",") for v in fields)
    if len(parsed) != expected:
        return [("", "")]
    return parsed
