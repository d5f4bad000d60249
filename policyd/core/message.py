"""The message itself, as far as the MTA showed it: its header block, the visible start of
its body and its size (pure).

Exim's DATA ACL can send ``$message_headers_raw``, the first ``message_body_visible``
bytes of ``$message_body`` and ``$message_size``; Postfix sends no header ever.  A
``Message`` keeps what the standard library's ``email`` parser (policy ``compat32``, the
one Mailman 3's ``Message`` uses) made of the header block, as ``(name, value)`` pairs in
order, so that each header field is seen on its own and exactly as Mailman sees it
(leading white space stripped, folding and trailing white space kept, bytes that are not
UTF-8 kept as surrogate escapes).

The content rules need Mailman's view of the whole message (``get_all``, ``walk``, the
first ``text/plain`` part): ``email_message`` rebuilds it from the pairs and the body, once
per message (several lists of one request share it).

Nothing here knows Twisted, SQL or a wire format.
"""

from __future__ import annotations

import email
import email.message
import re
from email.policy import compat32
from functools import lru_cache
from operator import itemgetter
from typing import NamedTuple

__all__ = ["Message", "parse_message", "split_headers", "email_message", "header_fields"]


class Message(NamedTuple):
    """The parsed message: hashable and immutable, so it can ride in a ``Query``.

    ``body`` is the visible start of the body (``None``: not sent); ``body_complete``
    says whether it is the whole body (known only when ``size`` is).  ``size`` is the
    message's size in bytes as the MTA counted it (``None``: not sent)."""

    headers: tuple[tuple[str, str], ...]
    body: str | None = None
    size: int | None = None
    body_complete: bool = False
    # The field names lower-cased, in order (``parse_message`` fills it once; empty:
    # computed when asked).
    names: tuple[str, ...] = ()
    # The MTA cut the header block (Exim's ``POLICYD_MAX_HEADERS``): fields past the cut
    # are missing.  From:, Reply-To: and Sender: are whole all the same (the ACL sends
    # them apart then: ``protocols.exim``); the rules that read other fields leave such a
    # message to Mailman (``core.chain``).
    headers_cut: bool = False

    def _names(self) -> tuple[str, ...]:
        return self.names if self.names or not self.headers else \
            tuple([key.lower() for key, _ in self.headers])

    def get_all(self, name: str) -> list[str]:
        """The raw values of every field ``name`` (any case), in order."""
        wanted = name.lower()
        names = self._names()
        # count() and index() search in C: most names asked for occur once or never.
        found = names.count(wanted)
        if found == 0:
            return []
        if found == 1:
            return [self.headers[names.index(wanted)][1]]
        return [pair[1] for key, pair in zip(names, self.headers) if key == wanted]

    def first(self, name: str) -> str | None:
        """The raw value of the first field ``name`` (any case), ``None`` without one."""
        names = self._names()
        wanted = name.lower()
        return self.headers[names.index(wanted)][1] if wanted in names else None

    def has(self, name: str) -> bool:
        return name.lower() in self._names()


_NAME = itemgetter(0)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_message(headers: bytes, body: bytes | None = None,
                  size: int | None = None) -> Message:
    """Parse a raw header block (and optionally the body's visible start).

    The header block is parsed the way Mailman parses a message
    (``email.message_from_bytes`` with ``compat32``); what follows a line that is no
    header (Exim never sends one) is not kept."""
    block = headers.replace(b"\r\n", b"\n")
    if block and not block.endswith(b"\n"):
        block += b"\n"
    pairs = split_headers(block.decode("ascii", "surrogateescape"))
    if pairs is None:
        parsed = email.message_from_bytes(block + b"\n", policy=compat32)
        pairs = tuple((str(name), str(value)) for name, value in parsed._headers)
    text = None
    complete = False
    if body is not None:
        body = body.replace(b"\r\n", b"\n")
        text = _text(body)
        if size is not None:
            # Exim's $message_size counts the header block, the empty line and the body
            # with one byte per newline; the body is whole when nothing is missing.
            complete = len(block) + 1 + len(body) >= size
    return Message(pairs, text, size, complete, tuple(map(str.lower, map(_NAME, pairs))))


# One field as the parser's ``headerRE`` and ``_parse_headers`` take it: a name of
# printable ASCII but ":", the colon, the rest of the line and its continuation lines.
# The value is what compat32's ``header_source_parse`` keeps of them: white space after the
# colon dropped, the line ends inside kept, the last one dropped.  Possessive: nothing
# is ever given back, so no backtracking state is kept; a block whose last line has no
# newline then fails to match as a whole and goes to the parser, which is always right.
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]++):[ \t]*+([^\n]*+(?:\n[ \t][^\n]*+)*+)\n")


def split_headers(text: str) -> tuple[tuple[str, str], ...] | None:
    """The ``(name, value)`` pairs that ``email``'s parser (``compat32``) makes of a
    header block (decoded as it decodes bytes: ASCII, surrogate escapes; each line ending
    in a newline), for a block where that is plain line splitting: every line a
    ``Name: value`` field or the continuation of one, up to an empty line or the end.
    ``None`` for anything the parser treats specially (a lone CR, a leading ``From ``
    line, a continuation first, a line that is no field): the parser itself then runs.
    Several times cheaper than the parser on a post's few KB of headers;
    tests/test_message.py holds it to the parser."""
    if "\r" in text or text.startswith("From "):
        return None
    pairs = []
    pos = 0
    for field in _FIELD.finditer(text):
        if field.start() != pos:
            break
        pairs.append(field.groups())
        pos = field.end()
    if pos != len(text) and text[pos] != "\n":
        return None  # a line that is no field (or no continuation) before the end
    return tuple(pairs)


def header_fields(message: Message | None, name: str) -> tuple[str, ...] | None:
    """The values of header ``name`` (``None``: no message to look at)."""
    if message is None:
        return None
    return tuple(message.get_all(name))


@lru_cache(maxsize=64)
def email_message(message: Message) -> email.message.Message:
    """Mailman's view of the message (``compat32``), built from the header pairs and the
    visible body: what its content rules read.  Cached per message (read-only use)."""
    lines = [f"{name}: {value}\n" for name, value in message.headers]
    raw = "".join(lines) + "\n" + (message.body or "")
    return email.message_from_bytes(raw.encode("utf-8", "surrogateescape"),
                                    policy=compat32)
