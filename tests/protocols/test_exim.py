"""The Exim ${readsocket} protocol: codec and the one-shot half-closing adapter."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel

from policyd.config import EximConfig
from policyd.protocols import ProtocolError
from policyd.protocols.exim import EximFactory, parse_request
from policyd.decider import Decider
from policyd.core.replies import Outcome, ReplyPolicy
from policyd.core.snapshot import ListSpec, build
from policyd.core.verdict import Action

from .fakes import HOLDING, LIST, MEMBER, NONMEMBER, OPEN, StaticSnapshots, sample_snapshot

CONFIG = EximConfig(listen=(), timeout=10.0, max_request=65536)
REJECT = (b"REJECT 550 5.7.1 Posting to test@lists.example.com is restricted to its "
          b"members; your message was not accepted")
TEMPFAIL = b"DEFER 451 4.3.0 List policy service temporarily unavailable, please try again later"


def b64(text: str, pad: bool = True) -> str:
    value = base64.b64encode(text.encode()).decode()
    return value if pad else value.rstrip("=")


def line(lists=LIST, sender=NONMEMBER, from_=None, reply_to=None, sender_header=None,
         extra="") -> bytes:
    words = ["POLICYD/1", f"list={lists}", f"sender={b64(sender)}"]
    for key, value in (("from", from_), ("reply_to", reply_to),
                       ("sender_header", sender_header)):
        if value is not None:
            words.append(f"{key}={b64(value)}")
    if extra:
        words.append(extra)
    return " ".join(words).encode()


def connect(config=CONFIG, snapshot="default", policy=ReplyPolicy(), decide=None):
    snap = sample_snapshot() if snapshot == "default" else snapshot
    kwargs = {} if decide is None else {"decide": decide}
    decider = Decider(StaticSnapshots(snap), policy, **kwargs)
    clock = Clock()
    factory = EximFactory(decider, config, clock)
    proto = factory.buildProtocol(None)
    proto.callLater = clock.callLater
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock, factory


def ask(data: bytes, half_close: bool = False, **kwargs) -> tuple[bytes, bool]:
    proto, transport, _, _ = connect(**kwargs)
    proto.dataReceived(data)
    if half_close:
        proto.readConnectionLost()
    return transport.value(), transport.disconnecting


# --- codec -----------------------------------------------------------------------------


def test_parse_full_request():
    req = parse_request(b"POLICYD/1 list=a@l.example,b@l.example sender=" + b64("s@x").encode()
                        + b" from=" + b64("A <a@x>", pad=False).encode()
                        + b" reply_to= sender_header=" + b64("S <s@y>").encode()
                        + b" id=1abc-00 future=whatever")
    assert req.lists == ("a@l.example", "b@l.example")
    assert req.envelope_sender == "s@x"
    assert req.from_header == "A <a@x>"
    assert req.reply_to_header is None
    assert req.sender_header == "S <s@y>"
    assert req.id == "1abc-00"
    assert [q.recipient for q in req.queries()] == ["a@l.example", "b@l.example"]


def test_parse_keys_in_any_order_and_absent_headers():
    req = parse_request(b"POLICYD/1 sender= list=a@l.example")
    assert req.envelope_sender == "" and req.from_header is None and req.id is None


def test_parse_raw_header_bytes_survive_base64():
    """Headers are passed raw: an encoded word, a comma in the display name, 8-bit."""
    raw = "=?utf-8?Q?Last=2C_First?= <alice@example.com>,\n Bob <b@x>"
    req = parse_request(line(from_=raw))
    assert req.from_header == raw


def test_parse_quoted_local_part_with_space_continues_value():
    req = parse_request(b'POLICYD/1 list="a b"@l.example sender=')
    assert req.lists == ('"a b"@l.example',)


def test_parse_trailing_cr_is_dropped():
    assert parse_request(b"POLICYD/1 list=a@l.example sender=\r").lists == ("a@l.example",)


def test_parse_id_is_sanitised():
    req = parse_request(b"POLICYD/1 list=a@l.example sender= id=x%[31m;" + b"y" * 100)
    assert len(req.id) == 64 and req.id.startswith("x__31m_")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty request"),
    (b"   ", "empty request"),
    (b"list=a@x sender=", "version word"),
    (b"POLICYD/2 list=a@x sender=", "unsupported version"),
    (b"POLICYD/1 sender=", "list= is required"),
    (b"POLICYD/1 list=, sender=", "names no address"),
    (b"POLICYD/1 list=a@x", "sender= is required"),
    (b"POLICYD/1 list=a@x sender=!!!", "sender= is not valid base64"),
    (b"POLICYD/1 list=a@x sender= from=abcde", "from= is not valid base64"),
    (b"POLICYD/1 list=a@x list=b@x sender=", "given twice"),
    (b"POLICYD/1 junk list=a@x sender=", "expected key=value"),
    # control bytes anywhere: in a word, the version word, a list's quoted local part,
    # a base64 block (refused by its decoding, named all the same), a body= nothing reads
    (b"POLICYD/1 list=a@x sender=\x7f", "control character 0x7f"),
    (b"POLICYD/1\x02 list=a@x sender=", "control character 0x02"),
    (b'POLICYD/1 list="a\x01b"@x sender=', "control character 0x01"),
    (b"POLICYD/1 list=a@x sender= id=a\tb", "control character 0x09"),
    (b"POLICYD/1 list=a@x sender= headers=RnJv\x00bTog", "control character 0x00"),
    (b"POLICYD/1 list=a@x sender= headers=RnJvbTog body=QU\x1bJD", "control character 0x1b"),
    (b"POLICYD/1 list=a@x sender= body=QUJD\x01", "control character 0x01"),
    (b"POLICYD/1 list=a@x sender= headers=RnJvbTog x\x05", "control character 0x05"),
    (b"POLICYD/1 list=a@x sender= headers=Rn!vbTog", "headers= is not valid base64"),
])
def test_parse_errors(data, reason):
    with pytest.raises(ProtocolError) as info:
        parse_request(data)
    assert reason in info.value.reason


_word = st.one_of(
    st.tuples(st.sampled_from(["list", "sender", "from", "id", "headers", "body", "size",
                               "client", "x_new", "", "Bad"]),
              st.sampled_from(["=", ""]),
              st.text(st.sampled_from(list("aZ09+/=@.\"") + ["\x00", "\t", "\x7f", "é"]),
                      max_size=6)).map("".join),
    st.just(""))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_word, max_size=8))
def test_fast_fields_are_the_word_by_words_fields(words):
    """``_plain_fields`` (C loops, the usual request) answers only where it reads what
    ``_fields`` reads, and declines whatever ``_fields`` would refuse."""
    from policyd.protocols.exim import _fields, _plain_fields

    words = [b"POLICYD/1"] + [w.encode() for w in words]
    fast = _plain_fields(words)
    try:
        slow = _fields(words)
    except ProtocolError:
        assert fast is None
        return
    assert fast is None or fast == slow


# --- protocol --------------------------------------------------------------------------


def test_protocol_is_half_closeable():
    proto, _, _, _ = connect()
    assert IHalfCloseableProtocol.providedBy(proto)


def test_nonmember_rejected_at_first_newline_without_trailing_newline():
    """Answered at the first newline; the reply has no trailing newline; then close."""
    value, closed = ask(line() + b"\n")
    assert value == REJECT
    assert closed


def test_member_accepted():
    value, _ = ask(line(sender=MEMBER) + b"\n")
    assert value == b"ACCEPT 250 2.1.5 accept"


def test_member_from_header_with_nonmember_envelope_is_accepted():
    """Forwarders/SRS: the From: member decides, as in Mailman."""
    value, _ = ask(line(sender="srs0=x@fwd.example", from_=f"Alice <{MEMBER}>") + b"\n")
    assert value == b"ACCEPT 250 2.1.5 accept"


DEFER = b"DEFER 451 4.7.1 Please try again later"


@pytest.mark.parametrize("field", ["from_", "reply_to", "sender_header"])
def test_address_field_too_long_to_read_is_deferred(field):
    """A From:/Reply-To:/Sender: too long to read on the reactor (``address-headers``)
    gets the configured defer, not a decision read from part of it; just under the
    bound the member in it is found as ever."""
    from policyd.core.rules import MAX_ADDRESS_CHARS
    tail = f" <{MEMBER}>"
    value, _ = ask(line(**{field: "x" * MAX_ADDRESS_CHARS + tail}) + b"\n")
    assert value == DEFER
    value, _ = ask(line(**{field: "x" * (MAX_ADDRESS_CHARS - len(tail)) + tail}) + b"\n")
    assert value == b"ACCEPT 250 2.1.5 accept"


@pytest.mark.parametrize("name", ["From", "Reply-To", "Sender"])
def test_address_field_too_long_in_headers_is_deferred(name):
    from policyd.core.rules import MAX_ADDRESS_CHARS
    tail = f" <{MEMBER}>"
    for value, answer in (("x" * MAX_ADDRESS_CHARS + tail, DEFER),
                          ("x" * (MAX_ADDRESS_CHARS - len(tail)) + tail,
                           b"ACCEPT 250 2.1.5 accept")):
        block = f"{name}: {value}\nSubject: hi\n".encode()
        got, _ = ask(line(extra=f"headers={base64.b64encode(block).decode()}") + b"\n")
        assert got == answer


def test_null_sender_rejected():
    value, _ = ask(line(sender="") + b"\n")
    assert value == b"REJECT 550 5.7.1 The null sender may not write to test@lists.example.com"


def test_answer_at_half_close_without_newline():
    """Exim's default shutdown=yes: no newline, EOF ends the request."""
    proto, transport, _, _ = connect()
    proto.dataReceived(line(sender=MEMBER))
    assert transport.value() == b""
    proto.readConnectionLost()
    assert transport.value() == b"ACCEPT 250 2.1.5 accept"
    assert transport.disconnecting


def test_bytes_after_the_newline_are_ignored():
    proto, transport, _, _ = connect()
    proto.dataReceived(line(sender=MEMBER) + b"\nPOLICYD/1 more")
    proto.dataReceived(b"stuff\n")
    proto.readConnectionLost()
    assert transport.value() == b"ACCEPT 250 2.1.5 accept"


def test_empty_request_at_eof_is_deferred():
    value, closed = ask(b"", half_close=True)
    assert value == b"DEFER 451 4.3.0 Malformed policy request: empty request"
    assert closed


def test_malformed_request_is_deferred_and_logged(events):
    value, closed = ask(b"HELLO\n")
    assert value.startswith(b"DEFER 451 4.3.0 Malformed policy request: ")
    assert closed
    assert any(e["log_level"] == LogLevel.warn and "version" in e.get("reason", "")
               for e in events)


def test_oversized_request_is_deferred():
    config = EximConfig(listen=(), timeout=10.0, max_request=50)
    proto, transport, _, _ = connect(config)
    proto.dataReceived(b"POLICYD/1 list=" + b"a" * 30)
    assert transport.value() == b""
    proto.dataReceived(b"b" * 30)
    assert transport.value() == (b"DEFER 451 4.3.0 Malformed policy request: request longer "
                                 b"than 50 bytes")
    # The rest of the request is read and dropped until Exim half-closes: closed now,
    # its next write would fail and Exim would use the ACL's fail string instead.
    assert not transport.disconnecting
    proto.dataReceived(b"c" * 1000 + b"\n")
    assert not transport.disconnecting and proto.buffered == 0
    proto.readConnectionLost()
    assert transport.disconnecting
    assert transport.value().count(b"DEFER") == 1


def test_an_oversized_request_that_goes_on_is_closed_at_a_bound():
    from policyd.protocols.exim import DRAIN_MAX

    config = EximConfig(listen=(), timeout=10.0, max_request=50)
    proto, transport, clock, _ = connect(config)
    proto.dataReceived(b"POLICYD/1 list=" + b"a" * 60)
    assert transport.value().startswith(b"DEFER 451 4.3.0")
    for _ in range(DRAIN_MAX // 65536):
        proto.dataReceived(b"d" * 65536)
    assert not transport.disconnecting
    proto.dataReceived(b"d")  # past DRAIN_MAX
    assert transport.disconnecting
    # Or, sending slowly, at its deadline.
    proto, transport, clock, _ = connect(config)
    proto.dataReceived(b"POLICYD/1 list=" + b"a" * 60)
    clock.advance(9.5)
    proto.dataReceived(b"d")
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_timeout_answers_defer_and_closes():
    """A client that never finishes its line gets a 4xx after ``[exim] timeout``."""
    proto, transport, clock, _ = connect()
    proto.dataReceived(b"POLICYD/1 list=")
    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.2)
    assert transport.value() == (b"DEFER 451 4.3.0 Malformed policy request: no complete "
                                 b"request within 10 s")
    assert transport.disconnecting


def test_each_connection_times_out_on_its_own_deadline_and_the_sweep_stops():
    """One sweep for all connections: a late connection gets its full timeout, an
    answered one is left alone, and the sweep stops with the last connection."""
    first, first_transport, clock, factory = connect()
    clock.advance(6)
    second = factory.buildProtocol(None)
    second_transport = StringTransport()
    second.makeConnection(second_transport)
    answered = factory.buildProtocol(None)
    answered_transport = StringTransport()
    answered.makeConnection(answered_transport)
    answered.dataReceived(line() + b"\n")
    clock.advance(4.5)
    assert first_transport.value().startswith(b"DEFER 451 4.3.0")
    assert second_transport.value() == b""
    clock.advance(6)
    assert second_transport.value().startswith(b"DEFER 451 4.3.0")
    assert answered_transport.value() == REJECT
    for proto in (first, second, answered):
        proto.connectionLost(None)
    assert not factory.connections
    clock.advance(1)
    assert clock.getDelayedCalls() == []


def test_no_timeout_after_the_answer():
    proto, transport, clock, _ = connect()
    proto.dataReceived(line() + b"\n")
    clock.advance(100)
    assert transport.value() == REJECT


def test_several_lists_most_severe_wins():
    """DEFER > REJECT > DISCARD > HOLD > ACCEPT; one answer for all lists."""
    value, _ = ask(line(lists=f"{OPEN},{LIST},{HOLDING}") + b"\n")
    assert value == REJECT


def test_several_lists_all_accept():
    value, _ = ask(line(lists=f"{OPEN},{LIST}", sender=MEMBER) + b"\n")
    assert value == b"ACCEPT 250 2.1.5 accept"


def test_several_lists_tie_goes_to_first_list():
    """Two rejections with different texts: the first list's reply is sent."""
    value, _ = ask(line(lists=f"nosuch@lists.example.com,{LIST}") + b"\n")
    assert value == b"REJECT 550 5.1.1 No such list: nosuch@lists.example.com"
    value, _ = ask(line(lists=f"{LIST},nosuch@lists.example.com") + b"\n")
    assert value == REJECT


def test_several_lists_hold_beats_accept_when_hold_is_mapped():
    value, _ = ask(line(lists=f"{OPEN},{HOLDING}") + b"\n",
                   policy=ReplyPolicy(hold=Outcome.HOLD))
    assert value == b"HOLD 250 2.6.0 accepted for moderation by nonmember-moderation"


def test_several_lists_discard_beats_hold():
    snap = build([
        ListSpec("a@lists.example.com", default_nonmember_action=Action.HOLD),
        ListSpec("b@lists.example.com", default_nonmember_action=Action.DISCARD),
    ])
    value, _ = ask(line(lists="a@lists.example.com,b@lists.example.com") + b"\n",
                   snapshot=snap, policy=ReplyPolicy(hold=Outcome.HOLD))
    assert value == b"DISCARD 250 2.7.0 discarded by nonmember-moderation"


def test_defer_beats_reject():
    def decide(snapshot, query, *, explain=True):
        if query.recipient == OPEN:
            raise RuntimeError("boom")
        from policyd.core.chain import decide as real
        return real(snapshot, query)
    value, _ = ask(line(lists=f"{LIST},{OPEN}") + b"\n", decide=decide)
    assert value == TEMPFAIL


def test_exception_in_decision_is_a_temporary_failure(events):
    """An error inside the decision: log.failure and DEFER 451 4.3.0, never 5xx."""
    def broken(snapshot, query, *, explain=True):
        raise ZeroDivisionError()
    value, closed = ask(line() + b"\n", decide=broken)
    assert value == TEMPFAIL
    assert closed
    assert any("log_failure" in e and e["log_failure"].check(ZeroDivisionError)
               for e in events)


def test_no_snapshot_is_a_temporary_failure(events):
    value, _ = ask(line() + b"\n", snapshot=None)
    assert value == TEMPFAIL
    assert any(e.get("verdict") == "unavailable" and "no snapshot" in e.get("reason", "")
               for e in events)


def test_one_log_event_per_decision(events):
    """One structured event per list decided, with the fields the log line shows."""
    ask(line(lists=f"{LIST},{OPEN}", extra="id=1qX-00") + b"\n")
    decisions = [e for e in events if e.get("log_namespace") == "policyd.decision"]
    assert [(e["list"], e["verdict"], e["rule"]) for e in decisions] == [
        (LIST, "reject", "nonmember-moderation"),
        (OPEN, "accept", "nonmember-moderation"),
    ]
    assert decisions[0]["protocol"] == "exim"
    assert decisions[0]["request_id"] == "1qX-00"
    assert decisions[0]["reply"] == REJECT.decode()
    assert decisions[0]["sender"] == NONMEMBER
    assert decisions[0]["elapsed"] >= 0


def test_counters(events):
    proto, transport, _, factory = connect()
    proto.dataReceived(line() + b"\n")
    counters = factory.decider.counters()
    assert counters["by_protocol"] == {"exim": {"reject": 1}}
    assert counters["answers"] == {"exim": {"REJECT": 1}}


def test_shutdown_waits_for_the_answer():
    proto, transport, _, _ = connect()
    proto.dataReceived(b"POLICYD/1 ")
    proto.shutdown()
    assert not transport.disconnecting
    proto.dataReceived(line()[10:] + b"\n")
    assert transport.value() == REJECT and transport.disconnecting


REQUEST = line(lists=f"{OPEN},{LIST}", from_="Alice <alice@example.com>") + b"\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REQUEST)), max_size=20),
       st.booleans())
def test_any_split_gives_the_same_answer(cuts, trailing_newline):
    """However the line is split across reads (and ended by newline or EOF), the
    answer is the same."""
    data = REQUEST if trailing_newline else REQUEST[:-1]
    points = sorted(set(cuts))
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    proto, transport, _, _ = connect()
    for chunk in chunks:
        if chunk:
            proto.dataReceived(chunk)
    if not trailing_newline:
        proto.readConnectionLost()
    assert transport.value() == b"ACCEPT 250 2.1.5 accept"
    assert transport.disconnecting


def test_every_byte_split():
    data = line() + b"\n"
    for i in range(1, len(data)):
        proto, transport, _, _ = connect()
        proto.dataReceived(data[:i])
        proto.dataReceived(data[i:])
        assert transport.value() == REJECT, i


def test_a_cut_header_block_takes_the_address_fields_given_whole_beside_it():
    """``headers_cut=1`` (contrib/exim: a block longer than POLICYD_MAX_HEADERS): the
    block's last field may be cut and From:/Reply-To:/Sender: lie past the cut; they come
    whole from ``from=``/``reply_to=``/``sender_header=`` (every field of a name), replace
    any the block had, and the message says it was cut."""
    block = ("X-Trace: one\r\nFrom: <cut-off@outside.example>\r\nX-Trace: two\r\n"
             "Subject: trunc").encode()
    raw = (f"POLICYD/1 list={LIST} sender={b64(NONMEMBER)} "
           f"headers={base64.b64encode(block).decode()} headers_cut=1 "
           f"from={b64(' Carol <' + MEMBER + '>')} reply_to={b64('a@x.example' + chr(10) + 'b@y.example')} "
           f"size=100000").encode()
    request = parse_request(raw)
    message = request.message
    assert message.headers_cut
    assert message.get_all("from") == [f"Carol <{MEMBER}>"]
    assert message.get_all("reply-to") == ["a@x.example", "b@y.example"]
    assert message.get_all("x-trace") == ["one", "two"]
    assert message.get_all("subject") == []  # the field the cut went through is dropped
    assert request.from_header == f"Carol <{MEMBER}>"
    with pytest.raises(ProtocolError, match="headers_cut="):
        parse_request(raw.replace(b"headers_cut=1", b"headers_cut=yes"))


def test_a_cut_header_block_decides_the_senders_and_leaves_the_other_rules_to_mailman():
    """The member in From: (past the cut) makes it a member's post, whatever the
    envelope; no-subject, which would hold for want of a Subject: the cut dropped, is
    not run, and the trace says why."""
    from policyd.core.chain import decide

    block = b"X-Trace: one\r\nX-Trace: two\r\n"
    raw = (f"POLICYD/1 list={LIST} sender={b64(NONMEMBER)} "
           f"headers={base64.b64encode(block).decode()} headers_cut=1 "
           f"from={b64('<' + MEMBER + '>')} size=100000").encode()
    query = parse_request(raw).queries()[0]
    decision = decide(sample_snapshot(), query)
    assert decision.verdict.value == "accept" and f"{MEMBER} is a member" in decision.reason
    skipped = {step.rule: step.detail for step in decision.trace if "cut the header" in
               step.detail}
    assert "no-subject" in skipped and "implicit-dest" in skipped
    assert decide(sample_snapshot(), query, explain=False).rule == decision.rule


@pytest.mark.parametrize("sender", [NONMEMBER, ""])
def test_role_address_of_a_list_domain_is_no_list_and_no_trouble(sender):
    """postmaster@ and abuse@ of a list domain: the answer contrib/exim's RCPT ACL takes
    for "not a list posting address" (POLICYD_NOT_A_POST_RE: no 550 5.1.1, no DATA
    question, no "one list per message"), never the not-managed 4xx of a domain the
    snapshot does not know.  It was ``REJECT 550 5.1.1 No such list``."""
    import re
    from pathlib import Path

    conf = Path(__file__).parents[2] / "contrib" / "exim" / "policyd-main.conf"
    macro = re.search(r"^POLICYD_NOT_A_POST_RE = \\N(.*)\\N$", conf.read_text(), re.M)
    not_a_post = re.compile(macro.group(1))
    for recipient in ("postmaster@lists.example.com", "ABUSE@lists.example.com"):
        value, _ = ask(line(lists=recipient, sender=sender) + b"\n")
        assert value == b"ACCEPT 250 2.0.0 role-address"
        assert not_a_post.match(value.decode())
