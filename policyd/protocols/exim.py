"""The Exim ``${readsocket}`` protocol: one request line per connection, one reply line.

Request, terminated by ``\\n`` or by the client's half-close (Exim's default
``shutdown=yes``)::

    POLICYD/1 list=<addr>[,<addr>...] sender=<b64> from=<b64> reply_to=<b64>
              sender_header=<b64> [id=<token>]          (one line)

* the version word comes first; then space-separated ``key=value`` in any order; unknown
  keys are ignored;
* ``list`` (required): plain list addresses, comma-separated, at most ``MAX_LISTS``;
* ``sender`` (required): base64 of the envelope sender (``$sender_address``); empty is
  the null sender ``<>``;
* ``from``, ``reply_to``, ``sender_header``: base64 of the raw header values
  (``${base64:$rh_from:}``); empty or absent means the header is absent;
* ``id``: an opaque token for log correlation (``$message_exim_id``).
* ``headers`` (optional): base64 of the whole header block (``$message_headers_raw``);
  when present, From:, Reply-To: and Sender: are read from it, each field on its own
  (``from=`` and the like are then ignored), and the rules that read the message run;
* ``body`` (optional): base64 of the visible start of the body (``$message_body``, its
  length set by Exim's ``message_body_visible``, newlines kept by
  ``message_body_newlines``);
* ``size`` (optional): ``$message_size``, decimal.
* ``client`` (optional): the SMTP client's IP address (``$sender_host_address``), for
  SMTP-time moderation's originating network; empty or absent means unknown (local
  submission, an older ACL).

Base64 is the standard alphabet, padding optional.  A word that is not ``key=`` continues
the previous value after a space (a quoted list local part with a space in it).

Reply: ``<OUTCOME> <code> <x.y.z> <text>`` with **no trailing newline** (a real Exim let a
message through when the answer ended in a newline), then the daemon closes.  Several
lists are decided one by one and the most severe outcome answers for all:
DEFER > REJECT > DISCARD > HOLD > ACCEPT, ties to the first list in the request.

A malformed request, an over-long one (``[exim] max_request`` bytes) or one that does not
arrive within ``[exim] timeout`` seconds (checked every half second) is
answered ``DEFER 451 4.3.0 <reason>`` (an over-long one as soon as that is seen, the rest
of it then read and dropped until the half-close: ``EximPolicyProtocol.draining``).  Malformed includes any control character (NUL,
tab, ESC...) in the line and any ``list=`` entry that is not one address (a stray word
after it, an empty local part): such a request is never decided, so it never gets the
``ACCEPT`` of a list that is not managed.  Parsing is linear in the line's length.
"""

from __future__ import annotations

import binascii
import re
from itertools import repeat
from typing import NamedTuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..core import mailman_headers
from ..core.message import Message, parse_message
from ..core.moderation import SmtpModeration
from ..core.replies import Outcome, SmtpReply, clean_text
from ..core.verdict import Query
from ..logging import DecisionLog
from ..moderation_service import moderation_fields
from . import EVICT_MIN_IDLE, SILENT_GRACE, DecidingFactory, ProtocolError, peer_text

log = Logger(namespace="policyd.exim")

__all__ = ["VERSION", "EximRequest", "parse_request", "reply_line", "aggregate",
           "format_reply", "malformed_reply", "busy_reply", "MODERATION_MODES",
           "EximPolicyProtocol", "EximFactory"]

VERSION = b"POLICYD/1"
_KEY_NAME = re.compile(rb"[a-z_]+")
_KNOWN_KEYS = frozenset({b"list", b"sender", b"from", b"reply_to", b"sender_header", b"id",
                         b"headers", b"body", b"size", b"client", b"headers_cut"})
_CLIENT = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_SIZE = re.compile(rb"[0-9]{1,15}")
_HEADERS = (b"from", b"reply_to", b"sender_header")
# The values that are decoded as bytes (``_b64_bytes``), not as text.
_BLOCKS = frozenset({b"headers", b"body"})
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:@+/=-]")
_SAFE_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+/=-"
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_BYTES = bytes(range(0x20)) + b"\x7f"
# One list address: a dot-atom-ish or quoted local part (the quoted one may hold spaces:
# the only reason a value continues over words), "@", a domain.  Exim's ACL refuses local
# parts with white space, comma, quote or backslash before it asks.
_LIST_ADDRESS = re.compile(rb'(?:"[^"\\]+"|[^\s"\\,@]+)@[^\s"\\,@]+')
#: More lists than this in one request is malformed.  contrib/exim's ACLs ask about one
#: (one list per message); an ACL of one's own may ask about a crosspost, but each list
#: is a decision and a log line of its own, so a request may not ask for hundreds.
MAX_LISTS = 20
#: The ``smtp_moderation`` settings Exim's DATA-time question applies (it has the
#: message, so a ticket can follow the post by its Message-ID); ``policyctl query``
#: previews the same.
MODERATION_MODES = (SmtpModeration.GREYLIST, SmtpModeration.MODERATE)


class EximRequest(NamedTuple):
    lists: tuple[str, ...]
    envelope_sender: str
    from_header: str | None = None
    reply_to_header: str | None = None
    sender_header: str | None = None
    id: str | None = None
    message: Message | None = None
    client: str | None = None

    def message_field(self, name: str) -> str:
        """The first ``name`` header of the message, stripped ("" when absent)."""
        if self.message is None:
            return ""
        values = self.message.get_all(name)
        return values[0].strip() if values else ""

    def queries(self) -> list[Query]:
        return [Query(address, self.envelope_sender, self.from_header,
                      self.reply_to_header, self.sender_header, self.message)
                for address in self.lists]


def _refuse_control(raw: bytes) -> None:
    # ``translate`` deleting the control bytes is a C loop several times faster than a
    # regex search; the search only names the first one.
    if len(raw.translate(None, _CONTROL_BYTES)) != len(raw):
        control = _CONTROL.search(raw)
        raise ProtocolError(f"control character 0x{control.group()[0]:02x} in the request")


def _b64_bytes(key: bytes, value: bytes) -> bytes:
    """A base64 value of ``headers=``/``body=``: the strict decoding refuses every byte
    outside the alphabet, control bytes included (named as such), so these few KB of a
    line are read once, not searched for control bytes first."""
    try:
        return binascii.a2b_base64(value + b"=" * (-len(value) % 4) if len(value) % 4
                                   else value, strict_mode=True)
    except (binascii.Error, ValueError):
        _refuse_control(value)
        raise ProtocolError(f"{key.decode()}= is not valid base64") from None


def _message(fields: dict) -> Message | None:
    """``headers=``/``body=``/``size=``: the message, or ``None`` when ``headers=`` is
    absent (an older ACL).  From:, Reply-To: and Sender: then come from the header
    block, each field on its own (``from=`` and the like are ignored)."""
    size_raw = fields.get(b"size")
    size = None
    if size_raw:
        if _SIZE.fullmatch(size_raw) is None:
            raise ProtocolError("size= is not a number of bytes")
        size = int(size_raw)
    if b"headers" not in fields:
        if b"body" in fields:  # read by nothing, refused all the same
            _refuse_control(fields[b"body"])
        return None
    headers = _b64_bytes(b"headers", fields[b"headers"])
    body = _b64_bytes(b"body", fields[b"body"]) if b"body" in fields else None
    message = parse_message(headers, body, size)
    cut = fields.get(b"headers_cut")
    if cut is not None and cut not in (b"0", b"1"):
        raise ProtocolError("headers_cut= is not 0 or 1")
    return _whole_address_fields(message, fields) if cut == b"1" else message


_ADDRESS_FIELDS = ((b"from", "From"), (b"reply_to", "Reply-To"), (b"sender_header", "Sender"))


def _whole_address_fields(message: Message, fields: dict) -> Message:
    """A header block the ACL cut (``headers_cut=1``: longer than POLICYD_MAX_HEADERS):
    the fields past the cut are missing and the last one may be cut in the middle, but
    From:, Reply-To: and Sender:, which decide whose post it is, come whole from
    ``from=``, ``reply_to=`` and ``sender_header=`` (``$rh_``: every field of a name,
    joined by newlines).  They replace those of the block; its last field is dropped."""
    pairs = [pair for pair in message.headers[:-1]
             if pair[0].lower() not in ("from", "reply-to", "sender")]
    whole = []
    for key, name in _ADDRESS_FIELDS:
        raw = fields.get(key)
        if raw:
            whole += [(name, field.lstrip(" \t").rstrip("\n"))
                      for field in mailman_headers.fields(_b64(key, raw))]
    headers = tuple(whole + pairs)
    return message._replace(headers=headers, names=tuple(name.lower() for name, _ in headers),
                            headers_cut=True)


def _joined(message: Message, name: str) -> str | None:
    """The fields of one header joined by newlines: the request's ``from_header`` and
    the like (the rules read the fields one by one from the message)."""
    values = message.get_all(name)
    return "\n".join(values) if values else None


def _b64(key: bytes, value: bytes) -> str:
    if not value:
        return ""
    try:
        raw = binascii.a2b_base64(value + b"=" * (-len(value) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{key.decode()}= is not valid base64") from None
    return raw.decode("utf-8", "surrogateescape")


def _plain_fields(words: list[bytes]) -> dict[bytes, bytes] | None:
    """The fields of the usual request, found by C loops: every word after the version
    one ``key=value`` of a known key, each key once, no control byte outside the base64
    blocks.  ``None`` for anything else (a value continued over words, an empty word, an
    unknown or repeated key, a control byte): ``_fields`` then reads it word by word and
    says what is wrong."""
    try:
        fields = dict(map(bytes.split, words[1:], repeat(b"="), repeat(1)))
    except ValueError:  # a word without "=" (or an empty one)
        return None
    if len(fields) != len(words) - 1 or not fields.keys() <= _KNOWN_KEYS:
        return None
    small = b"".join([value for key, value in fields.items() if key not in _BLOCKS])
    if len(small.translate(None, _CONTROL_BYTES)) != len(small):
        return None
    return fields


def _fields(words: list[bytes]) -> dict[bytes, bytes]:
    """The fields of any request, word by word (``_plain_fields`` first)."""
    # A value that continues over several words is gathered as a list of its words and
    # joined once at the end: appending to a bytes value per word would copy it again
    # each time (quadratic in the line's length).
    fields: dict[bytes, bytes] = {}
    continued: dict[bytes, list[bytes]] | None = None
    last = None
    rest = iter(words)
    next(rest)  # the version word
    for word in rest:
        if not word:
            continue
        key, eq, value = word.partition(b"=")
        if (key not in _BLOCKS or not eq) and \
                len(word.translate(None, _CONTROL_BYTES)) != len(word):
            _refuse_control(word)
        if eq and (key in _KNOWN_KEYS or _KEY_NAME.fullmatch(key)):
            if key in fields:
                raise ProtocolError(f"{key.decode()}= given twice")
            fields[key] = value
            last = key
        elif last is not None:
            if continued is None:
                continued = {}
            if last in continued:
                continued[last].append(word)
            else:
                continued[last] = [fields[last], word]
        else:
            raise ProtocolError(f"expected key=value, got {word[:40]!r}")
    if continued:
        for key, values in continued.items():
            fields[key] = b" ".join(values)
    return fields


def parse_request(line: bytes, *, max_lists: int = MAX_LISTS) -> EximRequest:
    """Parse one request line (without its newline; a trailing ``\\r`` is dropped).

    Raises ``ProtocolError`` for anything malformed; linear in ``len(line)``."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line.strip():
        raise ProtocolError("empty request")
    # Control bytes are refused word by word: the base64 blocks (``_BLOCKS``), most of
    # a DATA-ACL line, are checked by their strict decoding instead.
    words = line.split(b" ")
    if words[0] != VERSION:
        _refuse_control(words[0])
        if not words[0] or b"=" in words[0]:
            raise ProtocolError("the request must start with the version word POLICYD/1")
        raise ProtocolError(f"unsupported version {words[0][:20].decode('ascii', 'replace')!r}"
                            " (this daemon speaks POLICYD/1)")
    fields = _plain_fields(words)
    if fields is None:
        fields = _fields(words)
    get = fields.get
    lists_raw = get(b"list")
    if lists_raw is None:
        raise ProtocolError("list= is required")
    if b"," in lists_raw:
        entries = [entry for entry in lists_raw.split(b",") if entry]
        if not entries:
            raise ProtocolError("list= names no address")
        if len(entries) > max_lists:
            raise ProtocolError(f"list= names more than {max_lists} addresses")
    elif lists_raw:
        entries = [lists_raw]
    else:
        raise ProtocolError("list= names no address")
    for entry in entries:
        if _LIST_ADDRESS.fullmatch(entry) is None:
            raise ProtocolError(f"list= entry {entry[:60]!r} is not one address")
    lists = tuple([entry.decode("utf-8", "surrogateescape") for entry in entries])
    sender = get(b"sender")
    if sender is None:
        raise ProtocolError("sender= is required (empty for the null sender)")
    sender = _b64(b"sender", sender)
    message = _message(fields) if (b"headers" in fields or b"size" in fields
                                   or b"body" in fields) else None
    if message is not None:
        headers = [_joined(message, name) for name in ("from", "reply-to", "sender")]
    else:
        headers = [(_b64(key, raw) or None) if (raw := get(key)) is not None else None
                   for key in _HEADERS]
    request_id = get(b"id")
    if request_id is not None:
        request_id = request_id[:64]
        if request_id and not request_id.translate(None, _SAFE_ID_BYTES):
            request_id = request_id.decode("ascii")  # already safe (Exim's ids are)
        else:
            request_id = _SAFE_ID.sub("_", request_id.decode("ascii", "replace")) or None
    client = get(b"client") or None
    if client is not None:
        if _CLIENT.fullmatch(client) is None:
            raise ProtocolError("client= is not an IP address")
        client = client.decode("ascii")
    return EximRequest(lists, sender, *headers, request_id, message, client)


def reply_line(reply: SmtpReply) -> str:
    """``REJECT 550 5.7.1 text``: the whole Exim answer, no trailing newline."""
    return f"{reply.outcome._value_} {reply.code} {reply.status} {reply.text}"


# Several lists in one request: the most severe outcome wins, ties go to the first list.
SEVERITY = {
    Outcome.ACCEPT: 0,
    Outcome.HOLD: 1,
    Outcome.DISCARD: 2,
    Outcome.REJECT: 3,
    Outcome.DEFER: 4,
}


def aggregate(replies) -> SmtpReply:
    """The one Exim answer for several lists: most severe outcome, first list on ties."""
    best = None
    for reply in replies:
        if best is None or SEVERITY[reply.outcome] > SEVERITY[best.outcome]:
            best = reply
    if best is None:
        raise ValueError("no reply to aggregate")
    return best


def format_reply(reply: SmtpReply) -> bytes:
    """The reply bytes: one line, no newline."""
    return reply_line(reply).encode("utf-8", "replace")


def malformed_reply(reason: str) -> SmtpReply:
    return SmtpReply(Outcome.DEFER, 451, "4.3.0", clean_text("Malformed policy request: " + reason))


def busy_reply() -> SmtpReply:
    """The answer to a connection closed at a limit (``TrackingFactory``)."""
    return SmtpReply(Outcome.DEFER, 451, "4.3.2",
                     "Policy service busy, please try again later")


#: Bytes read and dropped after an answer to a request longer than ``max_request``
#: before the connection is closed anyway (Exim's own header limit is 1 MB).
DRAIN_MAX = 4 << 20


@implementer(IHalfCloseableProtocol)
class EximPolicyProtocol(Protocol):
    """Reads one line (newline or half-close), answers it, closes.

    ``deadline`` (set by the factory): when an unanswered connection times out.
    ``buffered``: the bytes of the incomplete line held (the factory's limits).
    A line arriving in pieces is gathered in a ``bytearray`` and only the new piece is
    searched for the newline: linear in the line's length however it is split.
    """

    deadline = 0.0
    started = 0.0
    buffered = 0
    # A line arriving in pieces is gathered in a ``bytearray`` (made only then: nearly
    # every request arrives in one read).
    _buffer: bytes | bytearray = b""
    answered = False
    # Answered before the whole request was read (longer than ``max_request``): the rest
    # is read and dropped until the peer half-closes (``DRAIN_MAX`` bytes, ``deadline``
    # at most), so that Exim, still writing, can finish and read the answer (closed at
    # once, its next write failed: the ACL's fail string instead of our reason).
    draining = False
    drained = 0
    # The request is complete and being decided (a password check in a thread, a DMARC
    # lookup): ``_pending`` is the Deferred of its answer, cancelled if the connection is
    # answered (its deadline) or closed before it fires, so that a decision nobody
    # receives is never made, logged or counted.
    waiting = False
    _pending: Deferred | None = None

    def __init__(self, factory: "EximFactory") -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        self.factory.track(self)

    def dataReceived(self, data: bytes) -> None:
        if self.answered or self.waiting:
            if self.draining:
                self.drained += len(data)
                if self.drained > DRAIN_MAX:
                    self.transport.loseConnection()
            return
        held = len(self._buffer)
        nl = data.find(b"\n")
        limit = self.factory.config.max_request
        if held + (nl if nl >= 0 else len(data)) > limit:
            reply = self.factory.malformed(
                ProtocolError(f"request longer than {limit} bytes"), self.transport)
            if nl >= 0:
                self._answer(reply)  # the whole line is read: nothing more to wait for
            else:
                self._drain(reply)
        elif nl >= 0:
            line = bytes(self._buffer) + data[:nl] if held else data[:nl]
            self._answer(self.factory.answer(line, self.transport))
        else:
            if held:
                self._buffer += data
            else:
                self._buffer = bytearray(data)
            if not self.factory.buffer_changed(self, len(self._buffer)):
                self.factory._close(self)

    def take_answer(self, reply) -> None:
        """The answer to the bytes read as the connection was accepted
        (``EximFactory.answer_first``): what remains of it to send, or the ``Deferred``
        of an answer that waits."""
        self._answer(reply)

    def _drain(self, reply: bytes) -> None:
        """Answer now, close when the peer has sent all it will (``draining``)."""
        self.answered = self.draining = True
        if self._buffer:
            self._buffer = b""
            self.factory.buffer_changed(self, 0)
        self.transport.write(reply)

    def readConnectionLost(self) -> None:
        if self.draining:
            self.transport.loseConnection()
            return
        if not self.answered and not self.waiting:
            self._answer(self.factory.answer(bytes(self._buffer), self.transport))

    def idle_for(self, now: float) -> float:
        """Seconds counted against this connection at a limit (``TrackingFactory``):
        never closed once answered; silent after ``SILENT_GRACE``: at once; half a
        line: after ``EVICT_MIN_IDLE``.  A request being decided is never closed."""
        if self.draining:  # answered: what is left of its request is not kept
            return now - self.started + EVICT_MIN_IDLE
        if self.answered or self.waiting:
            return -1.0
        age = now - self.started
        if not self._buffer and age >= SILENT_GRACE:
            return age + EVICT_MIN_IDLE
        return age

    def never_read(self) -> bool:
        """No byte received yet (``TrackingFactory.admit``): none of a line held, none
        being decided or answered."""
        return not (self.buffered or self.answered or self.waiting)

    def evict(self) -> None:
        """Closed for a limit: ``DEFER`` (counted, not logged: the incident is)."""
        if not self.answered:
            self.factory.decider.count("exim", "busy", "DEFER")
            self._answer(format_reply(busy_reply()))

    def writeConnectionLost(self) -> None:
        pass

    def timeoutConnection(self) -> None:
        if self.answered:
            return
        if self.waiting:
            # Still waiting for a password check or a DMARC lookup: the temporary
            # failure, counted as busy (the lookups log their own incidents).
            self.factory.decider.count("exim", "busy", "DEFER")
            self._answer(format_reply(self.factory.decider.policy.error()))
        else:
            self._answer(self.factory.malformed(
                ProtocolError(f"no complete request within {self.factory.config.timeout:g} s"),
                self.transport))

    def shutdown(self) -> None:
        """Daemon stopping: nothing to do, the connection closes after its answer."""

    def _answer(self, reply) -> None:
        # ``type`` first: ``Deferred`` is generic, and isinstance() against it goes
        # through the ABC machinery on every answer.
        if type(reply) is not bytes and isinstance(reply, Deferred):
            # Waiting for a password check in a thread: the connection stays open (and
            # its deadline still answers it if the check takes too long).
            self.waiting = True
            self._pending = reply
            reply.addCallbacks(self._answer_late, self._failed)
            return
        if self.answered:
            return
        self.answered = True
        self._cancel_pending()
        if self._buffer:
            self._buffer = b""
            self.factory.buffer_changed(self, 0)
        self.factory.finish(self.transport, reply)

    def _answer_late(self, reply: bytes) -> None:
        self._pending = None
        self._answer(reply)

    def _failed(self, failure) -> None:
        if failure.check(CancelledError):  # answered or closed meanwhile: nothing to do
            return
        self._pending = None
        log.failure("answering an Exim request failed", failure)
        self._answer(format_reply(self.factory.decider.policy.error()))

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def connectionLost(self, reason=None) -> None:
        # Exim gone before the answer: the decision that was coming is not made.
        self._cancel_pending()
        self.factory.untrack(self)


class EximFactory(DecidingFactory):
    protocol = EximPolicyProtocol
    sweep_interval = 0.5
    # Each answer is the connection's last (``finish``; ``policyd.runtime.tuning``).
    closes_after_answer = True

    def __init__(self, decider, config, reactor, decision_log: DecisionLog | None = None
                 ) -> None:
        super().__init__(decider, config, reactor, decision_log)
        self.sweep_interval = min(self.sweep_interval, config.timeout)
        self.use_limits(config)
        # The decision latency histogram when metrics are on, else None (nothing to do).
        self.latency = getattr(decider, "latency", {}).get("exim")
        self._answers = decider.answer_counter("exim")

    def answer_first(self, data: bytes, peer) -> bytes | Deferred | None:
        """The answer to what a connection sent before it was accepted
        (``policyd.runtime.fastaccept``), read as ``dataReceived`` reads it: ``None``
        while no whole line has arrived (the connection then goes the usual way)."""
        nl = data.find(b"\n")
        limit = self.config.max_request
        if nl < 0:
            return None  # (longer than max_request: the protocol answers, then drains)
        if nl > limit:
            return self.malformed(ProtocolError(f"request longer than {limit} bytes"), peer)
        return self.answer(data[:nl], peer)

    def track(self, protocol) -> None:
        protocol.started = now = self.reactor.seconds()
        protocol.deadline = now + self.config.timeout
        super().track(protocol)

    def sweep(self, now: float) -> None:
        for protocol in [p for p in self.connections
                         if (not p.answered or p.draining) and p.deadline <= now]:
            if protocol.draining:
                protocol.transport.loseConnection()
            elif not self.spared(protocol):
                protocol.timeoutConnection()

    # Times a request may wait for moderator passwords to be verified before it is
    # answered with what is known (several lists may each need one).
    VERIFY_ROUNDS = 3

    def answer(self, line: bytes, transport, _round: int = 0) -> bytes | Deferred:
        """Parse, decide each list, log each decision, answer the most severe reply.

        A moderator password to verify (an ``Approved:`` header) makes the answer a
        ``Deferred``: verified in a thread, then decided again."""
        try:
            request = parse_request(line)
        except ProtocolError as error:
            return self.malformed(error, transport)
        query = None
        answers = ()
        try:
            decide = self.decider.decide
            queries = request.queries()
            answers = [decide(query, "exim", names_a_list=True) for query in queries]
            pending = [answer.pending for answer in answers if answer.pending is not None]
            if pending:
                waiting = self.decider.verify(pending) if _round < self.VERIFY_ROUNDS else None
                if waiting is not None:
                    # Decided again when the checks are done, unless the answer is cancelled
                    # first (the connection answered or closed meanwhile: nothing decided,
                    # logged or counted); cancelling it never cancels the checks themselves.
                    again = Deferred()
                    waiting.addBoth(lambda _: again.callback(None))
                    return again.addCallback(
                        lambda _: self.answer(line, transport, _round + 1))
                # At the limit of checks waiting, or still undecided after the rounds: the
                # temporary failure, counted as busy, with the reason why.
                reason = self.decider.busy_reason(_round < self.VERIFY_ROUNDS)
                answers = [answer if answer.pending is None else
                           self.decider.trouble("exim", "busy", reason, answer.started)
                           for answer in answers]
            # SMTP-time moderation at DATA only (the request with the header block): the
            # RCPT-time question (envelope only) is never deferred by it.
            moderation = self.moderation if request.message is not None else None
            decision_log = self.decision_log
            reply = None
            started = 0.0
            for query, answer in zip(queries, answers):
                step = None
                # Moderation only ever changes a hold (``ModerationService.apply``): asked
                # then, and the Message-ID and Subject read only for it.
                if moderation is not None and moderation.asks_about(answer.decision):
                    answer, step = moderation.apply(
                        answer, query, client=request.client,
                        message_id=request.message_field("message-id")[:255],
                        subject=request.message_field("subject"), modes=MODERATION_MODES)
                text = reply_line(answer.reply)
                if decision_log.enabled:
                    decision_log.answered("exim", query, answer, text, request.id,
                                          moderation_fields(step) if step is not None else "")
                # Several lists: the most severe reply answers for all (``aggregate``).
                if reply is None:
                    reply, line_text, started = answer.reply, text, answer.started
                elif SEVERITY[answer.reply.outcome] > SEVERITY[reply.outcome]:
                    reply, line_text = answer.reply, text
            self._answers[reply.outcome._value_] += 1
            if self.latency is not None:  # from the first decision to the answer
                self.latency.observe(started)
            return line_text.encode("utf-8", "replace")
        except Exception as error:
            return self.answer_failed(error, "exim", query, answers)

    @staticmethod
    def error_answer(reply: SmtpReply) -> bytes:
        return format_reply(reply)

    def malformed(self, error: ProtocolError, transport) -> bytes:
        log.warn("malformed Exim policy request from {peer}: {reason}",
                      peer=peer_text(transport),
                      reason=error.reason)
        reply = malformed_reply(error.reason)
        self.decider.count("exim", "malformed", "DEFER")
        return format_reply(reply)
