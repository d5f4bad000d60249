"""The control socket protocol: JSON lines, ops query/status/reload, answered in order."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd.protocols import ProtocolError
from policyd.protocols.control import ControlFactory, format_response, parse_request
from policyd.core.verdict import Query


class FakeService:
    def __init__(self) -> None:
        self.reloads: list[defer.Deferred] = []
        self.queries: list[Query] = []
        self.clients: list = []
        self.message_ids: list = []

    def control_query(self, query, client=None, *, message_id=None):
        self.queries.append(query)
        self.clients.append(client)
        self.message_ids.append(message_id)
        return {"exim": "ACCEPT 250 2.1.5 accept", "recipient": query.recipient}

    def status(self):
        return {"uptime": 1.5}

    def reload(self):
        d = defer.Deferred()
        self.reloads.append(d)
        return d


def connect():
    service = FakeService()
    factory = ControlFactory(service, Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, service, factory


def lines(transport) -> list[dict]:
    return [json.loads(x) for x in transport.value().splitlines()]


def test_parse_query():
    req = parse_request(b'{"op": "query", "recipient": "l@x", "envelope_sender": "",'
                        b' "from_header": "A <a@x>"}')
    assert req.op == "query"
    assert req.query == Query("l@x", "", "A <a@x>", None, None)
    assert req.client is None


def test_query_client_address_reaches_the_service():
    """``client_address`` (``policyctl query --client``): the SMTP client whose network
    SMTP-time moderation's preview keys; a string or null, empty meaning unknown."""
    req = parse_request(b'{"op": "query", "recipient": "l@x", "client_address": "192.0.2.7"}')
    assert req.client == "192.0.2.7"
    assert parse_request(b'{"op": "query", "recipient": "l@x", "client_address": ""}'
                         ).client is None
    with pytest.raises(ProtocolError, match="client_address"):
        parse_request(b'{"op": "query", "recipient": "l@x", "client_address": 7}')
    proto, transport, service, _ = connect()
    proto.dataReceived(b'{"op": "query", "recipient": "l@x", "client_address": "::1"}\n')
    assert service.clients == ["::1"]


def test_query_message_id_reaches_the_service():
    """``message_id`` (``policyctl query --message-id``): the Message-ID: header value
    that keys the Exim preview of SMTP-time moderation; a string of at most a header
    line's length or null, empty meaning none."""
    from policyd.protocols.control import MAX_MESSAGE_ID

    req = parse_request(b'{"op": "query", "recipient": "l@x", "message_id": "<m@x>"}')
    assert req.message_id == "<m@x>"
    assert parse_request(b'{"op": "query", "recipient": "l@x"}').message_id is None
    assert parse_request(b'{"op": "query", "recipient": "l@x", "message_id": ""}'
                         ).message_id is None
    longest = "<" + "m" * (MAX_MESSAGE_ID - 2) + ">"
    assert parse_request(json.dumps({"op": "query", "recipient": "l@x",
                                     "message_id": longest}).encode()).message_id == longest
    for bad, reason in ((7, "message_id must be a string or null"),
                        (longest + "x", f"message_id longer than {MAX_MESSAGE_ID}")):
        with pytest.raises(ProtocolError, match=reason):
            parse_request(json.dumps({"op": "query", "recipient": "l@x",
                                      "message_id": bad}).encode())
    proto, transport, service, _ = connect()
    proto.dataReceived(b'{"op": "query", "recipient": "l@x", "from_header": "a@y", '
                       b'"message_id": "<m@x>"}\n{"op": "query", "recipient": "l@x"}\n')
    assert service.message_ids == ["<m@x>", None]
    assert [answer["ok"] for answer in lines(transport)] == [True, True]


@pytest.mark.parametrize("data, reason", [
    (b"not json", "not a JSON line"),
    (b"[1]", "JSON object"),
    (b'{"op": "explode"}', "unknown op"),
    (b'{"op": "query"}', "needs a recipient"),
    (b'{"op": "query", "recipient": "a@x", "envelope_sender": 3}', "envelope_sender"),
    (b'{"op": "query", "recipient": "a@x", "from_header": 3}', "from_header"),
    (b"\xff", "not a JSON line"),
])
def test_parse_errors(data, reason):
    with pytest.raises(ProtocolError) as info:
        parse_request(data)
    assert reason in info.value.reason


def test_query_status_and_errors_over_one_connection():
    proto, transport, service, _ = connect()
    proto.dataReceived(b'{"op": "query", "recipient": "l@x", "envelope_sender": "s@y"}\n'
                       b'{"op": "status"}\n{"op": "nope"}\n')
    got = lines(transport)
    assert got[0] == {"ok": True, "result": {"exim": "ACCEPT 250 2.1.5 accept",
                                             "recipient": "l@x"}}
    assert got[1] == {"ok": True, "result": {"uptime": 1.5}}
    assert got[2]["ok"] is False and "unknown op" in got[2]["error"]
    assert service.queries == [Query("l@x", "s@y")]


def test_reload_answers_when_done_and_keeps_order():
    """A reload answers when the snapshot is in place; later requests wait for it."""
    proto, transport, service, _ = connect()
    proto.dataReceived(b'{"op": "reload"}\n{"op": "status"}\n')
    assert transport.value() == b""
    service.reloads[0].callback({"reloaded": True})
    got = lines(transport)
    assert got == [{"ok": True, "result": {"reloaded": True}},
                   {"ok": True, "result": {"uptime": 1.5}}]


def test_internal_error_is_answered():
    proto, transport, service, _ = connect()
    service.status = lambda: 1 / 0
    proto.dataReceived(b'{"op": "status"}\n')
    got = lines(transport)
    assert got[0]["ok"] is False and "internal error" in got[0]["error"]


@pytest.mark.parametrize("later", [False, True])
def test_a_query_that_raises_is_answered_with_an_error(later):
    """An exception answering a query (at once, or in the Deferred of one that waits
    for a password check) is an error answer, never a dropped connection: the next
    request on it is answered."""
    proto, transport, service, _ = connect()

    def broken(query, client=None, *, message_id=None):
        if later:
            return defer.fail(ValueError("broken"))
        raise ValueError("broken")
    service.control_query = broken
    proto.dataReceived(b'{"op": "query", "recipient": "l@x", "envelope_sender": ""}\n'
                       b'{"op": "status"}\n')
    got = lines(transport)
    assert got[0]["ok"] is False and "internal error" in got[0]["error"]
    assert got[1] == {"ok": True, "result": {"uptime": 1.5}}
    assert not transport.disconnecting


def test_overlong_line_answered_and_closed():
    proto, transport, _, _ = connect()
    proto.dataReceived(b"x" * (proto.MAX_LENGTH + 10))
    assert json.loads(transport.value())["ok"] is False
    assert transport.disconnecting


def test_blank_lines_ignored():
    proto, transport, _, _ = connect()
    proto.dataReceived(b"\n\n")
    assert transport.value() == b""


def test_format_response_is_one_line():
    data = format_response({"text": "a\nb"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1


# --- limits: the control socket cannot take the MTAs' descriptors ----------------------

from policyd.protocols import control  # noqa: E402


def _open(factory, transports):
    proto = factory.buildProtocol(None)
    if proto is None:
        return None
    transport = StringTransport()
    proto.makeConnection(transport)
    transports.append(transport)
    return proto


def test_at_the_limit_the_idle_longest_makes_room_never_a_request_in_progress():
    clock = Clock()
    service = FakeService()
    factory = ControlFactory(service, clock)
    factory.listener_name = "[daemon] control_socket /run/policyd/control.sock"
    transports: list = []
    busy = _open(factory, transports)
    busy.dataReceived(b'{"op": "reload"}\n')  # answered when the reload is done
    done = _open(factory, transports)
    done.dataReceived(b'{"op": "status"}\n')  # answered, connection kept open
    clock.advance(5)
    rest = [_open(factory, transports) for _ in range(control.MAX_CONNECTIONS - 2)]
    assert all(p is not None for p in rest)
    assert len(factory.connections) == control.MAX_CONNECTIONS
    clock.advance(1)
    newcomer = _open(factory, transports)
    assert newcomer is not None
    assert transports[1].disconnecting  # the answered one, idle longest
    assert not transports[0].disconnecting  # its reload is still in progress
    done.connectionLost(None)
    # Every other one is busy now, their reloads asked just now: the next newcomer is
    # refused (the reload waited for 6 s would make room: it is answered first).
    service.reloads[0].callback({"reloaded": True})
    assert lines(transports[0]) == [{"ok": True, "result": {"reloaded": True}}]
    transports[0].clear()
    busy.dataReceived(b'{"op": "reload"}\n')
    for proto in [*rest, newcomer]:
        proto.dataReceived(b'{"op": "reload"}\n')
    assert _open(factory, transports) is None
    assert factory.refused == 1


def test_a_connection_idle_past_the_timeout_is_closed_one_in_progress_is_not():
    clock = Clock()
    service = FakeService()
    factory = ControlFactory(service, clock)
    transports: list = []
    idle = _open(factory, transports)
    idle.dataReceived(b'{"op": "status"}\n')
    busy = _open(factory, transports)
    busy.dataReceived(b'{"op": "reload"}\n')
    silent = _open(factory, transports)
    clock.advance(control.IDLE_TIMEOUT - 5)
    assert not any(t.disconnecting for t in transports)
    clock.advance(10)
    assert transports[0].disconnecting and transports[2].disconnecting
    assert not transports[1].disconnecting
    assert silent is not None


def test_a_burst_at_the_limit_holds_few_descriptors_while_they_are_closed():
    """In one reactor turn the connections closed for newcomers still hold their
    descriptors: a burst of 100 newcomers leaves at most MAX_CONNECTIONS open and
    CLOSING_SLACK being closed, and refuses the rest."""
    from policyd.protocols import CLOSING_SLACK

    clock = Clock()
    factory = ControlFactory(FakeService(), clock)
    transports: list = []
    for _ in range(control.MAX_CONNECTIONS):
        _open(factory, transports)
    clock.advance(1)
    admitted = [p for p in (_open(factory, transports) for _ in range(100)) if p]
    assert len(factory.connections) <= control.MAX_CONNECTIONS + CLOSING_SLACK
    assert len(factory.connections) - len(factory.evicting) <= control.MAX_CONNECTIONS
    assert len(admitted) == CLOSING_SLACK and factory.refused == 100 - CLOSING_SLACK


# --- bounded under a flood from the control socket's group -----------------------------

STATUS = b'{"op": "status"}\n'


def next_turn(clock: Clock) -> None:
    """Run what is due as one turn of a real reactor does: the calls scheduled while
    they run wait for the next turn (``Clock.advance(0)`` would run them at once)."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = True
        call.func(*call.args, **call.kw)


def test_a_deeply_nested_line_is_a_malformed_request_logged_with_a_rate_limit():
    """200,000 "[" (RecursionError in json): a clean error answer, a warning the log's
    rate limit knows (``rate_limit``), no traceback; the connection stays usable (the
    next line answered in the next turn: the long one took this turn's byte budget)."""
    from twisted.logger import globalLogPublisher

    with pytest.raises(ProtocolError) as info:
        parse_request(b"[" * 200_000)
    assert "nested too deeply" in info.value.reason
    proto, transport, _, _ = connect()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto.dataReceived(b"[" * 200_000 + b"\n" + STATUS)
        next_turn(proto.factory.reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    got = lines(transport)
    assert got[0] == {"ok": False, "error": "not a JSON line: nested too deeply"}
    assert got[1] == {"ok": True, "result": {"uptime": 1.5}}
    assert not [e for e in events if e.get("log_failure")]
    assert [e["rate_limit"] for e in events] == ["malformed control requests"]


def test_pipelined_requests_are_answered_a_few_per_reactor_turn():
    """16,000 pipelined status lines: MAX_PER_TURN answered per turn of the reactor, the
    rest in later turns (callLater(0)), the connection not read meanwhile; all answered
    in order in the end, then read again."""
    proto, transport, service, factory = connect()
    clock = factory.reactor
    count = 16_000
    proto.dataReceived(STATUS * count)
    assert len(lines(transport)) == control.MAX_PER_TURN
    assert transport.producerState == "paused"
    next_turn(clock)
    assert len(lines(transport)) == 2 * control.MAX_PER_TURN
    turns = 2
    while turns < 2 * count and any(call.getTime() <= clock.seconds()
                                    for call in clock.getDelayedCalls()):
        next_turn(clock)
        turns += 1
    assert turns == -(-count // control.MAX_PER_TURN)
    assert len(lines(transport)) == count
    assert transport.producerState == "producing"


def test_nothing_is_read_or_answered_while_an_answer_is_awaited_or_cannot_leave():
    """A reload in progress: the lines after it wait in the buffer, the connection is
    not read; answers queued past the transport's buffer (pauseProducing from the
    transport): no more answers made until it drains."""
    proto, transport, service, factory = connect()
    assert transport.producer is proto
    proto.dataReceived(b'{"op": "reload"}\n' + STATUS * 100)
    assert transport.value() == b"" and transport.producerState == "paused"
    service.reloads[0].callback({"reloaded": True})
    assert len(lines(transport)) == 1 + control.MAX_PER_TURN
    proto.pauseProducing()  # the transport: its buffer is full
    next_turn(factory.reactor)
    next_turn(factory.reactor)
    assert len(lines(transport)) == 1 + control.MAX_PER_TURN
    assert transport.producerState == "paused"
    proto.resumeProducing()  # drained
    for _ in range(20):
        next_turn(factory.reactor)
    assert len(lines(transport)) == 101
    assert transport.producerState == "producing"


# --- bounded per line: linear framing, a deadline, fields no longer than the MTAs' -----

class CountingBuffer(bytearray):
    """The protocol's line buffer, counting the bytes each newline search scans."""

    scanned = 0

    def find(self, sub, start=0, end=None):
        stop = len(self) if end is None else min(end, len(self))
        self.scanned += max(0, stop - start)
        return super().find(sub, start, stop)


def test_a_trickled_line_is_searched_once_not_again_at_each_read():
    """A line arriving a few bytes per read (up to near ``MAX_LINE``): the buffer grows
    in place and each read's search scans only the bytes new since the last, so the
    bytes scanned are the line's length, not the square of its reads; then answered."""
    proto, transport, _, _ = connect()
    buffer = proto._buffer = CountingBuffer()
    body = b'{"op": "status", "pad": "' + b"x" * 200_000 + b'"}'
    for i in range(0, len(body), 64):
        proto.dataReceived(body[i:i + 64])
    assert proto._buffer is buffer and len(buffer) == len(body)
    assert len(body) <= buffer.scanned <= len(body) + 64
    proto.dataReceived(b"\n")
    assert lines(transport) == [{"ok": True, "result": {"uptime": 1.5}}]


@pytest.mark.parametrize("piece", [1, 7, 64, 4096])
def test_lines_split_anywhere_are_answered_the_same(piece):
    """Pipelined lines, blank ones and one over the turn's byte budget among them, fed
    in pieces of any size: every one answered, in order, as when fed whole."""
    requests = [b'{"op": "status"}', b"", b'{"op": "nope"}',
                json.dumps({"op": "status", "pad": "y" * 70_000}).encode(),
                b'{"op": "query", "recipient": "l@x", "envelope_sender": "s@y"}'] * 3
    data = b"\n".join(requests) + b"\n"

    def answers(pieces):
        proto, transport, service, factory = connect()
        for chunk in pieces:
            proto.dataReceived(chunk)
            for _ in range(10):
                next_turn(factory.reactor)
        return lines(transport), service.queries

    whole = answers([data])
    assert len(whole[0]) == 12 and len(whole[1]) == 3
    assert answers([data[i:i + piece] for i in range(0, len(data), piece)]) == whole


#: The documented bounds: a line's deadline, the bytes of the lines one turn answers.
LINE_TIMEOUT = 10.0
BYTES_PER_TURN = 64 << 10


def test_a_line_not_complete_within_the_line_timeout_is_answered_and_closed():
    """Bytes of one line trickling in (one a second, so never idle): ``LINE_TIMEOUT``
    after its first byte, give or take a sweep, an error answer and the connection
    closed, with a warning the log's rate limit knows; a line completed in time is
    answered and the next one has a deadline of its own."""
    from twisted.logger import globalLogPublisher

    proto, transport, _, factory = connect()
    clock = factory.reactor
    proto.dataReceived(STATUS[:5])
    clock.advance(1)
    proto.dataReceived(STATUS[5:] + STATUS[:5])  # one answered, the next one begun
    assert len(lines(transport)) == 1
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(int(LINE_TIMEOUT) - 2):
            clock.advance(1)
            proto.dataReceived(b" ")
        assert not transport.disconnecting  # the second line began LINE_TIMEOUT - 2 ago
        for _ in range(int(LINE_TIMEOUT)):
            clock.advance(1)
            proto.dataReceived(b" ")
            if transport.disconnecting:
                break
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.disconnecting
    assert lines(transport)[1:] == [
        {"ok": False, "error": f"no complete request within {LINE_TIMEOUT:g} s"}]
    assert [e.get("rate_limit") for e in events] == ["stalled control requests"]
    proto.dataReceived(STATUS[5:])  # too late: not answered
    assert len(lines(transport)) == 2
    assert control.LINE_TIMEOUT == LINE_TIMEOUT


def test_a_line_held_behind_an_awaited_answer_is_timed_from_when_reading_resumes():
    """A reload's answer awaited for longer than ``LINE_TIMEOUT`` while the next line,
    read with it, is incomplete: nothing was read meanwhile, so its deadline counts from
    when the connection is read again."""
    proto, transport, service, factory = connect()
    clock = factory.reactor
    proto.dataReceived(b'{"op": "reload"}\n{"op": "sta')
    clock.advance(2 * LINE_TIMEOUT)  # less than the reload's own wait (RELOAD_WAIT)
    assert not transport.disconnecting
    service.reloads[0].callback({"reloaded": True})
    clock.advance(LINE_TIMEOUT / 2)
    assert not transport.disconnecting
    proto.dataReceived(b'tus"}\n')
    assert lines(transport) == [{"ok": True, "result": {"reloaded": True}},
                                {"ok": True, "result": {"uptime": 1.5}}]


def test_a_trickling_line_is_not_kept_at_the_limit_for_its_fresh_reads():
    """At the connection limit a connection trickling one line counts as idle since
    the line began, however recent its last byte: it makes room for a newcomer before
    an answered connection quiet for less time."""
    clock = Clock()
    factory = ControlFactory(FakeService(), clock)
    transports: list = []
    trickler = _open(factory, transports)
    trickler.dataReceived(b'{"op": ')
    clock.advance(3)
    done = _open(factory, transports)
    done.dataReceived(STATUS)
    rest = [_open(factory, transports) for _ in range(control.MAX_CONNECTIONS - 2)]
    for proto in rest:
        proto.dataReceived(b'{"op": "reload"}\n')  # in progress: never closed
    clock.advance(1)
    trickler.dataReceived(b" ")
    assert _open(factory, transports) is not None
    assert transports[0].disconnecting and not transports[1].disconnecting


#: What the MTAs can send (``[postfix] max_line``'s default for an address,
#: contrib/exim's ``POLICYD_MAX_HEADERS`` for a header).
LIMITS = {"recipient": 4096, "envelope_sender": 4096, "from_header": 32768,
          "reply_to_header": 32768, "sender_header": 32768, "client_address": 255}


@pytest.mark.parametrize("key, limit", LIMITS.items())
def test_a_query_field_longer_than_the_mtas_send_is_refused_naming_it(key, limit):
    """Each query field at most what an MTA can send: one at its limit is taken, one
    character more is an error answer naming the field and its limit, the query never
    decided; the connection stays usable."""
    def query(value):
        return {"op": "query", "recipient": "l@x", key: value}

    at_limit = "a" * (limit - 2) + "@x"
    assert len(parse_request(json.dumps(query(at_limit)).encode()).query.recipient) > 0
    with pytest.raises(ProtocolError) as info:
        parse_request(json.dumps(query(at_limit + "y")).encode())
    assert info.value.reason == f"{key} longer than {limit} characters"
    proto, transport, service, _ = connect()
    proto.dataReceived(json.dumps(query(at_limit + "y")).encode() + b"\n" + STATUS)
    assert lines(transport) == [
        {"ok": False, "error": f"{key} longer than {limit} characters"},
        {"ok": True, "result": {"uptime": 1.5}}]
    assert service.queries == []


def test_the_longest_query_fits_in_a_line_however_policyctl_escapes_it():
    """Every field at its limit, every character one JSON writes as two ``\\uXXXX``
    escapes (outside the BMP, as ``policyctl`` writes, ASCII JSON): the line is within
    ``MAX_LINE``, and answered."""
    from policyd.protocols.control import MAX_LINE, MAX_MESSAGE_ID

    wide = "\N{GRINNING FACE}"
    message = {"op": "query", **{key: wide * limit for key, limit in LIMITS.items()},
               "message_id": wide * MAX_MESSAGE_ID}
    line = json.dumps(message).encode()
    assert len(line) <= MAX_LINE
    proto, transport, service, _ = connect()
    proto.dataReceived(line + b"\n")
    assert lines(transport)[0]["ok"] is True
    assert service.queries[0].envelope_sender == wide * LIMITS["envelope_sender"]


def test_one_turn_answers_a_bounded_number_of_bytes():
    """Pipelined long lines: the lines answered in one turn total at most
    ``MAX_BYTES_PER_TURN`` bytes (a longer line alone), the rest in later turns."""
    proto, transport, _, factory = connect()
    pad = BYTES_PER_TURN // 4
    line = json.dumps({"op": "status", "pad": "x" * pad}).encode() + b"\n"
    proto.dataReceived(line * 10)
    assert len(lines(transport)) == 3
    next_turn(factory.reactor)
    assert len(lines(transport)) == 6
    long = json.dumps({"op": "status", "pad": "x" * BYTES_PER_TURN}).encode()
    proto2, transport2, _, factory2 = connect()
    proto2.dataReceived(STATUS + long + b"\n" + STATUS)
    assert len(lines(transport2)) == 1
    next_turn(factory2.reactor)
    assert len(lines(transport2)) == 2
    next_turn(factory2.reactor)
    assert len(lines(transport2)) == 3
    assert control.MAX_BYTES_PER_TURN == BYTES_PER_TURN


# --- reloads waiting on a stuck store ------------------------------------------------------


class CancellableService(FakeService):
    """``reload`` as the daemon's: its Deferred may be cancelled (the caller stops
    waiting), which the service notes in ``cancelled``."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[defer.Deferred] = []

    def reload(self):
        d = defer.Deferred(self.cancelled.append)
        self.reloads.append(d)
        return d


def test_a_reload_is_waited_for_at_most_reload_wait_then_answered_still_running():
    """A reload whose snapshot does not come (a stuck store) is answered after
    ``reload_wait`` seconds that it still runs, the service told to stop waiting (its
    waiter cancelled), and the connection is usable again."""
    clock = Clock()
    service = CancellableService()
    factory = ControlFactory(service, clock, reload_wait=30.0)
    transports: list = []
    proto = _open(factory, transports)
    proto.dataReceived(b'{"op": "reload"}\n')
    clock.advance(29)
    assert transports[0].value() == b"" and not service.cancelled
    clock.advance(1)
    assert service.cancelled == service.reloads
    assert lines(transports[0]) == [{"ok": True, "result": {
        "reloaded": False, "running": True, "error": "reload still running after 30.0 s"}}]
    transports[0].clear()
    proto.dataReceived(STATUS)
    assert lines(transports[0]) == [{"ok": True, "result": {"uptime": 1.5}}]


def test_a_client_that_goes_away_stops_its_reload_wait():
    """``policyctl reload`` giving up (its own timeout) closes its connection: the
    service is told at once (the waiter cancelled), nothing is written."""
    clock = Clock()
    service = CancellableService()
    factory = ControlFactory(service, clock)
    transports: list = []
    proto = _open(factory, transports)
    proto.dataReceived(b'{"op": "reload"}\n')
    clock.advance(5)
    proto.connectionLost(None)
    assert service.cancelled == service.reloads
    assert transports[0].value() == b""
    assert not factory.connections
    clock.advance(60)  # no timer left behind writes to it
    assert transports[0].value() == b""


def test_status_is_answered_when_every_connection_waits_for_a_reload():
    """Every connection of the control socket waits for a reload on a stuck store:
    ``policyctl status`` is still admitted, the reload waited for longest (over
    ``EVICT_MIN_IDLE``) making room, answered first that it still runs; the reload
    itself is the service's and goes on."""
    clock = Clock()
    service = CancellableService()
    factory = ControlFactory(service, clock)
    transports: list = []
    for _ in range(control.MAX_CONNECTIONS):
        _open(factory, transports).dataReceived(b'{"op": "reload"}\n')
        clock.advance(0.1)
    clock.advance(2)
    newcomer = _open(factory, transports)
    assert newcomer is not None
    newcomer.dataReceived(STATUS)
    assert lines(transports[-1]) == [{"ok": True, "result": {"uptime": 1.5}}]
    assert transports[0].disconnecting  # the first reload, waited for longest
    assert not any(t.disconnecting for t in transports[1:])
    assert lines(transports[0]) == [{"ok": True, "result": {
        "reloaded": False, "running": True, "error": "reload still running after 3.6 s"}}]
    assert service.cancelled == service.reloads[:1]


def test_reloads_from_connections_that_went_away_leave_nothing_in_the_snapshot_service():
    """With the real snapshot service: while a refresh hangs, control clients asking
    for a reload and giving up leave no waiter behind; those still connected get the
    one build that follows."""
    from policyd.snapshot_service import SnapshotService

    from .fakes import FakeBackend, ManualThread

    clock = Clock()
    thread = ManualThread()
    snapshots = SnapshotService(FakeBackend(), interval=2.0, clock=clock,
                                run_in_thread=thread.run, monotonic=clock.seconds)
    snapshots.startService()
    thread.step()
    clock.advance(2)  # this refresh hangs

    class Service(FakeService):
        def reload(self):
            return snapshots.reload()

    factory = ControlFactory(Service(), clock)
    for _ in range(1000):
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b'{"op": "reload"}\n')
        proto.connectionLost(None)
    assert not snapshots._forced
    transports: list = []
    _open(factory, transports).dataReceived(b'{"op": "reload"}\n')
    assert len(snapshots._forced) == 1
    thread.step()  # the hung refresh ends
    thread.step()  # the reload's build
    assert lines(transports[0]) == [{"ok": True, "result": True}]
