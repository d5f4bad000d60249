"""A small HTTP/1.x server side for the metrics endpoint (``[metrics] listen``): one
request per connection, no request body, bounded in bytes and in time.

Not ``twisted.web``: its ``HTTPChannel`` answers every pipelined request already read in
one reactor turn (thousands from one connection that never reads its answers), streams
any request body into a temporary file, and restarts its idle timeout at every byte.  A
scraper needs none of that: it sends one ``GET``, reads one answer.

The codec is pure (``head_end``, ``parse_head``, ``format_response``); ``HttpProtocol``
only frames bytes, asks its factory's ``respond(request) -> bytes`` for the answer and
closes; ``HttpFactory`` holds the connection limit.

Bounds, whatever a client sends or fails to read:

* the request head (request line and header fields) is at most ``MAX_HEAD`` bytes and
  ``MAX_FIELDS`` fields (else ``431``), and must be complete ``REQUEST_TIMEOUT`` seconds
  after the connection was accepted, however slowly it trickles in (else ``408``);
* a request announcing a body (``Content-Length`` above 0, any ``Transfer-Encoding``) is
  answered ``413`` without reading the body; malformed heads get ``400``, other
  versions than HTTP/1.0 and 1.1 ``505``;
* one answer per connection, sent with ``Connection: close``; the connection is not read
  again after the head (pipelined requests are never looked at) and is closed once the
  answer has left; a client that does not take its answer within ``ABORT_AFTER`` seconds
  is cut off (its one answer is all that is ever queued for it);
* at most ``max_connections`` open.  At the limit a newcomer is admitted by closing
  (``503``) one connection without a complete head (``protocols.TrackingFactory.admit``,
  as the MTA listeners do): one whose head a read left incomplete, the oldest first (a
  scraper writes its head in one piece), else one with nothing read ``HEAD_GRACE``
  seconds after its accept, else the oldest with nothing read yet; never one being
  answered.  A newcomer from another peer first closes the peer holding the most
  (``TrackingFactory._share``).  It is refused only when every connection is being
  answered, or while as many closed ones still hold their descriptors.  One
  warning per incident, and its summary when it is over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from . import EVICT_MIN_IDLE, RESERVED_DESCRIPTORS, ProcessLimits, TrackingFactory

__all__ = ["HttpError", "HttpRequest", "head_end", "parse_head", "format_response",
           "error_response", "HttpProtocol", "HttpFactory"]

log = Logger(namespace="policyd.http")

#: The request line and header fields together, in bytes (a scraper sends ~200).
MAX_HEAD = 8192
#: Header fields in one request.
MAX_FIELDS = 64
#: Seconds from the accept to the end of the request head, however it trickles in.
REQUEST_TIMEOUT = 10.0
#: Seconds a client has to take its answer once it is written, before it is cut off.
ABORT_AFTER = 10.0
#: Seconds from the accept during which a connection with nothing read yet is closed
#: for a newcomer at the limit only when nothing else can be: a scraper writes its head
#: in one piece right after connecting, and it is read within a turn or two of the
#: reactor (a busy one included).  Not a reason to refuse a newcomer: a client opening
#: connections faster than their grace lapses would keep every newcomer out.
HEAD_GRACE = 0.5

REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")


class HttpError(Exception):
    """The client's request cannot be served: ``status`` says why (4xx/5xx)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    version: str
    #: (lower-cased name, value) in the order sent.
    fields: tuple[tuple[str, str], ...] = ()

    def field(self, name: str) -> str | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None


def head_end(buffer: bytes, start: int = 0) -> int | None:
    """Where the request head in ``buffer`` ends (the index after its empty line, CRLF or
    bare LF), or ``None`` while it is incomplete.  ``start``: where to resume looking."""
    start = max(0, start - 2)
    crlf = buffer.find(b"\n\r\n", start)
    lf = buffer.find(b"\n\n", start)
    ends = [i + 3 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else None


def parse_head(head: bytes) -> HttpRequest:
    """A request head (up to and including its empty line) as an ``HttpRequest``; raises
    ``HttpError`` for what cannot be served, a request body included."""
    if len(head) > MAX_HEAD:
        raise HttpError(431, f"request head over {MAX_HEAD} bytes")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    while lines and lines[0] == b"":  # RFC 9112 2.2: empty lines before it are ignored
        lines.pop(0)
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise HttpError(400, "no request line")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line is not METHOD TARGET HTTP/x.y")
    method, target, version = parts
    if not _TOKEN.match(method) or not _TARGET.match(target):
        raise HttpError(400, "malformed request line")
    match = _VERSION.match(version)
    if match is None:
        raise HttpError(400, "malformed HTTP version")
    if match.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if len(lines) - 1 > MAX_FIELDS:
        raise HttpError(431, f"more than {MAX_FIELDS} header fields")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # also obs-fold and "Name :"
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value) or b"\r" in value:
            raise HttpError(400, "control character in a header field")
        fields.append((name.decode("ascii").lower(), value.decode("latin-1")))
    request = HttpRequest(method.decode("ascii"), target.decode("ascii"),
                          version.decode("ascii"), tuple(fields))
    _refuse_body(request)
    return request


def _refuse_body(request: HttpRequest) -> None:
    if any(name == "transfer-encoding" for name, _ in request.fields):
        raise HttpError(413, "no request body is accepted (Transfer-Encoding)")
    lengths = {value for name, value in request.fields if name == "content-length"}
    if not lengths:
        return
    if len(lengths) > 1 or not all(v.isascii() and v.isdigit() for v in lengths):
        raise HttpError(400, "malformed Content-Length")
    if int(lengths.pop()) != 0:
        raise HttpError(413, "no request body is accepted")


def format_response(status: int, fields: tuple[tuple[str, str], ...] = (),
                    body: bytes = b"", *, head_only: bool = False) -> bytes:
    """The whole answer, always with ``Connection: close``; ``head_only`` (``HEAD``): the
    same header fields, ``Content-Length`` included, and no body."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in fields]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    return head if head_only else head + body


def error_response(error: HttpError) -> bytes:
    return format_response(error.status, (("Content-Type", "text/plain; charset=utf-8"),),
                           f"{error.status} {error.reason}\n".encode("utf-8"))


class HttpProtocol(Protocol):
    """One request, one answer, closed: reads the head, never more.

    Under the factory's limits (``TrackingFactory``): ``idle_for`` reaches
    ``EVICT_MIN_IDLE`` once a read left the head incomplete or ``HEAD_GRACE`` passed
    with nothing read, is negative once answered; ``evict()`` answers ``503``.
    ``buffered`` stays 0: ``MAX_HEAD`` bounds the head, and the endpoint's bytes do not
    count against the MTAs' ``max_buffered``.
    """

    buffered = 0
    #: A read left the head incomplete: its grace is over (a scraper writes its head
    #: in one piece).
    partial = False

    def __init__(self, factory: "HttpFactory") -> None:
        self.factory = factory
        self._buffer = b""
        self.answered = False
        self._timer = None
        self.started = 0.0

    def connectionMade(self) -> None:
        self.started = self.factory.reactor.seconds()
        self._timer = self.factory.reactor.callLater(REQUEST_TIMEOUT, self._timed_out)
        self.factory.track(self)  # last: a Unix newcomer refused there is closed

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return  # read before the pause took effect: never looked at
        searched = len(self._buffer)
        self._buffer += data
        end = head_end(self._buffer, searched)
        if end is None:
            self.partial = True
            if len(self._buffer) > MAX_HEAD:
                self._answer(error_response(HttpError(431, "request head too long")))
            return
        head, self._buffer = self._buffer[:end], b""
        try:
            request = parse_head(head)
        except HttpError as error:
            self._answer(error_response(error))
            return
        try:
            answer = self.factory.respond(request)
        except Exception:
            log.failure("the metrics endpoint could not answer")
            answer = error_response(HttpError(500, "internal error"))
        self._answer(answer)

    def _answer(self, data: bytes) -> None:
        """Write the one answer and close; what the client sends after is not read."""
        self.answered = True
        self._buffer = b""
        self.transport.pauseProducing()  # stop reading
        self.transport.write(data)
        self.transport.loseConnection()
        self._reschedule(ABORT_AFTER)

    def _reschedule(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.factory.reactor.callLater(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.answered:
            self._answer(error_response(HttpError(
                408, f"the request head must arrive within {REQUEST_TIMEOUT:g} s")))
        else:
            self.transport.abortConnection()  # its answer was not taken in time

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.untrack(self)

    def idle_for(self, now: float) -> float:
        """At the limit (``TrackingFactory``): never closed once answered; a head a
        read left incomplete at once (a scraper writes its head in one piece), the
        oldest first; a connection with nothing read yet once ``HEAD_GRACE`` has passed
        (its head may be waiting to be read)."""
        if self.answered:
            return -1.0
        age = now - self.started
        if self.partial:
            return age + EVICT_MIN_IDLE
        return age - HEAD_GRACE + EVICT_MIN_IDLE

    def never_read(self) -> bool:
        """Nothing read yet: with nothing else to close, the oldest of these makes room
        for a newcomer (``TrackingFactory.admit``), grace or not."""
        return not (self.answered or self.partial)

    def evict(self) -> None:
        """Closed for a newcomer at the limit: ``503``, as at its head deadline."""
        if not self.answered:
            self._answer(error_response(HttpError(
                503, f"{self.factory.what}: at its connection limit, and this "
                "connection had no complete request head")))

    def shutdown(self) -> None:
        """Stopping: closed by ``HttpFactory.drain``."""


class HttpFactory(TrackingFactory):
    """A listener's factory (``service.ListenerGroup``): ``respond(HttpRequest) ->
    bytes`` makes each answer; at most ``max_connections`` open.  At the limit
    ``TrackingFactory.admit`` decides, with limits of the endpoint's own
    (``ProcessLimits`` counting only its connections, as the control socket's): it
    never closes an MTA's connection, and takes from the descriptors kept for the
    control socket and the store no more than ``max_connections`` more while the
    connections it closed for newcomers go (their descriptors are freed on the
    reactor's next turn)."""

    protocol = HttpProtocol
    noisy = False
    max_connections = 8
    kind = "http"
    what = "HTTP endpoint"
    sweep_interval = 1.0

    def __init__(self, respond, reactor) -> None:
        super().__init__(reactor, ProcessLimits(
            descriptors=RESERVED_DESCRIPTORS + self.max_connections,
            closing_slack=self.max_connections))
        self.limits.register(self)
        self.respond = respond

    @property
    def name(self) -> str:
        return self.listener_name or self.what

    def _start_sweeping(self) -> None:
        # The protocols time themselves; the sweeps only end the incidents (their
        # summary lines).
        if self.incidents:
            super()._start_sweeping()

    def incident(self, key: str, now: float, what: str, *, closed: int = 0,
                 refused: int = 0, doing: str | None = None) -> None:
        super().incident(key, now, what, closed=closed, refused=refused, doing=doing or (
            "closing connections without a complete request head for newcomers (a head "
            "begun, oldest first, then one with nothing read for "
            f"{HEAD_GRACE:g} s, then the oldest with nothing read), never one being "
            "answered, and refusing what does not fit"))

    def drain(self, grace: float) -> defer.Deferred:
        """Stopping: a scraper reconnects; nothing here is worth waiting for."""
        self.closing = True
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        return defer.succeed(0)
