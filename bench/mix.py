"""Request mixes for the load generator: realistic Exim and Postfix requests.

Who is a member of what comes from ``bench.dataset`` formulas, so no store is read.  The
mix (per cent of requests):

    55  member posts (From: a member; envelope the same, a VERP/SRS form or another
        address of the domain; some Reply-To:/Sender:; display names plain, quoted or
        RFC 2047 encoded; some addresses in mixed case)
     8  moderated members (their own moderation action: hold, a few reject/discard)
    12  nonmembers (the list's default nonmember action)
     5  nonmembers matching the list's accept regex (partner domain)
     2  the list's exact "hold" address
     3  nonmembers matching the list's reject regex
     2  banned senders (site bans, list bans)
     7  unknown lists in a list domain
     3  administrative addresses (-request, -owner, -bounces)
     1  null sender <>
     2  Exim: a second list in the same request; Postfix: a recipient in no list domain

Posting activity is skewed (Zipf-like: a list's k-th most active member posts about 1/k
as often as its most active one) and a person's From: form, envelope form and extra
headers are the same in every message, so senders and headers repeat as they do on a
real site (what a header-parse cache sees).

Exim requests follow the brief's wire format exactly
(``POLICYD/1 list=... sender=<b64> from=<b64> reply_to=<b64> sender_header=<b64> id=...``,
absent headers left out); Postfix requests carry the attributes Postfix 3.7 sends at RCPT
(``mta-lab/sample-requests.txt``), about 600 bytes each.
"""

from __future__ import annotations

import base64
import random
import string
import zlib
from dataclasses import dataclass

from .dataset import ALIAS_DOMAIN, HOSTS, Dataset

MIX = (
    ("member", 55),
    ("moderated", 8),
    ("nonmember", 12),
    ("partner", 5),
    ("held", 2),
    ("rejected", 3),
    ("banned", 2),
    ("unknown_list", 7),
    ("admin", 3),
    ("null_sender", 1),
    ("extra", 2),
)


@dataclass
class Post:
    """One generated message: the list recipients, envelope and raw headers."""

    kind: str
    lists: list[str]
    sender: str
    from_header: str | None
    reply_to: str | None = None
    sender_header: str | None = None
    from_address: str = ""


class Generator:
    def __init__(self, data: Dataset, seed: int = 20250101) -> None:
        self.data = data
        self.rng = random.Random(seed)
        weights = [s ** 0.5 for s in data.sizes]
        self._list_weights = weights
        self._kinds = [k for k, _ in MIX]
        self._kind_weights = [w for _, w in MIX]
        self._serial = 0

    # --- pieces ------------------------------------------------------------------------

    def pick_list(self) -> int:
        return self.rng.choices(range(self.data.lists), weights=self._list_weights)[0]

    def list_recipient(self, i: int) -> str:
        address = self.data.posting_address(i)
        r = self.rng.random()
        if r < 0.05:
            return address.title()  # List0001@Lists.Example.Org: the MTA keeps case
        if r < 0.08 and address.endswith("@" + ALIAS_DOMAIN[1]):
            return address.replace(ALIAS_DOMAIN[1], ALIAS_DOMAIN[0])
        return address

    def active_member(self, i: int) -> int:
        """Posting activity is Zipf-like: rank k posts about 1/k as often as the first."""
        size = self.data.sizes[i]
        return min(size - 1, int(size ** self.rng.random()) - 1)

    @staticmethod
    def habits(address: str) -> random.Random:
        """A person's mail client and route do not change between messages: the From:
        form, the envelope form and the extra headers are fixed per address."""
        return random.Random(zlib.crc32(address.encode()))

    def display(self, address: str) -> str:
        local = address.split("@", 1)[0]
        first, _, rest = local.partition(".")
        last = rest.rstrip("0123456789")
        name = f"{first.title()} {last.title()}"
        r = self.habits(address).random()
        if r < 0.35:
            return f"{name} <{address}>"
        if r < 0.55:
            return f'"{last.title()}, {first.title()}" <{address}>'
        if r < 0.75:
            encoded = f"{first.title()}_M=C3=BCller-{last.title()}"
            return f"=?UTF-8?Q?{encoded}?= <{address}>"
        if r < 0.85:
            b = base64.b64encode(f"{name} ✉".encode()).decode()
            return f"=?utf-8?B?{b}?=\n <{address}>"
        if r < 0.95:
            return address
        return f"{address} ({name})"

    def envelope_for(self, address: str) -> str:
        local, domain = address.split("@", 1)
        habits = self.habits(address)
        habits.random()  # the draw display() used
        r = habits.random()
        if r < 0.65:
            return address
        if r < 0.80:
            # SRS: the hash changes with the day, not with the message
            tag = "".join(habits.choices(string.ascii_uppercase + string.digits, k=4))
            return f"SRS0={tag}=TT={domain}={local}@forwarder.example"
        if r < 0.90:
            return f"{local}+bounces@{domain}"
        if r < 0.95:
            return address.upper()
        return f"postmaster@{domain}"

    def case_noise(self, address: str) -> str:
        return address.title() if zlib.crc32(address.encode()) % 20 == 0 else address

    # --- posts -------------------------------------------------------------------------

    def post(self) -> Post:
        kind = self.rng.choices(self._kinds, weights=self._kind_weights)[0]
        d = self.data
        rng = self.rng
        self._serial += 1
        n = self._serial
        i = self.pick_list()
        recipients = [self.list_recipient(i)]
        if kind in ("member", "moderated", "extra"):
            if kind == "moderated":
                size = d.sizes[i]
                j = rng.randrange(0, max(1, (size - 7) // 40))
                k = 40 * j + 7
            else:
                k = self.active_member(i)
            address = d.email(d.member_address_id(i, k))
            if kind == "extra":
                other = self.pick_list()
                if other != i:
                    recipients.append(self.list_recipient(other))
            from_header = self.display(self.case_noise(address))
            reply_to = None
            sender_header = None
            habits = self.habits(address)
            for _ in range(3):
                habits.random()
            if habits.random() < 0.15:
                reply_to = self.display(address) if habits.random() < 0.5 else recipients[0]
            if habits.random() < 0.05:
                sender_header = f"{address.split('@')[0]}-owner@{address.split('@')[1]}"
            return Post(kind, recipients, self.envelope_for(address), from_header, reply_to,
                        sender_header, address)
        if kind == "nonmember":
            address = f"visitor{n % 20011}@outside{n % 313}.example"
        elif kind == "partner":
            address = f"sales{n % 97}@{d.partner_domain(i)}"
        elif kind == "held":
            address = d.held_address(i)
        elif kind == "rejected":
            address = f"offer{n % 1009}@{d.rejected_domain(i)}"
        elif kind == "banned":
            choice = rng.random()
            banned = d.list_banned((i // 50) * 50)
            if choice < 0.4:
                address = f"spammer{n % 50}@banned.example"
            elif choice < 0.7:
                address = "villain@evil.example"
            else:
                i = (i // 50) * 50
                recipients = [self.list_recipient(i)]
                address = banned
        elif kind == "unknown_list":
            host = HOSTS[n % len(HOSTS)]
            recipients = [f"nolist{n % 4999}@{host}"]
            address = d.email(d.member_address_id(i, self.active_member(i)))
        elif kind == "admin":
            suffix = ("request", "owner", "bounces")[n % 3]
            local, domain = d.posting_address(i).split("@")
            recipients = [f"{local}-{suffix}@{domain}"]
            address = f"someone{n % 997}@outside{n % 31}.example"
        elif kind == "null_sender":
            return Post(kind, recipients, "", "Mail Delivery System <MAILER-DAEMON@mx.example>",
                        None, None, "")
        else:
            raise AssertionError(kind)
        return Post(kind, recipients, self.envelope_for(address), self.display(address),
                    None, None, address)


# --- encoders ------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def exim_line(post: Post, rng: random.Random) -> str:
    parts = ["POLICYD/1", "list=" + ",".join(post.lists), "sender=" + _b64(post.sender)]
    if post.from_header is not None:
        parts.append("from=" + _b64(post.from_header))
    if post.reply_to is not None:
        parts.append("reply_to=" + _b64(post.reply_to))
    if post.sender_header is not None:
        parts.append("sender_header=" + _b64(post.sender_header))
    alphabet = string.ascii_letters + string.digits
    parts.append("id=1t" + "".join(rng.choices(alphabet, k=4)) + "-"
                 + "".join(rng.choices(alphabet, k=6)) + "-" + "".join(rng.choices(alphabet, k=2)))
    return " ".join(parts) + "\n"


POSTFIX_TEMPLATE = """\
request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address={ip}
client_name={client}
client_port={port}
reverse_client_name={client}
server_address=192.0.2.25
server_port=25
helo_name={client}
sender={sender}
recipient={recipient}
recipient_count={count}
queue_id=
instance={instance}
size={size}
etrn_domain=
stress=
sasl_method=
sasl_username=
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol={tls}
encryption_cipher={cipher}
encryption_keysize={bits}
policy_context=

"""


def postfix_block(post: Post, rng: random.Random, n: int) -> str:
    recipient = post.lists[0]
    if post.kind == "extra":
        recipient = f"user{n % 911}@elsewhere{n % 17}.example"
    tls = rng.random() < 0.8
    octet = rng.randrange(1, 255)
    return POSTFIX_TEMPLATE.format(
        ip=f"198.51.100.{octet}",
        client=f"mx{octet}.sender{octet % 40}.example",
        port=rng.randrange(1024, 65535),
        sender=post.sender,
        recipient=recipient,
        count=rng.randrange(0, 3),
        instance=f"{rng.randrange(16**4):x}.{rng.randrange(16**8):08x}.{rng.randrange(16**5):05x}.0",
        size=rng.choice((0, 0, rng.randrange(2000, 200000))),
        tls="TLSv1.3" if tls else "",
        cipher="TLS_AES_256_GCM_SHA384" if tls else "",
        bits=256 if tls else 0,
    )


def forkexec_line(post: Post) -> str:
    """Arguments of the old ``${run}`` script: list, envelope sender, From: address (what
    Exim's ``${address:$h_from:}`` would have handed it)."""
    return "\t".join((post.lists[0], post.sender or "<>", post.from_address or "<>")) + "\n"


def write_mixes(directory, data: Dataset, count: int, seed: int = 20250101) -> dict:
    """Write exim.txt, postfix.txt and forkexec.txt under ``directory``; return the kind
    counts."""
    gen = Generator(data, seed)
    rng = random.Random(seed + 1)
    kinds: dict[str, int] = {}
    with open(directory / "exim.txt", "w") as exim, \
            open(directory / "postfix.txt", "w") as postfix, \
            open(directory / "forkexec.txt", "w") as forkexec:
        for n in range(count):
            post = gen.post()
            kinds[post.kind] = kinds.get(post.kind, 0) + 1
            exim.write(exim_line(post, rng))
            postfix.write(postfix_block(post, rng, n))
            forkexec.write(forkexec_line(post))
    return kinds
