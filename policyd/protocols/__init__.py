"""The wire protocols: one module each, a pure codec plus a thin Twisted protocol.

``postfix``  the Postfix policy delegation protocol (SMTPD_POLICY_README), persistent.
``exim``     one line per connection for Exim's ``${readsocket}``, answered without newline.
``control``  JSON lines over a Unix socket for ``policyctl`` (query, status, reload).
``http``     the metrics endpoint's HTTP: one request per connection, no body, bounded.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something we cannot read.  It is the peer's fault: answer with a
    temporary failure and say why, never a 5xx.

    ``fatal`` means the framing can no longer be trusted (an over-long line or request):
    answer, then close the connection.
    """

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


import array  # noqa: E402
import fcntl  # noqa: E402
import heapq  # noqa: E402
import ipaddress  # noqa: E402
import itertools  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import termios  # noqa: E402
import weakref  # noqa: E402

from twisted.internet import defer  # noqa: E402
from twisted.internet.address import UNIXAddress  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from . import loopback_owner  # noqa: E402

_limits_log = Logger(namespace="policyd.limits")


def peer_text(transport) -> str:
    """``127.0.0.1:4321`` for TCP, ``unix`` for a Unix socket peer, for log lines."""
    if transport is None:
        return "-"
    try:
        peer = transport.getPeer()
    except Exception:
        return "-"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"{host}:{peer.port}"
    return "unix"


#: ``struct ucred`` as ``SO_PEERCRED`` gives it on Linux: pid, uid, gid.
_UCRED = struct.Struct("3i")
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", None)
#: What ``address_peer`` says of a Unix socket's address: its peer (a uid) is read from
#: the socket, once the connection has a transport (``TrackingFactory.track``).
AT_CONNECT = object()


def host_peer(host: str) -> str:
    """The peer a TCP client's address counts as: the address, except that any local
    user may bind any loopback address but one, and an IPv6 host usually holds a whole
    /64: 127.0.0.1 (where an MTA on the host connects from) is a peer, every other
    127.0.0.0/8 address together another; an IPv6 address counts as its /64."""
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    if host.startswith("127."):
        return host if host == "127.0.0.1" else "127.0.0.0/8"
    if ":" in host and host != "::1":
        try:
            return str(ipaddress.IPv6Network((host.partition("%")[0], 64), strict=False))
        except ValueError:
            return host
    return host


def peer_identity(transport) -> str:
    """Who a connection counts against at a limit (``TrackingFactory``'s per-peer
    share): ``uid N`` for a Unix socket (``SO_PEERCRED``: every Postfix smtpd process is
    the one peer ``uid postfix``), ``ADDRESS uid N`` for a loopback TCP client (its
    socket's owner, from the kernel: ``loopback_owner``), the address for any other TCP
    client (``host_peer``,
    also for a loopback one whose owner the kernel does not say), ``unix`` for a Unix
    socket whose credentials cannot be read, ``-`` when nothing is known.  A system call
    for a Unix socket or a loopback client: called only at a limit, once per connection
    (``peer_of``)."""
    try:
        address = transport.getPeer()
    except Exception:
        return "-"
    host = getattr(address, "host", None)
    if host is not None:
        host = str(host)
        if loopback_owner.is_loopback(host):
            # Every local process comes from the same address: its owner tells them
            # apart (and counts Postfix as ``uid postfix`` over TCP as over a socket).
            try:
                local = transport.getHost()
                uid = loopback_owner.owner((str(local.host), local.port),
                                           (host, address.port))
            except Exception:
                uid = None
            if uid is not None:
                # The address stays in: a process binding 127.0.0.2 is still not the
                # MTA at 127.0.0.1 when both run as the same user.
                return f"{host_peer(host)} uid {uid}"
        return host_peer(host)
    if _SO_PEERCRED is None:
        return "unix"
    try:
        creds = transport.getHandle().getsockopt(socket.SOL_SOCKET, _SO_PEERCRED,
                                                 _UCRED.size)
        return f"uid {_UCRED.unpack(creds)[1]}"
    except (AttributeError, OSError, struct.error):
        return "unix"


def peer_of(protocol) -> str:
    """``peer_identity`` of a connection, read once and kept on it (``peer``)."""
    peer = getattr(protocol, "peer", None)
    if peer is None:
        peer = protocol.peer = peer_identity(protocol.transport)
    return peer


def address_peer(addr):
    """The peer of a connection being accepted, from its address alone: the host for
    TCP, ``AT_CONNECT`` for a Unix socket or a loopback TCP client (its uid is read at
    ``connectionMade``), ``None`` when unknown (no share then: the limits as for one
    peer)."""
    host = getattr(addr, "host", None)
    if host is not None:
        if loopback_owner.AVAILABLE and loopback_owner.is_loopback(str(host)):
            return AT_CONNECT  # its owner's uid is read from the kernel, as for Unix
        return host_peer(str(host))
    if isinstance(addr, UNIXAddress):
        return AT_CONNECT
    return None


#: Descriptors the MTA listeners leave free, whatever they hold: the control socket, the
#: store's connections, the log file, Twisted's own EMFILE reserve.
RESERVED_DESCRIPTORS = 64
#: At a limit only connections without a read for this long are closed: never one whose
#: request is arriving.  A connection with no request begun is not "arriving": Exim and
#: Postfix write their request as soon as they connect, so one silent for
#: ``SILENT_GRACE`` seconds after connecting, or one between two Postfix requests, can
#: be closed at once (``idle_for`` then adds ``EVICT_MIN_IDLE`` to its age).
EVICT_MIN_IDLE = 1.0
SILENT_GRACE = 0.1
#: A limit incident ends after this many seconds without a new event; its summary line
#: is logged then.
INCIDENT_QUIET = 10.0
#: Connections being closed still hold descriptors until the reactor's next turn: at
#: most this many more than ``max_open`` are open at once (taken from the reserve).
CLOSING_SLACK = 16

#: The order connections were accepted in, for all listeners (``TrackingFactory``
#: stamps it as ``protocol.accepted``): at a limit with nothing idle, the oldest
#: connection that has read nothing is closed.  A counter, not a time: one accept
#: burst is one instant (and one ``Clock`` time in the tests).
_accepted = itertools.count(1)


def hold_reads_while_answers_wait(transport) -> None:
    """Stop reading from a peer while its answers wait to be sent: a client that sends
    requests and never reads the answers would otherwise have them queued without end
    (a request of 90 bytes gets an answer of about 70).  The transport is registered as
    its own streaming producer, Twisted's back-pressure: past its ``bufferSize`` of
    queued output it stops reading, and reads again once the output is gone; the peer's
    further requests wait in the kernel's socket buffers.  A connection closed while
    its output cannot leave is aborted by its factory's sweep (``ABORT_AFTER``)."""
    register = getattr(transport, "registerProducer", None)
    if register is not None and getattr(transport, "producer", None) is None:
        register(transport, True)


#: A sweep this many seconds late follows a long turn of the reactor (``spared``).
SWEEP_LATE = 0.1


def unread_bytes(transport) -> int:
    """Bytes the kernel holds for ``transport`` that the reactor has not read yet
    (``FIONREAD``; 0 for a transport without a socket, or on an error).  Twisted runs
    the timers that are due before it polls for reads: after a long turn, a sweep would
    take a request waiting there for the peer's silence and close the connection."""
    fileno = getattr(transport, "fileno", None)
    if fileno is None:
        return 0
    try:
        count = array.array("i", [0])
        fcntl.ioctl(fileno(), termios.FIONREAD, count, True)
    except (OSError, ValueError, TypeError):
        return 0
    return count[0]


#: Seconds a connection being closed may wait for its peer to take the answers queued
#: for it before it is aborted (its descriptor and buffers freed).
ABORT_AFTER = 10.0


def abort_stuck(protocol, now: float) -> None:
    """For a sweep, on a connection being closed: abort it once it has waited
    ``ABORT_AFTER`` seconds (the first call only notes the time)."""
    since = getattr(protocol, "closing_since", None)
    if since is None:
        protocol.closing_since = now
    elif now - since >= ABORT_AFTER and protocol.transport is not None:
        protocol.transport.abortConnection()


def soft_nofile() -> int:
    """The soft ``RLIMIT_NOFILE`` (1024 when it cannot be read or is unlimited)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class ProcessLimits:
    """What the MTA listeners of one process share.

    ``max_open``: the connections they may hold together, the soft ``RLIMIT_NOFILE`` less
    ``RESERVED_DESCRIPTORS`` (so the control socket and the store stay usable whatever
    a local client holds).  ``max_buffered``: the bytes of incomplete requests they may
    buffer together (``[daemon] max_buffered``).  ``closing_slack``: connections being
    closed they may hold on top of ``max_open`` (``CLOSING_SLACK``).
    """

    def __init__(self, max_buffered: int = 32 << 20, descriptors: int | None = None,
                 closing_slack: int = CLOSING_SLACK) -> None:
        self.max_buffered = max_buffered
        self.buffered = 0
        self._descriptors = descriptors
        #: how many connections being closed may be held on top of ``max_open``.
        self.closing_slack = closing_slack
        # Weak references in a plain list: ``counts`` walks them for every connection
        # accepted, and a ``WeakSet``'s iterator costs several times more.
        self._refs: list[weakref.ref] = []

    @property
    def max_open(self) -> int:
        if self._descriptors is None:
            self._descriptors = soft_nofile()
        return max(1, self._descriptors - RESERVED_DESCRIPTORS)

    def refresh(self) -> None:
        """Read ``RLIMIT_NOFILE`` again (after ``listeners.raise_nofile_limit``)."""
        self._descriptors = None

    def register(self, factory) -> None:
        if factory not in self.factories:
            self._refs = [ref for ref in self._refs if ref() is not None]
            self._refs.append(weakref.ref(factory))

    @property
    def factories(self) -> list:
        """The registered factories still alive."""
        return [factory for factory in (ref() for ref in self._refs) if factory is not None]

    def counts(self) -> tuple[int, int]:
        """(connections open, of which being closed): a connection being closed holds
        its descriptor until the reactor's next turn."""
        held = closing = 0
        for ref in self._refs:
            factory = ref()
            if factory is not None:
                held += len(factory.connections)
                closing += len(factory.evicting)
        return held, closing

    def connections(self):
        for factory in self.factories:
            yield from factory.connections


#: The process's limits; a factory built without ``limits=`` uses these.
PROCESS_LIMITS = ProcessLimits()


class _Incident:
    __slots__ = ("what", "started", "last", "closed", "refused")

    def __init__(self, what: str, now: float) -> None:
        self.what = what
        self.started = self.last = now
        self.closed = self.refused = 0


def _by_peer(connections) -> dict[str, list]:
    """``connections`` by peer (``peer_of``), those being evicted left out."""
    held: dict[str, list] = {}
    for p in connections:
        if p.factory.evicting and p in p.factory.evicting:
            continue
        q = peer_of(p)
        same = held.get(q)
        if same is None:
            held[q] = [p]
        else:
            same.append(p)
    return held


class TrackingFactory(Factory):
    """A factory that knows its open connections, so shutdown can let them finish.

    Protocols call ``track``/``untrack`` from ``connectionMade``/``connectionLost`` and
    implement ``shutdown()``: close now if idle, else after the answer in progress.

    Timeouts are one sweep over the open connections every ``sweep_interval`` seconds
    while there are any (``sweep(now)``), not a timer per connection: setting, resetting
    and cancelling a timer cost more than the rest of a short connection's bookkeeping.

    Limits (MTA listeners: ``max_connections`` set; the control socket has none):
    at ``max_connections`` of this listener, or at ``ProcessLimits.max_open`` for all of
    them, or over ``max_buffered`` bytes of incomplete requests, the connections idle
    longest are closed (``protocol.evict()``: a 4xx for a request begun, else a plain
    close, which Postfix's client shrugs off by reconnecting); with none idle for
    ``EVICT_MIN_IDLE`` seconds, the oldest connection that has read nothing yet makes
    room for a new one (``admit``), else the new connection is refused (closed at once,
    nothing read), and a request that would overflow the buffers is answered 4xx.  A
    protocol under limits has ``buffered`` (bytes held), ``idle_for(now)`` (negative:
    never to be closed), ``never_read()`` (no byte received yet) and ``evict()``.

    Per-peer share: at a connection limit the connections are counted by peer
    (``peer_identity``: the uid of a Unix socket's client or of a loopback TCP one,
    the address of any other TCP one, ``host_peer``).
    A peer may hold everything while nobody else wants a connection; a newcomer from a
    peer holding at least two fewer than the peer holding the most closes one of *that*
    peer's connections, least useful first (idle, then its request begun longest ago,
    then silent; never one being answered), even a request begun within the second;
    a newcomer from the peer holding the most may only close its own peer's idle or
    silent connections, as above, else it is refused: never another peer's.  So one
    local client reconnecting with fresh partial requests cannot keep the MTA out, and
    the MTA (all Postfix smtpd processes are one peer, ``uid postfix``) is never starved
    by the share when it is alone.  Buffered bytes are shared alike (``_buffer_share``):
    a request from a peer within its share of ``max_buffered`` closes the incomplete
    requests of peers over theirs, so fresh partial requests cannot get the MTA's
    request arriving in several reads refused.  The peer is read only at a limit, once per
    connection (``peer_of``); a Unix or loopback newcomer's uid needs its socket, so its admission
    waits for ``track`` (``connectionMade``), and one refused then is closed at once.
    Each incident logs one line when it starts and one summary when it has been quiet
    for ``INCIDENT_QUIET`` seconds; ``refused`` and ``evicted`` count them for status,
    ``share_refused`` and ``share_evicted`` those of them the share decided.
    """

    noisy = False
    sweep_interval: float | None = None
    # Seconds this sweep ran after it was due: a turn of the reactor that long just
    # ended, and what peers sent meanwhile is not read yet (``spared``).
    sweep_late = 0.0
    _sweep_start = _sweep_due = 0.0
    max_connections: int | None = None
    kind = "control"
    #: what the incident lines call this listener (``Listener`` sets its address).
    listener_name: str | None = None

    @staticmethod
    def write(transport, data: bytes) -> None:
        """How an answer is written; the daemon may set a faster way
        (``policyd.runtime.fastio``)."""
        transport.write(data)

    @staticmethod
    def finish(transport, data: bytes) -> None:
        """How a connection's last answer is written before it closes; the daemon may set
        a faster way (``policyd.runtime.fastio``)."""
        transport.write(data)
        transport.loseConnection()

    def __init__(self, reactor, limits: ProcessLimits | None = None) -> None:
        self.reactor = reactor
        self.connections: set = set()
        self.closing = False
        self._drained: list[defer.Deferred] = []
        self._sweeping: LoopingCall | None = None
        self.limits = PROCESS_LIMITS if limits is None else limits
        self.evicting: set = set()
        self.incidents: dict[str, _Incident] = {}
        self.refused = 0
        self.evicted = 0
        self.share_refused = 0
        self.share_evicted = 0
        # A Unix newcomer at a limit, admitted once ``track`` has read its peer.
        self._admitting = None

    def buildProtocol(self, addr):
        if self.max_connections is None:
            return self.protocol(self)
        if not self.admit(addr):
            return None
        protocol = self.protocol(self)
        protocol.accepted = next(_accepted)
        if self._admitting is AT_CONNECT:
            self._admitting = protocol
        return protocol

    def track(self, protocol) -> None:
        if self._admitting is not None:
            self._admit_connected(protocol)
        self.connections.add(protocol)
        if self._sweeping is None:
            self._start_sweeping()

    def _admit_connected(self, protocol) -> None:
        """A Unix newcomer at a limit (``admit`` returned ``AT_CONNECT``): admitted now
        its peer can be read, or closed at once, nothing read (held, as a connection
        being closed, until its descriptor is free)."""
        if self._admitting is not protocol:
            self._admitting = None
            return
        self._admitting = None
        protocol.peer = peer_identity(protocol.transport)
        if not self.admit(peer=protocol.peer):
            self.evicting.add(protocol)
            protocol.transport.loseConnection()

    def _start_sweeping(self) -> None:
        if self.sweep_interval:
            self._sweeping = LoopingCall(self._sweep)
            self._sweeping.clock = self.reactor
            self._sweep_start = self.reactor.seconds()
            self._sweep_due = self._sweep_start + self.sweep_interval
            self._sweeping.start(self.sweep_interval, now=False)

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        self.sweep_late = now - self._sweep_due
        self.sweep(now)
        if self.incidents:
            self.end_incidents(now)
        # The sweeps go on while an incident is open, though every connection is gone:
        # a flood of short connections (Exim's) empties the listener between its bursts,
        # and is still one incident until it has been quiet for INCIDENT_QUIET.
        if not self.connections and not self.incidents and self._sweeping is not None:
            self._sweeping.stop()
            self._sweeping = None
            return
        # When the next sweep is due: as ``LoopingCall`` schedules it, the next point of
        # start + k x interval after now (missed ones skipped).
        after, interval = self.reactor.seconds(), self.sweep_interval
        self._sweep_due = after + interval - (after - self._sweep_start) % interval

    def sweep(self, now: float) -> None:
        """Time out what has to be (subclasses)."""

    def spared(self, protocol) -> bool:
        """Whether a sweep that ran late (after a long turn) leaves ``protocol`` alone this
        time: bytes wait unread for it, though it reads (not held back for answers that
        wait to leave), so its silence is the reactor's, not the peer's."""
        transport = protocol.transport
        return (self.sweep_late > SWEEP_LATE
                and not getattr(transport, "producerPaused", False)
                and unread_bytes(transport) > 0)

    # --- limits --------------------------------------------------------------------------

    def use_limits(self, config) -> None:
        """Apply a protocol section's limits: ``max_connections`` for this listener and
        ``max_buffered`` (from ``[daemon]``) for all of them."""
        self.max_connections = getattr(config, "max_connections", 1000)
        self.limits.max_buffered = getattr(config, "max_buffered", self.limits.max_buffered)
        self.limits.register(self)

    @property
    def name(self) -> str:
        return self.listener_name or self.kind

    def admit(self, addr=None, peer=None) -> bool:
        """Room for one more connection (from ``addr``, or from ``peer`` when known)?
        At a limit, with connections of several peers, the share decides
        (``_share``); else close the connections idle longest and admit; with none,
        close the oldest connection that has read nothing and admit; with none of those
        either, refuse.  A Unix newcomer at a limit is admitted for now and decided at
        ``track`` (``self._admitting`` is then ``AT_CONNECT``)."""
        limits = self.limits
        mine = len(self.connections) - len(self.evicting)
        held, closing = limits.counts()
        max_open = limits.max_open
        if mine < self.max_connections and held - closing < max_open:
            return held < max_open + limits.closing_slack or self._refuse_for_now(max_open)
        now = self.reactor.seconds()
        room = held < max_open + limits.closing_slack
        if peer is None:
            peer = address_peer(addr)
            if peer is AT_CONNECT:
                if room:
                    self._admitting = AT_CONNECT
                    return True
                peer = None
        if mine >= self.max_connections:
            pool = self.connections
            count = max(1, self.max_connections // 20)
            what = f"max_connections = {self.max_connections}"
        else:
            pool = None
            count = min(CLOSING_SLACK, max(1, max_open // 20))
            what = self._descriptor_limit(max_open)
        if peer is not None:
            admitted = self._share(pool, peer, now, count, room, what)
            if admitted is not None:
                return admitted
        closed = self._evict(limits.connections() if pool is None else pool, now, count)
        if not closed and room:
            # Nothing idle: every connection is a request arriving or being decided, or
            # was accepted less than SILENT_GRACE ago without a byte read yet.  Refusing
            # here would let a local client lock the MTAs out: connections that piled
            # up in the listen backlog are accepted in one burst, all of them silent
            # (their bytes are read on the reactor's next turn), so the MTA's among them
            # would be refused.  Instead the *oldest* connection that has read nothing
            # is closed: a request begun, complete or being decided is never closed
            # this way.  Oldest, not newest: an MTA writes as soon as it connects, so
            # the longer a connection has been silent the less likely it is one, and
            # within a burst the newest (perhaps the MTA's, its bytes not read yet)
            # outlives the rest of the burst as long as the burst is smaller than the
            # limit; refusing the newcomer is closing the newest.  One only, and only
            # when the newcomer is then admitted (``room``): closing without admitting
            # would free no descriptor before the next turn.
            closed = self._evict_silent(limits.connections() if pool is None else pool)
        admit = bool(closed) and room
        self.incident("connections", now, what, closed=closed, refused=0 if admit else 1)
        return admit

    def _share(self, pool, peer: str, now: float, count: int, room: bool,
               what: str) -> bool | None:
        """The per-peer share at a limit, for a newcomer from ``peer``: whether it is
        admitted, ``None`` when no other peer holds a connection (the limits then as
        for one peer).  A newcomer from a peer holding at least two fewer than the peer
        holding the most closes that peer's least useful connections; else only its
        own peer's idle or silent ones, and it is refused rather than close another
        peer's."""
        held = _by_peer(self.limits.connections() if pool is None else pool)
        own = held.pop(peer, [])
        if not held:
            return None
        biggest = max(held, key=lambda q: len(held[q]))
        most = held[biggest]
        total = len(own) + sum(len(v) for v in held.values())
        if len(most) >= len(own) + 2:
            victims = self._idlest(most, now, count)
            if not victims and room:
                victims = self._least_useful(most, now)
            for victim in victims:
                victim.factory._close(victim)
                victim.factory.share_evicted += 1
            closed = len(victims)
            admitted = bool(closed) and room
            holder, holds = biggest, len(most)
        else:
            closed = self._evict(own, now, count)
            if not closed and room:
                closed = self._evict_silent(own)
            admitted = bool(closed) and room
            holder, holds = peer, len(own)
            if room and not admitted:  # else the descriptors, not the share, refused it
                self.share_refused += 1
        self.incident(
            "share", now, f"{what}, shared between peers", closed=closed,
            refused=0 if admitted else 1,
            doing=f"the peer {holder} holds {holds} of the {total} connections, the most: "
            "closing its connections first (idle, then the request begun longest ago, "
            "never one being answered) for other peers' newcomers, and refusing its new "
            "ones rather than closing another peer's")
        return admitted

    @staticmethod
    def _least_useful(protocols, now: float) -> list:
        """Of an over-share peer's connections, the one least useful to keep: the one
        idle longest, or whose request began first, or silent longest (``idle_for``);
        never one being answered."""
        best = None
        longest = -1.0
        for p in protocols:
            idle = p.idle_for(now)
            if idle >= 0 and idle > longest:
                best, longest = p, idle
        return [] if best is None else [best]

    @staticmethod
    def _evict_silent(protocols) -> int:
        """Close the connection accepted first of those that have read nothing (and
        are not being closed already): 1 if there was one, else 0."""
        oldest = None
        first = 0
        for p in protocols:
            if (p.factory.evicting and p in p.factory.evicting) or not p.never_read():
                continue
            accepted = getattr(p, "accepted", 0)
            if oldest is None or accepted < first:
                oldest, first = p, accepted
        if oldest is None:
            return 0
        oldest.factory._close(oldest)
        return 1

    def _descriptor_limit(self, max_open: int) -> str:
        return (f"{max_open} connections for all listeners (RLIMIT_NOFILE less "
                f"{RESERVED_DESCRIPTORS} kept for the control socket and the store)")

    def _refuse_for_now(self, max_open: int) -> bool:
        """Room, but the descriptors of the connections being closed are not free yet."""
        self.incident("connections", self.reactor.seconds(),
                      self._descriptor_limit(max_open), refused=1)
        return False

    def buffer_changed(self, protocol, size: int) -> bool:
        """``protocol`` now buffers ``size`` bytes of an incomplete request.  False when
        that puts all listeners over ``max_buffered`` even after closing the connections
        idle longest and what the per-peer share allows (``_buffer_share``): the
        protocol then answers 4xx and closes (``evict()``)."""
        limits = self.limits
        grown = size - protocol.buffered
        limits.buffered += grown
        protocol.buffered = size
        # A request giving bytes back never needs room (a connection closed for a limit
        # does, from its ``evict()``, while the total may still be over).
        if limits.buffered <= limits.max_buffered or grown <= 0:
            return True
        now = self.reactor.seconds()
        closed = 0
        for victim in self._idlest((p for p in limits.connections()
                                    if p.buffered and p is not protocol), now):
            victim.factory._close(victim)
            closed += 1
            if limits.buffered <= limits.max_buffered:
                break
        what = (f"max_buffered = {limits.max_buffered} bytes of incomplete requests for "
                "all listeners")
        if limits.buffered > limits.max_buffered:
            shared = self._buffer_share(protocol, now, what, closed)
            if shared is not None:
                return shared
        fits = limits.buffered <= limits.max_buffered
        self.incident("buffered", now, what, closed=closed, refused=0 if fits else 1)
        return fits

    def _buffer_share(self, protocol, now: float, what: str, closed: int) -> bool | None:
        """The per-peer share of ``max_buffered``, for ``protocol``'s request that does
        not fit: whether it now fits, ``None`` when no other peer holds buffered bytes
        (the limit then as for one peer).  Each peer holding bytes may hold an equal
        share of them; while the requester's peer is within its share, the peers over
        theirs lose their incomplete requests, of the peer holding the most the
        largest first, even one begun within the second (never one being answered),
        until the request fits; a request of a peer over its share is refused rather
        than close another peer's.  Nothing is closed unless the request then fits."""
        limits = self.limits
        held = _by_peer(p for p in limits.connections() if p.buffered)
        peer = peer_of(protocol)
        own = held.pop(peer, [])
        if not held:
            return None
        if protocol not in own:
            own.append(protocol)
        bytes_of = {q: sum(p.buffered for p in ps) for q, ps in held.items()}
        mine = sum(p.buffered for p in own)
        total = mine + sum(bytes_of.values())
        holder, holds = max(bytes_of.items(), key=lambda item: item[1])
        if mine > holds:
            holder, holds = peer, mine
        share = limits.max_buffered // (len(held) + 1)
        victims = []
        if mine <= share:
            # Their closable requests, smallest first, so that ``pop`` takes the largest.
            closable = {q: sorted((p for p in ps if p.idle_for(now) >= 0),
                                  key=lambda p: p.buffered)
                        for q, ps in held.items()}
            excess = limits.buffered - limits.max_buffered
            while excess > 0:
                over = [q for q in closable if closable[q] and bytes_of[q] > share]
                if not over:
                    victims = []  # closing them would not make room: refused
                    break
                biggest = max(over, key=bytes_of.__getitem__)
                victim = closable[biggest].pop()
                bytes_of[biggest] -= victim.buffered
                excess -= victim.buffered
                victims.append(victim)
        for victim in victims:
            victim.factory._close(victim)
            victim.factory.share_evicted += 1
        fits = limits.buffered <= limits.max_buffered
        if not fits and mine > share:  # else peers within their shares hold it all
            self.share_refused += 1
        self.incident(
            "buffered share", now, f"{what}, shared between peers",
            closed=closed + len(victims), refused=0 if fits else 1,
            doing=f"the peer {holder} holds {holds} of the {total} bytes buffered, the most: "
            "closing its incomplete requests first (the largest first, even one begun "
            "within the second, never one being answered) for other peers' requests, "
            "and refusing its requests that do not fit rather than closing another peer's")
        return fits

    @staticmethod
    def _idlest(protocols, now: float, count: int | None = None) -> list:
        """The protocols idle at least ``EVICT_MIN_IDLE`` s, idle longest first."""
        candidates = []
        for p in protocols:
            if p.factory.evicting and p in p.factory.evicting:
                continue
            idle = p.idle_for(now)
            if idle >= EVICT_MIN_IDLE:
                candidates.append((idle, id(p), p))
        if count is None:
            candidates.sort(reverse=True)
            return [p for _, _, p in candidates]
        return [p for _, _, p in heapq.nlargest(count, candidates)]

    def _evict(self, protocols, now: float, count: int) -> int:
        victims = self._idlest(protocols, now, count)
        for victim in victims:
            victim.factory._close(victim)
        return len(victims)

    def _close(self, protocol) -> None:
        """Close one connection for a limit (it stays counted until it is gone)."""
        self.evicting.add(protocol)
        self.evicted += 1
        self.limits.buffered -= protocol.buffered
        protocol.buffered = 0
        protocol.evict()

    def incident(self, key: str, now: float, what: str, *, closed: int = 0,
                 refused: int = 0, doing: str | None = None) -> None:
        """Count one limit event; the first of an incident logs a line."""
        self.refused += refused
        incident = self.incidents.get(key)
        if incident is None:
            incident = self.incidents[key] = _Incident(what, now)
            if self._sweeping is None:
                self._start_sweeping()  # its summary comes from a sweep
            _limits_log.warn(
                "{listener}: at {limit}: {doing} (one summary follows when it is over)",
                listener=self.name, limit=what, incident=key,
                doing=doing or "closing the connections idle longest (else the oldest "
                "that sent nothing) and refusing what does not fit")
        incident.last = now
        incident.closed += closed
        incident.refused += refused

    def end_incidents(self, now: float, force: bool = False) -> None:
        for key, incident in list(self.incidents.items()):
            if force or now - incident.last >= INCIDENT_QUIET:
                del self.incidents[key]
                _limits_log.warn(
                    "{listener}: {limit}: over after {duration:.0f} s; {closed} connections "
                    "closed, {refused} refused",
                    listener=self.name, limit=incident.what,
                    duration=incident.last - incident.started, closed=incident.closed,
                    refused=incident.refused, incident=key)

    def untrack(self, protocol) -> None:
        if protocol in self.connections and self.max_connections is not None:
            if protocol.buffered:
                self.limits.buffered -= protocol.buffered
                protocol.buffered = 0
            self.evicting.discard(protocol)
        self.connections.discard(protocol)
        if not self.connections and self._drained:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(0)

    def drain(self, grace: float) -> defer.Deferred:
        """Ask every connection to finish; abort what is still open after ``grace`` s.
        Fires with the number of connections aborted."""
        self.closing = True
        for protocol in list(self.connections):
            protocol.shutdown()
        if not self.connections:
            return defer.succeed(0)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        call = self.reactor.callLater(grace, self._abort_all, d)

        def cancel_timer(result):
            if call.active():
                call.cancel()
            return result
        d.addBoth(cancel_timer)
        return d

    def _abort_all(self, d: defer.Deferred) -> None:
        remaining = list(self.connections)
        for protocol in remaining:
            protocol.transport.abortConnection()
        if d in self._drained:
            self._drained.remove(d)
            d.callback(len(remaining))


class DecidingFactory(TrackingFactory):
    """The factory of an MTA listener: answers from the ``Decider`` and writes one
    decision line per answer through ``decision_log``.

    ``moderation``: the daemon's ``ModerationService`` (SMTP-time moderation), set by the
    service; ``None`` (tests, policyctl) leaves every answer as the Decider gave it.

    Each protocol's ``answer`` catches any exception after the decision and answers
    ``answer_failed``: in its own body, not in a wrapper here, which would cost every
    request a Python call."""

    moderation = None

    def __init__(self, decider, config, reactor, decision_log=None) -> None:
        from ..logging import DecisionLog

        super().__init__(reactor)
        self.decider = decider
        self.config = config
        self.decision_log = decision_log if decision_log is not None else DecisionLog()

    def answer_failed(self, error: Exception, protocol: str, query=None,
                      decided=()) -> bytes:
        """The answer to a request whose answering raised ``error`` (moderation, the
        decision line, the reply's text: whatever follows ``Decider.decide``, which
        never raises), called in the ``except`` block that caught it: as an exception
        inside the decision is, logged once per incident (``Decider.failed``), counted
        as ``error`` and answered with the configured temporary failure, so that a bug
        on the answer path is a 4xx, never a dropped connection nor one traceback per
        request.  ``decided``: the answers ``Decider.decide`` gave (and counted) for the
        request, counted instead as this one ``error``."""
        decider = self.decider
        decider.failed(error, protocol, query, "answering")
        decider.uncount(protocol, decided)
        reply = decider.policy.error()
        decider.count(protocol, "error", reply.outcome._value_)
        return self.error_answer(reply)

    @staticmethod
    def error_answer(reply) -> bytes:
        """The temporary failure ``reply`` as the protocol's answer bytes."""
        raise NotImplementedError
