"""DMARC policy lookups for ``dmarc-mitigation``: Twisted's DNS client, a bounded cache.

``DmarcLookup.known(name)`` is what the pure rule (``core.dmarc``) reads, synchronously,
from the cache; ``lookup(names)`` asks the name servers (``twisted.names.client``, never
blocking the reactor) and fires when every name has an answer in the cache, whatever
happened: a timeout or any DNS error other than NXDOMAIN is cached as an ``error`` answer,
which the rule treats as Mailman does (mitigate).  The decider calls ``lookup`` for the
names a ``core.dmarc.LookupNeeded`` names and decides again.

The cache keeps an answer ``ttl`` seconds (a failure ``failure_ttl``), at most
``max_entries`` names (least recently used out first).  Queries for a name already in
flight share its query.  Whatever happens to a lookup (an answer, a DNS error, no answer
within ``timeout`` seconds, counting a TCP retry after a truncated answer, or an exception
anywhere in reading the answer) it ends with an answer in the cache and every waiter
fired: the slot it held is always given back (``_settle``, on every path).

A failing resolver is logged once per incident (``Incidents``: the first failure of each
kind warns, the rest are summed up once a minute); the incident ends, with one line
saying how many failed, at the first success after ``QUIET`` seconds without a failure:
a sender alternating a failing domain and a working one does not toggle it.  An answer
whose sections hold fewer records than its header counts (or bytes after them) is a
failure (``DNSFormatError``), not "no record": dnspython raises on it, and Mailman
mitigates.
"""

from __future__ import annotations

import errno
import struct
from collections import Counter, OrderedDict
from io import BytesIO
from pathlib import Path

from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from .core.dmarc import DnsAnswer, NOANSWER, NXDOMAIN, PublicSuffixList
from .decider import Incidents, _raised_at

__all__ = ["DmarcLookup", "Resolver", "from_config", "malformed", "name_text",
           "nameservers_from_resolv_conf", "public_suffixes", "to_answer"]

log = Logger(namespace="policyd.dmarc")


def nameservers_from_resolv_conf(path="/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf(5) file, port 53 (read once, at
    start-up)."""
    servers = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return servers
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append((words[1].split("%")[0], 53))
    return servers


def public_suffixes(path) -> PublicSuffixList:
    """The public suffix list from ``path``; an unreadable file gives an empty list (the
    organizational domain is then the last two labels) and a warning."""
    try:
        return PublicSuffixList.from_file(path)
    except OSError as error:
        log.warn("DMARC: cannot read the public suffix list {path}: {error}; the "
                 "organizational domain is taken as the last two labels",
                 path=str(path), error=error.strerror or str(error))
        return PublicSuffixList()


_ESCAPED = frozenset(b'"().;\\@$')
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in _ESCAPED) + b"."


def name_text(name) -> str:
    """A Twisted ``dns.Name`` as dnspython's ``Name.to_text()`` writes it, final dot
    included: what Mailman reads.  Printable ASCII as is, ``"().;\\@$`` after a
    backslash, any other byte as ``\\DDD`` (``str(name)`` raises UnicodeDecodeError for
    a byte that is not ASCII, which anyone can publish in a CNAME target)."""
    raw = name.name if isinstance(name, dns.Name) else name
    if not raw.translate(None, _PLAIN):
        return raw.decode("ascii") + "."  # the usual name: nothing to escape
    labels = []
    for label in raw.split(b"."):
        text = []
        for c in label:
            if c in _ESCAPED:
                text.append("\\" + chr(c))
            elif 0x20 < c < 0x7F:
                text.append(chr(c))
            else:
                text.append(f"\\{c:03d}")
        labels.append("".join(text))
    return ".".join(labels) + "."


def to_answer(name: str, answers) -> DnsAnswer:
    """The answer section of a TXT query for ``name`` (``RRHeader``s), grouped as
    dnspython groups it: one entry per (owner, type), its first record, in order, names
    written as dnspython writes them (``name_text``).
    No TXT at the end of the CNAME chain is ``noanswer`` (dnspython's NoAnswer)."""
    rrsets: list[tuple[str, str, object]] = []
    seen = set()
    for rr in answers:
        if rr.type not in (dns.TXT, dns.CNAME):
            continue
        owner = name_text(rr.name).lower()
        kind = "TXT" if rr.type == dns.TXT else "CNAME"
        if (owner, kind) in seen:
            continue
        seen.add((owner, kind))
        if kind == "TXT":
            rrsets.append((owner, kind, b"".join(rr.payload.data)))
        else:
            # The target as sent: Mailman compares it with the lower-cased owners.
            rrsets.append((owner, kind, name_text(rr.payload.name)))
    owners = {(owner, kind): value for owner, kind, value in rrsets}
    want, hops = name.lower() + ".", 0
    while (want, "TXT") not in owners and (want, "CNAME") in owners and hops < 16:
        want, hops = owners[want, "CNAME"].lower(), hops + 1
    if (want, "TXT") not in owners:
        return NOANSWER
    return DnsAnswer("ok", tuple(rrsets))


def malformed(data: bytes) -> str | None:
    """Why a DNS message does not hold what its header counts (dnspython raises
    ``FormError`` or ``TrailingJunk`` on it), or ``None``.  A truncated answer (TC) may
    hold less: the TCP retry reads it; one Twisted cannot read at all it drops itself (the
    query times out)."""
    message = dns.Message()
    stream = BytesIO(data)
    try:
        message.decode(stream)
    except Exception:
        return None
    if message.trunc:
        return None
    counts = struct.unpack("!4H", data[4:12])
    held = (len(message.queries), len(message.answers), len(message.authority),
            len(message.additional))
    if held != counts:
        return f"{sum(counts) - sum(held)} fewer records than its header counts"
    if stream.tell() != len(data):
        return f"{len(data) - stream.tell()} bytes after the records"
    return None


def _as_format_error(data: bytes) -> bytes:
    """``data`` with the response code FORMERR: Twisted then fails the query with a
    ``DNSFormatError`` (address checks and all), never "no record"."""
    if malformed(data) is None:
        return data
    return data[:3] + bytes([(data[3] & 0xF0) | dns.EFORMAT]) + data[4:]


class _CheckedDatagramProtocol(dns.DNSDatagramProtocol):
    def datagramReceived(self, data, addr):
        super().datagramReceived(_as_format_error(data), addr)


class _CheckedStreamProtocol(dns.DNSProtocol):
    def stringReceived(self, data):
        super().stringReceived(_as_format_error(data))


class _CheckedClientFactory(client.DNSClientFactory):
    def buildProtocol(self, addr):
        p = _CheckedStreamProtocol(self.controller)
        p.factory = self
        return p


class Resolver(client.Resolver):
    """Twisted's resolver with policyd's own UDP client (``queryUDP``), which reads every
    answer through ``malformed`` and fails a malformed one, and the TCP retry after a
    truncated answer given ``tcp_timeout`` seconds (Twisted's default is 10 s, beyond any
    SMTP client's patience).

    Only public Twisted API: ``queryUDP`` and ``queryTCP`` are the documented methods
    ``client.Resolver``'s lookups send their queries through (tests/test_dmarc.py pins
    that they still do: were one bypassed, answers would be read unchecked), and the UDP
    client is made of ``dns.DNSDatagramProtocol``, ``dns.randomSource`` and the reactor's
    ``listenUDP``, as Twisted's own is."""

    # Random source ports tried before a try gives up, as Twisted's client does: one in
    # use or privileged is refused, a descriptor limit (EMFILE) ends it at once.
    PORT_ATTEMPTS = 1000

    def __init__(self, *args, reactor=None, tcp_timeout: float = 2.0, **kwargs) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(*args, reactor=reactor, **kwargs)
        self.reactor = reactor
        self.tcp_timeout = tcp_timeout
        self.factory = _CheckedClientFactory(self, tcp_timeout)
        self.factory.noisy = False

    def queryUDP(self, queries, timeout=None):
        """Twisted's tries: each server in turn with the first timeout, then each again
        with the next, a retry keeping the query's id; all timed out, Twisted's
        ``TimeoutError``."""
        addresses = self.servers + list(self.dynServers)
        if not addresses:
            return fail(IOError("No domain name servers available"))
        tries = iter([(address, seconds)
                      for seconds in (self.timeout if timeout is None else timeout)
                      for address in addresses])

        def again(reason):
            reason.trap(dns.DNSQueryTimeoutError)
            following = next(tries, None)
            if following is None:
                return Failure(defer.TimeoutError(queries))
            return self._try(*following, queries, reason.value.id).addErrback(again)
        return self._try(*next(tries), queries).addErrback(again)

    def _try(self, address, seconds, queries, id=None) -> Deferred:
        """One datagram query from a socket of its own on a random port (the source port
        an off-path spoofer must guess), closed when the try ends however it ends."""
        protocol = _CheckedDatagramProtocol(self, reactor=self.reactor)
        interface = "::" if isIPv6Address(address[0]) else ""
        for attempt in range(self.PORT_ATTEMPTS):
            try:
                port = self.reactor.listenUDP(dns.randomSource(), protocol,
                                              interface=interface)
                break
            except CannotListenError as error:
                # Failed, not raised: Twisted's own raises, past the resolver's
                # bookkeeping of the name (later lookups of it would wait for nothing).
                if (getattr(error.socketError, "errno", None) == errno.EMFILE
                        or attempt == self.PORT_ATTEMPTS - 1):
                    return fail()

        def closed(result):
            port.stopListening()
            return result
        return protocol.query(address, queries, seconds, id).addBoth(closed)

    def queryTCP(self, queries, timeout=None):
        return super().queryTCP(queries, self.tcp_timeout if timeout is None else timeout)


class DmarcLookup:
    """The cache ``core.dmarc`` reads and the lookups that fill it."""

    # Seconds without a failure before a success ends an incident of the resolver.
    QUIET = 300.0

    def __init__(self, reactor, suffixes, *, resolver=None,
                 servers=(), timeout: float = 2.0, ttl: float = 3600.0,
                 failure_ttl: float = 60.0, max_entries: int = 10000) -> None:
        self.reactor = reactor
        # A ``PublicSuffixList`` (the daemon's, read at start-up by ``from_config``) or the
        # path of its file, read at the first use.
        self._suffixes = suffixes
        if resolver is None:
            resolver = Resolver(servers=list(servers), reactor=reactor,
                                tcp_timeout=timeout)
        self.resolver = resolver
        # Two tries (the second after half the time): a lost datagram is not a failure.
        self.timeout = (timeout / 2, timeout / 2)
        # The whole lookup, a TCP retry included: then it is a failure (``TimeoutError``).
        self.deadline = timeout
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[DnsAnswer, float]] = OrderedDict()
        self._flight: dict[str, list[Deferred]] = {}
        self._failures = 0            # failures in the current incident (0: none)
        self._last_failure = 0.0
        self.counts = {"lookups": 0, "failures": 0, "hits": 0}
        # The first failure of each kind per incident is logged, the rest summed up.
        self.incidents = Incidents(self._failures_left_out, quiet=self.QUIET,
                                   clock=reactor)
        # An exception in reading an answer (a bug, or an answer nobody foresaw).
        self.errors = Incidents(self._errors_left_out, clock=reactor)

    @property
    def suffixes(self) -> PublicSuffixList:
        if not isinstance(self._suffixes, PublicSuffixList):
            self._suffixes = public_suffixes(self._suffixes)
        return self._suffixes

    def known(self, name: str) -> DnsAnswer | None:
        """The cached answer for ``name``, or ``None`` (never looked up, or expired)."""
        entry = self._cache.get(name)
        if entry is None:
            return None
        answer, expires = entry
        if expires <= self.reactor.seconds():
            del self._cache[name]
            return None
        self.counts["hits"] += 1
        # The most recently used now: the cache evicts the least recently used name.
        self._cache.move_to_end(name)
        return answer

    def lookup(self, names) -> Deferred:
        """Look up every name not known yet; fires (with ``None``) when all are cached.
        Never fails."""
        waiting = [self._one(name) for name in names if self.known(name) is None]
        if not waiting:
            return succeed(None)
        return gatherResults(waiting).addCallback(lambda _: None)

    def _one(self, name: str) -> Deferred:
        done = Deferred()
        flight = self._flight.get(name)
        if flight is not None:
            flight.append(done)
            return done
        self._flight[name] = [done]
        self.counts["lookups"] += 1
        try:
            d = self.resolver.lookupText(name, timeout=self.timeout)
        except Exception as error:
            # No DNS name at all (bytes that are not ASCII in the From: domain): what
            # dnspython's IDNAException is to Mailman, an error (mitigate), not an
            # incident of the resolver.
            self._settle((DnsAnswer("error", detail=f"not a DNS name "
                                    f"({type(error).__name__})"), self.failure_ttl), name)
            return done
        try:
            # Cancelled at the deadline: Twisted's UDP tries, then its TCP retry.
            d.addTimeout(self.deadline, self.reactor)
            d.addCallbacks(self._read, self._failed, callbackArgs=(name,),
                           errbackArgs=(name,))
            d.addErrback(self._broken, name)
        finally:
            # On every path, even a callback that raised: the answer stored, the slot
            # given back, every waiter fired.
            d.addBoth(self._settle, name)
        return done

    def _read(self, result, name: str) -> tuple[DnsAnswer, float]:
        answer = to_answer(name, result[0])
        self._succeeded(name)
        return answer, self.ttl

    def _succeeded(self, name: str) -> None:
        if self._failures and self.reactor.seconds() - self._last_failure >= self.QUIET:
            log.info("DMARC lookups answer again ({name}) after {count} failures",
                     name=name, count=self._failures)
            self._failures = 0

    def _failed(self, failure, name: str) -> tuple[DnsAnswer, float]:
        if failure.check(DNSNameError):
            self._succeeded(name)
            return NXDOMAIN, self.ttl
        self.counts["failures"] += 1
        detail = failure.type.__name__
        if self.incidents.first(detail):
            log.warn("DMARC lookup of {name} failed ({error}): posts From: such a domain "
                     "to lists that reject or discard get the temporary failure; further "
                     "failures are counted, and summed up once a minute, until lookups "
                     "answer again", name=name, error=detail)
        self._failures += 1
        self._last_failure = self.reactor.seconds()
        return DnsAnswer("failed", detail=detail), self.failure_ttl

    def _broken(self, failure, name: str) -> tuple[DnsAnswer, float]:
        """An exception in reading the answer: the temporary failure for the post (it is
        doubt), the traceback logged once per incident."""
        where = _raised_at(failure.value)[0]
        if self.errors.first(where):
            log.failure("DMARC: reading the answer for {name} failed ({where}): the "
                        "temporary failure for posts From: that domain (further ones are "
                        "counted, not logged)", failure, name=name, where=where)
        self.counts["failures"] += 1
        return DnsAnswer("failed", detail=f"error reading the answer: {where}"), \
            self.failure_ttl

    def _settle(self, result, name: str) -> None:
        try:
            if isinstance(result, tuple):
                answer, ttl = result
            else:  # cannot happen: every failure was read; doubt if it does
                answer, ttl = DnsAnswer("failed", detail="no answer"), self.failure_ttl
            self._store(name, answer, ttl)
        finally:
            for d in self._flight.pop(name, ()):
                d.callback(None)

    def _store(self, name: str, answer: DnsAnswer, ttl: float) -> None:
        self._cache[name] = (answer, self.reactor.seconds() + ttl)
        self._cache.move_to_end(name)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    @staticmethod
    def _failures_left_out(left_out: Counter, new: int, others: int, more: bool,
                           interval: float) -> None:
        log.warn("{count} more DMARC lookups failed in the last {interval:g} s ({kinds}): "
                 "each post From: such a domain to a list that rejects or discards got the "
                 "temporary failure", count=sum(left_out.values()), interval=interval,
                 kinds=", ".join(f"{kind}: {count}"
                                 for kind, count in left_out.most_common(10)))

    @staticmethod
    def _errors_left_out(left_out: Counter, new: int, others: int, more: bool,
                         interval: float) -> None:
        log.error("DMARC: reading an answer failed {count} more times in the last "
                  "{interval:g} s ({kinds}): each a temporary failure",
                  count=sum(left_out.values()), interval=interval,
                  kinds=", ".join(f"{where}: {count}"
                                  for where, count in left_out.most_common(10)))


def from_config(config, reactor, resolv_conf="/etc/resolv.conf") -> DmarcLookup:
    """The daemon's lookup from ``[dmarc]`` (``config.DmarcConfig``): its name servers,
    else those of ``resolv_conf``, else 127.0.0.1 (as the C library does), and the public
    suffix list, read here."""
    servers = list(config.nameservers) or nameservers_from_resolv_conf(resolv_conf) \
        or [("127.0.0.1", 53)]
    # Read now, at start-up (about 0.1 s for the whole list): never on the reactor.
    return DmarcLookup(reactor, public_suffixes(config.public_suffix_list), servers=servers,
                       timeout=config.timeout, ttl=config.cache_ttl,
                       failure_ttl=config.failure_ttl, max_entries=config.cache_size)
