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

``--lookup STORE.sqlite``: the same servers doing policyd's core lookup instead of
answering a constant: the members of every list are read from the store once (a dict of
posting address -> frozenset of addresses, address strings shared between lists), and
each request is answered by one set probe: Exim decodes ``list=`` (the first list) and
the base64 ``sender=``, Postfix takes ``recipient=`` and ``sender=`` from the block; a
member is accepted (``ACCEPT`` / ``action=DUNNO``), anybody else rejected.  A DATA-ACL
line with the message (``headers=``, ``body=``, ``size=``, ``client=``; several KB) is
read whole and split into its words like any other, and answered by the same lookup:
the message is not decoded (``bench.headermix`` lines get the answers of their
``exim.txt`` twins).  No rules,
headers, moderation, logging or counters: the floor a Twisted server doing this job stands
on, which the open-loop tail targets compare policyd with.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sqlite3
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from zope.interface import implementer  # noqa: E402

EXIM_REPLY = b"ACCEPT 250 2.1.5 accept"
EXIM_REJECT = b"REJECT 550 5.7.1 not a member"
POSTFIX_REPLY = b"action=DUNNO\n\n"
POSTFIX_REJECT = b"action=550 5.7.1 not a member\n\n"

#: posting address -> frozenset of member addresses (``--lookup``); empty: constant answers
MEMBERS: dict = {}
_NOBODY: frozenset = frozenset()


def load_members(path: str) -> int:
    """Fill ``MEMBERS`` from a policyd SQLite store; the number of memberships."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    shared: dict = {}
    lists: dict = {}
    rows = db.execute("SELECT l.posting_address, a.email FROM memberships m "
                      "JOIN lists l ON l.id = m.list_id "
                      "JOIN addresses a ON a.id = m.address_id WHERE m.role = 1")
    count = 0
    for address, email in rows:
        lists.setdefault(address.lower(), []).append(shared.setdefault(email, email))
        count += 1
    db.close()
    MEMBERS.update((k, frozenset(v)) for k, v in lists.items())
    return count


def is_member(list_address: bytes, sender: bytes) -> bool:
    members = MEMBERS.get(list_address.decode("utf-8", "replace").lower(), _NOBODY)
    return sender.decode("utf-8", "replace").lower() in members


def exim_reply(line: bytes) -> bytes:
    """``POLICYD/1 list=a[,b] sender=<b64> ...``: the first list, the envelope sender."""
    if not MEMBERS:
        return EXIM_REPLY
    fields = dict(part.split(b"=", 1) for part in line.split()[1:] if b"=" in part)
    try:
        sender = base64.b64decode(fields.get(b"sender", b""))
    except (binascii.Error, ValueError):
        sender = b""
    return EXIM_REPLY if is_member(fields.get(b"list", b"").split(b",")[0], sender) \
        else EXIM_REJECT


def postfix_reply(block: bytes) -> bytes:
    attributes = dict(line.split(b"=", 1) for line in block.split(b"\n") if b"=" in line)
    return POSTFIX_REPLY if is_member(attributes.get(b"recipient", b""),
                                      attributes.get(b"sender", b"")) else POSTFIX_REJECT


@implementer(IHalfCloseableProtocol)
class EximConstant(Protocol):
    answered = False
    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        if MEMBERS:
            self.buffer += data
        if b"\n" in data:
            self.answer()

    def readConnectionLost(self) -> None:
        if not self.answered:
            self.answer()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def answer(self) -> None:
        self.answered = True
        self.transport.write(exim_reply(self.buffer.split(b"\n", 1)[0]))
        self.transport.loseConnection()


class PostfixConstant(Protocol):
    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data
        if buffer.startswith(b"\n"):
            buffer = buffer[1:]
        if MEMBERS:
            blocks = buffer.split(b"\n\n")
            self.buffer = blocks.pop()
            if blocks:
                self.transport.write(b"".join(map(postfix_reply, blocks)))
            return
        requests = buffer.count(b"\n\n")
        if requests:
            buffer = buffer[buffer.rfind(b"\n\n") + 2:]
            self.transport.write(POSTFIX_REPLY * requests)
        self.buffer = buffer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refserver")
    parser.add_argument("--exim", action="append", default=[])
    parser.add_argument("--postfix", action="append", default=[])
    parser.add_argument("--lookup", metavar="STORE",
                        help="a policyd SQLite store: answer by membership, not a constant")
    args = parser.parse_args(argv)
    if args.lookup:
        load_members(args.lookup)
        import gc

        gc.collect()
        gc.freeze()  # as policyd does after its first load: the sets are never rescanned
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
