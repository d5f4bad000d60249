"""DMARC policy lookups for ``dmarc-mitigation``: Twisted's DNS client, a bounded cache.

``DmarcLookup.known(name)`` is what the pure rule (``core.dmarc``) reads, synchronously,
from the cache; ``lookup(names)`` asks the name servers (``twisted.names.client``, never
blocking the reactor) and fires when every name has an answer in the cache, whatever
happened: a timeout or any DNS error other than NXDOMAIN is cached as an ``error`` answer,
which the rule treats as Mailman does (mitigate).  The decider calls ``lookup`` for the
names a ``core.dmarc.LookupNeeded`` names and decides again.

The cache keeps an answer ``ttl`` seconds (a failure ``failure_ttl``), at most
``max_entries`` names (least recently used out first).  Queries for a name already in
flight share its query.  A failing resolver is logged once per incident: at the first
failure, and again when a lookup succeeds after it, with the count of failures between.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError

from .core.dmarc import DnsAnswer, NOANSWER, NXDOMAIN, PublicSuffixList

__all__ = ["DmarcLookup", "from_config", "nameservers_from_resolv_conf",
           "public_suffixes", "to_answer"]

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


def to_answer(name: str, answers) -> DnsAnswer:
    """The answer section of a TXT query for ``name`` (``RRHeader``s), grouped as
    dnspython groups it: one entry per (owner, type), its first record, in order.
    No TXT at the end of the CNAME chain is ``noanswer`` (dnspython's NoAnswer)."""
    rrsets: list[tuple[str, str, object]] = []
    seen = set()
    for rr in answers:
        if rr.type not in (dns.TXT, dns.CNAME):
            continue
        owner = str(rr.name).lower() + "."
        kind = "TXT" if rr.type == dns.TXT else "CNAME"
        if (owner, kind) in seen:
            continue
        seen.add((owner, kind))
        if kind == "TXT":
            rrsets.append((owner, kind, b"".join(rr.payload.data)))
        else:
            # The target as sent: Mailman compares it with the lower-cased owners.
            rrsets.append((owner, kind, str(rr.payload.name) + "."))
    owners = {(owner, kind): value for owner, kind, value in rrsets}
    want, hops = name.lower() + ".", 0
    while (want, "TXT") not in owners and (want, "CNAME") in owners and hops < 16:
        want, hops = owners[want, "CNAME"].lower(), hops + 1
    if (want, "TXT") not in owners:
        return NOANSWER
    return DnsAnswer("ok", tuple(rrsets))


class DmarcLookup:
    """The cache ``core.dmarc`` reads and the lookups that fill it."""

    def __init__(self, reactor, suffixes, *, resolver=None,
                 servers=(), timeout: float = 2.0, ttl: float = 3600.0,
                 failure_ttl: float = 60.0, max_entries: int = 10000) -> None:
        self.reactor = reactor
        # A ``PublicSuffixList`` (the daemon's, read at start-up by ``from_config``) or the
        # path of its file, read at the first use.
        self._suffixes = suffixes
        if resolver is None:
            from twisted.names.client import Resolver
            resolver = Resolver(servers=list(servers), reactor=reactor)
        self.resolver = resolver
        # Two tries (the second after half the time): a lost datagram is not a failure.
        self.timeout = (timeout / 2, timeout / 2)
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[DnsAnswer, float]] = OrderedDict()
        self._flight: dict[str, list[Deferred]] = {}
        self._failures = 0            # failures in the current incident (0: none)
        self.counts = {"lookups": 0, "failures": 0, "hits": 0}

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
            self._store(name, DnsAnswer("error", detail=f"not a DNS name "
                                        f"({type(error).__name__})"), self.failure_ttl)
            return done
        d.addCallbacks(lambda result: self._answered(name, to_answer(name, result[0])),
                       lambda failure: self._failed(name, failure))
        d.addErrback(lambda failure: log.failure("DMARC lookup of {name} went wrong",
                                                 failure, name=name))
        return done

    def _answered(self, name: str, answer: DnsAnswer) -> None:
        if self._failures:
            log.info("DMARC lookups answer again ({name}) after {count} failures",
                     name=name, count=self._failures)
            self._failures = 0
        self._store(name, answer, self.ttl)

    def _failed(self, name: str, failure) -> None:
        if failure.check(DNSNameError):
            self._answered(name, NXDOMAIN)
            return
        self.counts["failures"] += 1
        detail = failure.type.__name__
        if not self._failures:
            log.warn("DMARC lookup of {name} failed ({error}): posts From: such a domain "
                     "to lists that reject or discard get the temporary failure; further "
                     "failures are counted until a lookup succeeds", name=name, error=detail)
        self._failures += 1
        self._store(name, DnsAnswer("failed", detail=detail), self.failure_ttl)

    def _store(self, name: str, answer: DnsAnswer, ttl: float) -> None:
        self._cache[name] = (answer, self.reactor.seconds() + ttl)
        self._cache.move_to_end(name)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        for d in self._flight.pop(name, ()):
            d.callback(None)


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
