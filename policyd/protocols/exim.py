"""The Exim ``${readsocket}`` protocol: one request line per connection, one reply line.

Request, terminated by ``\\n`` or by the client's half-close (Exim's default
``shutdown=yes``)::

    POLICYD/1 list=<addr>[,<addr>...] sender=<b64> from=<b64> reply_to=<b64>
              sender_header=<b64> [id=<token>]          (one line)

* the version word comes first; then space-separated ``key=value`` in any order; unknown
  keys are ignored;
* ``list`` (required): plain list addresses, comma-separated;
* ``sender`` (required): base64 of the envelope sender (``$sender_address``); empty is
  the null sender ``<>``;
* ``from``, ``reply_to``, ``sender_header``: base64 of the raw header values
  (``${base64:$rh_from:}``); empty or absent means the header is absent;
* ``id``: an opaque token for log correlation (``$message_exim_id``).

Base64 is the standard alphabet, padding optional.  A word that is not ``key=`` continues
the previous value after a space (a quoted list local part with a space in it).

Reply: ``<OUTCOME> <code> <x.y.z> <text>`` with **no trailing newline** (a real Exim let a
message through when the answer ended in a newline), then the daemon closes.  Several
lists are decided one by one and the most severe outcome answers for all:
DEFER > REJECT > DISCARD > HOLD > ACCEPT, ties to the first list in the request.

A malformed request, an over-long one (``[exim] max_request`` bytes) or one that does not
arrive within ``[exim] timeout`` seconds (checked every half second) is
answered ``DEFER 451 4.3.0 <reason>``.
"""

from __future__ import annotations

import binascii
import re
from typing import NamedTuple

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..core.replies import Outcome, SmtpReply, clean_text
from ..core.verdict import Query
from ..wire import aggregate, exim_reply_line
from . import ProtocolError, TrackingFactory, peer_text

log = Logger(namespace="policyd.exim")

__all__ = ["VERSION", "EximRequest", "parse_request", "format_reply", "malformed_reply",
           "EximPolicyProtocol", "EximFactory"]

VERSION = b"POLICYD/1"
_KEY_NAME = re.compile(rb"[a-z_]+")
_KNOWN_KEYS = frozenset({b"list", b"sender", b"from", b"reply_to", b"sender_header", b"id"})
_HEADERS = (b"from", b"reply_to", b"sender_header")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:@+/=-]")
_SAFE_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+/=-"


class EximRequest(NamedTuple):
    lists: tuple[str, ...]
    envelope_sender: str
    from_header: str | None = None
    reply_to_header: str | None = None
    sender_header: str | None = None
    id: str | None = None

    def queries(self) -> list[Query]:
        return [Query(address, self.envelope_sender, self.from_header,
                      self.reply_to_header, self.sender_header)
                for address in self.lists]


def _b64(key: bytes, value: bytes) -> str:
    if not value:
        return ""
    try:
        raw = binascii.a2b_base64(value + b"=" * (-len(value) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{key.decode()}= is not valid base64") from None
    return raw.decode("utf-8", "surrogateescape")


def parse_request(line: bytes) -> EximRequest:
    """Parse one request line (without its newline; a trailing ``\\r`` is dropped)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    words = line.split(b" ")
    if not line.strip():
        raise ProtocolError("empty request")
    if words[0] != VERSION and (not words[0] or b"=" in words[0]):
        raise ProtocolError("the request must start with the version word POLICYD/1")
    if words[0] != VERSION:
        raise ProtocolError(f"unsupported version {words[0][:20].decode('ascii', 'replace')!r}"
                            " (this daemon speaks POLICYD/1)")
    fields: dict[bytes, bytes] = {}
    last = None
    for word in words[1:]:
        if not word:
            continue
        key, eq, value = word.partition(b"=")
        if eq and (key in _KNOWN_KEYS or _KEY_NAME.fullmatch(key)):
            if key in fields:
                raise ProtocolError(f"{key.decode()}= given twice")
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += b" " + word
        else:
            raise ProtocolError(f"expected key=value, got {word[:40]!r}")
    lists_raw = fields.get(b"list")
    if lists_raw is None:
        raise ProtocolError("list= is required")
    lists = tuple(filter(None, lists_raw.decode("utf-8", "surrogateescape").split(",")))
    if not lists:
        raise ProtocolError("list= names no address")
    if b"sender" not in fields:
        raise ProtocolError("sender= is required (empty for the null sender)")
    sender = _b64(b"sender", fields[b"sender"])
    headers = [(_b64(k, fields[k]) or None) if k in fields else None for k in _HEADERS]
    request_id = fields.get(b"id")
    if request_id is not None:
        request_id = request_id[:64]
        if request_id and not request_id.translate(None, _SAFE_ID_BYTES):
            request_id = request_id.decode("ascii")  # already safe (Exim's ids are)
        else:
            request_id = _SAFE_ID.sub("_", request_id.decode("ascii", "replace")) or None
    return EximRequest(lists, sender, *headers, request_id)


def format_reply(reply: SmtpReply) -> bytes:
    """The reply bytes: one line, no newline."""
    return exim_reply_line(reply).encode("utf-8", "replace")


def malformed_reply(reason: str) -> SmtpReply:
    return SmtpReply(Outcome.DEFER, 451, "4.3.0", clean_text("Malformed policy request: " + reason))


@implementer(IHalfCloseableProtocol)
class EximPolicyProtocol(Protocol):
    """Reads one line (newline or half-close), answers it, closes.

    ``deadline`` (set by the factory): when an unanswered connection times out.
    """

    deadline = 0.0

    def __init__(self, factory: "EximFactory") -> None:
        self.factory = factory
        self._buffer = b""
        self.answered = False

    def connectionMade(self) -> None:
        self.factory.track(self)

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        buffer = self._buffer + data if self._buffer else data
        nl = buffer.find(b"\n")
        limit = self.factory.config.max_request
        if nl >= 0 and nl <= limit:
            self._answer(self.factory.answer(buffer[:nl], self.transport))
        elif nl > limit or len(buffer) > limit:
            self._answer(self.factory.malformed(
                ProtocolError(f"request longer than {limit} bytes"), self.transport))
        else:
            self._buffer = buffer

    def readConnectionLost(self) -> None:
        if not self.answered:
            self._answer(self.factory.answer(self._buffer, self.transport))

    def writeConnectionLost(self) -> None:
        pass

    def timeoutConnection(self) -> None:
        if not self.answered:
            self._answer(self.factory.malformed(
                ProtocolError(f"no complete request within {self.factory.config.timeout:g} s"),
                self.transport))

    def shutdown(self) -> None:
        """Daemon stopping: nothing to do, the connection closes after its answer."""

    def _answer(self, reply: bytes) -> None:
        self.answered = True
        self._buffer = b""
        self.transport.write(reply)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.factory.untrack(self)


class EximFactory(TrackingFactory):
    protocol = EximPolicyProtocol
    sweep_interval = 0.5

    def __init__(self, decider, config, reactor) -> None:
        super().__init__(reactor)
        self.decider = decider
        self.config = config
        self.sweep_interval = min(self.sweep_interval, config.timeout)

    def track(self, protocol) -> None:
        protocol.deadline = self.reactor.seconds() + self.config.timeout
        super().track(protocol)

    def sweep(self, now: float) -> None:
        for protocol in [p for p in self.connections if not p.answered and p.deadline <= now]:
            protocol.timeoutConnection()

    def buildProtocol(self, addr):
        return self.protocol(self)

    def answer(self, line: bytes, transport) -> bytes:
        try:
            request = parse_request(line)
        except ProtocolError as error:
            return self.malformed(error, transport)
        decide = self.decider.decide
        queries = request.queries()
        if len(queries) == 1:
            _, reply, wire = decide(queries[0], "exim", request.id, count_answer=False)
            answer = wire.encode("utf-8", "replace")
        else:
            reply = aggregate([decide(query, "exim", request.id, count_answer=False)[1]
                               for query in queries])
            answer = format_reply(reply)
        self.decider.count_answer("exim", reply.outcome._value_)
        return answer

    def malformed(self, error: ProtocolError, transport) -> bytes:
        log.warn("malformed Exim policy request from {peer}: {reason}",
                      peer=peer_text(transport),
                      reason=error.reason)
        reply = malformed_reply(error.reason)
        self.decider.count("exim", "malformed", "DEFER")
        return format_reply(reply)
