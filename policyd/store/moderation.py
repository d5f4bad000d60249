"""SMTP-time moderation state in the native store's database (migration 0004).

Plain functions on an ``Engine`` (the daemon's store thread) or a ``Session``
(``policyctl``): load the in-memory index, write a batch of ``core.moderation.Changes``,
read what other daemons and moderators changed, prune expired rows, list and decide
tickets.  Nothing here runs on the reactor.  These tables are not tracked for change
detection: writing them never bumps ``store_state.generation`` (so never through
``Store.write()``, which does).
"""

from __future__ import annotations

import hashlib
import math
import random
import time

from sqlalchemy import delete, insert, or_, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..core.moderation import CLOCK_SLACK, Changes, Decision, Entry, Key, Settings, Ticket
from ..errors import BadInput, NotFound
from .models import ModerationEntry, ModerationSender, ModerationTicket

__all__ = ["key_hash", "sender_hash", "load_state", "write_changes", "read_since",
           "prune_rows", "pending_tickets", "decide_ticket", "store_clock"]

G = ModerationEntry.__table__
R = ModerationSender.__table__
T = ModerationTicket.__table__
# Rows per statement in a batch (SQLite's bound-parameter limit is the tightest).
CHUNK = 200


def key_hash(key: Key) -> str:
    return hashlib.sha256("\0".join(key).encode("utf-8", "surrogateescape")).hexdigest()


def sender_hash(list_: str, sender: str) -> str:
    return hashlib.sha256(f"{list_}\0{sender}".encode("utf-8", "surrogateescape")).hexdigest()


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(math.floor(value))


def _entry(row) -> Entry:
    return Entry(Key(row.list, row.sender, row.network, row.message_id),
                 float(row.first_seen), float(row.last_seen), row.attempts)


def _ticket(row) -> Ticket:
    return Ticket(row.id, Key(row.list, row.sender, row.network, row.message_id),
                  float(row.first_seen), float(row.last_seen), row.attempts, row.subject,
                  row.client, Decision(row.decision) if row.decision else None,
                  row.reason, None if row.decided_at is None else float(row.decided_at),
                  row.digest)


def _chunks(items: list, size: int = CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# The store's own clock as Unix seconds, by dialect: the one clock every daemon sharing
# the store reads alike (the rows carry the writing daemon's wall clock; a daemon whose
# clock jumped must not expire rows by it).  clock_timestamp(): the time now, not the
# transaction's start; UTC_TIMESTAMP(6) and julianday('now'): the statement's, with a
# fraction.
_CLOCK_SQL = {
    "postgresql": "SELECT extract(epoch from clock_timestamp())",
    # UTC_TIMESTAMP, not NOW(): the session's local time is ambiguous for an hour at
    # each fall-back of a zone with summer time.
    "mysql": "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) / 1000000",
    "mariadb": "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) / 1000000",
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
}


def store_clock(bind: Engine | Connection) -> float:
    """The database server's clock, Unix seconds (a float: PostgreSQL and MariaDB
    answer a ``Decimal``).  On a ``Connection`` it runs in that connection (a
    transaction reads the clock it deletes by)."""
    sql = _CLOCK_SQL.get(bind.dialect.name)
    if sql is None:
        raise NotImplementedError(f"no clock query for the {bind.dialect.name} dialect")
    if isinstance(bind, Connection):
        return float(bind.execute(text(sql)).scalar_one())
    with bind.connect() as connection:
        return float(connection.execute(text(sql)).scalar_one())


def load_state(engine: Engine, settings: Settings, now: float):
    """(entries, remembered, tickets) not expired, oldest first, at most the caps."""
    with engine.connect() as connection:
        entries = [_entry(row) for row in connection.execute(
            select(G).where(G.c.first_seen >= now - settings.max_age)
            .order_by(G.c.last_seen.desc()).limit(settings.max_entries))]
        remembered = [(row.list, row.sender, float(row.until)) for row in connection.execute(
            select(R).where(R.c.until > now).order_by(R.c.until.desc())
            .limit(settings.max_entries))]
        tickets = [_ticket(row) for row in connection.execute(
            select(T).order_by(T.c.last_seen.desc()).limit(settings.max_tickets))]
    entries.reverse()
    remembered.reverse()
    tickets.reverse()
    return entries, remembered, tickets


# Another daemon writing the same rows at the same moment (the first attempt of a post
# reaches both MX hosts; InnoDB's gap locks make any two overlapping batches conflict):
# the transaction that lost is tried again, a few times, after a short random pause.
WRITE_ATTEMPTS = 5
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "23505"})  # serialization, deadlock, dup
_CONFLICT_MYSQL = frozenset({1213, 1062})  # deadlock, duplicate entry


def is_write_conflict(error: DBAPIError) -> bool:
    """A conflict with a concurrent writer (deadlock, serialization failure, a row the
    other one inserted first): worth trying again, unlike a lock held for long."""
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _CONFLICT_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] in _CONFLICT_MYSQL


def write_changes(engine: Engine, changes: Changes, *, sleep=time.sleep) -> list[str]:
    """One transaction: the entries and remembered senders replaced or deleted; new
    tickets inserted, known ones updated (``last_seen``, ``attempts`` only: a moderator's
    decision written meanwhile is never overwritten), dropped ones deleted.  Tried again
    on a conflict with another daemon's writes (``WRITE_ATTEMPTS``): the rows are whole
    replacements, so the transaction that comes second simply replaces them again.

    The ids of tickets the store holds for another post (another daemon drew the same
    id): neither updated, inserted nor deleted here (the row is that post's, its
    decision too); ``ModerationState.redraw`` gives them new ids."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return _write_changes(engine, changes)
        except DBAPIError as error:
            if attempt == WRITE_ATTEMPTS or not is_write_conflict(error):
                raise
            sleep(random.uniform(0.005, 0.05) * attempt)


def _write_changes(engine: Engine, changes: Changes) -> list[str]:
    with engine.begin() as connection:
        hashes = {key_hash(key): (key, entry) for key, entry in changes.entries.items()}
        for chunk in _chunks(list(hashes)):
            connection.execute(delete(G).where(G.c.key_hash.in_(chunk)))
        rows = [{"key_hash": h, "list": key.list, "sender": key.sender,
                 "network": key.network, "message_id": key.message_id,
                 "first_seen": _seconds(entry.first_seen),
                 "last_seen": _seconds(entry.last_seen), "attempts": entry.attempts}
                for h, (key, entry) in hashes.items() if entry is not None]
        if rows:
            connection.execute(insert(G), rows)
        senders = {sender_hash(l, s): (l, s, until)
                   for (l, s), until in changes.remembered.items()}
        for chunk in _chunks(list(senders)):
            connection.execute(delete(R).where(R.c.key_hash.in_(chunk)))
        rows = [{"key_hash": h, "list": l, "sender": s, "until": _seconds(until)}
                for h, (l, s, until) in senders.items() if until is not None]
        if rows:
            connection.execute(insert(R), rows)
        # A dropped ticket is deleted by id (``Changes`` records no key for a drop).
        dropped = [tid for tid, ticket in changes.tickets.items() if ticket is None]
        for chunk in _chunks(dropped):
            connection.execute(delete(T).where(T.c.id.in_(chunk)))
        kept = {tid: ticket for tid, ticket in changes.tickets.items() if ticket is not None}
        stored: dict[str, str] = {}
        for chunk in _chunks(list(kept)):
            stored.update((tid, hash_) for tid, hash_ in connection.execute(
                select(T.c.id, T.c.key_hash).where(T.c.id.in_(chunk))))
        known: set[str] = set()
        conflicts: list[str] = []
        for tid, stored_hash in stored.items():
            if stored_hash == key_hash(kept[tid].key):
                known.add(tid)
            else:
                conflicts.append(tid)
        for tid in known:
            ticket = kept[tid]
            # The key in the WHERE too: a row that changed hands since the select
            # above is not updated with another post's attempts.
            connection.execute(update(T).where(
                T.c.id == tid, T.c.key_hash == key_hash(ticket.key)).values(
                last_seen=_seconds(ticket.last_seen), attempts=ticket.attempts))
        rows = [{"id": t.id, "key_hash": key_hash(t.key), "list": t.key.list,
                 "sender": t.key.sender, "network": t.key.network,
                 "message_id": t.key.message_id, "subject": t.subject[:255],
                 "client": t.client[:64], "first_seen": _seconds(t.first_seen),
                 "last_seen": _seconds(t.last_seen), "attempts": t.attempts,
                 "decision": t.decision.value if t.decision else None,
                 "reason": t.reason[:300], "decided_at": _seconds(t.decided_at),
                 "digest": t.digest}
                for tid, t in kept.items() if tid not in stored]
        if rows:
            connection.execute(insert(T), rows)
    return conflicts


def read_since(engine: Engine, since: float, remember: float):
    """What changed from ``since`` on (give a little slack): greylist entries seen,
    senders remembered (their ``until`` is the pass time plus ``remember``), tickets seen
    or decided.  For ``ModerationState.merge``."""
    mark = int(since)
    with engine.connect() as connection:
        entries = [_entry(row) for row in connection.execute(
            select(G).where(G.c.last_seen >= mark).order_by(G.c.last_seen))]
        remembered = [(row.list, row.sender, float(row.until)) for row in connection.execute(
            select(R).where(R.c.until >= mark + int(remember)).order_by(R.c.until))]
        tickets = [_ticket(row) for row in connection.execute(
            select(T).where(or_(T.c.last_seen >= mark, T.c.decided_at >= mark))
            .order_by(T.c.last_seen))]
    return entries, remembered, tickets


def prune_rows(engine: Engine, settings: Settings, now: float | None = None) -> int:
    """Delete the expired rows (every daemon may; it is idempotent), and those written
    with times the clock has stepped back from (``core.moderation.CLOCK_SLACK``).

    ``now``: the store's clock (``store_clock``; ``None``: read in this transaction),
    never a daemon's wall clock alone: one daemon whose clock jumped a day ahead would
    delete every other daemon's greylist entries and tickets, moderators' decisions
    with them (and one stepped back, every row written since)."""
    with engine.begin() as connection:
        if now is None:
            now = store_clock(connection)
        future = now + CLOCK_SLACK
        count = connection.execute(delete(G).where(or_(
            G.c.first_seen < now - settings.max_age, G.c.first_seen > future))).rowcount or 0
        count += connection.execute(delete(R).where(or_(
            R.c.until <= now, R.c.until > future + settings.remember))).rowcount or 0
        count += connection.execute(delete(T).where(or_(
            T.c.decided_at < now - settings.max_age, T.c.decided_at > future,
            T.c.first_seen > future,
            (T.c.decided_at.is_(None)) & (T.c.first_seen < now - settings.decide_within
                                          - settings.max_age)))).rowcount or 0
    return count


# --- policyctl -----------------------------------------------------------------------------


def pending_tickets(session: Session, list_: str | None = None) -> list[Ticket]:
    """Undecided tickets, oldest first (of one list with ``list_``)."""
    statement = select(T).where(T.c.decision.is_(None)).order_by(T.c.first_seen, T.c.id)
    if list_ is not None:
        statement = statement.where(T.c.list == list_)
    return [_ticket(row) for row in session.execute(statement)]


def decide_ticket(session: Session, ticket_id: str, decision: Decision, now: float,
                  reason: str = "") -> Ticket:
    """Record a moderator's decision; the daemons apply it at the sender's next retry."""
    tid = ticket_id.strip().upper()
    if any(ch in reason for ch in "\r\n\x00"):
        raise BadInput("reason: one line of text (it becomes the SMTP reply)")
    if len(reason) > 300:
        raise BadInput("reason: at most 300 characters")
    row = session.execute(select(T).where(T.c.id == tid)).first()
    if row is None:
        raise NotFound(f"no ticket {tid}")
    session.execute(update(T).where(T.c.id == tid).values(
        decision=decision.value, reason=reason.strip(), decided_at=_seconds(now)))
    return _ticket(session.execute(select(T).where(T.c.id == tid)).one())
