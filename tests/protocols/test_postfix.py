"""The Postfix policy protocol: codec and Twisted adapter, driven with StringTransport."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from policyd.config import PostfixConfig
from policyd.protocols import ProtocolError
from policyd.protocols.postfix import (
    PostfixFactory,
    RequestReader,
    format_response,
    parse_request,
)
from policyd.decider import Decider
from policyd.core.replies import Outcome, ReplyPolicy

from .fakes import HOLDING, LIST, MEMBER, NONMEMBER, StaticSnapshots, sample_snapshot

CONFIG = PostfixConfig(listen=(), mode="safe", accept_action="dunno", idle_timeout=600.0,
                       max_line=4096, max_attributes=100, max_request=65536)


def request(**attrs) -> bytes:
    """A request as Postfix 3.7 sends it (the usual attributes, then ``attrs``)."""
    base = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT",
        "protocol_name": "ESMTP", "client_address": "127.0.0.1", "client_name": "localhost",
        "helo_name": "client.example", "sender": MEMBER, "recipient": LIST,
        "recipient_count": "0", "queue_id": "", "instance": "756c.6b014fc4.8e366.0",
        "size": "0", "policy_context": "",
    }
    base.update(attrs)
    lines = [f"{k}={v}".encode() if isinstance(v, str) else k.encode() + b"=" + v
             for k, v in base.items() if v is not None]
    return b"\n".join(lines) + b"\n\n"


def connect(config=CONFIG, snapshot="default", policy=ReplyPolicy(), decide=None):
    snap = sample_snapshot() if snapshot == "default" else snapshot
    kwargs = {} if decide is None else {"decide": decide}
    decider = Decider(StaticSnapshots(snap), policy, **kwargs)
    clock = Clock()
    factory = PostfixFactory(decider, config, clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.callLater = clock.callLater
    proto.makeConnection(transport)
    return proto, transport, clock, factory


def answers(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\n")
    return [a[len(b"action="):] for a in data[:-2].split(b"\n\n")]


def test_member_posting_address_in_safe_mode_is_dunno():
    """Safe mode leaves posting decisions to Mailman: a member gets DUNNO."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request())
    assert transport.value() == b"action=DUNNO\n\n"
    assert not transport.disconnecting


def test_nonmember_in_safe_mode_is_dunno():
    """Safe mode: a nonmember envelope sender may carry a member's From:, so DUNNO."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(sender=NONMEMBER))
    assert transport.value() == b"action=DUNNO\n\n"


def test_unknown_list_rejected_at_rcpt():
    """A recipient in a list domain that is no list gets 550 5.1.1."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(recipient="nosuch@lists.example.com"))
    assert transport.value() == b"action=550 5.1.1 No such list: nosuch@lists.example.com\n\n"


def test_empty_sender_is_the_null_sender():
    """``sender=`` (empty) is the null sender, refused for a posting address."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(sender=""))
    assert transport.value() == (b"action=550 5.7.1 The null sender may not write to "
                                 b"test@lists.example.com\n\n")


def test_null_sender_to_bounces_address_is_dunno():
    """The null sender may write to the -bounces address."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(sender="", recipient="test-bounces@lists.example.com"))
    assert transport.value() == b"action=DUNNO\n\n"


def test_absent_sender_is_malformed_not_null():
    """An absent ``sender`` is not the null sender: the request is answered 451."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(sender=None))
    assert transport.value().startswith(b"action=451 4.3.0 Malformed policy request: ")
    assert b"sender" in transport.value()
    assert not transport.disconnecting


def test_not_a_list_domain_is_dunno():
    """Recipients outside the managed domains get no opinion."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(recipient="someone@elsewhere.example", sender=""))
    assert transport.value() == b"action=DUNNO\n\n"


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "MAIL", "DATA",
                                   "END-OF-MESSAGE", "VRFY", "ETRN"])
def test_other_states_are_dunno(state):
    """Only RCPT is decided; every other protocol state answers DUNNO."""
    proto, transport, _, factory = connect()
    proto.dataReceived(request(protocol_state=state, sender="", recipient="x@lists.example.com"))
    assert transport.value() == b"action=DUNNO\n\n"
    assert factory.decider.counters()["by_protocol"]["postfix"] == {"other-state": 1}


def test_envelope_mode_decides_fully():
    """``mode = envelope``: a nonmember envelope sender is rejected at RCPT, a member
    gets ``accept_action``."""
    config = dataclasses.replace(CONFIG, mode="envelope", accept_action="ok")
    proto, transport, _, _ = connect(config)
    proto.dataReceived(request(sender=NONMEMBER) + request(sender=MEMBER))
    assert answers(transport.value()) == [
        b"550 5.7.1 Posting to test@lists.example.com is restricted to its members; "
        b"your message was not accepted",
        b"OK",
    ]


@pytest.mark.parametrize("sender", ["pat@example.com.", "pat@@example.com",
                                    "idn@b\u00fccher.example"])
def test_envelope_mode_without_a_sender_it_can_see_has_no_opinion(sender):
    """``mode = envelope``, ``accept_action = ok``: an envelope sender Mailman's validator
    drops leaves no sender; Mailman decides from the From: Postfix never sends, so the
    answer is DUNNO: not no-senders' DISCARD (the whole message), not the nonmember
    REJECT, and not OK."""
    config = dataclasses.replace(CONFIG, mode="envelope", accept_action="ok")
    proto, transport, _, _ = connect(config)
    proto.dataReceived(request(sender=sender))
    assert answers(transport.value()) == [b"DUNNO"]


def test_envelope_mode_hold_maps_to_postfix_hold():
    """With ``[smtp] hold = hold`` a held post is ``HOLD <text>`` (whole message)."""
    config = dataclasses.replace(CONFIG, mode="envelope")
    proto, transport, _, _ = connect(config, policy=ReplyPolicy(hold=Outcome.HOLD))
    proto.dataReceived(request(sender=NONMEMBER, recipient=HOLDING))
    assert transport.value() == (b"action=HOLD accepted for moderation by "
                                 b"nonmember-moderation\n\n")


def test_pipelined_requests_answered_in_order_in_one_write():
    """Several requests in one read are all answered, in order, with one write."""
    proto, transport, _, _ = connect()
    writes = []
    original = transport.write
    transport.write = lambda data: (writes.append(data), original(data))
    proto.dataReceived(request(sender="") + request() + request(recipient="no@lists.example.com")
                       + request(protocol_state="MAIL"))
    assert len(writes) == 1
    assert answers(transport.value()) == [
        b"550 5.7.1 The null sender may not write to test@lists.example.com",
        b"DUNNO",
        b"550 5.1.1 No such list: no@lists.example.com",
        b"DUNNO",
    ]


def test_connection_stays_open_across_requests():
    """Persistent connection: requests keep coming on the same connection."""
    proto, transport, _, _ = connect()
    for _ in range(3):
        transport.clear()
        proto.dataReceived(request())
        assert transport.value() == b"action=DUNNO\n\n"
    assert not transport.disconnecting


def test_per_request_state_is_reset():
    """An attribute of one request never leaks into the next."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(sender=MEMBER))
    transport.clear()
    proto.dataReceived(request(sender=None))
    assert transport.value().startswith(b"action=451 4.3.0")


def test_unknown_attributes_are_ignored():
    """Attributes from newer Postfix versions (or anything else) do not matter."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(tls_sni="x", compatibility_level="3.6", zzz_future="1=2"))
    assert transport.value() == b"action=DUNNO\n\n"


def test_values_are_byte_exact():
    """Values are kept byte-exact: invalid UTF-8 and '=' survive parsing."""
    parsed = parse_request(b"sender=a\xff=b@x\nrecipient=\xc3\xa9@lists.example.com")
    assert parsed.attributes[b"sender"] == b"a\xff=b@x"
    assert parsed.get("sender").encode("utf-8", "surrogateescape") == b"a\xff=b@x"
    assert parsed.get("recipient") == "\u00e9@lists.example.com"


def test_utf8_recipient_in_list_domain_is_unknown_list():
    """A raw UTF-8 (SMTPUTF8) recipient is looked up like any other."""
    proto, transport, _, _ = connect()
    proto.dataReceived(request(recipient="t\u00e9st@lists.example.com".encode()))
    assert transport.value().startswith(b"action=550 5.1.1 No such list:")


def test_stray_empty_lines_between_requests_are_ignored():
    """An extra empty line is tolerated and produces no extra answer."""
    proto, transport, _, _ = connect()
    proto.dataReceived(b"\n" + request() + b"\n\n" + request())
    assert answers(transport.value()) == [b"DUNNO", b"DUNNO"]


def test_malformed_line_is_answered_and_connection_kept(events):
    """A line without '=' is answered 451 4.3.0 and the next request still works."""
    proto, transport, _, _ = connect()
    proto.dataReceived(b"request=smtpd_access_policy\ngarbage line\n\n" + request())
    got = answers(transport.value())
    assert got[0].startswith(b"451 4.3.0 Malformed policy request: line without name=value")
    assert got[1] == b"DUNNO"
    assert not transport.disconnecting
    assert any(e.get("reason", "").startswith("line without") and
               e["log_level"] == LogLevel.warn for e in events)


@pytest.mark.parametrize("block, reason", [
    (b"a=1\na=2", "sent twice"),
    (b"=x", "empty name"),
    (b"a=\x00", "NUL"),
    (b"request=other_policy\nprotocol_state=RCPT", "unsupported request type"),
])
def test_parse_errors(block, reason):
    """Requests Postfix cannot send are ProtocolErrors (not fatal: framing is intact)."""
    with pytest.raises(ProtocolError) as info:
        parse_request(block)
    assert reason in info.value.reason
    assert not info.value.fatal


def test_rcpt_without_recipient_is_malformed():
    proto, transport, _, _ = connect()
    proto.dataReceived(request(recipient=None))
    assert b"without recipient" in transport.value()


def test_too_many_attributes_answered_and_connection_kept():
    config = dataclasses.replace(CONFIG, max_attributes=14)
    proto, transport, _, _ = connect(config)
    proto.dataReceived(request(extra1="1", extra2="2") + request())
    got = answers(transport.value())
    assert got[0] == b"451 4.3.0 Malformed policy request: more than 14 attributes"
    assert got[1] == b"DUNNO"
    assert not transport.disconnecting


def test_overlong_line_answered_then_closed():
    """A line over ``max_line`` is answered at once (before the request ends) and the
    connection is closed: its framing cannot be trusted."""
    config = dataclasses.replace(CONFIG, max_line=100)
    proto, transport, _, _ = connect(config)
    proto.dataReceived(b"request=smtpd_access_policy\nsender=" + b"x" * 200)
    assert transport.value() == (b"action=451 4.3.0 Malformed policy request: line longer "
                                 b"than 100 bytes\n\n")
    assert transport.disconnecting
    transport.clear()
    proto.dataReceived(b"\n\n" + request())
    assert transport.value() == b""


def test_oversized_request_answered_then_closed():
    config = dataclasses.replace(CONFIG, max_request=300)
    proto, transport, _, _ = connect(config)
    proto.dataReceived(request() + b"\n".join(b"x%d=1" % i for i in range(80)))
    got = answers(transport.value())
    assert got == [b"DUNNO",
                   b"451 4.3.0 Malformed policy request: request longer than 300 bytes"]
    assert transport.disconnecting


def test_idle_timeout_closes_after_the_configured_time():
    """The idle timeout (longer than Postfix's 300 s max_idle) closes the connection;
    activity resets it."""
    proto, transport, clock, _ = connect()
    proto.dataReceived(request())
    clock.pump([1] * 599)
    proto.dataReceived(request())
    clock.pump([1] * 599)
    assert not transport.disconnecting
    clock.pump([1] * 10)  # within two sweeps (2.5 s each) of the timeout
    assert transport.disconnecting


def test_idle_sweep_stops_with_the_last_connection():
    proto, transport, clock, factory = connect()
    clock.pump([1] * 100)
    proto.connectionLost(None)
    clock.pump([1] * 100)
    assert clock.getDelayedCalls() == []


def test_exception_in_decision_is_a_temporary_failure(events):
    """An error inside the decision is logged (log.failure) and answered with the
    configured 4xx, never a 5xx, and the connection stays usable."""
    def broken(snapshot, query, *, explain=True):
        raise RuntimeError("boom")
    proto, transport, _, factory = connect(decide=broken)
    proto.dataReceived(request() + request())
    assert answers(transport.value()) == [
        b"451 4.3.0 List policy service temporarily unavailable, please try again later"] * 2
    failures = [e for e in events if "log_failure" in e]
    assert failures and failures[0]["log_failure"].check(RuntimeError)
    assert factory.decider.counters()["by_protocol"]["postfix"]["error"] == 2


def test_no_snapshot_yet_is_a_temporary_failure():
    proto, transport, _, _ = connect(snapshot=None)
    proto.dataReceived(request(recipient="nosuch@lists.example.com"))
    assert transport.value() == (b"action=451 4.3.0 List policy service temporarily "
                                 b"unavailable, please try again later\n\n")


def test_shutdown_closes_idle_connection_at_once():
    proto, transport, _, _ = connect()
    proto.dataReceived(request())
    proto.shutdown()
    assert transport.disconnecting


def test_shutdown_lets_a_request_in_flight_finish():
    """A half-received request at shutdown is still answered, then the connection
    closes."""
    proto, transport, _, _ = connect()
    data = request()
    proto.dataReceived(data[:20])
    proto.shutdown()
    assert not transport.disconnecting
    proto.dataReceived(data[20:])
    assert transport.value() == b"action=DUNNO\n\n"
    assert transport.disconnecting


def test_format_response():
    assert format_response("DUNNO") == b"action=DUNNO\n\n"


# --- framing property: any split of the stream gives the same answers ----------------

STREAM = (
    request() + request(sender="") + b"\n" + b"bad\n\n" + request(protocol_state="MAIL")
    + request(recipient="no@lists.example.com") + request(a="1", a_="=x\xff".encode("latin-1"))
)


def feed_all(chunks, config=CONFIG) -> tuple[bytes, bool]:
    proto, transport, _, _ = connect(config)
    for chunk in chunks:
        proto.dataReceived(chunk)
    return transport.value(), transport.disconnecting


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted(set(c % (len(data) + 1) for c in cuts))
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


def test_every_single_split_point_gives_the_same_answers():
    whole = feed_all([STREAM])
    for i in range(1, len(STREAM)):
        assert feed_all([STREAM[:i], STREAM[i:]]) == whole, i


def test_byte_by_byte_gives_the_same_answers():
    whole = feed_all([STREAM])
    assert feed_all([STREAM[i:i + 1] for i in range(len(STREAM))]) == whole


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_split_gives_the_same_answers(cuts):
    """Splitting the byte stream anywhere yields the same answers."""
    assert feed_all(split(STREAM, cuts)) == feed_all([STREAM])


OVERSIZE = dataclasses.replace(CONFIG, max_line=40, max_request=200)
_OVERSIZE_STREAMS = [
    request(sender="") + b"a=" + b"y" * 60 + b"\n\n",
    request()[:150] + b"\n" + b"\n".join(b"k%d=v" % i for i in range(30)) + b"\n\n",
    b"x=1\n" * 30 + b"z=" + b"q" * 50 + b"\n\n",
    b"x=1\n" * 9 + b"z=" + b"q" * 50 + b"\n\n",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_OVERSIZE_STREAMS),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_limits_are_split_independent(stream, cuts):
    """The size limits give the same answer (and close) however the bytes arrive."""
    assert feed_all(split(stream, cuts), OVERSIZE) == feed_all([stream], OVERSIZE)


# Whole requests one per read (the reader's fast path when the read is exactly one
# request) and the same bytes one at a time (its general path), malformed ones included.
_ONE_PER_READ = [
    request(), request(sender=""), request(protocol_state="MAIL"), b"bad\n\n",
    b"\n" + request(), request().replace(b"\n", b"\r\n"), request()[:-1] + b"\r\n\r\n",
    request(a="1") + b"a=2\n\n", b"=x\n\n", b"a=\x00\n\n", request(sender="x\ry"),
    request(a="y" * 60), b"x=1\n" * 30 + b"\n", request() + request(),
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_ONE_PER_READ), min_size=1, max_size=8),
       st.sampled_from([CONFIG, OVERSIZE]))
def test_a_read_of_one_whole_request_is_answered_as_any_split_of_it(reads, config):
    whole = feed_all(reads, config)
    stream = b"".join(reads)
    assert feed_all([stream[i:i + 1] for i in range(len(stream))], config) == whole


def test_reader_memory_is_bounded():
    """Endless bytes without a newline are refused once they exceed the limit."""
    reader = RequestReader(max_line=100, max_attributes=10, max_request=1000)
    items = []
    for _ in range(50):
        items += reader.feed(b"z" * 10)
    assert len(items) == 1 and items[0].fatal
    assert not reader.pending
    assert reader.feed(b"a=b\n\n") == []


def test_half_close_after_requests_still_answers():
    """A client that writes its requests and half-closes (printf | socat) gets every
    answer, then the connection closes."""
    from twisted.internet.interfaces import IHalfCloseableProtocol

    protocol, transport, _, _ = connect()
    assert IHalfCloseableProtocol.providedBy(protocol)
    protocol.dataReceived(request() + request(recipient="nolist@" + LIST.split("@")[1]))
    protocol.readConnectionLost()
    assert len(answers(transport.value())) == 2
    assert transport.disconnecting


def test_client_fields_are_remembered_per_client_and_bounded(monkeypatch):
    """The decision line's client fields come from a bounded memo, the same as made."""
    _, _, _, factory = connect()
    monkeypatch.setattr(factory, "CLIENTS_REMEMBERED", 3)
    requests = [parse_request(request(client_address=f"192.0.2.{i % 5}",
                                      client_name=name, sasl_username=user)[:-2])
                for i in range(20) for name in ("mx.example", 'a "b"')
                for user in ("", "u\\1")]
    for item in requests + requests[::-1]:
        assert factory.client_fields(item) == item.client_fields()
        assert len(factory._client_fields) <= 3


@pytest.mark.parametrize("mode, accept_action", [("safe", "dunno"), ("envelope", "ok")])
@pytest.mark.parametrize("recipient", ["postmaster@lists.example.com",
                                       "abuse@lists.example.com"])
@pytest.mark.parametrize("sender", [NONMEMBER, ""])
def test_role_address_of_a_list_domain_is_dunno(mode, accept_action, recipient, sender):
    """RCPT TO:<postmaster@listdomain> (RFC 5321 section 4.5.1) and abuse@ (RFC 2142)
    get DUNNO in every mode, never OK, so virtual_alias_maps and the local maps decide;
    they were ``550 5.1.1 No such list`` (the policy check runs before those maps)."""
    config = dataclasses.replace(CONFIG, mode=mode, accept_action=accept_action)
    proto, transport, _, _ = connect(config=config)
    proto.dataReceived(request(recipient=recipient, sender=sender))
    assert transport.value() == b"action=DUNNO\n\n"


def test_role_addresses_follow_the_configuration():
    """``[rules] role_addresses`` reaches the decision through the Decider."""
    decider = Decider(StaticSnapshots(sample_snapshot()), ReplyPolicy(),
                      roles=frozenset({"hostmaster"}))
    factory = PostfixFactory(decider, CONFIG, Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(request(recipient="hostmaster@lists.example.com") +
                       request(recipient="postmaster@lists.example.com"))
    assert answers(transport.value()) == [
        b"DUNNO", b"550 5.1.1 No such list: postmaster@lists.example.com"]
