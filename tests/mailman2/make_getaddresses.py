# -*- coding: utf-8 -*-
"""Write what Mailman 2.1's Python reads as the senders of a header (run with Python 2.7).

    PYENV_VERSION=2.7.18 python2 tests/mailman2/make_getaddresses.py

Mailman 2.1's ``Message.get_senders()`` takes each of From:, the envelope, Reply-To: and
Sender: through ``email.Utils.getaddresses`` and lower-cases the addresses; its member
lookup and nonmember entries then compare those strings.  This writes, for a corpus of
header values (hand-picked shapes, then generated ones from a fixed seed),
``email.Utils.getaddresses([value])`` and ``email.Utils.parseaddr(value)`` as CPython
2.7.18 returns them, into ``fixtures/headers/getaddresses.json``;
``tests/test_mailman2_senders.py`` holds policyd's Mailman 2 reading to it.  Python 2's
``random`` with a fixed seed is deterministic, so re-running reproduces the file.
"""

from __future__ import print_function

import io
import json
import os
import random
import sys

if sys.version_info[0] != 2:
    sys.exit("make_getaddresses.py must run under Python 2.7 (Mailman 2.1's email package)")

import email.Utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "headers", "getaddresses.json")

PICKED = [
    u"Alice <Alice@Example.COM>", u"alice@example.com", u"<pat@example.com>garbage",
    u"<stranger@x.example>pat@example.com", u'"q" <s@x.example> <t@y.example>',
    u"pat@example.com <stranger@outside.example>", u"pat@example.com. ",
    u"Pat <pat@example.com.>", u'"unterminated@x.example', u"@domain.example",
    u"undisclosed-recipients:;", u"Team: a@x.example, \"B, b\" <b@y.example>;",
    u"a@x.example (A comment, with a comma)", u"(lead) a@x.example (trail)",
    u"<@relay.example,@other.example:u@final.example>", u'"quoted part"@x.example',
    u"Name <a@x.example>\nOther <b@y.example>", u"Folded\r\n <a@x.example>",
    u"=?utf-8?Q?Last=2C_First?= <u@example.com>", u"John Doe", u"", u"<>", u"x <>",
    u"a@x.example, , b@y.example", u"a@x.example;b@y.example", u"Pat. Smith <p@x.example>",
    u"p@x.example <q@y.example> r@z.example", u"<a@x.example> (comment) b@y.example",
    u"A <a@x.example>, B <b@y.example>", u"pat@[192.0.2.1]", u"Pat <pat@example.com",
    u"pat@example.com>", u"<<pat@example.com>>", u"pat @ example . com",
    u"\"Doe, Pat\" pat@example.com", u"Pat <pat@example.com> <other@example.com>",
]

ATOMS = [u"pat", u"a.b", u"Pat", u"x_y", u"q+tag", u"o'neil", u"=?utf-8?q?P=C3=A4t?="]
DOMAINS = [u"example.com", u"x.example", u"Example.ORG", u"example.com.", u"[192.0.2.1]",
           u"sub.example.net"]
PIECES = [u" ", u" ", u",", u", ", u";", u":", u"<", u">", u"(", u")", u'"', u"\\",
          u"\n\t", u"@", u".", u"garbage", u"Name", u"Doe, Pat"]


def address(rng):
    return u"%s@%s" % (rng.choice(ATOMS), rng.choice(DOMAINS))


def generated(rng):
    parts = []
    for _ in range(rng.randint(1, 7)):
        roll = rng.random()
        if roll < 0.35:
            parts.append(address(rng))
        elif roll < 0.55:
            parts.append(u"<%s>" % address(rng))
        elif roll < 0.65:
            parts.append(u'"%s"' % rng.choice(ATOMS + [u"Doe, Pat", u"a@b.example"]))
        elif roll < 0.72:
            parts.append(u"(%s)" % rng.choice(ATOMS + [u"x, y", u"a@b.example"]))
        else:
            parts.append(rng.choice(PIECES))
    return u"".join(parts)


def main():
    rng = random.Random(20261206)
    values = list(PICKED)
    seen = set(values)
    while len(values) < 2000:
        value = generated(rng)
        if value not in seen:
            seen.add(value)
            values.append(value)
    rows = []
    for value in values:
        raw = value.encode("utf-8")
        pairs = email.Utils.getaddresses([raw])
        first = email.Utils.parseaddr(raw)
        rows.append({"value": value,
                     "getaddresses": [a.decode("utf-8") for _, a in pairs],
                     "parseaddr": first[1].decode("utf-8")})
    lines = []
    for row in rows:
        text = json.dumps(row, ensure_ascii=False, sort_keys=True)
        lines.append(text.decode("utf-8") if isinstance(text, bytes) else text)
    with io.open(OUT, "w", encoding="utf-8") as fp:
        fp.write(u'{"python": "%s", "rows": [\n' % sys.version.split()[0])
        fp.write(u",\n".join(lines))
        fp.write(u"\n]}\n")
    print("wrote %d values to %s" % (len(rows), OUT))


if __name__ == "__main__":
    main()
