"""SMTP-time moderation of nonmember posts: the greylist and ticket state machine (pure).

Owns the transitions of issue 17, nothing else: no SQL, no Twisted, no wire text beyond
the reply texts.  The clock and the ticket generator are injected, so every transition is
a table-driven test.  The daemon keeps one ``ModerationState`` as its in-memory index,
asks ``check`` on the reactor, and hands ``drain()`` (the rows that changed) to the store
thread, which writes them in batches.

A post is keyed by ``Key``: the list, the sender, the originating network (``network_of``:
/24 for IPv4, /64 for IPv6, ``""`` when the client is unknown) and, on the Exim path, the
Message-ID (``""`` on Postfix, which asks at RCPT).

``greylist``::

    no entry, or entry older than max_age  -> DEFER  (first attempt; entry created)
    retry before min_delay                 -> DEFER  (early retry; attempts counted)
    retry within [min_delay, max_age]      -> PASS   (sender remembered for ``remember``)
    sender remembered on this list         -> PASS

``moderate``::

    no ticket, or ticket expired           -> HELD   (a new ticket, in the 4xx text)
    undecided, younger than decide_within  -> HELD   (same ticket; attempts counted)
    undecided, older than decide_within    -> PASS   (the fallback: the list's normal
                                                      outcome, i.e. Mailman's hold queue)
    another post under the ticket's key    -> PASS   (``OTHER_POST``: the digest differs)
    approved                               -> ACCEPT
    rejected                               -> REJECT (550 5.7.1 with the reason)
    discarded                              -> DISCARD

A decided ticket answers every retry the same way for ``max_age`` after the decision,
then it is pruned.  ``PASS`` means "no opinion from moderation": the caller answers the
list's normal outcome.

Bounded: at most ``max_entries`` greylist entries, ``max_entries`` remembered senders and
``max_tickets`` tickets, shared by every list, sender and network, so a flood of made-up
senders reaches them first. At a cap what no MTA waits for goes first and what an MTA
waits for never goes: expired entries, remembered passes and tickets are dropped (counted
in ``take_expired``), then tickets whose post got its final answer; a greylist entry
younger than ``max_age`` and a ticket still waiting for its decision or fallback are
kept. A first attempt that still finds no room is not recorded: ``AT_CAP``, the list's
normal outcome, as with ``smtp_moderation = off``. One network (a key's /24 or /64) holds
at most ``NETWORK_SHARE`` of the greylist entries: a flood from one network keeps its own
new attempts out first (``NETWORK_AT_CAP``), and the others are still greylisted.
Tickets have such shares too (``Settings.ticket_network_share`` of one client network,
``ticket_sender_share`` of one sender on one list: ``NETWORK_AT_CAP``, ``SENDER_AT_CAP``),
so a host sending new Message-IDs for days cannot keep every other first post out.
Remembered passes are idle state: at their cap the least recently remembered goes
(``Step.evicted``).

``prune`` runs on the reactor, so each call looks at a bounded number of items: the
expired ones first in line, then the next ``PRUNE_BATCH`` of a round over every item
(what expires out of line: a ticket decided, a row from another daemon, a clock
stepped back), so whatever expired goes within a round, ``len / PRUNE_BATCH`` calls.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import secrets
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import islice
from typing import Callable, Generator, Iterable, Iterator, NamedTuple

__all__ = ["SmtpModeration", "Settings", "Key", "Entry", "Ticket", "Decision",
           "Outcome", "Step", "Changes", "ModerationState", "network_of", "new_ticket_id",
           "TICKET_ALPHABET", "AT_CAP", "NETWORK_AT_CAP", "SENDER_AT_CAP", "REFUSED",
           "displayable", "post_digest", "OTHER_POST"]


class SmtpModeration(enum.Enum):
    """A list's ``smtp_moderation`` setting."""

    OFF = "off"
    GREYLIST = "greylist"
    MODERATE = "moderate"

    @classmethod
    def from_name(cls, name: str) -> "SmtpModeration":
        try:
            return cls(name.strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown smtp_moderation {name!r} (allowed: {allowed})") \
                from None


class Decision(enum.Enum):
    """A moderator's decision on a ticket."""

    APPROVE = "approve"
    REJECT = "reject"
    DISCARD = "discard"


class Outcome(enum.Enum):
    """What moderation says about one attempt."""

    DEFER = "defer"        # greylisted: a temporary deferral
    HELD = "held"          # deferred with a ticket, waiting for a moderator
    PASS = "pass"          # no opinion: the list's normal outcome
    ACCEPT = "accept"      # approved by a moderator
    REJECT = "reject"      # rejected by a moderator: 550 with the reason
    DISCARD = "discard"    # discarded by a moderator: accepted and dropped


@dataclass(frozen=True, slots=True)
class Settings:
    min_delay: float = 300.0
    max_age: float = 86400.0
    remember: float = 30 * 86400.0
    decide_within: float = 3 * 86400.0
    max_entries: int = 100_000
    max_tickets: int = 10_000
    # The shares of ``max_tickets`` one client network and one sender on one list may
    # hold (``NETWORK_SHARE``, ``SENDER_SHARE``; 1.0: no share, the cap alone).
    ticket_network_share: float = 0.5
    ticket_sender_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay < self.max_age:
            raise ValueError("min_delay must be at least 0 and below max_age")
        if self.remember < 0 or self.decide_within <= 0:
            raise ValueError("remember must be at least 0 and decide_within above 0")
        if self.max_entries < 1 or self.max_tickets < 1:
            raise ValueError("max_entries and max_tickets must be at least 1")
        if not (0 < self.ticket_network_share <= 1 and 0 < self.ticket_sender_share <= 1):
            raise ValueError("the ticket shares must be above 0 and at most 1")


class Key(NamedTuple):
    list: str
    sender: str
    network: str = ""
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """A greylist entry: the first attempt of one key and how often it came back."""

    key: Key
    first_seen: float
    last_seen: float
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Ticket:
    """A post held for a moderator.  ``subject`` and ``client`` are for ``policyctl
    pending``; ``decision`` is ``None`` until a moderator decides.  ``digest``: what
    identifies the post beyond its key (``post_digest`` of its Subject; ``""`` for a
    ticket stored before migration 0011, which then answers any post with its key)."""

    id: str
    key: Key
    first_seen: float
    last_seen: float
    attempts: int = 1
    subject: str = ""
    client: str = ""
    decision: Decision | None = None
    reason: str = ""
    decided_at: float | None = None
    digest: str = ""


def post_digest(subject: str) -> str:
    """What tells two posts with one key (list, From:, Message-ID) apart: a digest of the
    Subject as the MTA sent it.  Anyone can reuse an approved post's From: and
    Message-ID; a post that also copies its Subject is refused nothing more than it was
    before, and one that does not is not the approved post."""
    return hashlib.sha256(subject.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Step(NamedTuple):
    """The outcome of one attempt, its reply text (for DEFER, HELD and REJECT), the
    ticket if any, what the transition was (for logs and tests), and how many remembered
    senders a cap pushed out."""

    outcome: Outcome
    transition: str
    text: str = ""
    ticket: str | None = None
    evicted: int = 0


#: A sender remembered on the list: the usual step on a greylisted list (one object).
REMEMBERED = Step(Outcome.PASS, "remembered")
#: The transitions with which ``check`` begins a greylist entry or a ticket.
STARTS = frozenset({"first-attempt", "expired"})
#: The transition of a first attempt that found its cap full of entries and tickets MTAs
#: wait for: not recorded, the list's normal outcome (PASS).
AT_CAP = "at-cap"
_AT_CAP = Step(Outcome.PASS, AT_CAP)
#: The same for a first attempt whose network holds its share of the greylist cap.
NETWORK_AT_CAP = "network-at-cap"
_NETWORK_AT_CAP = Step(Outcome.PASS, NETWORK_AT_CAP)
#: The share of ``max_entries`` one network may hold (keys without a network, unknown
#: clients, are not a network and share the whole cap); ``Settings.ticket_network_share``
#: is the same for the tickets of one client network.
NETWORK_SHARE = 0.5
#: The transition of a new ticket kept out because one sender on one list holds
#: ``Settings.ticket_sender_share`` of ``max_tickets`` (a flood of made-up Message-IDs
#: from one From:).  That default share is far more posts than one person sends in
#: ``decide_within``, far less than the cap every other nonmember's first post needs.
SENDER_AT_CAP = "sender-at-cap"
_SENDER_AT_CAP = Step(Outcome.PASS, SENDER_AT_CAP)
#: The transition of a post whose key has a ticket for another post (its digest
#: differs: a replay of an approved post's From: and Message-ID): no opinion, the
#: list's normal outcome, and the ticket is left as it is.
OTHER_POST = "other-post"
_OTHER_POST = Step(Outcome.PASS, OTHER_POST)
#: The transitions of a first attempt kept out by a cap or a share (not recorded).
REFUSED = frozenset({AT_CAP, NETWORK_AT_CAP, SENDER_AT_CAP})
#: At most this many greylist entries and tickets of one sender ``describe`` lists
#: (with their totals): ``policyctl query`` runs on the reactor.
DESCRIBE_LIMIT = 20


@dataclass
class Changes:
    """What changed since the last ``drain``: the rows the store thread writes."""

    entries: dict[Key, Entry | None] = field(default_factory=dict)        # None: delete
    remembered: dict[tuple[str, str], float | None] = field(default_factory=dict)
    tickets: dict[str, Ticket | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.entries or self.remembered or self.tickets)


TICKET_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1: read aloud safely
TICKET_LENGTH = 6


def new_ticket_id() -> str:
    """Six characters of a base32 alphabet without look-alikes (30 bits)."""
    return "".join(secrets.choice(TICKET_ALPHABET) for _ in range(TICKET_LENGTH))


# An MTA's peers are few: the same client addresses come back (``ipaddress`` parsing is
# several microseconds a request otherwise).
@lru_cache(maxsize=4096)
def network_of(address: str | None) -> str:
    """The originating network: ``192.0.2.0/24``, ``2001:db8:1:2::/64``; ``""`` for an
    unknown or unreadable client (the key then has no network)."""
    if not address:
        return ""
    text = address.strip()
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    text = text.strip("[]")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


# What a peer's text must not carry to a moderator's terminal (``policyctl pending``):
# control characters, C0 and C1 (U+009B is a CSI), format characters (the bidi
# overrides, U+202E, reorder what follows) and the line and paragraph separators.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})


def displayable(text: str) -> str:
    """``text`` with each run of control, format and line-separator characters (Unicode
    categories Cc, Cf, Zl, Zp) made one space, for storing a peer's value and for
    showing rows stored before that."""
    if text.isprintable():  # everything hidden is unprintable: the usual text is done
        return text
    out = []
    hidden = False
    for ch in text:
        if unicodedata.category(ch) in _HIDDEN:
            if not hidden:
                out.append(" ")
            hidden = True
        else:
            out.append(ch)
            hidden = False
    return "".join(out)


GREYLIST_TEXT = "Greylisted: temporary deferral of a first post to {list}, please retry later"
HELD_TEXT = "Held for moderator approval, ticket {ticket}"
REJECT_TEXT = "Your post to {list} was rejected by its moderator"


# How far in the future a time read from the state may lie and still be taken as it is
# (the clocks of MX hosts sharing a store differ a little).  Beyond it the clock was
# stepped back since (NTP after a wrong clock, a restored VM): ages would be negative,
# so nothing would expire, a greylisted sender would never pass and a ticket never fall
# back; such an entry counts as expired instead (the sender starts over: a bounded wait).
CLOCK_SLACK = 300.0


def _batches(entries: list, remembered: list, tickets: list, size: int):
    """(entries, remembered, tickets) in consecutive slices of at most ``size`` rows in
    all, in that order; one empty batch when there are no rows."""
    rows = [(0, r) for r in entries] + [(1, r) for r in remembered] + \
        [(2, r) for r in tickets]
    for start in range(0, max(len(rows), 1), size):
        batch: tuple[list, list, list] = ([], [], [])
        for kind, row in rows[start:start + size]:
            batch[kind].append(row)
        yield batch

# How many items of each dict one ``prune`` looks at in line, and as many of its round
# (it runs on the reactor, between MTA requests).
PRUNE_BATCH = 250


def _kept(a: "Ticket", b: "Ticket") -> "Ticket":
    """Of two tickets for one post, the one every daemon keeps: a decided one, else the
    first seen (the one its first deferral named), else the smaller id."""
    return a if (a.decision is None, a.first_seen, a.id) <= \
        (b.decision is None, b.first_seen, b.id) else b


def _ticket_network(ticket: "Ticket") -> str:
    """The client network a ticket counts against (its key's, else its client's: a
    ticket keyed by Message-ID has no network in its key)."""
    return ticket.key.network or network_of(ticket.client)


def _group_add(index: dict, group, item) -> None:
    index.setdefault(group, {})[item] = None


def _group_drop(index: dict, group, item) -> None:
    members = index.get(group)
    if members is not None:
        members.pop(item, None)
        if not members:
            del index[group]


def _other_post(ticket: "Ticket", digest: str) -> bool:
    """``digest`` names another post than ``ticket``'s (either unknown: the same)."""
    return bool(ticket.digest and digest and ticket.digest != digest)


def _stale(since: float, now: float, lifetime: float) -> bool:
    """Expired: older than ``lifetime``, or from a future the clock has stepped back from."""
    return now - since > lifetime or since - now > CLOCK_SLACK


class ModerationState:
    """The in-memory index of greylist entries, remembered senders and tickets.

    ``check`` is the only transition driven by the MTA; ``decide`` is a moderator's;
    ``prune`` drops what expired.  Every change is recorded for ``drain``."""

    def __init__(self, settings: Settings = Settings(), *,
                 clock: Callable[[], float], ticket_id: Callable[[], str] = new_ticket_id
                 ) -> None:
        self.settings = settings
        self.clock = clock
        self.ticket_id = ticket_id
        # Entries and tickets in the order they were first seen (a refresh keeps its
        # place), remembered senders in the order they were last remembered: the first
        # item is the one to expire first, so a cap looks at it alone.  OrderedDict: a
        # plain dict walks the slots its deletions left at its front to find the first.
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.remembered: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.tickets: OrderedDict[str, Ticket] = OrderedDict()
        self.ticket_by_key: dict[Key, str] = {}
        # The same keys in the order ``prune`` looks at them next: not every item expires
        # in line (a decided ticket expires before undecided ones seen earlier, a row
        # merged late or written with a clock stepped back lands behind younger ones),
        # and these rounds reach each in a bounded number of calls.
        self._entry_round: OrderedDict[Key, None] = OrderedDict()
        self._remembered_round: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._ticket_round: OrderedDict[str, None] = OrderedDict()
        # Greylist entries by network, for ``NETWORK_SHARE``.
        self.by_network: Counter[str] = Counter()
        # Side indexes, kept by ``_put_*``/``_drop_*`` alone (every change goes through
        # them): greylist entries and ticket ids of each (list, sender), for
        # ``describe`` (a look-up, not a walk over the whole index on the reactor) and
        # ``SENDER_SHARE``; ticket ids of each client network, for ``NETWORK_SHARE``.
        # Each group in insertion order: its first is the one to look at for room.
        self.entries_by_sender: dict[tuple[str, str], dict[Key, None]] = {}
        self.tickets_by_sender: dict[tuple[str, str], dict[str, None]] = {}
        self.tickets_by_network: dict[str, dict[str, None]] = {}
        # Tickets whose post got its final answer (a decision or the fallback, answered
        # to a retry), the first answered first: what goes at the ticket cap.
        self.done: OrderedDict[str, None] = OrderedDict()
        # Undecided tickets among ``tickets``, kept by ``_put_ticket``/``_drop_ticket``
        # (every change of ``tickets`` goes through them): the metrics and ``policyctl
        # status`` read it on the reactor, and a walk would grow with the index.
        self.undecided = 0
        self.changes = Changes()
        # Rows ``merge`` could not keep at a cap (other daemons' rows): the service
        # counts and logs them as it does its own (``take_merge_evicted``).
        self.merge_evicted = 0
        # Expired rows dropped to make room at a cap (``take_expired``).
        self.expired = 0
        # Own tickets given a new id because another daemon's post holds theirs
        # (``redraw``; ``take_id_conflicts``).
        self.id_conflicts = 0

    def take_merge_evicted(self) -> int:
        count, self.merge_evicted = self.merge_evicted, 0
        return count

    def take_expired(self) -> int:
        count, self.expired = self.expired, 0
        return count

    def take_id_conflicts(self) -> int:
        count, self.id_conflicts = self.id_conflicts, 0
        return count

    def redraw(self, ticket_ids: Iterable[str]) -> int:
        """Give each of these own tickets a new id: another daemon drew the same for
        another post and the store holds that post under it (30-bit ids: rare, never
        silent).  The store's row stays; the ticket under its new id is written as
        new, and the sender's next retry is told that id.  How many were redrawn."""
        count = 0
        for tid in ticket_ids:
            ticket = self.tickets.get(tid)
            if ticket is None:
                continue
            fresh = self._fresh_id()  # drawn while ``tid`` is taken: never it again
            self._drop_ticket(ticket, record=False)
            self.changes.tickets.pop(tid, None)  # ours: it must not touch the other row
            self._put_ticket(replace(ticket, id=fresh))
            count += 1
        self.id_conflicts += count
        return count

    # --- loading and draining ------------------------------------------------------------

    def load(self, entries: Iterable[Entry] = (), remembered: Iterable[tuple[str, str, float]]
             = (), tickets: Iterable[Ticket] = ()) -> None:
        """Merge rows read from the store, without recording changes (the store's
        query bounds them by the caps)."""
        for entry in sorted(entries, key=lambda e: e.first_seen):
            if entry.key in self.entries:
                self._drop_entry(entry.key, record=False)
            self._put_entry(entry, record=False)
        for list_, sender, until in sorted(remembered, key=lambda r: r[2]):
            self.remembered.pop((list_, sender), None)
            self.remembered[list_, sender] = until
            self._remembered_round[list_, sender] = None
        for ticket in sorted(tickets, key=lambda t: t.first_seen):
            self._put_ticket(ticket, record=False)

    def load_batches(self, entries: Iterable[Entry] = (),
                     remembered: Iterable[tuple[str, str, float]] = (),
                     tickets: Iterable[Ticket] = (), *, size: int) -> Iterator[None]:
        """``load`` in batches of at most ``size`` rows, yielding between two batches
        (the service gives the reactor a turn there: a busy site's state is up to the
        caps, ~100k rows, too much for one turn)."""
        entries = sorted(entries, key=lambda e: e.first_seen)
        remembered = sorted(remembered, key=lambda r: r[2])
        tickets = sorted(tickets, key=lambda t: t.first_seen)
        for index, batch in enumerate(_batches(entries, remembered, tickets, size)):
            if index:
                yield
            self.load(*batch)

    def merge_batches(self, entries: Iterable[Entry] = (),
                      remembered: Iterable[tuple[str, str, float]] = (),
                      tickets: Iterable[Ticket] = (), *, size: int
                      ) -> Generator[None, None, int]:
        """``merge`` in batches of at most ``size`` rows, yielding between two; returns
        the number of decisions that arrived."""
        decided = 0
        for index, batch in enumerate(_batches(list(entries), list(remembered),
                                               list(tickets), size)):
            if index:
                yield
            decided += self.merge(*batch)
        return decided

    def merge(self, entries: Iterable[Entry] = (), remembered: Iterable[tuple[str, str, float]]
              = (), tickets: Iterable[Ticket] = ()) -> int:
        """Merge what other daemons and moderators wrote (``store.moderation.read_since``),
        without recording changes: the newer entry, the later ``until``, a ticket's
        decision from the store.  The caps hold as for the daemon's own attempts: a row
        new to the index that finds no room is left out (``take_merge_evicted``), never
        one the index holds.  The number of tickets whose decision arrived."""
        now = self.clock()
        entries_ = self.entries
        for entry in entries:
            mine = entries_.get(entry.key)
            if mine is None:
                if self._room_for_entry(now, entry.key.network) is not None:
                    self.merge_evicted += 1
                    continue
                self._put_entry(entry, record=False)
            elif entry.last_seen > mine.last_seen:
                entries_[entry.key] = entry
                if entry.first_seen != mine.first_seen:  # begun again: first seen now
                    entries_.move_to_end(entry.key)
        for list_, sender, until in remembered:
            if until > self.remembered.get((list_, sender), 0.0):
                self.merge_evicted += self._remember(list_, sender, until, record=False)
        decided = 0
        for ticket in tickets:
            mine = self.tickets.get(ticket.id)
            if mine is not None and mine.key != ticket.key:
                # One id drawn by two daemons for two posts: the row is the other
                # post's (its decision is not ours), ours draws a new id.
                self.redraw([mine.id])
                mine = None
            if mine is None:
                other = self.tickets.get(self.ticket_by_key.get(ticket.key, ""))
                if other is None and self._room_for_ticket(now, ticket) is not None:
                    self.merge_evicted += 1
                    continue
                if other is not None and other.id != ticket.id:
                    # Two tickets for one post (its first attempt reached two MX hosts
                    # before they synced): every daemon keeps the same one, and the
                    # other goes from the store too, so the sender is told one ticket
                    # and the moderators see one.
                    if _kept(other, ticket) is other:
                        self.changes.tickets[ticket.id] = None
                        continue
                    self._drop_ticket(other)
                self._put_ticket(ticket, record=False)
                decided += ticket.decision is not None
                continue
            if ticket.decision is not None and ticket.decision is not mine.decision:
                decided += 1
                mine = replace(mine, decision=ticket.decision, reason=ticket.reason,
                               decided_at=ticket.decided_at)
            mine = replace(mine, last_seen=max(mine.last_seen, ticket.last_seen),
                           attempts=max(mine.attempts, ticket.attempts))
            self._put_ticket(mine, record=False)
        return decided

    def drain(self) -> Changes:
        """The changes since the last drain (the store thread writes them)."""
        changes, self.changes = self.changes, Changes()
        return changes

    def restore(self, changes: Changes) -> None:
        """Put back changes that could not be written, under newer ones."""
        for name in ("entries", "remembered", "tickets"):
            mine = getattr(self.changes, name)
            merged = dict(getattr(changes, name))
            merged.update(mine)
            setattr(self.changes, name, merged)

    # --- the MTA's attempts --------------------------------------------------------------

    def check(self, mode: SmtpModeration, key: Key, *, subject: str = "",
              client: str = "", digest: str = "") -> Step:
        """One attempt of ``key`` on a list whose ``smtp_moderation`` is ``mode``;
        ``digest``: the post's ``post_digest`` (``""``: not compared)."""
        if mode is SmtpModeration.GREYLIST:
            return self._greylist(key)
        if mode is SmtpModeration.MODERATE:
            return self._moderate(key, subject, client, digest)
        return Step(Outcome.PASS, "off")

    def preview(self, mode: SmtpModeration, key: Key, client: str = "", digest: str = ""
                ) -> Step:
        """What ``check`` would answer for ``key`` now, changing nothing: no entry or
        ticket made, refreshed, counted or dropped, no change recorded (``policyctl
        query``).  A step whose transition is ``first-attempt`` or ``expired`` is one
        ``check`` would begin a greylist entry or a ticket with (``STARTS``); a held
        one's text then names no ticket yet."""
        now = self.clock()
        s = self.settings
        if mode is SmtpModeration.GREYLIST:
            until = self.remembered.get((key.list, key.sender))
            if until is not None and now < until <= now + s.remember + CLOCK_SLACK:
                return REMEMBERED
            text = GREYLIST_TEXT.format(list=key.list)
            entry = self.entries.get(key)
            if entry is None or _stale(entry.first_seen, now, s.max_age):
                if entry is None:
                    refused = self._no_room_for_entry(key.network, now)
                    if refused is not None:
                        return refused
                return Step(Outcome.DEFER, "first-attempt" if entry is None else "expired",
                            text)
            if now - entry.first_seen < s.min_delay:
                return Step(Outcome.DEFER, "early-retry", text)
            return Step(Outcome.PASS, "retry-in-window")
        if mode is SmtpModeration.MODERATE:
            ticket_id = self.ticket_by_key.get(key)
            ticket = self.tickets.get(ticket_id) if ticket_id is not None else None
            if ticket is None or self._expired(ticket, now):
                if ticket is None:
                    if self._full(self.tickets, s.max_tickets, now):
                        return _AT_CAP
                    refused = self._share_refused(
                        Ticket("", key, now, now, client=client), now, drop=False)
                    if refused is not None:
                        return refused
                return Step(Outcome.HELD, "first-attempt" if ticket is None else "expired",
                            HELD_TEXT.format(ticket="(a new one)"))
            if _other_post(ticket, digest):
                return _OTHER_POST
            if ticket.decision is Decision.APPROVE:
                return Step(Outcome.ACCEPT, "approved", ticket=ticket.id)
            if ticket.decision is Decision.REJECT:
                return Step(Outcome.REJECT, "rejected",
                            ticket.reason or REJECT_TEXT.format(list=key.list), ticket.id)
            if ticket.decision is Decision.DISCARD:
                return Step(Outcome.DISCARD, "discarded", ticket=ticket.id)
            if now - ticket.first_seen >= s.decide_within:
                return Step(Outcome.PASS, "undecided-fallback", ticket=ticket.id)
            return Step(Outcome.HELD, "waiting", HELD_TEXT.format(ticket=ticket.id),
                        ticket.id)
        return Step(Outcome.PASS, "off")

    def remembered_step(self, list_: str, sender: str) -> Step | None:
        """The greylist's step for ``sender`` remembered on ``list_`` (PASS), else
        ``None``: the first thing ``check`` asks on a greylisted list, and all it needs
        is the list and the sender, not the rest of the key (the client's network)."""
        until = self.remembered.get((list_, sender))
        if until is not None:
            now = self.clock()
            # As ``_greylist`` reads it: a time beyond what ``remember`` can give (a
            # clock stepped back, a row from a host whose clock ran ahead) is no pass.
            if now < until <= now + self.settings.remember + CLOCK_SLACK:
                return REMEMBERED
        return None

    def _greylist(self, key: Key) -> Step:
        now = self.clock()
        s = self.settings
        until = self.remembered.get((key.list, key.sender))
        if until is not None:
            if now < until <= now + s.remember + CLOCK_SLACK:
                return REMEMBERED
            self._forget(key.list, key.sender)
        entry = self.entries.get(key)
        text = GREYLIST_TEXT.format(list=key.list)
        if entry is None or _stale(entry.first_seen, now, s.max_age):
            if entry is not None:
                # begun again: its place is at the end
                self._drop_entry(key, record=False)
                transition = "expired"
            else:
                transition = "first-attempt"
            refused = self._room_for_entry(now, key.network)
            if refused is not None:
                if entry is not None:
                    self.changes.entries[key] = None
                    self.expired += 1
                return refused
            self._put_entry(Entry(key, now, now, 1))
            return Step(Outcome.DEFER, transition, text)
        if now - entry.first_seen < s.min_delay:
            self._put_entry(replace(entry, last_seen=now, attempts=entry.attempts + 1))
            return Step(Outcome.DEFER, "early-retry", text)
        self._drop_entry(key)
        evicted = self._remember(key.list, key.sender, now + s.remember) \
            if s.remember > 0 else 0
        return Step(Outcome.PASS, "retry-in-window", evicted=evicted)

    def _moderate(self, key: Key, subject: str, client: str, digest: str) -> Step:
        now = self.clock()
        s = self.settings
        ticket_id = self.ticket_by_key.get(key)
        ticket = self.tickets.get(ticket_id) if ticket_id is not None else None
        if ticket is not None and self._expired(ticket, now):
            self._drop_ticket(ticket)
            ticket = None
            transition = "expired"
        else:
            transition = "first-attempt"
        if ticket is None:
            ticket = Ticket("", key, now, now, 1, subject[:200], client[:64],
                            digest=digest)
            refused = self._room_for_ticket(now, ticket)
            if refused is not None:
                return refused
            ticket = replace(ticket, id=self._fresh_id())
            self._put_ticket(ticket)
            return Step(Outcome.HELD, transition, HELD_TEXT.format(ticket=ticket.id),
                        ticket.id)
        if _other_post(ticket, digest):
            # Not this ticket's post: neither its decision nor a retry of it.
            return _OTHER_POST
        ticket = replace(ticket, last_seen=now, attempts=ticket.attempts + 1)
        self._put_ticket(ticket)
        if ticket.decision is Decision.APPROVE:
            return Step(Outcome.ACCEPT, "approved", ticket=ticket.id)
        if ticket.decision is Decision.REJECT:
            text = ticket.reason or REJECT_TEXT.format(list=key.list)
            return Step(Outcome.REJECT, "rejected", text, ticket.id)
        if ticket.decision is Decision.DISCARD:
            return Step(Outcome.DISCARD, "discarded", ticket=ticket.id)
        if now - ticket.first_seen >= s.decide_within:
            return Step(Outcome.PASS, "undecided-fallback", ticket=ticket.id)
        return Step(Outcome.HELD, "waiting", HELD_TEXT.format(ticket=ticket.id), ticket.id)

    def _expired(self, ticket: Ticket, now: float) -> bool:
        """A decided ticket lives ``max_age`` after its decision; an undecided one
        ``decide_within`` + ``max_age`` after it was first seen (the fallback answers
        retries meanwhile)."""
        s = self.settings
        if ticket.decided_at is not None:
            return _stale(ticket.decided_at, now, s.max_age)
        return _stale(ticket.first_seen, now, s.decide_within + s.max_age)

    # --- moderators ----------------------------------------------------------------------

    def decide(self, ticket_id: str, decision: Decision, reason: str = "") -> Ticket | None:
        """A moderator's decision; ``None`` for an unknown ticket.  The next retry of the
        post gets it."""
        ticket = self.tickets.get(ticket_id.strip().upper())
        if ticket is None:
            return None
        ticket = replace(ticket, decision=decision, reason=reason[:300],
                         decided_at=self.clock())
        self._put_ticket(ticket)
        return ticket

    def pending(self, list_: str | None = None) -> list[Ticket]:
        """Undecided tickets, oldest first (of one list with ``list_``): a walk over
        every ticket, never on the reactor per request (``undecided`` counts them)."""
        return [t for t in self.tickets.values() if t.decision is None
                and (list_ is None or t.key.list == list_)]

    def describe(self, list_: str, sender: str) -> dict:
        """What applies to ``sender`` on ``list_`` (``policyctl query``): remembered
        until when, the greylist entries (first attempt, waiting, passed soon) and the
        tickets with their decisions, the first ``DESCRIBE_LIMIT`` of each and their
        totals.  Look-ups in the side indexes: it runs on the reactor, and its work
        must not grow with the index (a full one is 100,000 entries)."""
        now = self.clock()
        s = self.settings

        def entry_state(entry: Entry) -> str:
            age = now - entry.first_seen
            if age > s.max_age:
                return "expired"
            return "waiting" if age < s.min_delay else "passes at the next retry"

        until = self.remembered.get((list_, sender))
        keys = self.entries_by_sender.get((list_, sender), {})
        ids = self.tickets_by_sender.get((list_, sender), {})
        entries = [self.entries[k] for k in islice(keys, DESCRIBE_LIMIT)]
        tickets = [self.tickets[i] for i in islice(ids, DESCRIBE_LIMIT)]
        return {
            "remembered_until": until if until is not None and until > now else None,
            "greylist": [{"network": e.key.network, "message_id": e.key.message_id,
                          "first_seen": e.first_seen, "attempts": e.attempts,
                          "state": entry_state(e)} for e in entries],
            "greylist_total": len(keys),
            "tickets": [{"ticket": t.id, "network": t.key.network,
                         "message_id": t.key.message_id, "first_seen": t.first_seen,
                         "attempts": t.attempts,
                         "decision": t.decision.value if t.decision else
                         ("fallback" if now - t.first_seen >= s.decide_within
                          else "pending")} for t in tickets],
            "tickets_total": len(ids),
        }

    # --- housekeeping --------------------------------------------------------------------

    def prune(self) -> int:
        """Drop what expired, a bounded amount of work a call (see the module's
        docstring); the number of rows dropped."""
        now = self.clock()
        s = self.settings
        dropped = self._prune(self.entries, self._entry_round,
                              lambda entry: _stale(entry.first_seen, now, s.max_age),
                              lambda key, entry: self._drop_entry(key))
        limit = now + s.remember + CLOCK_SLACK
        dropped += self._prune(self.remembered, self._remembered_round,
                               lambda until: not now < until <= limit,
                               lambda who, until: self._forget(*who))
        dropped += self._prune(self.tickets, self._ticket_round,
                               lambda ticket: self._expired(ticket, now),
                               lambda tid, ticket: self._drop_ticket(ticket))
        return dropped

    @staticmethod
    def _prune(items: OrderedDict, round_: OrderedDict, expired: Callable, drop: Callable
               ) -> int:
        """Drop expired ``items`` (``drop`` takes a key out of ``round_`` too): those
        first in line up to the first live one, then those among the next keys of the
        round, whose live ones go to its end.  At most ``PRUNE_BATCH`` of each."""
        dropped = 0
        for _ in range(PRUNE_BATCH):
            if not items:
                break
            key, value = next(iter(items.items()))
            if not expired(value):
                break
            drop(key, value)
            dropped += 1
        for _ in range(min(PRUNE_BATCH, len(round_))):
            key = next(iter(round_))
            value = items.get(key)
            if value is None:  # left ``items`` without leaving the round: a guard
                del round_[key]
            elif expired(value):
                drop(key, value)
                dropped += 1
            else:
                round_.move_to_end(key)
        return dropped

    # --- the dicts and their caps --------------------------------------------------------

    def _full(self, items: OrderedDict, cap: int, now: float) -> bool:
        """``preview``'s reading of the room at the ticket cap (nothing dropped)."""
        if len(items) < cap:
            return False
        return not self._expired(next(iter(items.values())), now) and not self.done

    def _no_room_for_entry(self, network: str, now: float) -> Step | None:
        """The step of a new first attempt from ``network`` kept out at a cap, else
        ``None``, were the expired entries first in line dropped (nothing is)."""
        s = self.settings
        oldest = next(iter(self.entries.values()), None)
        if oldest is not None and _stale(oldest.first_seen, now, s.max_age):
            return None
        if len(self.entries) >= s.max_entries:
            return _AT_CAP
        if network and self.by_network[network] >= self._network_cap():
            return _NETWORK_AT_CAP
        return None

    def _network_cap(self) -> int:
        return max(1, int(self.settings.max_entries * NETWORK_SHARE))

    def _room_for_entry(self, now: float, network: str) -> Step | None:
        """Make room for one more greylist entry from ``network``: expired ones make it,
        the first seen first (the order of ``entries``); a live one never (its MTA is
        coming back).  ``None``: there is room; else the step of the attempt kept out."""
        entries = self.entries
        s = self.settings
        share = self._network_cap() if network else 0
        while True:
            if len(entries) >= s.max_entries:
                refused = _AT_CAP
            elif share and self.by_network[network] >= share:
                refused = _NETWORK_AT_CAP
            else:
                return None
            key, oldest = next(iter(entries.items()))
            if not _stale(oldest.first_seen, now, s.max_age):
                return refused
            self._drop_entry(key)
            self.expired += 1

    def _room_for_ticket(self, now: float, ticket: Ticket) -> Step | None:
        """Make room for ``ticket``, new: expired tickets make it, then tickets whose post
        got its final answer (``done``); never one whose MTA still waits for a decision
        or the fallback.  ``None``: there is room; else the step of the attempt kept
        out (the cap, or the share of the ticket's network or sender)."""
        tickets = self.tickets
        while len(tickets) >= self.settings.max_tickets:
            oldest = next(iter(tickets.values()))
            if self._expired(oldest, now):
                self._drop_ticket(oldest)
                self.expired += 1
            elif self.done:
                self._drop_ticket(tickets[next(iter(self.done))])
                self.expired += 1
            else:
                return _AT_CAP
        return self._share_refused(ticket, now, drop=True)

    def _share_refused(self, ticket: Ticket, now: float, *, drop: bool) -> Step | None:
        """The step of ``ticket``, new, kept out because its client network holds
        ``ticket_network_share`` or its sender on its list ``ticket_sender_share`` of
        the tickets,
        else ``None``.  At a share the group's first ticket goes if its post is done
        with (expired, or answered) and ``drop``: one look per ticket dropped, so the
        flood keeps its own newcomers out, never anyone else's."""
        s = self.settings
        network = _ticket_network(ticket)
        groups = ((self.tickets_by_network.get(network) if network else None,
                   max(1, int(s.max_tickets * s.ticket_network_share)), _NETWORK_AT_CAP),
                  (self.tickets_by_sender.get((ticket.key.list, ticket.key.sender)),
                   max(1, int(s.max_tickets * s.ticket_sender_share)), _SENDER_AT_CAP))
        for members, share, refused in groups:
            if not drop:
                # What ``check`` would drop (``preview``): the group's first tickets, as
                # many as put it at its share, all done with.
                if members and len(members) >= share and not all(
                        tid in self.done or self._expired(self.tickets[tid], now)
                        for tid in islice(members, len(members) - share + 1)):
                    return refused
                continue
            while members and len(members) >= share:
                first = self.tickets[next(iter(members))]
                if not (first.id in self.done or self._expired(first, now)):
                    return refused
                self._drop_ticket(first)
                self.expired += 1
        return None

    def _put_entry(self, entry: Entry, record: bool = True) -> None:
        # A new key goes to the end; a refreshed one keeps its place (first seen order).
        key = entry.key
        if key not in self.entries:
            self.by_network[key.network] += 1
            self._entry_round[key] = None
            _group_add(self.entries_by_sender, (key.list, key.sender), key)
        self.entries[key] = entry
        if record:
            self.changes.entries[key] = entry

    def _drop_entry(self, key: Key, record: bool = True) -> None:
        del self.entries[key]
        self._entry_round.pop(key, None)
        _group_drop(self.entries_by_sender, (key.list, key.sender), key)
        network = key.network
        if self.by_network[network] > 1:
            self.by_network[network] -= 1
        else:
            del self.by_network[network]
        if record:
            self.changes.entries[key] = None

    def _remember(self, list_: str, sender: str, until: float, record: bool = True) -> int:
        """Remember a pass; at the cap expired passes go first, then the least recently
        remembered (idle state: that sender is greylisted once more).  How many of
        those went."""
        remembered = self.remembered
        remembered.pop((list_, sender), None)
        now = self.clock()
        limit = now + self.settings.remember + CLOCK_SLACK
        evicted = 0
        while len(remembered) >= self.settings.max_entries:
            who, oldest = next(iter(remembered.items()))
            if now < oldest <= limit:
                evicted += 1
            else:
                self.expired += 1
            self._forget(*who)
        remembered[list_, sender] = until
        self._remembered_round[list_, sender] = None
        if record:
            self.changes.remembered[list_, sender] = until
        return evicted

    def _forget(self, list_: str, sender: str) -> None:
        self.remembered.pop((list_, sender), None)
        self._remembered_round.pop((list_, sender), None)
        self.changes.remembered[list_, sender] = None

    def _put_ticket(self, ticket: Ticket, record: bool = True) -> None:
        """Add or refresh a ticket (a refreshed one keeps its place); the caller made
        room for a new one."""
        old = self.tickets.get(ticket.id)
        # A refresh keeps the ticket's place in its groups too (their first is the oldest,
        # the one ``_share_refused`` looks at).
        in_place = (old is not None and old.key == ticket.key
                    and _ticket_network(old) == _ticket_network(ticket))
        if old is not None:
            if old.key != ticket.key:
                self.ticket_by_key.pop(old.key, None)
            if not in_place:
                self._unindex_ticket(old)
        other = self.ticket_by_key.get(ticket.key)
        if other is not None and other != ticket.id:
            # Two tickets for one key (two daemons saw the first attempt): keep the newer.
            stale = self.tickets.pop(other, None)
            self._ticket_round.pop(other, None)
            self.done.pop(other, None)
            if stale is not None:
                self.undecided -= stale.decision is None
                self._unindex_ticket(stale)
                if record:
                    self.changes.tickets[other] = None
        if old is None:
            self._ticket_round[ticket.id] = None
        else:
            self.undecided -= old.decision is None
        self.undecided += ticket.decision is None
        self.tickets[ticket.id] = ticket
        if not in_place:
            _group_add(self.tickets_by_sender, (ticket.key.list, ticket.key.sender),
                       ticket.id)
            network = _ticket_network(ticket)
            if network:
                _group_add(self.tickets_by_network, network, ticket.id)
        self.ticket_by_key[ticket.key] = ticket.id
        if record:
            self.changes.tickets[ticket.id] = ticket
        if ticket.id not in self.done and self._answered(ticket):
            self.done[ticket.id] = None

    def _answered(self, ticket: Ticket) -> bool:
        """The post got its final answer: a retry came after the decision, or after
        ``decide_within`` (the fallback, the list's normal outcome)."""
        if ticket.decided_at is not None:
            return ticket.last_seen >= ticket.decided_at
        return ticket.last_seen - ticket.first_seen >= self.settings.decide_within

    def _unindex_ticket(self, ticket: Ticket) -> None:
        _group_drop(self.tickets_by_sender, (ticket.key.list, ticket.key.sender), ticket.id)
        network = _ticket_network(ticket)
        if network:
            _group_drop(self.tickets_by_network, network, ticket.id)

    def _drop_ticket(self, ticket: Ticket, record: bool = True) -> None:
        stored = self.tickets.pop(ticket.id, None)
        if stored is not None:
            self.undecided -= stored.decision is None
            self._unindex_ticket(stored)
        self._ticket_round.pop(ticket.id, None)
        self.done.pop(ticket.id, None)
        if self.ticket_by_key.get(ticket.key) == ticket.id:
            del self.ticket_by_key[ticket.key]
        if record:
            self.changes.tickets[ticket.id] = None

    def _fresh_id(self) -> str:
        for _ in range(100):
            candidate = self.ticket_id()
            if candidate not in self.tickets:
                return candidate
        raise RuntimeError("no free ticket id after 100 tries")
