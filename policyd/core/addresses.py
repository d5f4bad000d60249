"""Envelope and header address parsing and normalisation (pure).

Header values are split into mailboxes *before* anything is RFC 2047 decoded, so an
encoded comma or an encoded ``<spoof@member>`` in a display name stays inside the display
name and can never become an address.  Display names are never needed for a decision, so
they are never decoded.  Every address that comes out is normalised the same way:

* a source route (``@a,@b:user@x``) is dropped;
* a quoted local part is unquoted (Postfix hands policyd ``quoted part@x`` for
  ``"quoted part"@x``, so both spellings must meet);
* the local part is lower-cased (Mailman lower-cases everything and compares that);
* the domain is lower-cased and converted to IDNA 2008 A-labels (``xn--...``, UTS 46
  mapping, non-transitional);
* anything without a local part or a domain, or with control characters, is dropped: an
  empty or unparseable address never reaches a membership lookup.
"""

from __future__ import annotations

import binascii
import re
from email._parseaddr import quote as _quote
from functools import lru_cache

from . import mailman_headers

__all__ = ["canonical", "envelope_mailman3", "first_address_mailman2", "normalise",
           "normalise_mailman2", "parse_header", "parse_header_mailman3", "mailman_valid",
           "mailman3_raw_valid", "split_address"]

# Entries per parsing cache.  Only the slow paths are cached (odd syntax, encoded
# words, non-ASCII): the common shapes are parsed by one regex in less time than a
# cache lookup plus its upkeep costs on a daemon that does a system call between any
# two queries, and a stream of one-off senders would only churn a cache.
CACHE_SIZE = 16384
# The longest value a cache keeps: an entry costs its key, and a client may send a sender
# tens of kilobytes long.  SMTP's path limit is 256 octets, with room for quoting and
# encoded words; anything longer is parsed each time, with the same result.
CACHED_MAX = 512

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WSP = " \t\r\n"
_ANY_WSP = re.compile(r"\s")

# Mailman 3's email/validate.py, applied to normalised addresses in Mailman 3 mode so that
# a sender Mailman would drop from msg.senders is dropped here too.
_MM_LOCAL_BAD = re.compile(r"[^-0-9a-z!#$%&'*+./=?@_`{}~]")
_MM_LABEL_BAD = re.compile(r"[^-a-z0-9]")


def split_address(address: str) -> tuple[str, str]:
    """Split a normalised address at its last ``@``."""
    local, _, domain = address.rpartition("@")
    return local, domain


def _unquote_local(local: str) -> str | None:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        body = local[1:-1]
        out = []
        escaped = False
        for ch in body:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                return None
            else:
                out.append(ch)
        if escaped:
            return None
        return "".join(out)
    if '"' in local:
        return None
    return local


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        return None
    if domain.startswith("[") and domain.endswith("]"):
        return domain
    if domain.isascii():
        labels = domain.split(".")
    else:
        labels = _idna_labels(domain)
        if labels is None:
            return None
    if any(not label for label in labels):
        return None
    if any(ch in label for label in labels for ch in ' "\\<>()[],;:@'):
        return None
    return ".".join(labels)


def _idna_labels(domain: str) -> list[str] | None:
    """A-labels per IDNA 2008 with UTS 46 mapping, non-transitional (``faß.de`` is
    ``xn--fa-hia.de``, as browsers and registries have it, not IDNA 2003's ``fass.de``),
    label by label so one odd label does not hide which one failed."""
    import idna

    out = []
    for label in re.split("[.\u3002\uff0e\uff61]", domain):
        if label.isascii():
            out.append(label)
            continue
        try:
            out.append(idna.encode(label, uts46=True, transitional=False).decode("ascii"))
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return out


_CANONICAL = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~-][a-z0-9!#$%&'*+/=?^_`{|}~.-]*"
                        r"@[a-z0-9-]+(?:\.[a-z0-9-]+)*")


def canonical(address: str) -> str | None:
    """``normalise`` without the cache: for bulk loads, where a cache would only churn."""
    return _normalise(address)


def _plain(address: str) -> str | None:
    """The fast path, for the plain ASCII address nearly every query carries (tested to
    agree with the full path): the address lower-cased, or ``None`` for anything else."""
    if _CANONICAL.fullmatch(address):
        return address
    if address.isascii():
        lowered = address.lower()
        if _CANONICAL.fullmatch(lowered):
            return lowered
    return None


def _normalise(address: str) -> str | None:
    return _plain(address) or _normalise_slowly(address)


def normalise(address: str) -> str | None:
    """The canonical form of one addr-spec (see ``_normalise_slowly``); what takes the
    slow path is cached, up to ``CACHED_MAX`` characters."""
    return _plain(address) or (_normalise_cached(address) if len(address) <= CACHED_MAX
                               else _normalise_slowly(address))


def _normalise_slowly(address: str) -> str | None:
    """Return the canonical form of one addr-spec, or ``None`` if it cannot be an address.

    ``""`` (the null sender) gives ``None``: it is nobody.
    """
    if not address:
        return None
    address = address.strip().strip(_WSP)
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address.startswith("@"):
        # Source route: "@a,@b:user@x".
        colon = address.find(":")
        if colon < 0:
            return None
        address = address[colon + 1 :]
    if not address or _CONTROL.search(address):
        return None
    at = _last_unquoted_at(address)
    if at <= 0:
        return None
    local = _unquote_local(address[:at].strip())
    domain = _ascii_domain(address[at + 1 :])
    if not local or domain is None or _CONTROL.search(local):
        return None
    return f"{local.lower()}@{domain}"


_normalise_cached = lru_cache(maxsize=CACHE_SIZE)(_normalise_slowly)


def _last_unquoted_at(address: str) -> int:
    in_quotes = False
    escaped = False
    last = -1
    for i, ch in enumerate(address):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quotes:
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == "@" and not in_quotes:
            last = i
    return -1 if in_quotes else last


def mailman_valid(address: str) -> bool:
    """Would Mailman 3's validator keep this (normalised) address in ``msg.senders``?"""
    local, domain = split_address(address)
    if not local or _MM_LOCAL_BAD.search(local):
        return False
    labels = domain.split(".")
    if len(labels) < 2:
        return False
    return all(label and label[0] != "-" and not _MM_LABEL_BAD.search(label) for label in labels)


def normalise_mailman2(address: str) -> str | None:
    """``normalise`` as Mailman 2.1 compares: a domain written with a trailing dot keeps
    it.  Mailman 2.1 looks a sender up lower-cased and otherwise as written
    (``OldStyleMemberships.__get_cp_member``: ``members.get(member.lower())``), and its
    nonmember entries are compared with it the same way, so ``pat@example.com.`` is not
    the member ``pat@example.com`` (nor can a member be subscribed with the dot:
    ``Utils.ValidateEmail`` refuses an empty domain label)."""
    out = normalise(address)
    if out is not None and out[-1] != "." and address.rstrip(_WSP + ">").endswith("."):
        return out + "."
    return out


def first_address_mailman2(value: str | None) -> str | None:
    """Mailman 2.1's ``msg.get_sender()`` on one header: the first address
    ``getaddresses`` finds in it, ``None`` when that is empty (Mailman then reads the
    next header); normalised where it is an address, else lower-cased as it is (no
    member is named so, but a nonmember ``^regex`` entry still sees it)."""
    if not value:
        return None
    specs = _addr_specs(value)
    if not specs or not specs[0]:
        return None
    return normalise_mailman2(specs[0]) or specs[0].lower()


def parse_header(value: str | None) -> tuple[str, ...]:
    """Return the addresses of an address-list header value, in order, as Mailman 2.1
    reads them (``normalise_mailman2``: the Mailman 2 rules are its only reader).

    Handles folding, comments, quoted strings, angle addresses, group syntax
    (``team: a@x, b@y;``), several mailboxes and several headers joined by newlines.
    Unparseable mailboxes are dropped, never guessed at.
    """
    if not value:
        return ()
    out = []
    for spec in _addr_specs(value):
        address = normalise_mailman2(spec)
        if address is not None:
            out.append(address)
    return tuple(out)


def mailman3_raw_valid(spec: str) -> bool:
    """Could Mailman 3's validator accept this addr-spec *as written*?

    Mailman validates the address it got from ``getaddresses`` (or the envelope sender),
    lower-cased but otherwise untouched: a non-ASCII address (a UTF-8 local part, an IDN
    domain in U-labels), a domain with a trailing dot, or a second ``@`` outside quotes
    makes it invalid there, even where ``normalise`` would turn it into a valid address;
    so does white space anywhere (``getaddresses`` can return ``" pat@example.com"``).
    """
    if not spec.isascii() or _ANY_WSP.search(spec):
        return False
    if spec.startswith("@"):
        # A source route: Python's parser drops it, and so does normalise().
        spec = spec[spec.find(":") + 1 :]
    at = _last_unquoted_at(spec)
    if at < 0 or _last_unquoted_at(spec[:at]) >= 0:
        return False
    return not spec.endswith(".")


def envelope_mailman3(sender: str) -> tuple[str, ...]:
    """The envelope sender as Mailman 3's ``msg.senders`` has it: ``()`` when null or
    when its validator would drop it."""
    address = _mailman3_address(sender)
    return () if address is None else (address,)


# A plain ASCII address that Mailman 3's validator keeps, lower-cased: the common case,
# where normalise() and both validity checks all come down to lower().
_MM3_PLAIN = re.compile(r"[-0-9a-z!#$%&'*+./=?_`{}~]+@[a-z0-9][a-z0-9-]*(?:\.[a-z0-9][a-z0-9-]*)+")


def _mailman3_address(spec: str) -> str | None:
    """One raw addr-spec as an address in Mailman 3's ``msg.senders``, or ``None``."""
    if spec.isascii():
        lowered = spec.lower()
        if _MM3_PLAIN.fullmatch(lowered):
            return lowered
    if not mailman3_raw_valid(spec):
        return None
    address = normalise(spec)
    if address is None or not mailman_valid(address):
        return None
    return address


def parse_header_mailman3(value: str | None) -> tuple[str, ...]:
    """The addresses Mailman 3's ``msg.senders`` takes from one header (repeated headers
    joined by newlines), normalised: each field decoded and split the way a current
    Mailman does it (``mailman_headers``), minus what its validator drops (addresses
    invalid as written, ``mailman3_raw_valid``, or once normalised, ``mailman_valid``)."""
    if not value:
        return ()
    if "=?" not in value:
        match = (_MM3_ANGLE.fullmatch(value) or _MM3_QUOTED.fullmatch(value)
                 or _MM3_BARE.fullmatch(value))
        if match is not None:
            address = _mailman3_address(match.group(1))
            return () if address is None else (address,)
    else:
        spec = _encoded_name_angle(value)
        if spec is not None:
            address = _mailman3_address(spec)
            return () if address is None else (address,)
    if len(value) > CACHED_MAX:
        return tuple(parse_header_mailman3_slowly(value))
    return _parse_header_mailman3_cached(value)


@lru_cache(maxsize=CACHE_SIZE)
def _parse_header_mailman3_cached(value: str) -> tuple[str, ...]:
    return tuple(parse_header_mailman3_slowly(value))


def parse_header_mailman3_slowly(value: str) -> list[str]:
    """``parse_header_mailman3`` without its fast paths (which are tested against it)."""
    out = []
    for field in mailman_headers.fields(value):
        decoded = mailman_headers.decode_like_mailman(field)
        if decoded is None:
            continue
        for _, spec in mailman_headers.strict_getaddresses(decoded):
            address = _mailman3_address(spec) if spec else None
            if address is not None:
                out.append(address)
    return out


# The shapes of nearly every header, where the strict parse is a formality: one mailbox,
# no encoded word, no newline, nothing that counts as a second address.
_MM3_ADDR = (r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
             r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)")
_MM3_WORD = r"[^\x00-\x20\x7f\"(),:;<>@\[\]\\]+"
# "Display Name <addr>" or "<addr>";
_MM3_ANGLE = re.compile(rf"[ \t]*(?:{_MM3_WORD}(?:[ \t]+{_MM3_WORD})*[ \t]*)?<{_MM3_ADDR}>[ \t]*")
# '"Quoted, Name" <addr>';
_MM3_QUOTED = re.compile(rf'[ \t]*"[^"\\\x00-\x1f\x7f]*"[ \t]*<{_MM3_ADDR}>[ \t]*')
# a bare addr-spec, perhaps with a "(Comment Name)" after it (a comma in it would count).
_MM3_BARE = re.compile(rf'[ \t]*{_MM3_ADDR}[ \t]*(?:\([^()\\,"\x00-\x1f\x7f]*\)[ \t]*)?')

# "=?utf-8?Q?Name?= <addr>", perhaps folded before the address: the display name made of
# encoded words and plain words.  Mailman decodes the whole field before it parses it,
# and that decoding is the expensive part; the address itself is never encoded, so the
# name only matters if it decodes to something the parser treats specially.
_MM3_ENCODED_ANGLE = re.compile(
    rf"[ \t]*(?P<name>{_MM3_WORD}(?:(?:[ \t]|\r?\n[ \t])+{_MM3_WORD})*)"
    rf"(?:[ \t]|\r?\n[ \t])*<{_MM3_ADDR}>[ \t]*")
_ENCODED_WORD = re.compile(
    r"=\?([A-Za-z0-9-]+)\?(?:[qQ]\?((?:[A-Za-z0-9!*+/_.-]|=[0-9A-Fa-f]{2})*)"
    r"|[bB]\?((?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?))\?=")
_Q_HEX = re.compile(r"=([0-9A-Fa-f]{2})")
# Charsets whose decoding ``email.header.make_header`` does as a plain strict decode.
_PLAIN_CHARSETS = frozenset({"utf-8", "us-ascii", "iso-8859-1", "iso-8859-15"})
# What makes a decoded name more than a name to the parser (or to the strict check).
_NAME_SPECIALS = re.compile(r'["(),:;<>@\[\]\\\x00-\x1f\x7f]')


def _encoded_name_angle(value: str) -> str | None:
    """The addr-spec of an ASCII ``encoded name <addr>`` whose name decodes to plain
    words, else ``None`` (the full decode-then-parse decides)."""
    if not value.isascii():
        return None
    match = _MM3_ENCODED_ANGLE.fullmatch(value)
    if match is None:
        return None
    for word in match.group("name").split():
        if "=?" not in word:
            continue
        encoded = _ENCODED_WORD.fullmatch(word)
        if encoded is None:
            return None
        charset, quoted, b64 = encoded.groups()
        charset = charset.lower()
        if charset not in _PLAIN_CHARSETS:
            return None
        if quoted is not None:
            raw = _Q_HEX.sub(lambda m: chr(int(m.group(1), 16)),
                             quoted.replace("_", " ")).encode("latin-1")
        else:
            raw = binascii.a2b_base64(b64)
        try:
            text = raw.decode(charset)
        except UnicodeDecodeError:
            return None
        if _NAME_SPECIALS.search(text):
            return None
    return match.group(2)


# The shapes of nearly every From:, Reply-To: and Sender: header, each read with one
# regex instead of the full tokenizer below (each tested to read what it reads): the
# address is plain (one "@", no quote, comment, domain literal or white space), and the
# name holds nothing the tokenizer treats specially, no "@" either (a name that is an
# address is an address of its own to it).
_SPEC = r'([^"(),;:<>\[\]\\\s@]+@[^"(),;:<>\[\]\\\s@]+)'
# "Display Name <addr>" or "<addr>";
_SIMPLE_MAILBOX = re.compile(r'[^"(),;:<>\[\]\\\r\n@]*<' + _SPEC + r'>[ \t]*')
# '"Name, Quoted" <addr>';
_QUOTED_MAILBOX = re.compile(r'[ \t]*"[^"\\\r\n]*"[ \t]*<' + _SPEC + r'>[ \t]*')
# a bare addr-spec, perhaps with a "(Comment Name)" after it;
_BARE_SPEC = re.compile(r'[ \t]*' + _SPEC + r'[ \t]*(?:\([^()\\\r\n]*\)[ \t]*)?')
# an encoded-word name folded away from its address ("=?utf-8?B?...?=\n <addr>"): the
# fold is white space to the tokenizer.
_FOLDED_MAILBOX = re.compile(
    r'[ \t]*[^"(),;:<>\[\]\\\s@]+[ \t]*\r?\n[ \t]+<' + _SPEC + r'>[ \t]*')


def _addr_specs(value: str) -> list[str] | tuple[str, ...]:
    """The raw addresses of a header value as Mailman 2.1 reads them (``normalise``
    then drops what is no address): a fast path for the common shapes, else the full
    tokenizer (``_addr_specs_slowly``), cached up to ``CACHED_MAX`` characters."""
    match = (_SIMPLE_MAILBOX.fullmatch(value) or _QUOTED_MAILBOX.fullmatch(value)
             or _BARE_SPEC.fullmatch(value) or _FOLDED_MAILBOX.fullmatch(value))
    if match is not None:
        return [match.group(1)]
    if len(value) > CACHED_MAX:
        return _addr_specs_slowly(value)
    return _addr_specs_cached(value)


@lru_cache(maxsize=CACHE_SIZE)
def _addr_specs_cached(value: str) -> tuple[str, ...]:
    return tuple(_addr_specs_slowly(value))


def _addr_specs_slowly(value: str) -> list[str]:
    """The addresses Mailman 2.1 takes from a header: ``email.Utils.getaddresses`` of
    Python 2.7 (``_Python27AddressList``; tests/test_mailman2_senders.py holds this to
    Python 2.7's own output).  Text after an address is another address
    (``<a@x.example>b@y.example`` is both), a name that is an address counts
    (``a@x.example <b@y.example>`` is both), and what is no address at all (``John``,
    ``""``) is returned as it is: ``normalise`` drops it."""
    return [address for _, address in _Python27AddressList(value).addresslist]


class _Python27AddressList(mailman_headers.BoundedAddressList):
    """``email._parseaddr.AddressList`` as CPython 2.7.18 has it, the tokenizer of
    Mailman 2.1's ``getaddresses``.  Python 3 changed one thing in it: white space
    between the words of a local part is kept (``Pat q@x.example``), where 2.7 drops it
    (``Patq@x.example``).  ``getaddrspec`` below is 2.7's (``email/_parseaddr.py``,
    PSF licence).  Groups nest at most ``mailman_headers.MAX_GROUP_DEPTH`` deep."""

    def getaddrspec(self):
        aslist = []
        self.gotonext()
        while self.pos < len(self.field):
            if self.field[self.pos] == ".":
                aslist.append(".")
                self.pos += 1
            elif self.field[self.pos] == '"':
                aslist.append('"%s"' % _quote(self.getquote()))
            elif self.field[self.pos] in self.atomends:
                break
            else:
                aslist.append(self.getatom())
            self.gotonext()
        if self.pos >= len(self.field) or self.field[self.pos] != "@":
            return "".join(aslist)
        aslist.append("@")
        self.pos += 1
        self.gotonext()
        domain = self.getdomain()
        if not domain:
            return ""
        return "".join(aslist) + domain
