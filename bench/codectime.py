"""Codec time against the request's size (issue 13: "linear time in the input size").

    python -m bench.codectime [SIZE ...]        (default 1024 8192 65536)

In-process, no sockets: the CPU time (``time.thread_time``) of parsing one request of
``SIZE`` bytes on the wire with policyd's own codecs, at the daemon's default limits
(``[exim] max_request``, ``[postfix] max_line``/``max_attributes``/``max_request``: a
64 KB request is the largest either accepts):

* ``exim``: ``policyd.protocols.exim.parse_request`` on a DATA-ACL line whose size is
  mostly its ``headers=`` (base64 of a header block of Received/DKIM/References fields,
  parsed as Mailman parses it) and a short ``body=``;
* ``postfix``: ``policyd.protocols.postfix.RequestReader.feed`` of a whole request (the
  29 attributes of Postfix 3.7 at RCPT and, to reach the size, extra attributes of up to
  4,000 bytes, which the codec reads and ignores) in one piece;
* ``postfix_chunked``: the same request fed 4 KiB at a time, as a socket delivers a big
  one (the reader keeps the incomplete request and must not search it again).

Eight different requests per size, best of five passes.  Prints JSON: microseconds per
request and nanoseconds per byte per codec and size, and ``ratio``: time(largest) /
time(the size before it) per codec (8 for linear when the sizes grow 8-fold).
"""

from __future__ import annotations

import base64
import json
import random
import string
import sys
import time

SIZES = (1024, 8192, 65536)
VARIANTS = 8
_B64 = string.ascii_letters + string.digits + "+/"


def _blob(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(_B64, k=n))


def _fields(rng: random.Random):
    """An endless stream of realistic header fields (folded where real ones are)."""
    n = 0
    while True:
        n += 1
        kind = rng.randrange(4)
        if kind == 0:
            yield (f"Received: from relay{n}.example.net ([198.51.100.{rng.randrange(1, 255)}])"
                   f"\n\tby mx{n}.lists.example.org with esmtps (TLS1.3)\n\t(Exim 4.97)"
                   f"\n\tid {_blob(rng, 16)}; Mon, 7 Dec 2026 10:{n % 60:02d}:00 +0000")
        elif kind == 1:
            yield (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=d{n}.example;"
                   f"\n\ts=s{n}; h=from:to:subject:date:message-id;\n\tbh={_blob(rng, 43)}=;"
                   f"\n\tb={_blob(rng, 72)}\n\t {_blob(rng, 72)}\n\t {_blob(rng, 72)}")
        elif kind == 2:
            yield "References: " + "\n ".join(f"<{_blob(rng, 20).replace('/', 'x')}@"
                                              f"mail{n}.example>" for _ in range(6))
        else:
            yield f"X-Spam-Report: {_blob(rng, 60)}\n\t{_blob(rng, 60)}"


def exim_request(size: int, rng: random.Random) -> bytes:
    """A request line of exactly ``size`` bytes (no newline)."""
    sender = base64.b64encode(b"alice.smith@example.com").decode()
    body = base64.b64encode(b"Hello,\n\nsee the minutes attached.\n").decode()
    head = f"POLICYD/1 list=list0001@lists.example.org sender={sender} from= reply_to= " \
           "sender_header= headers="
    tail = f" body={body} size={size} client=198.51.100.7 id=1tAbCd-EfGhIj-Kl"
    room = size - len(head) - len(tail)
    tail += "x" * (room % 4)  # the id takes what base64 cannot: its length is 4k
    room -= room % 4
    raw_size = room // 4 * 3  # a header block of this many bytes encodes to ``room``
    block = ("From: Alice Smith <alice.smith@example.com>\nTo: list0001@lists.example.org\n"
             "Subject: minutes\nMessage-ID: <m1@example.com>\n")
    for field in _fields(rng):
        if len(block) + len(field) + 1 > raw_size - 16:
            break
        block += field + "\n"
    block += "X-Pad: " + "p" * (raw_size - len(block) - len("X-Pad: \n")) + "\n"
    return (head + base64.b64encode(block.encode()).decode() + tail).encode()


_POSTFIX = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "client_address=198.51.100.7\nclient_name=mx7.sender.example\nclient_port=40123\n"
    "reverse_client_name=mx7.sender.example\nserver_address=192.0.2.25\nserver_port=25\n"
    "helo_name=mx7.sender.example\nsender=alice.smith@example.com\n"
    "recipient=list0001@lists.example.org\nrecipient_count=0\nqueue_id=\n"
    "instance=1a2b.5f0e3c21.7d2e1.0\nsize=0\netrn_domain=\nstress=\nsasl_method=\n"
    "sasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n"
    "ccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
    "encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n")


def postfix_request(size: int, rng: random.Random, max_line: int = 4096) -> bytes:
    """A request of exactly ``size`` bytes (at least 700) with its ending empty line."""
    room = size - 1 - len(_POSTFIX)  # for the extra attribute lines
    lines = max(1, -(-room // (max_line - 96)))
    extra = []
    for i in range(lines):
        share = room // lines + (1 if i < room % lines else 0)
        name = f"x_bench_{i + 1}="
        extra.append(name + _blob(rng, share - len(name) - 1) + "\n")
    return (_POSTFIX + "".join(extra) + "\n").encode()


def _time(fn, items, passes: int = 5, budget: float = 0.05) -> float:
    """Best microseconds of CPU per item over ``passes`` passes of at least ``budget``
    seconds each."""
    fn(items[0])  # imports, first-call costs
    start = time.thread_time()
    fn(items[0])
    once = max(time.thread_time() - start, 1e-6)
    repeat = max(1, int(budget / once / len(items)) + 1)
    best = float("inf")
    for _ in range(passes):
        start = time.thread_time()
        for _ in range(repeat):
            for item in items:
                fn(item)
        best = min(best, (time.thread_time() - start) / (repeat * len(items)))
    return best * 1e6


def measure(sizes=SIZES) -> dict:
    from policyd.config import parse
    from policyd.protocols import exim, postfix

    config = parse("")
    p = config.postfix
    rng = random.Random(13)

    def reader():
        return postfix.RequestReader(max_line=p.max_line, max_attributes=p.max_attributes,
                                     max_request=p.max_request)

    def postfix_whole(block: bytes) -> None:
        out = reader().feed(block)
        if len(out) != 1 or isinstance(out[0], Exception):
            raise SystemExit(f"bench.codectime: the Postfix request was not parsed: {out!r}")

    def postfix_chunked(block: bytes) -> None:
        r = reader()
        out = []
        for start in range(0, len(block), 4096):
            out += r.feed(block[start:start + 4096])
        if len(out) != 1 or isinstance(out[0], Exception):
            raise SystemExit(f"bench.codectime: the Postfix request was not parsed: {out!r}")

    def exim_parse(line: bytes) -> None:
        if len(line) > config.exim.max_request:
            raise SystemExit("bench.codectime: an Exim request over [exim] max_request")
        exim.parse_request(line)

    out: dict = {"sizes": list(sizes)}
    for name, build, fn in (("exim", exim_request, exim_parse),
                            ("postfix", postfix_request, postfix_whole),
                            ("postfix_chunked", postfix_request, postfix_chunked)):
        figures = {}
        for size in sizes:
            items = [build(size, rng) for _ in range(VARIANTS)]
            if any(len(item) != size for item in items):
                raise SystemExit(f"bench.codectime: {name} requests are not {size} bytes")
            us = _time(fn, items)
            figures[str(size)] = {"us": round(us, 2), "ns_per_byte": round(us * 1e3 / size, 2)}
        out[name] = figures
        last, before = str(sizes[-1]), str(sizes[-2])
        out[name]["ratio"] = round(figures[last]["us"] / figures[before]["us"], 2)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sizes = tuple(int(a) for a in argv) or SIZES
    print(json.dumps(measure(sizes)))


if __name__ == "__main__":
    main()
