"""The framework's ceiling: bare Twisted servers that answer a constant (benchmark reference).

Same socket types and framing as policyd, no decision, no logging:

* Exim shape: answer at the first newline or at the client's half-close, then close;
* Postfix shape: answer every request block (ended by an empty line) on a persistent
  connection.

Both parse nothing and split the buffer in one go (``Protocol.dataReceived``), the
cheapest way to do it in Twisted, so policyd's ratio against them is its ratio against
Twisted itself.  Run: ``python -m bench.refserver --exim unix:/p/e.sock --postfix
unix:/p/p.sock --postfix tcp:10041:interface=127.0.0.1``; it prints ``ready`` once
listening.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from zope.interface import implementer  # noqa: E402

EXIM_REPLY = b"ACCEPT 250 2.1.5 accept"
POSTFIX_REPLY = b"action=DUNNO\n\n"


@implementer(IHalfCloseableProtocol)
class EximConstant(Protocol):
    answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered and b"\n" in data:
            self.answer()

    def readConnectionLost(self) -> None:
        if not self.answered:
            self.answer()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def answer(self) -> None:
        self.answered = True
        self.transport.write(EXIM_REPLY)
        self.transport.loseConnection()


class PostfixConstant(Protocol):
    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data
        if buffer.startswith(b"\n"):
            buffer = buffer[1:]
        requests = buffer.count(b"\n\n")
        if requests:
            buffer = buffer[buffer.rfind(b"\n\n") + 2:]
            self.transport.write(POSTFIX_REPLY * requests)
        self.buffer = buffer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refserver")
    parser.add_argument("--exim", action="append", default=[])
    parser.add_argument("--postfix", action="append", default=[])
    args = parser.parse_args(argv)
    pending = []
    for descriptions, protocol in ((args.exim, EximConstant), (args.postfix, PostfixConstant)):
        for description in descriptions:
            endpoint = serverFromString(reactor, description)
            pending.append(endpoint.listen(Factory.forProtocol(protocol)))

    from twisted.internet.defer import gatherResults

    def ready(_):
        print("ready", flush=True)

    def failed(failure):
        print(f"listen failed: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    gatherResults(pending, consumeErrors=True).addCallbacks(ready, failed)
    reactor.run()


if __name__ == "__main__":
    main()
