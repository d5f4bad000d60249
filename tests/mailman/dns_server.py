"""A small authoritative DNS server for the DMARC agreement cases (twisted.names).

Run with policyd's Python (it needs Twisted); reads the zone as JSON on standard input
and prints ``PORT <n>`` once it listens on 127.0.0.1 (UDP and TCP, the same free port):

    {"records": {"_dmarc.a.example": [["TXT", "v=DMARC1; p=reject"], ...],
                 "_dmarc.b.example": [["CNAME", "policy.a.example"]]},
     "servfail": ["_dmarc.broken.example"],
     "refused": ["_dmarc.refusing.example"]}

A name with records answers them in the order given (several TXT records are one RRset,
answered in that order), a CNAME is followed inside the zone (its target's records are in
the same answer, as an authoritative server answers; names are sent as latin-1 bytes, so
``\u00ff`` is the byte 0xff), any other name is NXDOMAIN, a name
listed in ``servfail``/``refused`` gets that rcode.  Both Mailman's dnspython (in the
oracle) and policyd's Twisted client ask it.  It stops when standard input closes.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, reactor, stdio
from twisted.internet.protocol import Protocol
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase


class Zone(ResolverBase):
    def __init__(self, zone: dict) -> None:
        super().__init__()
        self.records = {name.lower(): rows for name, rows in zone.get("records", {}).items()}
        self.servfail = {name.lower() for name in zone.get("servfail", ())}
        self.refused = {name.lower() for name in zone.get("refused", ())}

    def _lookup(self, name, cls, type, timeout):
        key = name.decode() if isinstance(name, bytes) else str(name)
        key = key.lower().rstrip(".")
        if key in self.servfail:
            return defer.fail(error.DNSServerError(key))
        if key in self.refused:
            return defer.fail(error.DNSQueryRefusedError(key))
        answers = []
        seen = set()
        current = key
        while current in self.records and current not in seen:
            seen.add(current)
            target = None
            for kind, value in self.records[current]:
                # Names as bytes, one per character (latin-1): a name with bytes
                # that are not ASCII is sent as such, as anyone may publish one.
                owner = current.encode("latin-1")
                if kind == "CNAME":
                    answers.append(dns.RRHeader(owner, dns.CNAME, ttl=60, auth=True,
                                                payload=dns.Record_CNAME(
                                                    value.encode("latin-1"), ttl=60)))
                    target = value.lower().rstrip(".")
                elif kind == "TXT" and type in (dns.TXT, dns.ALL_RECORDS):
                    answers.append(dns.RRHeader(owner, dns.TXT, ttl=60, auth=True,
                                                payload=dns.Record_TXT(value.encode(),
                                                                       ttl=60)))
            if target is None:
                break
            current = target
        if not answers and key not in self.records:
            return defer.fail(error.AuthoritativeDomainError(key))
        return defer.succeed((answers, [], []))


class Refusing(server.DNSServerFactory):
    """Maps DNSQueryRefusedError to REFUSED and DNSServerError to SERVFAIL (the factory
    answers NXDOMAIN for every DomainError, which both are)."""

    def gotResolverError(self, failure, protocol, message, address):
        for kind, rcode in ((error.DNSQueryRefusedError, dns.EREFUSED),
                            (error.DNSServerError, dns.ESERVER)):
            if failure.check(kind):
                response = self._responseFromMessage(message=message, rCode=rcode)
                self.sendReply(protocol, response, address)
                return
        return super().gotResolverError(failure, protocol, message, address)


class Stop(Protocol):
    def connectionLost(self, reason):
        if reactor.running:
            reactor.stop()


def main() -> None:
    zone = json.loads(sys.stdin.readline())
    factory = Refusing(authorities=[Zone(zone)])
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    port = udp.getHost().port
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    stdio.StandardIO(Stop())
    reactor.run()


if __name__ == "__main__":
    main()
