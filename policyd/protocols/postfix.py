"""The Postfix policy delegation protocol (SMTPD_POLICY_README): codec + thin protocol.

A request is ``name=value`` lines ended by an empty line; the answer is ``action=...`` and
an empty line; the connection stays open for the next request.  Values are kept
byte-exact (decoded as UTF-8 with ``surrogateescape``, so any byte survives), unknown
attributes are ignored, and an empty ``sender=`` (the null sender) is kept apart from an
absent one.

Only ``protocol_state=RCPT`` is decided (one recipient per request: Postfix sends one
request per RCPT); every other state answers ``DUNNO``.  What the answer is for a decision
(``[postfix] mode`` and ``accept_action``) is ``postfix_action`` below.

Bad input is answered, never a silent hang-up (Postfix would wait out its 100 s timeout):
``action=451 4.3.0 Malformed policy request: <reason>``.  A request Postfix cannot have
sent (a line without ``=``, too many attributes, a NUL, a duplicate attribute, a RCPT
without recipient) is answered and the connection stays usable, up to ``MALFORMED_MAX``
of them.  Pipelined requests are answered ``PER_TURN`` per turn of the reactor.  A line longer than
``[postfix] max_line`` or a request longer than ``max_request`` bytes is answered the same
way as soon as it is seen, then the connection is closed: its framing cannot be trusted.
"""

from __future__ import annotations

import re
from itertools import repeat
from typing import Mapping, NamedTuple

from zope.interface import implementer

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from ..core.replies import Outcome, SmtpReply, clean_text
from ..core.verdict import Decision, Query
from ..core.moderation import SmtpModeration
from ..logging import FIELD_MAX, DecisionLog, log_fields
from ..moderation_service import moderation_fields
from . import (EVICT_MIN_IDLE, SILENT_GRACE, DecidingFactory, ProtocolError, abort_stuck,
               hold_reads_while_answers_wait, peer_text)

log = Logger(namespace="policyd.postfix")

__all__ = ["PostfixRequest", "RequestReader", "parse_request", "format_response",
           "malformed_action", "postfix_action", "answer_action", "postfix_query",
           "SAFE_RULES", "MODERATION_MODES",
           "PostfixPolicyProtocol", "PostfixFactory"]

_UTF8 = "utf-8"
_ESC = "surrogateescape"


#: The attributes a decision line carries, to find the message in the mail log.
_LOGGED_ATTRIBUTES = (b"client_address", b"client_name", b"queue_id", b"sasl_username")
_LOGGED_NAMES = tuple((name, f" {name.decode('ascii')}=") for name in _LOGGED_ATTRIBUTES)
# A value ``log_fields`` would write as it is (its _PLAIN_VALUE, in bytes, not cut).
_PLAIN_BYTES = re.compile(rb"[A-Za-z0-9._:@+/\[\]-]{1,%d}" % FIELD_MAX)


class PostfixRequest(NamedTuple):
    """One request: the attributes as raw bytes (names and values exactly as sent)."""

    attributes: Mapping[bytes, bytes]

    def get(self, name: str) -> str | None:
        value = self.attributes.get(name.encode("ascii"))
        return None if value is None else value.decode(_UTF8, _ESC)

    @property
    def protocol_state(self) -> str:
        return self.attributes.get(b"protocol_state", b"").decode("ascii", "replace")

    def client_fields(self) -> str:
        """The client and queue attributes Postfix sent (``client_address``,
        ``client_name``, ``queue_id``, ``sasl_username``), absent or empty ones left out,
        as `` name=value`` text for the end of the decision line (``log_fields``)."""
        attrs = self.attributes
        out = []
        for name, label in _LOGGED_NAMES:
            value = attrs.get(name)
            if not value:
                continue
            if _PLAIN_BYTES.fullmatch(value) is not None:  # the usual: no quoting needed
                out.append(label + value.decode("ascii"))
            else:
                out.append(log_fields(((name.decode("ascii"),
                                        value.decode(_UTF8, "backslashreplace")),)))
        return "".join(out)

    @property
    def request_id(self) -> str | None:
        """``queue_id`` if Postfix has one yet, else ``instance``: for log correlation."""
        value = self.attributes.get(b"queue_id") or self.attributes.get(b"instance")
        return value.decode("ascii", "replace") if value else None

    def query(self) -> Query | None:
        """The query at ``protocol_state=RCPT``, ``None`` for every other state.

        Raises ``ProtocolError`` for a RCPT request without recipient or sender.
        """
        attrs = self.attributes
        if attrs.get(b"protocol_state") != b"RCPT":
            return None
        recipient = attrs.get(b"recipient")
        if not recipient:
            raise ProtocolError("RCPT request without recipient=")
        sender = attrs.get(b"sender")
        if sender is None:
            raise ProtocolError("RCPT request without sender=")
        return Query(recipient.decode(_UTF8, _ESC), sender.decode(_UTF8, _ESC))


def _overflow(data: bytes, start: int, max_line: int, max_request: int,
              stop: int | None = None) -> str | None:
    """The first limit a streaming reader would cross in ``data[:stop]`` (one request's
    lines), checking lines from offset ``start`` (earlier lines are known to be short)."""
    length = len(data) if stop is None else stop
    size_at = max_request + 1 if length > max_request else None
    line_at = None
    pos = start
    while True:
        nl = data.find(b"\n", pos, length)
        end = length if nl < 0 else nl
        if end - pos > max_line:
            line_at = pos + max_line + 1
            break
        if nl < 0 or (size_at is not None and nl >= size_at):
            break
        pos = nl + 1
    if line_at is not None and (size_at is None or line_at <= size_at):
        return f"line longer than {max_line} bytes"
    if size_at is not None:
        return f"request longer than {max_request} bytes"
    return None


def parse_request(block: bytes, *, max_line: int = 4096, max_attributes: int = 100,
                  max_request: int = 65536) -> PostfixRequest:
    """Parse one request: its ``name=value`` lines joined by ``\\n``, without the empty
    line that ends it.  Raises ``ProtocolError`` (``fatal`` for the size limits)."""
    if len(block) > max_line or len(block) > max_request:
        reason = _overflow(block, 0, max_line, max_request)
        if reason is not None:
            raise ProtocolError(reason, fatal=True)
    if b"\0" in block:
        raise ProtocolError("NUL byte in the request")
    lines = block.split(b"\n")
    if len(lines) > max_attributes:
        raise ProtocolError(f"more than {max_attributes} attributes")
    try:
        # map() over the unbound method: the loop runs in C, a third faster than a
        # generator expression over 15-30 lines.
        attributes = dict(map(bytes.split, lines, repeat(b"="), repeat(1)))
    except ValueError:
        bad = next(line for line in lines if b"=" not in line)
        raise ProtocolError(f"line without name=value: {_show(bad)}") from None
    if len(attributes) != len(lines):
        seen = set()
        for line in lines:
            name = line.split(b"=", 1)[0]
            if name in seen:
                raise ProtocolError(f"attribute {_show(name)} sent twice")
            seen.add(name)
    if b"" in attributes:
        raise ProtocolError("attribute with an empty name")
    kind = attributes.get(b"request")
    if kind is not None and kind != b"smtpd_access_policy":
        raise ProtocolError(f"unsupported request type {_show(kind)}")
    if attributes.get(b"protocol_state") == b"RCPT":
        # (``PostfixRequest.query`` says it too; here it counts for ``MALFORMED_MAX``)
        if not attributes.get(b"recipient"):
            raise ProtocolError("RCPT request without recipient=")
        if b"sender" not in attributes:
            raise ProtocolError("RCPT request without sender=")
    return PostfixRequest(attributes)


def _bare(error: ProtocolError) -> ProtocolError:
    """``error`` without its traceback and the exception it was raised in: they would
    hold ``feed``'s frame, and the list of results holding the error, in a cycle only
    the cyclic collector frees (one per malformed request)."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode(_UTF8, "backslashreplace")
    return repr(text + ("..." if len(raw) > limit else ""))


class RequestReader:
    """Sans-IO framing: feed bytes, get requests (or ``ProtocolError``) in order.

    Stray empty lines between requests are skipped.  The size limits are enforced on the
    incomplete request too, so memory stays bounded whatever the peer sends.  CRLF line
    ends are read as LF (Postfix never sends them; a hand-written client or a proxy
    may): a request ended by ``\r\n\r\n`` is answered at once, not at the idle timeout.
    An incomplete request is kept in a ``bytearray`` and only the new bytes are searched:
    linear in the input however it is split.
    """

    def __init__(self, *, max_line: int = 4096, max_attributes: int = 100,
                 max_request: int = 65536) -> None:
        self.max_line = max_line
        self.max_attributes = max_attributes
        self.max_request = max_request
        self._buffer = bytearray()
        self._checked = 0  # lines of the buffered partial request before this are short
        self.broken = False
        # ``feed`` stopped at its ``limit``: the buffer may hold whole requests still.
        self.backlog = False

    @property
    def pending(self) -> bool:
        """A request has started but is not complete."""
        return bool(self._buffer)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, limit: int | None = None) -> list:
        """The requests (or ``ProtocolError``) ``data`` completes, in order; with
        ``limit``, at most that many, the rest kept (``backlog``) for a later call,
        ``feed(b"", limit)`` if nothing more comes."""
        if self.broken:
            return []
        held = self._buffer
        if not held and data[-2:] == b"\n\n" and data[:1] != b"\n" and b"\r" not in data:
            # The usual read: exactly one whole request (Postfix waits for each answer).
            end = data.find(b"\n\n")
            if end == len(data) - 2:
                try:
                    return [parse_request(data[:end], max_line=self.max_line,
                                          max_attributes=self.max_attributes,
                                          max_request=self.max_request)]
                except ProtocolError as error:
                    if error.fatal:
                        self._fail()
                    return [_bare(error)]
        if held:
            if b"\r" in data or held[-1] == 13:
                if held[-1] == 13 and data[:1] == b"\n":
                    del held[-1]  # a CRLF split between two reads
                data = data.replace(b"\r\n", b"\n")
            # What is held has no b"\n\n", unless ``limit`` left requests in it.
            search = 0 if self.backlog else max(len(held) - 1, 0)
            held += data
            buffer = held
        else:
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            search = 0
            buffer = data
        out: list = []
        start = 0
        size = len(buffer)
        limits = (self.max_line, self.max_attributes, self.max_request)
        self.backlog = False
        while True:
            while start < size and buffer[start] == 10:  # b"\n": stray empty line
                start += 1
            if limit is not None and len(out) >= limit:
                self.backlog = buffer.find(b"\n\n", start) >= 0
                if self.backlog:
                    break
            end = buffer.find(b"\n\n", max(start, search))
            if end < 0:
                break
            block = buffer[start:end]
            try:
                out.append(parse_request(block if type(block) is bytes else bytes(block),
                                         max_line=limits[0], max_attributes=limits[1],
                                         max_request=limits[2]))
            except ProtocolError as error:
                out.append(_bare(error))
                if error.fatal:
                    self._fail()
                    return out
            start = end + 2
        if start >= size:
            self._buffer = bytearray()
            self._checked = 0
            return out
        if buffer is held:
            if start:
                del held[:start]
                self._checked = 0
            rest = held
        else:
            rest = bytearray(buffer[start:] if start else buffer)
            self._checked = 0
        if self.backlog:  # whole requests ahead of any incomplete one: checked later
            self._checked = 0
            self._buffer = rest
            return out
        body = len(rest) - 1 if rest[-1] == 10 else len(rest)
        if body > self.max_line or body > self.max_request:
            reason = _overflow(rest, self._checked, self.max_line, self.max_request, body)
            if reason is not None:
                out.append(ProtocolError(reason, fatal=True))
                self._fail()
                return out
        self._checked = rest.rfind(b"\n") + 1
        self._buffer = rest
        return out

    def _fail(self) -> None:
        self.broken = True
        self.backlog = False
        self._buffer = bytearray()
        self._checked = 0

    def discard(self) -> None:
        """Forget the incomplete request (answered or closed by the protocol)."""
        self._fail()


# The rules whose answer needs no header: the only ones that act in ``safe`` mode.
SAFE_RULES = frozenset({"unknown-list", "null-sender"})


def postfix_action(decision: Decision | None, reply: SmtpReply, mode: str,
                   accept_action: str) -> str:
    """The value of ``action=`` for one RCPT decision.

    * not a list domain -> ``DUNNO``;
    * ``[postfix] mode = safe`` (default): only the envelope-only SMTP-time rules act
      (``unknown-list``, ``null-sender``); everything else, the administrative addresses
      included, is ``DUNNO``, because Mailman decides from From: first;
    * ``[postfix] mode = envelope``: the full decision on the envelope sender alone;
    * an accepted post -> ``DUNNO`` (or ``OK`` with ``accept_action = ok``, if it had a
      sender: an envelope sender that Mailman's validator drops is none); HOLD ->
      ``HOLD <text>``; DISCARD -> ``DISCARD <text>``; REJECT and DEFER ->
      ``<code> <x.y.z> <text>``.

    ``decision`` is ``None`` when there is no decision (no snapshot yet, an error inside
    the decision, a malformed request): ``reply`` is then sent as it is (a 4xx).
    """
    if decision is None:
        return reply.line()
    if not decision.managed:
        return "DUNNO"
    if mode == "safe" and decision.rule not in SAFE_RULES:
        return "DUNNO"
    outcome = reply.outcome
    if outcome is Outcome.ACCEPT:
        # No sender seen (an envelope sender Mailman's validator drops, the null sender
        # with null_sender = mailman): no opinion, never OK, which would skip the
        # restrictions after policyd.
        if mode == "safe" or decision.rule == "administrative-address" \
                or not decision.senders:
            return "DUNNO"
        return "OK" if accept_action == "ok" else "DUNNO"
    if outcome is Outcome.HOLD:
        return f"HOLD {reply.text}"
    if outcome is Outcome.DISCARD:
        return f"DISCARD {reply.text}"
    return reply.line()


def answer_action(answer, step, mode: str, accept_action: str) -> str:
    """The value of ``action=`` for a decided RCPT ``answer`` after SMTP-time moderation
    (``step``: ``None`` when it did not apply): greylisting's deferral whatever ``[postfix]
    mode`` says, else ``postfix_action``.  What the daemon answers Postfix and what
    ``policyctl query`` shows, from this one place."""
    if step is not None and answer.reply.outcome is Outcome.DEFER:
        return answer.reply.line()  # greylisted, whatever [postfix] mode says
    return postfix_action(answer.decision, answer.reply, mode, accept_action)


def postfix_query(query: Query) -> Query:
    """What Postfix can ask about ``query``: the envelope only, never a header."""
    if (query.from_header is None and query.reply_to_header is None
            and query.sender_header is None):
        return query
    return Query(query.recipient, query.envelope_sender)


def format_response(action: str) -> bytes:
    """``action=<value>`` and the empty line."""
    return b"action=" + action.encode(_UTF8, "replace") + b"\n\n"


def malformed_action(reason: str) -> str:
    return f"451 4.3.0 {clean_text('Malformed policy request: ' + reason)}"


DUNNO = b"action=DUNNO\n\n"
#: What Postfix, at RCPT without the message, applies of SMTP-time moderation.
MODERATION_MODES = (SmtpModeration.GREYLIST,)
#: Requests of one connection answered in one turn of the reactor (Postfix sends one and
#: waits for its answer; a client may pipeline): the rest wait for the next turn.
PER_TURN = 32
#: Malformed requests answered on one connection before it is closed (with the answer
#: to the last): Postfix sends none, and each costs an answer and a log event.
MALFORMED_MAX = 10
#: The answer to a request begun on a connection closed at a limit.
BUSY_ACTION = "451 4.3.2 Policy service busy, please try again later"


@implementer(IHalfCloseableProtocol)
class PostfixPolicyProtocol(Protocol):
    """Frames bytes into requests, answers each, batches the answers of one read.

    Half-closeable: Postfix never half-closes, but a client that sends its requests and
    then shuts down its write side (``printf ... | socat``) must still get every answer,
    which a plain connectionLost would drop with the unsent write buffer.

    ``reads`` counts the reads, for the factory's idle sweep (``idle_since``);
    ``buffered`` the bytes of the incomplete request held (the factory's limits).
    An incomplete request at the peer's half-close is answered 4xx (and logged) before
    the connection closes.
    """

    reads = 0
    reads_seen = 0
    idle_since = 0.0
    buffered = 0
    # When the incomplete request held began (``reactor.seconds()``): what
    # ``request_timeout`` and the limits count, however often its bytes trickle in.
    pending_since = 0.0

    def __init__(self, factory: "PostfixFactory") -> None:
        self.factory = factory
        config = factory.config
        self.reader = RequestReader(max_line=config.max_line,
                                    max_attributes=config.max_attributes,
                                    max_request=config.max_request)
        self._close_when_idle = False
        self._next_turn = None  # the delayed call that answers the backlog
        self._eof = False  # the peer half-closed while a backlog waited
        self.malformed = 0

    def connectionMade(self) -> None:
        hold_reads_while_answers_wait(self.transport)
        self.factory.track(self)

    def dataReceived(self, data: bytes, _read: bool = True) -> None:
        """Answer what ``data`` completes, at most ``PER_TURN`` requests: the rest wait
        in the reader, the connection unread, for the next turn of the reactor
        (``_go_on``, ``_read`` false), so that a client pipelining thousands of requests
        in one read shares the reactor with the MTAs' requests.  The answers of one read
        may queue while the peer does not read them (one read's worth: the connection is
        not read again until they have left)."""
        if _read:
            self.reads += 1
        reader = self.reader
        items = reader.feed(data, PER_TURN)
        if items:
            answer = self.factory.answer
            out = []
            for item in items:
                if isinstance(item, PostfixRequest):
                    out.append(answer(item, self.transport))
                else:
                    out.append(self.factory.malformed(item, self.transport))
                    self.malformed += 1
                    if self.malformed >= MALFORMED_MAX and not reader.broken:
                        # No MTA sends these: a client testing limits, or probing.
                        reader.discard()
                        break
            self.factory.write(self.transport, out[0] if len(out) == 1 else b"".join(out))
            if reader.broken or (self._close_when_idle and not reader.pending):
                self.transport.loseConnection()
        if reader.backlog:
            self._backlog_turn(reader)
        if reader._buffer or self.buffered:
            # Off the usual path (Postfix writes each request whole): a request left
            # incomplete, begun by this read when it completed others or none was held.
            if reader._buffer and (items or not self.buffered):
                self.pending_since = self.factory.reactor.seconds()
            if not self.factory.buffer_changed(self, len(reader._buffer)):
                self.factory._close(self)

    def _go_on(self) -> None:
        self._next_turn = None
        if not self.transport.disconnecting:
            self.dataReceived(b"", False)
            if not self.reader.backlog:  # (else it waits for the next turn again)
                self._backlog_turn(self.reader)

    def _backlog_turn(self, reader: RequestReader) -> None:
        """After a turn's answers: wait for the next turn while whole requests are left,
        read again once none is; answer the half-close that came meanwhile."""
        transport = self.transport
        if transport.disconnecting:
            return
        if reader.backlog:
            # (again if the transport resumed itself meanwhile, its answers gone)
            transport.pauseProducing()
            if self._next_turn is None:
                self._next_turn = self.factory.reactor.callLater(0, self._go_on)
        elif self._eof:
            self.readConnectionLost()
        elif self._next_turn is None and not getattr(transport, "producerPaused", False):
            # The answers not piling up (else the transport, its own producer, resumes
            # itself once they have left): read again.
            transport.resumeProducing()

    def timeoutConnection(self) -> None:
        """Idle longer than ``idle_timeout`` between requests (the sweep logs a count)."""
        self.transport.loseConnection()

    def stalled(self) -> None:
        """No complete request within ``request_timeout``: 4xx for a request begun,
        then close (the sweep counts it; the incident is logged once)."""
        if self.reader.pending:
            self.reader.discard()
            self.factory.decider.count("postfix", "malformed", "DEFER")
            self.transport.write(format_response(malformed_action(
                f"no complete request within {self.factory.config.request_timeout:g} s")))
        self.transport.loseConnection()

    def idle_for(self, now: float) -> float:
        """Seconds counted against this connection at a limit (``TrackingFactory``):
        half a request: seconds since it began, however often bytes of it came since
        (Postfix writes a request whole: one begun ``EVICT_MIN_IDLE`` ago is no MTA's
        request arriving, but a client trickling bytes to hold the connection);
        between requests, or silent ``SILENT_GRACE`` after connecting: closable at once."""
        if self.reader.pending:
            return now - self.pending_since
        idle = now - self.idle_since
        if self.reads or idle >= SILENT_GRACE:
            return idle + EVICT_MIN_IDLE
        return idle

    def never_read(self) -> bool:
        """No byte received yet (``TrackingFactory.admit``)."""
        return not self.reads

    def evict(self) -> None:
        """Closed for a limit: 4xx for a request begun, else a plain close (Postfix
        reconnects for its next request)."""
        if self.reader.pending:
            self.reader.discard()
            self.factory.decider.count("postfix", "busy", "DEFER")
            self.transport.write(format_response(BUSY_ACTION))
        self.transport.loseConnection()

    def shutdown(self) -> None:
        """Daemon stopping: close now unless a request is half received."""
        if self.reader.pending:
            self._close_when_idle = True
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """The peer sent all it will: answer an incomplete request 4xx, then close
        (once the whole requests waiting for their turn are answered)."""
        if self.reader.backlog:
            self._eof = True  # ``_backlog_turn`` comes back here when they are
            return
        if self.reader.pending:
            self.reader.discard()
            if self.buffered:
                self.factory.buffer_changed(self, 0)
            self.transport.write(self.factory.malformed(
                ProtocolError("incomplete request at the end of the input", fatal=True),
                self.transport))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None
        if self.reader.pending:
            # Reset or closed by the peer mid-request: nothing can be answered.
            log.info("Postfix policy connection from {peer} lost with an incomplete "
                     "request ({size} bytes)", peer=peer_text(self.transport),
                     size=self.reader.buffered, rate_limit="incomplete")
            self.reader.discard()
        self.factory.untrack(self)


class PostfixFactory(DecidingFactory):
    protocol = PostfixPolicyProtocol
    # The connection stays open after an answer (what ``policyd.runtime.fastio`` is for).
    answers_stay_open = True

    def __init__(self, decider, config, reactor, decision_log: DecisionLog | None = None
                 ) -> None:
        super().__init__(decider, config, reactor, decision_log)
        # Never early (a connection is idle from the sweep that saw its last read), at
        # most two sweeps late: 10 minutes by default, give or take 30 s; an incomplete
        # request (request_timeout, 10 s by default) give or take 2.5 s.
        self.request_timeout = getattr(config, "request_timeout", 10.0)
        self.sweep_interval = min(30.0, config.idle_timeout / 4, self.request_timeout / 4)
        self.use_limits(config)
        # The decision latency histogram when metrics are on, else None (nothing to do).
        self.latency = getattr(decider, "latency", {}).get("postfix")
        # What was answered, counted where ``Decider.count_answer`` counts it.
        self._answers = decider.answer_counter("postfix")
        self._client_fields: dict = {}

    def track(self, protocol) -> None:
        protocol.idle_since = self.reactor.seconds()
        super().track(protocol)

    def sweep(self, now: float) -> None:
        """Close what idled out: ``request_timeout`` for a connection holding an
        incomplete request or none yet, ``idle_timeout`` between requests.  One line
        per sweep that closed any, never one per connection."""
        timeout = self.config.idle_timeout
        request_timeout = self.request_timeout
        idle = stalled = 0
        for protocol in list(self.connections):
            if protocol in self.evicting:
                abort_stuck(protocol, now)  # its peer does not take its last answers
            elif ((protocol.reader.pending
                   and now - protocol.pending_since >= request_timeout)
                  or (protocol.reads == 0 and now - protocol.idle_since >= request_timeout)):
                if self.spared(protocol):
                    continue
                # An incomplete request counts from its first byte: one byte now and
                # then must not hold a connection (and its buffer) for ever.
                self.evicting.add(protocol)
                protocol.stalled()
                stalled += 1
            elif protocol.reads != protocol.reads_seen:
                protocol.reads_seen = protocol.reads
                protocol.idle_since = now
            elif now - protocol.idle_since >= timeout:
                if self.spared(protocol):
                    continue
                self.evicting.add(protocol)
                protocol.timeoutConnection()
                idle += 1
        if idle:
            # Postfix closes its own after max_idle (300 s, below idle_timeout): a client
            # that opens connections and leaves them is one incident, not a line a sweep.
            self.incident("idle_timeout", now, f"idle_timeout = {timeout:g} s "
                          "(connections idle between requests)", closed=idle,
                          doing="closing them")
        if stalled:
            self.incident("request_timeout", now, f"request_timeout = {request_timeout:g} s "
                          "(connections holding an incomplete request, or none)",
                          closed=stalled, doing="closing them")

    def answer(self, request: PostfixRequest, transport=None) -> bytes:
        """Decide a RCPT request, log it, answer its ``action=``."""
        try:
            query = request.query()
        except ProtocolError as error:
            return self.malformed(error, transport)
        if query is None:
            self.decider.count("postfix", "other-state", "DUNNO")
            return DUNNO
        decided = None
        try:
            answer = decided = self.decider.decide(query, "postfix")
            decision = answer.decision
            step = None
            # Moderation only ever changes a hold (``ModerationService.apply``): asked then.
            if self.moderation is not None and self.moderation.asks_about(decision):
                answer, step = self.moderation.apply(
                    answer, query, client=request.get("client_address"),
                    modes=MODERATION_MODES)
            config = self.config
            # ``answer_action``, its usual case spelled out (a Python call less per request).
            action = postfix_action(answer.decision, answer.reply, config.mode,
                                    config.accept_action) if step is None else \
                answer_action(answer, step, config.mode, config.accept_action)
            decision_log = self.decision_log
            if decision_log.enabled:
                fields = self.client_fields(request)
                decision_log.answered("postfix", query, answer, action, request.request_id,
                                      fields if step is None else
                                      fields + moderation_fields(step))
            if self.latency is not None:
                self.latency.observe(answer.started)
            data = format_response(action)
            # Counted last: what is answered if nothing above failed.
            self._answers[action if action == "DUNNO" or action == "OK"
                          else answer.reply.outcome._value_] += 1
            return data
        except Exception as error:
            return self.answer_failed(error, "postfix", query,
                                      () if decided is None else (decided,))

    @staticmethod
    def error_answer(reply: SmtpReply) -> bytes:
        return format_response(reply.line())

    # How many clients' decision-line fields are remembered (then all forgotten at once).
    CLIENTS_REMEMBERED = 1024

    def client_fields(self, request: PostfixRequest) -> str:
        """``request.client_fields()``, remembered per client: a list server hears from
        the same few mail servers again and again, and the fields cost more to make than
        to look up."""
        get = request.attributes.get
        key = (get(b"client_address"), get(b"client_name"), get(b"queue_id"),
               get(b"sasl_username"))
        fields = self._client_fields.get(key)
        if fields is None:
            if len(self._client_fields) >= self.CLIENTS_REMEMBERED:
                self._client_fields.clear()
            fields = self._client_fields[key] = request.client_fields()
        return fields

    def malformed(self, error: ProtocolError, transport) -> bytes:
        peer = peer_text(transport)
        log.warn("malformed Postfix policy request from {peer}: {reason}{closing}",
                      peer=peer, reason=error.reason,
                      closing="; closing the connection" if error.fatal else "")
        self.decider.count("postfix", "malformed", "DEFER")
        return format_response(malformed_action(error.reason))
