"""The per-peer share at a connection limit (``TrackingFactory._share``) and of the
buffered bytes (``_buffer_share``): one local client that reconnects and keeps sending
fresh partial requests cannot keep another peer (the MTA) out, nor get its request
arriving in several reads refused, and a peer alone may still use every connection.

Driven with ``StringTransport`` and ``Clock``; the peer is the transport's address (TCP)
or, for a Unix socket, the uid a fake socket gives for ``SO_PEERCRED``.  The same attack
against a real daemon is in ``tests/integration/daemon/test_hardening.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import struct

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import StringTransport

from policyd.protocols import ProcessLimits, host_peer, loopback_owner, peer_identity

from . import test_exim, test_postfix
from . import test_password_off_reactor as passwords

POSTFIX = dataclasses.replace(test_postfix.CONFIG, max_connections=5)
BEGUN = b"request=smtpd_access_policy\nprotocol_state=RCPT\n"  # a request, not finished
BUSY = b"action=451 4.3.2 Policy service busy, please try again later\n\n"


class UnixTransport(StringTransport):
    """A Unix socket's transport whose socket says the peer is ``uid``."""

    def __init__(self, uid: int) -> None:
        super().__init__(peerAddress=UNIXAddress(None))
        self.uid = uid

    def getHandle(self):
        return self

    def getsockopt(self, level, option, size):
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return struct.pack("3i", 4242, self.uid, 100)


def tcp(host: str) -> StringTransport:
    return StringTransport(peerAddress=IPv4Address("TCP", host, 40000))


def join(factory, transport):
    """A connection from ``transport``'s peer: the protocol, ``None`` when refused."""
    proto = factory.buildProtocol(transport.getPeer())
    if proto is None:
        return None
    proto.makeConnection(transport)
    if transport.disconnecting and not transport.value():
        # Refused once its peer could be read (a Unix or loopback newcomer at a limit
        # is decided at ``connectionMade``): closed at once, nothing read.
        return None
    return proto


def listener():
    """An empty Postfix listener of 5 connections and its clock."""
    first, _, clock, factory = test_postfix.connect(config=POSTFIX)
    first.connectionLost(None)
    return clock, factory


def share_lines(events):
    return [e for e in events if e.get("log_namespace") == "policyd.limits"
            and e.get("incident") == "share"]


def test_fresh_partial_requests_of_one_peer_cannot_keep_another_out(events):
    """127.0.0.2 fills the listener with requests begun within the last second (never
    closed for a newcomer of its own): a newcomer from 127.0.0.1 is admitted, the
    attacker's request begun first is closed with the 4xx, and the victim's requests
    are answered; the attacker's own newcomers are then refused rather than close the
    victim's connection, idle between its requests.  One warning names the peer."""
    clock, factory = listener()
    attacker = []
    for _ in range(5):
        transport = tcp("127.0.0.2")
        proto = join(factory, transport)
        proto.dataReceived(BEGUN)
        attacker.append((proto, transport))
        clock.advance(0.1)
    victim_t = tcp("127.0.0.1")
    victim = join(factory, victim_t)
    assert victim is not None
    assert attacker[0][1].disconnecting and attacker[0][1].value() == BUSY
    assert not any(t.disconnecting for _, t in attacker[1:])
    attacker[0][0].connectionLost(None)
    victim.dataReceived(test_postfix.request())
    assert victim_t.value() == b"action=DUNNO\n\n"
    clock.advance(0.5)
    # The attacker reconnects with fresh partial requests: refused, nothing closed.
    for _ in range(20):
        assert join(factory, tcp("127.0.0.2")) is None
    assert not victim_t.disconnecting
    assert not any(t.disconnecting for _, t in attacker[1:])
    victim.dataReceived(test_postfix.request())
    assert victim_t.value() == b"action=DUNNO\n\n" * 2
    assert factory.share_evicted == 1 and factory.evicted == 1
    assert factory.share_refused == 20 and factory.refused == 20
    lines = share_lines(events)
    assert len(lines) == 1 and "the peer 127.0.0.0/8 holds 5 " in lines[0]["doing"]
    clock.pump([1] * 15)
    lines = share_lines(events)
    assert len(lines) == 2 and lines[1]["closed"] == 1 and lines[1]["refused"] == 20


def test_the_peer_over_its_share_loses_its_least_useful_connection_first():
    """Of the peer holding the most, a connection idle between requests goes before a
    request begun; once the newcomer's peer would hold as many as the other, it makes
    room from its own idle connections, never the other peer's requests begun."""
    clock, factory = listener()
    big = []
    for i in range(4):
        transport = tcp("10.0.0.1")
        proto = join(factory, transport)
        proto.dataReceived(test_postfix.request() if i == 2 else BEGUN)
        big.append(transport)
    small_t = tcp("10.0.0.2")
    small = join(factory, small_t)
    small.dataReceived(test_postfix.request())
    clock.advance(0.3)
    newcomer = join(factory, tcp("10.0.0.2"))  # 10.0.0.1 holds 4, 10.0.0.2 one
    assert newcomer is not None
    newcomer.dataReceived(BEGUN)
    assert [t.disconnecting for t in big] == [False, False, True, False]
    assert big[2].value() == b"action=DUNNO\n\n"  # idle between requests: a plain close
    assert not small_t.disconnecting
    # 10.0.0.1 holds 3, 10.0.0.2 two: closing one of 10.0.0.1's would only swap them.
    newcomer = join(factory, tcp("10.0.0.2"))
    assert newcomer is not None
    newcomer.dataReceived(BEGUN)
    assert small_t.disconnecting  # its own connection idle between requests
    assert [t.disconnecting for t in big] == [False, False, True, False]
    assert factory.share_evicted == 1 and factory.evicted == 2
    # 10.0.0.2 now holds two requests arriving: its next newcomer is refused.
    assert join(factory, tcp("10.0.0.2")) is None
    assert [t.disconnecting for t in big] == [False, False, True, False]
    assert factory.share_refused == 1


def test_a_peer_alone_may_use_every_connection():
    """Nobody else connected: a peer (Postfix: every smtpd is ``uid postfix``) holds the
    whole listener, and at the limit its requests begun are never closed for its own
    newcomer, as without a share; a second peer's newcomer then gets a connection."""
    clock, factory = listener()
    mta = []
    for _ in range(5):
        transport = tcp("127.0.0.1")
        join(factory, transport).dataReceived(BEGUN)
        mta.append(transport)
    clock.advance(0.5)
    assert join(factory, tcp("127.0.0.1")) is None
    assert not any(t.disconnecting for t in mta)
    assert factory.share_refused == 0 and factory.share_evicted == 0
    assert join(factory, tcp("127.0.0.9")) is not None
    assert sum(t.disconnecting for t in mta) == 1


def test_a_tcp_peer_is_its_address_but_a_local_user_cannot_multiply_itself():
    """127.0.0.1 (an MTA on the host) is one peer and every other loopback address
    together another (any local user may bind any of them); an IPv6 address counts as
    its /64."""
    assert host_peer("192.0.2.7") == "192.0.2.7"
    assert host_peer("127.0.0.1") == "127.0.0.1"
    assert host_peer("127.0.0.2") == host_peer("127.45.6.7") == "127.0.0.0/8"
    assert host_peer("::ffff:127.0.0.3") == "127.0.0.0/8"
    assert host_peer("::1") == "::1"
    assert host_peer("2001:db8::1") == host_peer("2001:db8::2:3") == "2001:db8::/64"
    clock, factory = listener()
    mta = []
    for _ in range(5):
        transport = tcp("127.0.0.1")
        join(factory, transport).dataReceived(BEGUN)
        mta.append(transport)
    clock.advance(0.5)
    # Fresh partial requests from 127.0.0.2, .3, ...: one peer, which gets its share
    # (two connections of the MTA's closed for it) and no more.
    for i in range(2, 10):
        proto = join(factory, tcp(f"127.0.0.{i}"))
        if proto is not None:
            proto.dataReceived(BEGUN)
    assert sum(t.disconnecting for t in mta) == 2
    assert factory.share_evicted == 2 and factory.share_refused == 6


def test_unix_peers_are_told_apart_by_uid():
    """A Unix socket's peer is the uid ``SO_PEERCRED`` gives (read once, at the limit);
    a Unix newcomer at the limit is decided once its socket can be read: from another
    uid it is admitted and the flooding uid's oldest request closed; from the flooding
    uid it is closed at once, nothing read, and counted as refused."""
    assert peer_identity(UnixTransport(1234)) == "uid 1234"
    assert peer_identity(tcp("192.0.2.7")) == "192.0.2.7"
    clock, factory = listener()
    flood = []
    for _ in range(5):
        transport = UnixTransport(1000)
        join(factory, transport).dataReceived(BEGUN)
        flood.append(transport)
        clock.advance(0.1)
    mta_t = UnixTransport(107)
    mta = join(factory, mta_t)
    assert mta is not None and not mta_t.disconnecting
    assert [t.disconnecting for t in flood] == [True, False, False, False, False]
    mta.dataReceived(test_postfix.request())
    assert mta_t.value() == b"action=DUNNO\n\n"
    late_t = UnixTransport(1000)
    join(factory, late_t)
    assert late_t.disconnecting and late_t.value() == b""
    assert factory.refused == 1 and factory.share_refused == 1
    assert not mta_t.disconnecting


def test_loopback_tcp_peers_are_told_apart_by_their_owner(monkeypatch):
    """Over TCP on loopback every local process may come from 127.0.0.1, the MTA's
    address: the owner of the client's socket, which the kernel gives
    (``loopback_owner.owner``, faked here), tells them apart, the address kept (the
    same user from 127.0.0.5 is another peer still); an owner the kernel does not give
    leaves the address alone.  A newcomer at the limit is decided once its owner is read:
    the MTA's is admitted and the flooding user's oldest request closed; the flooding
    user's is closed at once, nothing read."""
    owners: dict[int, int] = {}
    monkeypatch.setattr(loopback_owner, "owner", lambda local, peer: owners.get(peer[1]))
    ports = itertools.count(50000)

    def local(host: str, uid: int) -> StringTransport:
        port = next(ports)
        owners[port] = uid
        return StringTransport(peerAddress=IPv4Address("TCP", host, port),
                               hostAddress=IPv4Address("TCP", "127.0.0.1", 10040))

    assert peer_identity(local("127.0.0.1", 107)) == "127.0.0.1 uid 107"
    assert peer_identity(local("127.0.0.5", 107)) == "127.0.0.0/8 uid 107"
    assert peer_identity(tcp("127.0.0.1")) == "127.0.0.1"
    clock, factory = listener()
    flood = []
    for _ in range(5):
        transport = local("127.0.0.1", 1000)
        join(factory, transport).dataReceived(BEGUN)
        flood.append(transport)
        clock.advance(0.1)
    mta_t = local("127.0.0.1", 107)
    mta = join(factory, mta_t)
    assert mta is not None and not mta_t.disconnecting
    assert [t.disconnecting for t in flood] == [True, False, False, False, False]
    assert flood[0].value() == BUSY
    mta.dataReceived(test_postfix.request())
    assert mta_t.value() == b"action=DUNNO\n\n"
    assert join(factory, local("127.0.0.1", 1000)) is None
    assert factory.share_refused == 1 and factory.share_evicted == 1
    assert not mta_t.disconnecting


# --- the share of max_buffered ---------------------------------------------------------------

EXIM_BUSY = b"DEFER 451 4.3.2 Policy service busy, please try again later"


def buffering(factory, max_buffered: int):
    """``factory`` (Exim, 100 connections) with limits of its own: ``max_buffered``."""
    factory.connections.clear()
    factory.max_connections = 100
    factory.limits = ProcessLimits(max_buffered=max_buffered)
    factory.limits.register(factory)
    return factory.limits


def exim_listener(max_buffered: int):
    _, _, clock, factory = test_exim.connect()
    return clock, factory, buffering(factory, max_buffered)


def partial(factory, uid: int, size: int):
    """A connection of ``uid`` holding ``size`` bytes of an Exim line, no newline yet."""
    transport = UnixTransport(uid)
    proto = join(factory, transport)
    proto.dataReceived(b"POLICYD/1 list=" + b"a" * (size - 15))
    return proto, transport


def mta_request() -> bytes:
    """An Exim request with a header block (as Exim's DATA ACL sends it), ending in its
    newline, of about 2700 bytes."""
    headers = f"From: {test_exim.NONMEMBER}\nSubject: x\nX-Pad: {'p' * 2000}\n"
    return test_exim.line(extra=f"headers={test_exim.b64(headers)}") + b"\n"


def buffer_share_lines(events):
    return [e for e in events if e.get("log_namespace") == "policyd.limits"
            and e.get("incident") == "buffered share"]


def test_fresh_partial_requests_cannot_get_another_peers_request_refused(events):
    """uid 65534 keeps the buffers just under ``max_buffered`` with partial lines, each
    younger than a second (none idle, so none closed for the limit alone); the MTA's
    request arriving in two reads (a header block) does not fit: uid 65534, over its
    half, loses its largest partial lines (answered 4xx) and the MTA's request is
    answered.  uid 65534's next partial line is then refused, the MTA's untouched.  One
    warning names the peer."""
    clock, factory, limits = exim_listener(10_000)
    flood = []
    for size in (1000, 1000, 1000, 1500, 1000, 1000, 1000, 1000, 1000):
        flood.append(partial(factory, 65534, size))
        clock.advance(0.05)
    assert limits.buffered == 9500
    request = mta_request()
    mta_t = UnixTransport(107)
    mta = join(factory, mta_t)
    mta.dataReceived(request[:2500])
    assert not mta_t.disconnecting
    # 12000 bytes for 10000: the 1500 bytes of uid 65534 go first, then a 1000.
    closed = [t.value() for _, t in flood if t.disconnecting]
    assert closed == [EXIM_BUSY, EXIM_BUSY] and flood[3][1].disconnecting
    assert limits.buffered <= 10_000
    for proto, transport in flood:
        if transport.disconnecting:
            proto.connectionLost(None)
    mta.dataReceived(request[2500:])
    assert mta_t.value().startswith(b"REJECT 550")
    mta.connectionLost(None)
    second_t = UnixTransport(107)
    second = join(factory, second_t)
    second.dataReceived(request[:2000])
    flood.append(partial(factory, 65534, 3000))  # uid 65534 over its half: refused
    assert flood[-1][1].value() == EXIM_BUSY
    assert not second_t.disconnecting
    second.dataReceived(request[2000:])
    assert second_t.value().startswith(b"REJECT 550")
    assert factory.share_evicted == 2 and factory.share_refused == 1
    lines = buffer_share_lines(events)
    assert len(lines) == 1
    assert "the peer uid 65534 holds 9500 of the 12000 bytes" in lines[0]["doing"]
    clock.pump([1] * 15)
    lines = buffer_share_lines(events)
    assert len(lines) == 2 and lines[1]["closed"] == 2 and lines[1]["refused"] == 1


def test_a_peer_within_its_share_is_refused_only_when_the_others_are_too():
    """Three peers, a third each: uid 2000's request beyond its third is refused though
    uid 1000 holds more, and nothing of the others is closed; uid 3000, within its third,
    closes uid 1000's request, the one over its third, never uid 2000's."""
    clock, factory, limits = exim_listener(9_000)
    big = partial(factory, 1000, 4000)
    middle = partial(factory, 2000, 3400)
    small_t = UnixTransport(3000)
    small = join(factory, small_t)
    small.dataReceived(b"POLICYD/1 list=" + b"a" * 985)
    clock.advance(0.2)
    middle[0].dataReceived(b"b" * 700)  # uid 2000 would hold 4100 of the 9100
    assert middle[1].value() == EXIM_BUSY
    assert not big[1].disconnecting and not small_t.disconnecting
    assert factory.share_refused == 1 and factory.share_evicted == 0
    middle[0].connectionLost(None)
    other = partial(factory, 2000, 2900)
    small.dataReceived(b"c" * 1900)  # uid 3000 within its 3000: uid 1000 pays
    assert not small_t.disconnecting and big[1].value() == EXIM_BUSY
    assert not other[1].disconnecting
    assert factory.share_evicted == 1 and factory.share_refused == 1


def test_a_request_being_decided_is_never_closed_for_the_share():
    """uid 1000's request arrived in two reads and waits for a password check in a
    thread, its bytes still held: the MTA's request that does not fit is refused, and
    nothing of uid 1000 is closed in vain (closing its small partial line would not
    make room); the waiting request gets its answer."""
    threads = passwords.Threads()
    factory = passwords.factory(threads)
    limits = buffering(factory, 1500)
    headers = (f"From: stranger@outside.example\nTo: {passwords.LIST}\n"
               f"Approved: right horse\nX-Pad: {'p' * 800}\n").encode()
    request = (f"POLICYD/1 list={passwords.LIST} "
               f"sender={passwords.b64(b'stranger@outside.example')} "
               f"headers={passwords.b64(headers)}\n").encode()
    waiting_t = UnixTransport(1000)
    waiting = join(factory, waiting_t)
    waiting.dataReceived(request[:900])
    waiting.dataReceived(request[900:])
    assert waiting.waiting and limits.buffered == 900
    small = partial(factory, 1000, 100)
    mta_t = UnixTransport(107)
    join(factory, mta_t).dataReceived(b"POLICYD/1 list=" + b"a" * 685)
    assert mta_t.value() == EXIM_BUSY
    assert not waiting_t.disconnecting and not small[1].disconnecting
    threads.run_all()
    assert waiting_t.value().startswith(b"ACCEPT 250")
