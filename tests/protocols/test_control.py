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
    # Every other one is busy now: the next newcomer is refused.
    for proto in [*rest, newcomer]:
        proto.dataReceived(b'{"op": "reload"}\n')
    assert _open(factory, transports) is None
    assert factory.refused == 1
    service.reloads[0].callback({"reloaded": True})
    assert lines(transports[0]) == [{"ok": True, "result": {"reloaded": True}}]


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
    rate limit knows (``rate_limit``), no traceback; the connection stays usable."""
    from twisted.logger import globalLogPublisher

    with pytest.raises(ProtocolError) as info:
        parse_request(b"[" * 200_000)
    assert "nested too deeply" in info.value.reason
    proto, transport, _, _ = connect()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto.dataReceived(b"[" * 200_000 + b"\n" + STATUS)
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
