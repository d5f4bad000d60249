"""The rules of Mailman 3's built-in chain that read the message itself (pure).

Each mirrors one rule of mailman 3.3.10 (``rules/approved.py``, ``rules/loop.py``,
``chains/headers.py``, ``rules/administrivia.py``, ``rules/implicit_dest.py``,
``rules/max_recipients.py``, ``rules/max_size.py``, ``rules/news_moderation.py``,
``rules/no_subject.py``, ``rules/digests.py``, ``rules/suspicious.py``) on the message the
MTA sent (``Query.message``, see ``core.message``).  Without a message (Postfix; an Exim
ACL that sends no ``headers=``) each misses and says so in the trace: it could not be
evaluated.  Where only the visible start of the body was sent and the answer depends on
what follows, the rule misses and says that too (see docs/mailman-differences.md).

The rules after ``approved`` read the message as Mailman's do, which is not the message
the MTA received (``mailman_view``): Mailman's LMTP runner appends ``Message-ID-Hash:``,
``X-Message-ID-Hash:`` and ``X-MailFrom: <envelope sender>`` before the chain runs
(``runners/lmtp.py``), and for a list with a moderator password ``approved`` deletes every
Approve:/Approved:/X-Approve:/X-Approved: header, or the password line at the top of the
first text/plain part, whether the password was right or not.  A header_matches entry on
X-MailFrom, a bounce_matching_headers line on Approved: or the administrivia line count
depend on that.  The moderator password hash is only ever handed to
``passwords.verify_password``; no trace or reason contains it or the candidate.
"""

from __future__ import annotations

import base64
import email
import re
from contextlib import suppress
from email._header_value_parser import get_angle_addr
from email.errors import HeaderParseError
from email.generator import BytesGenerator
from email.header import Header, decode_header, make_header
from email.iterators import typed_subpart_iterator
from email.policy import compat32
from functools import lru_cache
from hashlib import sha1
from io import BytesIO

from .mailman_headers import UnreadRecipients, expected_count, recipient_addresses
from .message import Message, email_message, split_headers
from .passwords import verify_password
from .rules import Context, Hit, Miss
from .verdict import ACTION_VERDICT, Action, Verdict

__all__ = ["Approved", "Loop", "HeaderMatchRule", "Administrivia", "ImplicitDestination",
           "MaximumRecipients", "MaximumSize", "NewsModeration", "NoSubject", "Digests",
           "SuspiciousHeader", "mailman_view", "lmtp_fields", "DmarcMitigation", "CONTENT_HOLDS"]

_NO_MESSAGE = Miss("not evaluated: the MTA sent no message headers (Postfix, or an Exim "
                   "ACL without headers=)")
_NO_BODY = Miss("not evaluated: the MTA sent no body (an Exim ACL without body=)")

# mailman/rules/approved.py HEADERS, in the order Mailman tries them.
APPROVED_HEADERS = ("approve", "approved", "x-approve", "x-approved")
# mailman/rules/administrivia.py EMAIL_COMMANDS.
EMAIL_COMMANDS = {
    "confirm": (1, 1), "help": (0, 0), "info": (0, 0), "lists": (0, 0),
    "options": (0, 0), "password": (2, 2), "remove": (0, 0), "set": (3, 3),
    "subscribe": (0, 3), "unsubscribe": (0, 1), "who": (0, 2),
}
# Mailman's [mailman] email_commands_max_lines default.
EMAIL_COMMANDS_MAX_LINES = 10


def _first_plain(msg):
    """The first text/plain part (``typed_subpart_iterator``), or ``None``."""
    for part in typed_subpart_iterator(msg, "text", "plain"):
        return part
    return None


def _decoded(part, default_charset: str) -> str | None:
    payload = part.get_payload(decode=True)
    if payload is None:
        return None
    try:
        return payload.decode(part.get_content_charset(default_charset), "replace")
    except LookupError:
        return payload.decode("us-ascii", "replace")


def _hold(reason: str, ctx: Context) -> Hit:
    return Hit(Verdict.HOLD, reason, Action.HOLD, ctx.senders[0] if ctx.senders else None)


class DmarcMitigation:
    name = "dmarc-mitigation"
    description = ("Mailman's DMARC mitigation (reject or discard a post whose From: "
                   "domain publishes p=reject/quarantine): not evaluated by policyd yet.")

    def check(self, ctx: Context) -> Hit | Miss:
        return _NO_DMARC


_NO_DMARC = Miss("not evaluated: policyd does not look up DMARC policies")


class Approved:
    name = "approved"
    description = ("An Approved:/Approve: header (or such a first line of the first "
                   "text/plain part) with the list's moderator password accepts the post.")

    def check(self, ctx: Context) -> Hit | Miss:
        hashed = ctx.policy.content.moderator_password
        if hashed is None:
            return _NO_PASSWORD
        message: Message | None = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        password = self._password(message)
        if isinstance(password, Miss):
            return password
        if verify_password(password, hashed):
            return Hit(Verdict.ACCEPT, "approved with the list's moderator password",
                       Action.ACCEPT, ctx.senders[0] if ctx.senders else None)
        return _WRONG_PASSWORD

    @classmethod
    def _password(cls, message: Message):
        """The password of the first ``Approved:``-like header, else of such a first
        body line, or a ``Miss``."""
        for header in APPROVED_HEADERS:
            values = message.get_all(header)
            if values:
                return values[0]
        if message.body is None:
            return _NO_BODY
        return cls._from_body(message)

    @staticmethod
    def _from_body(message: Message):
        """The password of an ``Approved:`` first non-blank line of the first text/plain
        part, or a ``Miss``."""
        part = _first_plain(email_message(message))
        if part is None:
            # The first text/plain part may lie past the visible start.
            return _UNSEEN_APPROVAL if _parts_unseen(message) else _NO_APPROVAL
        payload = _decoded(part, "us-ascii")
        if payload is None:
            return _NO_APPROVAL
        line = ""
        lines = payload.splitlines(True)
        for line in lines:
            if line.strip() != "":
                break
        else:
            if not message.body_complete and message.size is not None:
                return _TRUNCATED_APPROVAL
        if ":" in line:
            header, value = line.split(":", 1)
            if header.lower() in APPROVED_HEADERS:
                if (not line.endswith(("\n", "\r")) and not message.body_complete
                        and message.size is not None):
                    return _TRUNCATED_APPROVAL
                return value.strip()
        return _NO_APPROVAL


class Mailman2Approved(Approved):
    """Mailman 2.1's ``Approve`` handler, which runs before ``Moderate``: an
    ``Approved:``/``Approve:`` header (or such a first body line) with the list's
    moderator (or administrator) password approves the post.  policyd imports neither of
    Mailman 2's passwords (SHA-1 digests): it verifies the moderator password set with
    ``policyctl list set --moderator-password``, as for a Mailman 3 list; any other
    password misses (an outsider's ``Approved: x`` must not get past the SMTP refusal)."""

    name = "approved"
    description = ("Mailman 2.1's Approve handler: an Approved:/Approve: header (or first "
                   "body line) with the moderator password set with policyctl approves "
                   "the post.")


_NO_PASSWORD = Miss("the list has no moderator password")
_NO_APPROVAL = Miss("no Approved: header or first line")
_WRONG_PASSWORD = Miss("an Approved: password that is not the list's moderator password")
_TRUNCATED_APPROVAL = Miss(
    "not evaluated: the body's first line is not within its visible start "
    "(message_body_visible)", note="approved: the body's first line was not seen",
    unseen=frozenset({Verdict.ACCEPT}))
_UNSEEN_APPROVAL = Miss(
    "not evaluated: no text/plain part within the body's visible start "
    "(message_body_visible); the first one may come after it",
    note="approved: the first text/plain part was not seen",
    unseen=frozenset({Verdict.ACCEPT}))
# Mailman only ever passes the message on from ``approved`` (its hit accepts).
APPROVED_OUTCOMES = frozenset({Verdict.ACCEPT})


# --- what the rules after ``approved`` read ---------------------------------------------

#: What stands for the Message-ID: Mailman's LMTP runner makes for a message without one.
MADE_MESSAGE_ID = "<made-by-mailman-lmtp@message-id.invalid>"


def lmtp_fields(message: Message, envelope_sender: str) -> tuple[tuple[str, str], ...]:
    """The fields Mailman 3.3.10's LMTP runner appends before the chain runs
    (``LMTPHandler._handle_DATA``): ``Message-ID-Hash:`` and ``X-Message-ID-Hash:``
    (``utilities/email.add_message_hash``, from the first Message-ID:) and
    ``X-MailFrom:`` (the envelope sender as aiosmtpd parsed ``MAIL FROM``: ``<>`` for
    the null sender).  A message without a Message-ID: gets one made by the LMTP runner
    (``make_msgid``: a random value on Mailman's host name; policyd appends
    ``MADE_MESSAGE_ID`` in its place, so that the field and its hash are there, but a
    pattern on its value may differ); one with a bogus ``<[...]>`` is rewritten
    (``_fixed_message_id``, by ``_mailman_view``)."""
    out = []
    message_id = message.first("message-id")
    if message_id is None:
        message_id = MADE_MESSAGE_ID
        out.append(("Message-ID", message_id))
    if message_id is not None:
        message_id = _fixed_message_id(message_id)
        if message_id.startswith("<") and message_id.endswith(">"):
            message_id = message_id[1:-1]
        else:
            message_id = message_id.strip()
        digest = sha1(message_id.encode("utf-8", "surrogateescape")).digest()
        hash32 = base64.b32encode(digest).decode("ascii")
        out += [("Message-ID-Hash", hash32), ("X-Message-ID-Hash", hash32)]
    out.append(("X-MailFrom", _mail_from(envelope_sender)))
    return tuple(out)


#: The fields ``add_message_hash`` replaces.
_HASH_FIELDS = ("message-id-hash", "x-message-id-hash")


def _fixed_message_id(value: str) -> str:
    # runners/lmtp.py: "Workaround for bogus Message-IDs. See #1065."
    return re.sub(r"^<?\[(.*)\]>?", r"<\1>", value)


def _mail_from(envelope_sender: str) -> str:
    """``envelope.mail_from`` as aiosmtpd makes it of ``MAIL FROM:<sender>``."""
    try:
        return get_angle_addr(f"<{envelope_sender}>")[0].addr_spec
    except (HeaderParseError, IndexError, ValueError):
        return envelope_sender  # aiosmtpd would refuse it (553 5.1.3): never reaches Mailman


def mailman_view(ctx: Context) -> Message:
    """The message as Mailman's rules after ``approved`` read it: the LMTP runner's
    fields appended, and for a list with a moderator password what ``approved`` leaves
    (``_after_approved``).  Made only by the rules that read other fields than the
    sender fields and have something to look for; cached per message."""
    return _mailman_view(ctx.query.message, ctx.query.envelope_sender,
                         ctx.policy.content.moderator_password is not None)


@lru_cache(maxsize=64)
def _mailman_view(message: Message, envelope_sender: str, password: bool) -> Message:
    if password:
        message = _after_approved(message)
    names = message._names()
    if "message-id-hash" in names or "x-message-id-hash" in names:
        # ``add_message_hash`` deletes every hash field the message came with before it
        # adds its own: a forged one is never seen by Mailman's rules.
        message = message._replace(
            headers=tuple(pair for pair, name in zip(message.headers, names)
                          if name not in _HASH_FIELDS),
            names=tuple(name for name in names if name not in _HASH_FIELDS))
    headers = list(message.headers)
    message_id = message.first("message-id")
    if message_id is not None and _fixed_message_id(message_id) != message_id:
        at = message._names().index("message-id")
        headers[at] = (headers[at][0], _fixed_message_id(message_id))
    headers += lmtp_fields(message, envelope_sender)
    return message._replace(headers=tuple(headers),
                            names=tuple(name.lower() for name, _ in headers))


def _after_approved(message: Message) -> Message:
    """What Mailman's ``approved`` rule (``rules/approved.py``, its password right or
    wrong) leaves of the message, for a list with a moderator password: without any
    Approve:/Approved:/X-Approve:/X-Approved: header when it has one; else without an
    ``Approved:`` first non-blank line of the first text/plain part (that part re-encoded
    by Mailman's ``reset_payload``, and the ``Approved: <password>`` text deleted from
    every text part), the parts re-generated by ``email``'s generator."""
    if any(name in APPROVED_HEADERS for name in message._names()):
        headers = tuple(pair for pair in message.headers
                        if pair[0].lower() not in APPROVED_HEADERS)
        return message._replace(headers=headers,
                                names=tuple(name.lower() for name, _ in headers))
    if message.body is None:
        return message
    lines = [f"{name}: {value}\n" for name, value in message.headers]
    raw = ("".join(lines) + "\n" + message.body).encode("utf-8", "surrogateescape")
    msg = email.message_from_bytes(raw, policy=compat32)
    if not _strip_approved_line(msg):
        return message
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=compat32.clone(max_line_length=0)) \
        .flatten(msg)
    head, _, body = out.getvalue().replace(b"\r\n", b"\n").partition(b"\n\n")
    headers = split_headers(head.decode("ascii", "surrogateescape") + "\n")
    if headers is None:
        headers = tuple((str(name), str(value)) for name, value in msg._headers)
    return message._replace(headers=headers, body=body.decode("utf-8", "surrogateescape"),
                            names=tuple(name.lower() for name, _ in headers))


def _strip_approved_line(msg) -> bool:
    """Mailman's body branch of ``Approved.check``, on ``msg`` (mutated): True when it
    found and deleted an Approved: first line."""
    part = payload = None
    for part in typed_subpart_iterator(msg, "text", "plain"):
        payload = part.get_payload(decode=True)
        break
    if payload is None:
        return False
    payload = _decode_us_ascii(part, payload)
    line = ""
    lineno = 0
    lines = payload.splitlines(True)
    for lineno, line in enumerate(lines):
        if line.strip() != "":
            break
    if ":" not in line:
        return False
    header, value = line.split(":", 1)
    if header.lower() not in APPROVED_HEADERS:
        return False
    password = value.strip()
    del lines[lineno]
    _reset_payload(part, "".join(lines))
    pattern = header + r":(\s|&nbsp;)*" + re.escape(password)
    for part in typed_subpart_iterator(msg, "text"):
        payload = part.get_payload(decode=True)
        if payload is not None:
            payload = _decode_us_ascii(part, payload)
            if re.search(pattern, payload):
                _reset_payload(part, re.sub(pattern, "", payload))
    return True


def _decode_us_ascii(part, payload: bytes) -> str:
    try:
        return payload.decode(part.get_content_charset("us-ascii"), "replace")
    except LookupError:
        return payload.decode("us-ascii", "replace")


def _reset_payload(part, payload: str) -> None:
    # rules/approved.py reset_payload.
    charset = part.get_content_charset() or "us-ascii"
    content_type = part.get_content_type()
    format_ = part.get_param("format")
    delsp = part.get_param("delsp")
    del part["content-transfer-encoding"]
    del part["content-type"]
    try:
        part.set_payload(payload, charset)
    except LookupError:
        part.set_payload(payload, "us-ascii")
    part.set_type(content_type)
    if format_:
        part.set_param("Format", format_)
    if delsp:
        part.set_param("DelSp", delsp)


class Loop:
    name = "loop"
    description = "A List-Post: header equal to the list's posting address: discarded."

    def check(self, ctx: Context) -> Hit | Miss:
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        posts = {value.strip().lower() for value in message.get_all("list-post")}
        if ctx.policy.posting_address in posts:
            return Hit(Verdict.DISCARD, "the message has already been posted to this list",
                       Action.DISCARD, ctx.senders[0] if ctx.senders else None)
        return _NO_LOOP


_NO_LOOP = Miss("no List-Post: header names this list")


class _DecodedHeaders:
    """The values of the headers of one message (any case, every part), RFC 2047-decoded
    as Mailman's ``HeaderMatchRule`` decodes them, each header decoded the first time it
    is asked for: the site's header_checks lines and the header_matches entries of every
    list asked about often name the same header, and a long header with encoded words or
    8-bit bytes would otherwise be decoded again for each of them.  Holds only the
    headers asked for."""

    __slots__ = ("_message", "_values")

    def __init__(self, message: Message) -> None:
        self._message = message
        self._values: dict[str, tuple[str, ...]] = {}

    def get(self, header: str) -> tuple[str, ...]:
        key = header.lower()
        values = self._values.get(key)
        if values is None:
            values = self._values[key] = _decode_values(email_message(self._message), key)
        return values


# Keyed by the immutable message, as email_message is, and as bounded.
_decoded_headers = lru_cache(maxsize=64)(_DecodedHeaders)


#: In a header's decoded values: one Mailman's ``HeaderMatchRule`` cannot decode (it
#: raises there, and Mailman shunts the message).
UNDECODABLE = None


def _decode_values(msg, header: str) -> tuple[str | None, ...]:
    """Every value of ``header`` (lower case) in every part, decoded, in Mailman's order
    (``msg.walk()``); ``UNDECODABLE`` for one Mailman cannot decode."""
    out = []
    for part in msg.walk():
        # get_all's fields, before its policy makes a Header of an 8-bit value.
        for name, value in part.raw_items():
            if name.lower() != header:
                continue
            decoded = _decoded_8bit(value)
            if decoded is not None:
                out.append(decoded)
                continue
            value = part.policy.header_fetch_parse(name, value)
            if isinstance(value, Header):
                value = value.encode()
            try:
                out.append(str(make_header(decode_header(value))))
            except (HeaderParseError, LookupError, UnicodeError, ValueError):
                out.append(UNDECODABLE)
    return tuple(out)


def _decoded_8bit(value) -> str | None:
    """What Mailman's decoding makes of a value with bytes that are not ASCII (ASCII and
    surrogate escapes, as the parser leaves them), ``None`` for any other value.

    compat32 hands such a value out as a ``Header`` of charset ``unknown-8bit``; its
    ``encode()`` joins the lines (``splitlines``, each continuation line's leading white
    space made one space) into encoded words of the same bytes, ``decode_header`` gives
    the bytes back and ``str`` makes each byte that is not ASCII U+FFFD.  That round trip
    does pure-Python work for every character, several times over (the encoder measures
    each prefix of an encoded line); this is its result, without it, and
    tests/test_header_match.py holds the two to each other."""
    if not isinstance(value, str) or value.isascii():
        return None
    try:
        value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return None
    lines = value.splitlines()  # not empty: the value has a byte that is not ASCII
    value = lines[0] + "".join([" " + line.lstrip() for line in lines[1:]])
    return value.encode("ascii", "surrogateescape").decode("ascii", "replace")


class HeaderMatchRule:
    name = "header-match"
    description = ("Mailman's site [antispam] header_checks, then the list's "
                   "header_matches, in order: a site line that finds its header's value "
                   "takes jump_chain; else the first list pattern that does takes its "
                   "action (none: jump_chain).")

    def check(self, ctx: Context) -> Hit | Miss:
        site = ctx.snapshot.site_header_checks
        matches = ctx.policy.content.header_matches
        if not matches and not site.checks:
            return _NO_HEADER_MATCHES
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        headers = _decoded_headers(mailman_view(ctx))
        # chains/headers.py: every site line is a rule of its own whose hit defers; then
        # "any" jumps to jump_chain before a list entry is looked at.
        for line, entry in site.checks:
            if _matches(headers, entry):
                action = site.jump_chain
                return Hit(ACTION_VERDICT[action],
                           f"site header_checks line {line} ({entry.header}: "
                           f"{entry.pattern}) of {site.source or 'the Mailman configuration'}"
                           f" matched: jump_chain {action.label} (Mailman's rule "
                           f"header-match-config-{line})", action,
                           ctx.senders[0] if ctx.senders else None)
        for index, entry in enumerate(matches):
            if _matches(headers, entry):
                action = site.jump_chain if entry.action is None else entry.action
                return Hit(ACTION_VERDICT[action],
                           f"header_matches #{index} ({entry.header}: {entry.pattern}) "
                           f"matched: {action.label}", action,
                           ctx.senders[0] if ctx.senders else None)
        if _parts_unseen(message):
            outcomes = header_match_outcomes(ctx)
            if outcomes & PASSED_ON:
                return Miss(_HEADER_MATCH_PARTIAL.detail,
                            note="header-match: the headers of MIME parts past the body's "
                            "visible start were not seen", unseen=outcomes)
            return _HEADER_MATCH_PARTIAL
        return _NO_HEADER_MATCH


#: What passes a post on to Mailman at SMTP time (its hold queue or the list).
PASSED_ON = frozenset({Verdict.ACCEPT, Verdict.HOLD})


def _parts_unseen(message: Message) -> bool:
    """MIME parts may lie past the body's visible start: a multipart (or message/*)
    message whose size says the body was cut.  A single part has no part headers, and
    without the size (an ACL that sends none) nothing says the body was cut."""
    if message.body is None or message.size is None or message.body_complete:
        return False
    content_type = (message.first("content-type") or "").lstrip().lower()
    return content_type.startswith(("multipart/", "message/"))


def header_match_outcomes(ctx: Context) -> frozenset:
    """The verdicts the ``header-match`` rule can give on this list (its entries' and the
    site lines' actions), whatever the message."""
    site = ctx.snapshot.site_header_checks
    actions = {site.jump_chain} if site.checks else set()
    actions.update(site.jump_chain if entry.action is None else entry.action
                   for entry in ctx.policy.content.header_matches
                   if entry.regex is not None)
    return frozenset(ACTION_VERDICT[a] for a in actions if a in ACTION_VERDICT)


def _matches(headers: _DecodedHeaders, entry) -> bool:
    """Mailman's ``HeaderMatchRule.check``: ``re.search`` (case ignored) in the decoded
    values of the header in every MIME part, in order: True at the first that matches.
    At a value Mailman cannot decode, before any match, Mailman raises (and shunts the
    message): the entry misses there, the values after it unread, as Mailman never reads
    them; the chain goes on (passing such a message on would let any sender past every
    later rule, and fill Mailman's shunt queue).  A pattern that does not compile
    misses."""
    regex = entry.regex
    if regex is None:
        return False
    for value in headers.get(entry.header):
        if value is UNDECODABLE:
            return False
        if regex.search(value):
            return True
    return False


_NO_HEADER_MATCHES = Miss("no site header_checks and the list has no header_matches")
_NO_HEADER_MATCH = Miss("no site header_checks line or header_matches pattern matched")
_HEADER_MATCH_PARTIAL = Miss("no site header_checks line or header_matches pattern "
                             "matched the headers seen (the headers of MIME parts past the "
                             "body's visible start were not seen)")


class Administrivia:
    name = "administrivia"
    description = "A Subject: or early body line that looks like an email command: held."

    def check(self, ctx: Context) -> Hit | Miss:
        if not ctx.policy.content.administrivia:
            return _OFF
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        message = mailman_view(ctx)
        msg = email_message(message)
        lines_to_check = []
        subject = str(msg.get("subject", ""))
        if subject != "":
            lines_to_check.append(subject)
        complete = True
        if message.body is None:
            complete = False
        else:
            part = _first_plain(msg)
            if part is not None:
                payload = _decoded(part, "utf-8") or ""
                lineno = 0
                for line in payload.splitlines():
                    line = line.strip()
                    if len(line) == 0:
                        continue
                    lineno += 1
                    if lineno > EMAIL_COMMANDS_MAX_LINES:
                        break
                    lines_to_check.append(line)
                else:
                    complete = message.body_complete
        for line in lines_to_check:
            words = [word.lower() for word in line.split()]
            if not words or words[0] not in EMAIL_COMMANDS:
                continue
            minargs, maxargs = EMAIL_COMMANDS[words[0]]
            if minargs <= len(words) - 1 <= maxargs:
                return _hold("the message contains administrivia", ctx)
        if not complete:
            return _ADMINISTRIVIA_PARTIAL
        return _NO_ADMINISTRIVIA


_OFF = Miss("off for this list")
_NO_ADMINISTRIVIA = Miss("no email command in the Subject: or the first lines")
_ADMINISTRIVIA_PARTIAL = Miss("no email command in the Subject: or the visible lines "
                              "(the rest of the body was not seen)")


class ImplicitDestination:
    name = "implicit-dest"
    description = ("With require_explicit_destination, a post whose To:/Cc:/Resent-To:/"
                   "Resent-Cc: names neither the list nor an acceptable alias: held.")

    def check(self, ctx: Context) -> Hit | Miss:
        content = ctx.policy.content
        if not content.require_explicit_destination:
            return _OFF
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        aliases = set()
        patterns = set()
        for alias in content.acceptable_aliases:
            (patterns if alias.startswith("^") else aliases).add(alias)
        aliases.add(ctx.policy.posting_address)
        recipients = set()
        unread = None
        for header in ("to", "cc", "resent-to", "resent-cc"):
            values = message.get_all(header)
            if not values:
                continue
            try:
                addresses = recipient_addresses(values)
            except UnreadRecipients as error:
                # Its addresses could name the list: only another header that does (or
                # a pattern that matches one read) decides without it.
                unread = unread or f"{header.title()}: {error}"
                continue
            found = set(map(str.lower, addresses))
            if not aliases.isdisjoint(found):
                return _EXPLICIT
            recipients |= found
        for pattern in patterns:
            for recipient in recipients:
                try:
                    if re.match(pattern, recipient, re.IGNORECASE):
                        return _EXPLICIT
                except re.error:
                    with suppress(re.error):
                        if re.match(re.escape(pattern), recipient, re.IGNORECASE):
                            return _EXPLICIT
        if unread is not None:
            return _unread(unread, ctx)
        return _hold("the message has an implicit destination", ctx)


_EXPLICIT = Miss("the list or an acceptable alias is an explicit recipient")


def _unread(why: str, ctx: Context) -> Hit:
    """The temporary failure for recipient fields beyond what is read at SMTP time
    (``mailman_headers.recipient_addresses``): never a skip of the rule."""
    return Hit(Verdict.DEFER, f"{why}: temporary failure (Mailman would parse them)"
               if ctx.explain else "")


class MaximumRecipients:
    name = "max-recipients"
    description = "At least max_num_recipients addresses in To: and Cc:: held."

    def check(self, ctx: Context) -> Hit | Miss:
        limit = ctx.policy.content.max_num_recipients
        if limit == 0:
            return _OFF
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        values = message.get_all("to") + message.get_all("cc")
        # Mailman counts ``most`` addresses, or one where its strict parse fails (none
        # without a field): fewer than the limit needs no parse.
        most = expected_count(values)
        if most < limit and not ctx.explain:
            return _FEWER
        try:
            count = len(recipient_addresses(values))
        except UnreadRecipients as error:
            if most < limit:
                return Miss(f"at most {most} recipients in To: and Cc: ({error})")
            if limit == 1:
                return _hold("at least one recipient in To: and Cc: (max_num_recipients 1)",
                             ctx)
            return _unread(f"To:/Cc:: {error}", ctx)
        if count >= limit:
            return _hold(f"{count} recipients in To: and Cc: (max_num_recipients {limit})",
                         ctx)
        return Miss(f"{count} recipients in To: and Cc:" if ctx.explain else "")


_FEWER = Miss("")


class MaximumSize:
    name = "max-size"
    description = "A message larger than max_message_size KB: held."

    def check(self, ctx: Context) -> Hit | Miss:
        limit = ctx.policy.content.max_message_size
        if limit == 0:
            return _OFF
        message = ctx.query.message
        size = message.size if message is not None else None
        if size is None:
            return _NO_SIZE
        if size / 1024.0 <= limit:
            return Miss(f"{size} bytes" if ctx.explain else "")
        return _hold(f"the message ({size} bytes) is larger than {limit} KB", ctx)


_NO_SIZE = Miss("not evaluated: the MTA sent no message size")


class NewsModeration:
    name = "news-moderation"
    description = "A list gatewayed to a moderated newsgroup holds every post."

    @staticmethod
    def quiet(policy, snapshot) -> bool:
        return not policy.content.newsgroup_moderated

    def check(self, ctx: Context) -> Hit | Miss:
        if not ctx.policy.content.newsgroup_moderated:
            return _NOT_MODERATED_NEWS
        return _hold("post to a moderated newsgroup gateway", ctx)


_NOT_MODERATED_NEWS = Miss("not a moderated newsgroup gateway")


class NoSubject:
    name = "no-subject"
    description = "A message without a Subject: or with an empty one: held."

    def check(self, ctx: Context) -> Hit | Miss:
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        subject = message.first("subject")
        if subject is None or not subject.isascii() or "\n" in subject or "\r" in subject:
            # Mailman's own reading (a folded or 8-bit value); a plain one reads the same.
            subject = str(email_message(message).get("subject", ""))
        if subject.strip() == "":
            return _hold("the message has no subject", ctx)
        return _HAS_SUBJECT


_HAS_SUBJECT = Miss("the message has a subject")


class Digests:
    name = "digests"
    description = ("Mailman's [mailman] hold_digest (off by default): a digest Subject: "
                   "or quoted digest boilerplate.")

    def check(self, ctx: Context) -> Hit | Miss:
        return _HOLD_DIGEST_OFF


_HOLD_DIGEST_OFF = Miss("Mailman's hold_digest is off (its default; policyd does not "
                        "read a site that turns it on)")


class SuspiciousHeader:
    name = "suspicious-header"
    description = "A header matching a line of bounce_matching_headers: held."

    def check(self, ctx: Context) -> Hit | Miss:
        rules = ctx.policy.content.bounce_matching_headers
        if not rules:
            return _NO_BOUNCE_MATCHING
        message = ctx.query.message
        if message is None:
            return _NO_MESSAGE
        msg = email_message(mailman_view(ctx))
        for header, regex in rules:
            for value in msg.get_all(header, []):
                if regex.search(str(value)):
                    return _hold(f"header {header} matched a bounce_matching_headers line",
                                 ctx)
        return _NO_SUSPICIOUS


_NO_BOUNCE_MATCHING = Miss("the list has no bounce_matching_headers")
_NO_SUSPICIOUS = Miss("no header matched bounce_matching_headers")

# Where they go in MAILMAN3_CHAIN (chains/builtin.py): approved and loop after
# no-senders, the header-match detour after banned-address, the holds after moderation.
CONTENT_HOLDS = (Administrivia(), ImplicitDestination(), MaximumRecipients(),
                 MaximumSize(), NewsModeration(), NoSubject(), Digests(),
                 SuspiciousHeader())
