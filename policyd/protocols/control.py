"""The control socket: JSON lines over a Unix socket, for ``policyctl``.

One JSON object per line each way; a connection may carry several requests, answered in
order.  Requests::

    {"op": "query", "recipient": "...", "envelope_sender": "...",
     "from_header": "..."|null, "reply_to_header": "..."|null, "sender_header": "..."|null,
     "client_address": "..."|null, "message_id": "..."|null}
    {"op": "status"}
    {"op": "reload"}

Answers: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.  The
``query`` result is ``query_result``'s dict: the decision with its trace, the SMTP reply,
the exact Exim line and Postfix action, and the snapshot version and age.  A query is
read-only: the Postfix action, and the Exim line of a query with headers (Exim's DATA
ACL), include what SMTP-time moderation would answer (greylisting, and on Exim the
tickets; keyed by ``client_address``'s network and, on Exim, ``message_id``: the
Message-ID: header's value), previewed without creating, refreshing or counting anything
(``ModerationService.preview``).

Bounded as the MTA listeners are: a query field longer than an MTA can send
(``FIELD_LIMITS``) is refused with an error naming it, a line longer than ``MAX_LINE``
or not complete ``LINE_TIMEOUT`` after its first byte is answered with an error and the
connection closed.

A ``reload`` waits for the snapshot, but not for ever: after ``reload_wait`` seconds (the
daemon's ``[store] refresh_timeout``), or when its connection is needed at the limit for
a newcomer (a waiting reload may be closed for one like an idle connection, once it has
waited ``EVICT_MIN_IDLE`` seconds: so that ``policyctl status`` is answered while a stuck
store holds every reload), the control socket stops waiting and answers that the reload
is still running (the service's answer says why; the reload itself still runs: its
build is only queued behind the refresh in progress).  A client that goes away stops
its wait too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.protocol import Protocol

from ..core.moderation import STARTS, Outcome
from ..core.replies import SmtpReply
from ..core.verdict import Query
from ..errors import Unavailable
from . import (EVICT_MIN_IDLE, RESERVED_DESCRIPTORS, SILENT_GRACE,
               ProcessLimits, ProtocolError, TrackingFactory, abort_stuck)
from .exim import MODERATION_MODES as EXIM_MODES, reply_line
from .postfix import MODERATION_MODES as POSTFIX_MODES, answer_action, postfix_query

log = Logger(namespace="policyd.control")

__all__ = ["OPS", "RELOAD_WAIT", "FIELD_LIMITS", "ControlRequest", "parse_request", "format_response",
           "query_result", "preview_dict", "exim_preview_dict", "reply_dict",
           "ControlProtocol", "ControlFactory"]

OPS = ("query", "status", "reload")
_HEADER_KEYS = ("from_header", "reply_to_header", "sender_header")
#: The longest value of each query field, in characters: what the MTAs can send, so
#: that one query costs the decision no more than theirs.  An address: a Postfix request
#: line (``[postfix] max_line``'s default), far past SMTP's 256-octet path; a header:
#: the header block contrib/exim sends (``POLICYD_MAX_HEADERS``); a client address: a
#: host name's length.
FIELD_LIMITS = {"recipient": 4096, "envelope_sender": 4096,
                **dict.fromkeys(_HEADER_KEYS, 32768), "client_address": 255}
#: The longest ``message_id`` taken: a header line's limit (RFC 5322); the Exim path
#: keys on its first ``MESSAGE_ID_KEPT`` characters.
MAX_MESSAGE_ID = 998
MESSAGE_ID_KEPT = 255
#: The longest line read: a query with every field at its limit still fits when
#: ``policyctl`` (ASCII JSON) writes each character outside the BMP as two ``\uXXXX``
#: escapes (12 bytes a character).
MAX_LINE = 1280 << 10
#: The control socket's connections, and how long one may sit without a request.  They
#: live in the descriptors the MTA listeners leave free (``RESERVED_DESCRIPTORS``), so a
#: client of the socket (its group, with ``control_socket_mode = 0660``) holding
#: connections can never take the MTAs' descriptors; at the limit the connection idle
#: longest is closed for the newcomer, never one whose request is being answered.
#: ``policyctl`` opens one connection per command and closes it.
MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 60.0
#: How long a line may take to arrive, counted from its first byte however often more
#: trickle in (as the MTA listeners' ``request_timeout``): a client sending a byte now
#: and then is never idle, and must not hold a connection and its buffer for ever.
#: ``policyctl`` writes its line whole.
LINE_TIMEOUT = 10.0
#: Requests of one connection answered in one turn of the reactor, and the bytes of
#: their lines: the rest wait for the next turn, so that a client pipelining thousands,
#: or long queries, cannot hold the reactor (and the MTAs' queries) for their whole run.
#: A line longer than ``MAX_BYTES_PER_TURN`` is answered in a turn of its own.
MAX_PER_TURN = 16
MAX_BYTES_PER_TURN = 64 << 10
#: How long a ``reload`` answer is waited for, unless the daemon sets its own
#: (``[store] refresh_timeout``: a refresh running longer is a stuck store).
RELOAD_WAIT = 30.0


@dataclass(frozen=True)
class ControlRequest:
    op: str
    query: Query | None = None
    # The SMTP client's address, for SMTP-time moderation's network (``None``: unknown).
    client: str | None = None
    # The post's Message-ID: header value, for the Exim preview's key (``None``: none).
    message_id: str | None = None


def parse_request(line: bytes) -> ControlRequest:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"not a JSON line: {error}") from None
    except RecursionError:  # "[[[[...": deeper than the interpreter's stack
        raise ProtocolError("not a JSON line: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("the request must be a JSON object")
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r} (allowed: {', '.join(OPS)})")
    if op != "query":
        return ControlRequest(op)
    recipient = message.get("recipient")
    sender = message.get("envelope_sender", "")
    if not isinstance(recipient, str) or not recipient:
        raise ProtocolError("query needs a recipient (a string)")
    if not isinstance(sender, str):
        raise ProtocolError("envelope_sender must be a string (\"\" for <>)")
    headers = []
    for key in _HEADER_KEYS:
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise ProtocolError(f"{key} must be a string or null")
        headers.append(value)
    client = message.get("client_address")
    if client is not None and not isinstance(client, str):
        raise ProtocolError("client_address must be a string or null")
    for key, limit in FIELD_LIMITS.items():
        value = message.get(key)
        if value is not None and len(value) > limit:
            raise ProtocolError(f"{key} longer than {limit} characters")
    message_id = message.get("message_id")
    if message_id is not None:
        if not isinstance(message_id, str):
            raise ProtocolError("message_id must be a string or null")
        if len(message_id) > MAX_MESSAGE_ID:
            raise ProtocolError(f"message_id longer than {MAX_MESSAGE_ID} characters")
    return ControlRequest("query", Query(recipient, sender, *headers), client or None,
                          message_id or None)


def format_response(result=None, error: str | None = None) -> bytes:
    if error is not None:
        body = {"ok": False, "error": error}
    else:
        body = {"ok": True, "result": result}
    return json.dumps(body, sort_keys=True, default=str).encode("utf-8") + b"\n"


def query_result(decider, query: Query, *, postfix_mode: str, accept_action: str,
                 now: float | None = None, loaded_at: float | None = None,
                 moderation=None, client: str | None = None,
                 message_id: str | None = None) -> dict:
    """The answer to ``policyctl query`` (live through the control socket, or offline
    through a ``Decider`` over a ``FixedSnapshot``): the explained decision, and what each
    MTA gets for it, byte for byte: the Exim line for the query as given (headers
    included), the Postfix action for what Postfix would send (the envelope only).

    ``moderation``: the daemon's ``ModerationService``.  With it the Postfix action, and
    the Exim line of a query with headers (what Exim's DATA ACL asks; its RCPT-time
    question, the envelope only, is never moderated), are the ones the daemon would
    answer after SMTP-time moderation (a greylisted sender's 451 from ``client``'s
    network, ``None`` being a client whose network has no entry; on Exim also a ticket's
    451 or its moderator's decision, the post keyed by ``message_id``, the Message-ID:
    header's value, ``None`` being a post without one), and ``moderation`` in the
    result says what the list's moderation holds and, under ``postfix`` and ``exim``, the
    step previewed.  Previewed only: a query creates, refreshes and counts nothing
    (``ModerationService.preview``), and says so when the MTA's attempt would begin an
    entry or a ticket.

    Raises ``Unavailable`` when there is no decision (no snapshot, an empty one)."""
    answer = decider.decide(query, "control", explain=True)
    if answer.decision is None:
        raise Unavailable(f"{answer.reason}; the MTAs get {reply_line(answer.reply)!r}")
    decision, reply = answer.decision, answer.reply
    exim = decider.decide(query, "control", names_a_list=True, counted=False)
    exim_step = None
    if moderation is not None and _at_data(query) and moderation.asks_about(exim.decision):
        # Read as ``EximFactory`` reads the header: stripped, its first characters.
        exim, exim_step = moderation.preview(
            exim, query, client=client,
            message_id=(message_id or "").strip()[:MESSAGE_ID_KEPT], modes=EXIM_MODES)
    pf_query = postfix_query(query)
    pf = decider.decide(pf_query, "control", counted=False)
    step = None
    if moderation is not None and moderation.asks_about(pf.decision):
        pf, step = moderation.preview(pf, pf_query, client=client, modes=POSTFIX_MODES)
    snapshot = decider.snapshots.current
    now = time.time() if now is None else now
    loaded = snapshot.built_at if loaded_at is None else loaded_at
    result = {
        "decision": decision.to_dict(),
        "reply": reply_dict(reply),
        "exim": reply_line(exim.reply),
        "postfix": answer_action(pf, step, postfix_mode, accept_action),
        "snapshot": {"version": snapshot.version, "age": round(max(0.0, now - loaded), 3)},
    }
    if moderation is not None:
        described = moderation.describe(decision)
        if described is not None:
            result["moderation"] = described
        if step is not None:
            result.setdefault("moderation", {})["postfix"] = preview_dict(step, client)
        if exim_step is not None:
            result.setdefault("moderation", {})["exim"] = exim_preview_dict(
                exim_step, client, message_id)
    return result


def _at_data(query: Query) -> bool:
    """A query with headers: what Exim's DATA ACL asks, the one Exim question
    SMTP-time moderation answers (``EximFactory.answer``)."""
    return (query.from_header is not None or query.reply_to_header is not None
            or query.sender_header is not None or query.message is not None)


def preview_dict(step, client: str | None) -> dict:
    """The moderation step previewed for Postfix's attempt, for ``policyctl query``."""
    starts = step.transition in STARTS
    if starts:
        note = ("Postfix's attempt would begin a greylist entry for this sender and "
                f"network ({client or 'client unknown'}); this query began none")
    else:
        note = "this query changed nothing"
    return {"outcome": step.outcome.value, "transition": step.transition,
            "ticket": step.ticket, "client": client, "starts_entry": starts, "note": note}


def exim_preview_dict(step, client: str | None, message_id: str | None) -> dict:
    """The moderation step previewed for Exim's DATA-time attempt, for ``policyctl
    query``: ``preview_dict``'s fields and the Message-ID the post was keyed by, with
    the assumption made when none was given."""
    starts = step.transition in STARTS
    message_id = (message_id or "").strip() or None
    if not starts:
        note = "this query changed nothing"
    elif step.outcome is Outcome.HELD:
        note = ("Exim's attempt would begin a ticket for this post (its number is drawn "
                "then); this query began none")
    else:
        network = f"network ({client or 'client unknown'})"
        keyed = f", {network} and Message-ID" if message_id else f" and {network}"
        note = (f"Exim's attempt would begin a greylist entry for this sender{keyed}; "
                "this query began none")
    if message_id is None:
        note += ("; no Message-ID given: previewed as a post without one (a post with "
                 "one has a greylist entry or ticket of its own: --message-id)")
    return {"outcome": step.outcome.value, "transition": step.transition,
            "ticket": step.ticket, "client": client, "message_id": message_id,
            "starts_entry": starts, "note": note}


def reply_dict(reply: SmtpReply) -> dict:
    return {"outcome": reply.outcome.value, "code": reply.code, "status": reply.status,
            "text": reply.text}


class ControlProtocol(Protocol):
    """JSON lines, answered in order, a bounded number per reactor turn.

    At most ``MAX_PER_TURN`` requests of one connection, and ``MAX_BYTES_PER_TURN`` bytes
    of their lines (one longer line alone), are answered in one turn of the reactor; the
    rest wait in the line buffer for the next turn (``callLater(0)``) and the connection
    is not read meanwhile, so 16,000 pipelined ``status`` lines interleave with the MTAs'
    queries instead of holding the reactor for their whole run.  Nothing is read either
    while an answer is awaited (a reload) or while answers wait to be sent (the protocol
    is its transport's producer): what a client may make the daemon hold is one line
    buffer (``MAX_LINE`` plus one read) and one turn's answers.

    The buffer is a ``bytearray`` and only the bytes not searched yet are searched for
    the newline: linear in a line's length however it is split.  A line not complete
    ``LINE_TIMEOUT`` after its first byte is answered with an error and the connection
    closed (``ControlFactory.sweep``)."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    # For the factory's limits (``TrackingFactory``): reads so far, when the last one
    # came, requests being answered; nothing counts as ``buffered`` (the line buffer is
    # bounded by ``MAX_LINE`` and the connections by ``MAX_CONNECTIONS``).
    reads = 0
    last_read = 0.0
    pending = 0
    buffered = 0
    # When the incomplete line held began: its first byte, or the daemon reading again
    # after answering the lines before it (it read nothing meanwhile).
    line_began = 0.0

    def __init__(self, factory: "ControlFactory") -> None:
        self.factory = factory
        self._buffer = bytearray()
        # ``_buffer[:_searched]`` holds no newline: where the next search starts.
        self._searched = 0
        self._waiting: defer.Deferred | None = None  # an answer not given yet
        # Whether that answer is a reload's, which the daemon may stop waiting for
        # (``ControlFactory.gives_up``), and since when it is awaited.
        self._may_give_up = False
        self._waiting_since = 0.0
        self._next_turn = None  # the delayed call that goes on with the buffer
        self._output_full = False
        self._reading = True
        self._closing = False

    def connectionMade(self) -> None:
        self.last_read = self.factory.reactor.seconds()
        register = getattr(self.transport, "registerProducer", None)
        if register is not None and getattr(self.transport, "producer", None) is None:
            register(self, True)  # told when the answers queued pass its bufferSize
        self.factory.track(self)

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        self.last_read = self.factory.reactor.seconds()
        if self._closing:  # answered for good (a line too long, stalled): not kept
            return
        if not self._buffer or b"\n" in data:
            self.line_began = self.last_read  # what follows its last newline, if any
        self._buffer += data
        self._process()

    # IPushProducer, for the transport: answers queued past its bufferSize.
    def pauseProducing(self) -> None:
        self._output_full = True
        self._read(False)

    def resumeProducing(self) -> None:
        self._output_full = False
        self._process()

    def stopProducing(self) -> None:
        self._closing = True

    def _read(self, on: bool) -> None:
        if on != self._reading and self.transport is not None:
            self._reading = on
            if on:
                self.line_began = self.factory.reactor.seconds()
            (self.transport.resumeProducing if on else self.transport.pauseProducing)()

    def _process(self) -> None:
        """Answer the complete lines in the buffer, at most ``MAX_PER_TURN`` and
        ``MAX_BYTES_PER_TURN``; read more only when none is left and nothing holds the
        answers back."""
        if self._next_turn is not None or self._closing:
            return
        buffer, start, search = self._buffer, 0, self._searched
        answered = size = 0
        full = False
        while self._waiting is None and not self._output_full and not self._closing:
            end = buffer.find(b"\n", search)
            if end < 0:
                search = len(buffer)
                break
            if end - start > MAX_LINE:
                self._discard()
                self.lineLengthExceeded(buffer[start:end])
                return
            if answered and (answered == MAX_PER_TURN
                             or size + end - start > MAX_BYTES_PER_TURN):
                full = True
                search = start
                break
            line, start = bytes(buffer[start:end]), end + 1
            search = start
            if line.strip():
                answered += 1
                size += len(line)
                self._handle(line)
        if self._closing:
            return
        if start:
            del buffer[:start]  # from the front of a bytearray: no copy of the rest
            search -= start
        self._searched = search
        if search == len(buffer) > MAX_LINE:  # searched to the end: one line, too long
            self._discard()
            self.lineLengthExceeded(buffer)
            return
        more = search < len(buffer)
        if full and self._waiting is None and not self._output_full:
            self._next_turn = self.factory.reactor.callLater(0, self._go_on)
        self._read(not more and self._waiting is None and not self._output_full)

    def _discard(self) -> None:
        self._buffer = bytearray()
        self._searched = 0

    def _go_on(self) -> None:
        self._next_turn = None
        self._process()

    def overdue(self, now: float) -> bool:
        """An incomplete line begun ``LINE_TIMEOUT`` ago or more, while the daemon reads
        (it answered the lines before it)."""
        return (bool(self._buffer) and self._reading and not self.pending
                and now - self.line_began >= LINE_TIMEOUT)

    def stalled(self) -> None:
        """No complete line within ``LINE_TIMEOUT``: an error answer, then close."""
        self._discard()
        if self.transport is not None:
            self.transport.write(format_response(
                error=f"no complete request within {LINE_TIMEOUT:g} s"))
        self._close()

    def idle_for(self, now: float) -> float:
        """Seconds counted against this connection at the limit: never while a request
        is being answered, but for a reload waited for (since it was asked: it is
        answered that it still runs, ``evict``); half a line: since it began, however
        often bytes of it came since; silent after ``SILENT_GRACE`` or done with its
        requests: closable at once."""
        if self.pending:
            if self._may_give_up and self._waiting is not None:
                return now - self._waiting_since
            return -1.0
        if self._buffer and self._reading:
            return now - self.line_began
        idle = now - self.last_read
        if self.reads or idle >= SILENT_GRACE:
            return idle + EVICT_MIN_IDLE
        return idle

    def never_read(self) -> bool:
        """No byte received yet (``TrackingFactory.admit``)."""
        return not self.reads

    def evict(self) -> None:
        """Closed for the limit or idle past ``IDLE_TIMEOUT``: nothing is in progress but
        perhaps a reload waited for, answered first that it still runs."""
        self._closing = True
        self._give_up()
        self._close()

    def _give_up(self) -> None:
        """Stop waiting for a reload (its answer, if the peer is still there, says that
        it still runs)."""
        if self._may_give_up and self._waiting is not None:
            self._may_give_up = False
            self._waiting.cancel()

    def _handle(self, line: bytes) -> None:
        self.pending += 1
        d = defer.maybeDeferred(self.factory.handle, line)

        def failed(failure):
            log.failure("control request failed", failure,
                        rate_limit="failed control requests")
            return format_response(error=f"internal error: {failure.getErrorMessage()}")
        may_give_up = self.factory.gives_up(d)
        d.addErrback(failed)
        d.addCallback(self._write)
        if not d.called:  # a reload, a moderator's password: later lines wait for it
            self._waiting = d
            self._may_give_up = may_give_up
            self._waiting_since = self.factory.reactor.seconds()
            d.addBoth(self._answered)

    def _answered(self, _) -> None:
        self._waiting = None
        self._may_give_up = False
        self._process()

    def _write(self, data: bytes) -> None:
        self.pending -= 1
        self.last_read = self.factory.reactor.seconds()
        if self.transport is not None and self.connected:
            self.transport.write(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(format_response(error=f"request longer than {MAX_LINE} bytes"))
        self._close()

    def shutdown(self) -> None:
        """Stopping: close after the answer in progress; lines not begun are dropped."""
        if self._waiting is not None:
            self._waiting.addBoth(lambda _: self._close())
        else:
            self._close()

    def _close(self) -> None:
        self._closing = True
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._closing = True
        self.connected = False
        self._give_up()  # nobody reads the answer: the service forgets the wait
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None
        self.factory.untrack(self)


class ControlFactory(TrackingFactory):
    """The control socket's connections: at most ``MAX_CONNECTIONS`` (the idle longest
    closed for a newcomer, else the newcomer refused, one log line per incident), none
    idle past ``IDLE_TIMEOUT``, and at most ``CLOSING_SLACK`` more being closed.  Counted
    apart from the MTA listeners (a ``ProcessLimits`` of its own): they take from the
    reserve, never from the MTAs' share.

    A reload's answer is waited for at most ``reload_wait`` seconds; a connection whose
    reload has been waited for ``EVICT_MIN_IDLE`` seconds counts at the limit as idle
    since it asked, so that 16 reloads waiting on a stuck store cannot keep ``policyctl
    status`` out (evicting one, rather than a reserve of connections for ``status``
    beyond the limit: which op a newcomer sends is unknown when it is admitted, and the
    evicted reload loses nothing but its wait)."""

    protocol = ControlProtocol
    max_connections = MAX_CONNECTIONS
    # An incomplete line is closed ``LINE_TIMEOUT`` after it began, at most a quarter
    # later; an idle connection after ``IDLE_TIMEOUT``.
    sweep_interval = LINE_TIMEOUT / 4

    def __init__(self, service, reactor, reload_wait: float = RELOAD_WAIT) -> None:
        # Its own count (``max_open`` = ``MAX_CONNECTIONS``): at most ``CLOSING_SLACK``
        # more are held while being closed (their descriptors are freed on the reactor's
        # next turn), however many a burst brings in one turn.
        super().__init__(reactor, limits=ProcessLimits(
            descriptors=MAX_CONNECTIONS + RESERVED_DESCRIPTORS))
        self.limits.register(self)
        self.service = service
        self.reload_wait = reload_wait
        # The reloads' answers not given yet (``gives_up``).
        self._reloads: set[defer.Deferred] = set()

    def sweep(self, now: float) -> None:
        stalled = 0
        for protocol in list(self.connections):
            if protocol in self.evicting:
                abort_stuck(protocol, now)  # its peer does not take its last answers
            elif protocol.overdue(now):
                self.evicting.add(protocol)
                protocol.stalled()
                stalled += 1
            elif not protocol.pending and now - protocol.last_read >= IDLE_TIMEOUT:
                self.evicting.add(protocol)
                protocol.evict()
        if stalled:
            log.warn("closed {count} control connections holding a line begun "
                     "{timeout:g} s ago or more", count=stalled, timeout=LINE_TIMEOUT,
                     rate_limit="stalled control requests")

    def handle(self, line: bytes):
        try:
            request = parse_request(line)
        except ProtocolError as error:
            log.warn("malformed control request: {reason}", reason=error.reason,
                     rate_limit="malformed control requests")
            return format_response(error=error.reason)
        if request.op == "query":
            try:
                result = self.service.control_query(request.query, request.client,
                                                    message_id=request.message_id)
            except Unavailable as error:
                return format_response(error=str(error))
            if not isinstance(result, defer.Deferred):
                return format_response(result)
            # A moderator password verified in a thread first.
            result.addCallback(format_response)
            result.addErrback(lambda failure: format_response(
                error=str(failure.trap(Unavailable) and failure.value)))
            return result
        if request.op == "status":
            return format_response(self.service.status())
        d = defer.maybeDeferred(self.service.reload)
        if not d.called:
            asked = self.reactor.seconds()
            d.addTimeout(self.reload_wait, self.reactor)
            d.addErrback(self._still_running, asked)
            self._reloads.add(d)
            d.addBoth(self._reload_answered, d)
        d.addCallback(format_response)
        return d

    def gives_up(self, answer) -> bool:
        """Whether ``answer`` (what ``handle`` returned) is a reload's, which may be
        stopped waiting for (cancelled: the service answers that it still runs)."""
        return answer in self._reloads

    def _reload_answered(self, result, d):
        self._reloads.discard(d)
        return result

    def _still_running(self, failure, asked: float):
        """A service whose reload does not say itself that it stopped waiting."""
        failure.trap(defer.CancelledError, defer.TimeoutError)
        waited = self.reactor.seconds() - asked
        return {"reloaded": False, "running": True,
                "error": f"reload still running after {waited:.1f} s"}
