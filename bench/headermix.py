"""The Exim request mix with the message (issue 16): what the DATA ACL of
``contrib/exim/policyd-data.acl`` sends once it passes ``headers=``, ``body=``, ``size=``
and ``client=``.

The posts are those of ``bench.mix`` (the same generator, the same seed: request k here
is request k of ``exim.txt`` with its header block added), and each line carries the
words in the ACL's order::

    POLICYD/1 list=<list> sender=<b64> from=<b64> reply_to=<b64> sender_header=<b64>
              headers=<b64> body=<b64> size=<n> client=<ip> id=<id>

``from=``/``reply_to=``/``sender_header=`` are empty when the header is absent (the ACL's
``$rh_`` of a missing header).  The header block, 2-4 KB and different per request, is
what a list post looks like on arrival: a Received chain (2-5 hops, one of them this
MX), an Authentication-Results, one or two DKIM-Signatures, ARC sets on forwarded mail,
Message-ID, Date, From/Reply-To/Sender as the generator chose them, To (the list),
sometimes Cc, a Subject (some RFC 2047 encoded), In-Reply-To/References on replies,
MIME headers, a mail client's own headers, sometimes the List- headers of another list
(a forwarded post; never this list's List-Post:, which is the loop rule's discard).
The body is a short plain-text start (100-600 bytes), all of it sent (the message is
complete: ``size=`` counts header block, empty line and body).
"""

from __future__ import annotations

import base64
import random
import string

from .dataset import ALIAS_DOMAIN, Dataset
from .mix import Generator, Post

HEADER_MIN = 2048
HEADER_MAX = 4096
_B64 = string.ascii_letters + string.digits + "+/"
_ALNUM = string.ascii_letters + string.digits
_WORDS = ("meeting", "agenda", "release", "patch", "question", "minutes", "draft", "report",
          "budget", "schedule", "update", "proposal", "review", "notes", "build", "bug",
          "deadline", "workshop", "survey", "results", "travel", "server", "migration",
          "security", "newsletter", "call", "slides", "summary", "fix", "plan")
_CLIENTS = ("Mozilla Thunderbird", "Microsoft Outlook 16.0", "Apple Mail (2.3774.500.171)",
            "Roundcube Webmail/1.6.5", "Mutt/2.2.12 (2023-09-09)", "Evolution 3.50.2",
            "K-9 Mail for Android", "Claws Mail 4.2.0 (GTK 3.24.41)")
_RELAYS = ("mail-ej1-f54.google.com", "mail-wm1-f41.google.com",
           "EUR05-AM6-obe.outbound.protection.outlook.com", "mout.gmx.net",
           "smtp.fastmail.com", "mx.posteo.de", "relay.mailbox.org", "smtp-out.example.edu")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
           "Dec")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _blob(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(_B64, k=n))


def _folded(rng: random.Random, n: int, width: int = 72, indent: str = "\t ") -> str:
    """``n`` characters of base64 folded as DKIM signers fold ``b=``."""
    text = _blob(rng, n)
    return ("\n" + indent).join(text[i:i + width] for i in range(0, len(text), width))


def _date(rng: random.Random) -> str:
    return (f"{rng.choice(_WEEKDAYS)}, {rng.randrange(1, 29)} {rng.choice(_MONTHS)} 2026 "
            f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d} "
            f"{rng.choice(('+0000', '+0100', '+0200', '-0500', '-0800'))}")


def _message_id(rng: random.Random, domain: str) -> str:
    return f"<{''.join(rng.choices(_ALNUM, k=rng.randrange(16, 36)))}@{domain}>"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() or "example.com"


def _received(rng: random.Random, by: str, ip: str, when: str, rcpt: str) -> str:
    frm = rng.choice(_RELAYS)
    qid = "".join(rng.choices(_ALNUM, k=6)) + "-" + "".join(rng.choices(_ALNUM, k=6)) \
        + "-" + "".join(rng.choices(_ALNUM, k=2))
    return (f"Received: from {frm} ([{ip}])\n\tby {by} with esmtps  (TLS1.3) tls "
            f"TLS_AES_256_GCM_SHA384\n\t(Exim 4.97)\n\t(envelope-from <bounce@{_domain(frm)}>)"
            f"\n\tid {qid}\n\tfor <{rcpt}>; {when}")


def _dkim(rng: random.Random, domain: str, headers: str) -> str:
    return (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain};\n"
            f"\ts={rng.choice(('20230601', 'selector1', 'mail', 'google', 's2048'))}; "
            f"t={1790000000 + rng.randrange(10**7)}; x={1790600000 + rng.randrange(10**7)};"
            f" darn=lists.example.org;\n\th={headers};\n\tbh={_blob(rng, 43)}=;\n"
            f"\tb={_folded(rng, 344)}")


def _arc(rng: random.Random, domain: str, i: int) -> str:
    return (f"ARC-Seal: i={i}; a=rsa-sha256; t={1790000000 + rng.randrange(10**7)}; cv=none;"
            f"\n\td={domain}; s=arc-20240605;\n\tb={_folded(rng, 344)}\n"
            f"ARC-Message-Signature: i={i}; a=rsa-sha256; c=relaxed/relaxed; d={domain};"
            f"\n\ts=arc-20240605; h=to:subject:message-id:date:from:mime-version;\n"
            f"\tbh={_blob(rng, 43)}=;\n\tb={_folded(rng, 344)}\n"
            f"ARC-Authentication-Results: i={i}; mx.{domain};\n\tdkim=pass "
            f"header.i=@{domain};\n\tspf=pass smtp.mailfrom={domain};\n"
            f"\tdmarc=pass (p=NONE sp=QUARANTINE dis=NONE) header.from={domain}")


def _subject(rng: random.Random) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(2, 9)))
    prefix = rng.choice(("", "", "Re: ", "Re: ", "Fwd: ", "AW: ", "[ANN] "))
    r = rng.random()
    if r < 0.1:
        raw = (prefix + "Über " + words).encode()
        return f"=?UTF-8?B?{_b64(raw)}?="
    if r < 0.2:
        return f"=?iso-8859-1?Q?{prefix.replace(' ', '_')}R=E9union_{words.replace(' ', '_')}?="
    return prefix + words.capitalize()


def header_block(post: Post, rng: random.Random, target: int) -> tuple[str, str]:
    """A raw header block of about ``target`` bytes (clipped to HEADER_MIN..HEADER_MAX)
    for ``post``, and the client IP its first hop came from."""
    author = post.from_address or post.sender or "mailer-daemon@mx.example"
    domain = _domain(author)
    list_host = _domain(post.lists[0]).replace(ALIAS_DOMAIN[0], ALIAS_DOMAIN[1])
    client = (f"198.51.100.{rng.randrange(1, 255)}" if rng.random() < 0.85
              else f"2001:db8:{rng.randrange(16**4):x}::{rng.randrange(1, 16**4):x}")
    when = _date(rng)
    trace = [_received(rng, f"mx{rng.randrange(1, 4)}.{list_host}", client, when,
                       post.lists[0])]
    auth = (f"Authentication-Results: mx.{list_host};\n\tdkim=pass (2048-bit key) "
            f"header.d={domain} header.i=@{domain} header.b={_blob(rng, 8)};\n"
            f"\tspf=pass (mx.{list_host}: domain of {post.sender or 'postmaster@' + domain}"
            f" designates {client} as permitted sender) smtp.mailfrom={domain};\n"
            f"\tdmarc=pass (p=none dis=none) header.from={domain}")
    forwarded = rng.random() < 0.2
    signed = ("from:to:cc:subject:date:message-id:mime-version:content-type:"
              "in-reply-to:references")
    middle = [auth]
    if forwarded:
        middle.append(_arc(rng, rng.choice(("google.com", "microsoft.com")), 1))
    middle.append(_dkim(rng, domain, signed))
    if rng.random() < 0.3:
        middle.append(_dkim(rng, rng.choice(("gappssmtp.com", "mailgun.org", "amazonses.com")),
                            "from:to:subject:date:message-id"))
    for _ in range(rng.randrange(1, 4)):
        trace.append(_received(rng, rng.choice(_RELAYS), f"10.{rng.randrange(256)}."
                               f"{rng.randrange(256)}.{rng.randrange(1, 255)}", when,
                               post.lists[0]))
    msg = [f"Message-ID: {_message_id(rng, domain)}", f"Date: {when}"]
    if post.from_header is not None:
        msg.append(f"From: {post.from_header}")
    if post.reply_to is not None:
        msg.append(f"Reply-To: {post.reply_to}")
    if post.sender_header is not None:
        msg.append(f"Sender: {post.sender_header}")
    msg.append(f"To: {post.lists[0].lower().replace(ALIAS_DOMAIN[0], ALIAS_DOMAIN[1])}")
    if rng.random() < 0.25:
        msg.append(f"Cc: colleague{rng.randrange(999)}@{domain}, "
                   f"\"Team Lead\" <lead{rng.randrange(99)}@{domain}>")
    msg.append(f"Subject: {_subject(rng)}")
    msg += ["MIME-Version: 1.0",
            "Content-Type: text/plain; charset=UTF-8; format=flowed",
            "Content-Transfer-Encoding: 8bit",
            f"User-Agent: {rng.choice(_CLIENTS)}",
            f"Content-Language: {rng.choice(('en-US', 'de-DE', 'fr', 'en-GB'))}"]
    optional = []
    if rng.random() < 0.4:
        other = f"other{rng.randrange(50)}.lists.example.net"
        optional.append(f"List-Id: Other list {rng.randrange(50)} <{other}>\n"
                        f"List-Unsubscribe: <mailto:{other.split('.')[0]}-leave@lists."
                        f"example.net>,\n\t<https://lists.example.net/u/{_blob(rng, 24)}>\n"
                        f"List-Archive: <https://lists.example.net/archives/{other}>")
    if rng.random() < 0.3:
        optional.append(f"Thread-Topic: {rng.choice(_WORDS)} {rng.choice(_WORDS)}\n"
                        f"Thread-Index: {_blob(rng, 40)}==")
    optional.append(f"X-Spam-Score: {rng.uniform(-5, 4):.1f}\nX-Spam-Status: No, "
                    f"score={rng.uniform(-5, 4):.1f} required=5.0\n\ttests=BAYES_00,"
                    f"DKIM_SIGNED,DKIM_VALID,DKIM_VALID_AU,SPF_PASS autolearn=ham")
    block = "\n".join(trace + middle + msg + optional)
    target = max(HEADER_MIN, min(HEADER_MAX, target))
    # Replies carry a References chain: the thread's Message-IDs, as many as fit.
    if len(block) < target - 120 or rng.random() < 0.5:
        ids = []
        while len(block) + 40 + sum(len(i) + 2 for i in ids) < target and len(ids) < 40:
            ids.append(_message_id(rng, rng.choice((domain, "mail.gmail.com",
                                                    "example.org"))))
        if ids:
            block += f"\nIn-Reply-To: {ids[-1]}\nReferences: " + "\n ".join(ids)
    if len(block) + 1 > HEADER_MAX:  # a forwarded post with two DKIM signatures: drop the ARC
        block = "\n".join(trace + [auth, _dkim(rng, domain, signed)] + msg)
    while len(block) + 1 < HEADER_MIN:  # a spam filter's report header
        block += f"\nX-Spam-Report: {_blob(rng, 60)}\n\t{_blob(rng, 60)}"
    return block + "\n", client


def _body(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randrange(15, 90))]
    lines, line = [], []
    for word in words:
        line.append(word)
        if len(line) == 10:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "Hello,\n\n" + "\n".join(lines) + "\n\n-- \nsent from the benchmark\n"


def exim_line(post: Post, rng: random.Random) -> str:
    """One request as the DATA ACL sends it (``headers=`` and the rest)."""
    headers, client = header_block(post, rng, rng.randrange(HEADER_MIN, HEADER_MAX + 1))
    body = _body(rng)
    size = len(headers.encode()) + 1 + len(body.encode())

    def b64(text: str | None) -> str:
        return _b64(text.encode("utf-8")) if text else ""

    exim_id = "".join(rng.choices(_ALNUM, k=6)) + "-" + "".join(rng.choices(_ALNUM, k=6)) \
        + "-" + "".join(rng.choices(_ALNUM, k=2))
    return (f"POLICYD/1 list={','.join(post.lists)} sender={b64(post.sender)} "
            f"from={b64(post.from_header)} reply_to={b64(post.reply_to)} "
            f"sender_header={b64(post.sender_header)} headers={b64(headers)} "
            f"body={b64(body)} size={size} client={client} id=1t{exim_id}\n")


def write_header_mix(path, data: Dataset, count: int, seed: int = 20250101) -> dict:
    """Write ``count`` requests with the message to ``path``; return figures of the mix
    (header block sizes, line sizes)."""
    gen = Generator(data, seed)
    rng = random.Random(seed + 2)
    header_sizes = []
    line_sizes = []
    with open(path, "w") as out:
        for _ in range(count):
            line = exim_line(gen.post(), rng)
            out.write(line)
            line_sizes.append(len(line))
            words = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
            header_sizes.append(len(base64.b64decode(words["headers"])))
    header_sizes.sort()
    line_sizes.sort()
    return {"requests": count,
            "header_bytes_min": header_sizes[0], "header_bytes_median":
            header_sizes[len(header_sizes) // 2], "header_bytes_max": header_sizes[-1],
            "line_bytes_median": line_sizes[len(line_sizes) // 2]}
