"""The ``mailman3`` store backend: read a Mailman 3 core database directly, read-only.

Configuration (``[store] backend = mailman3``, ``url =`` the SQLAlchemy URL Mailman's own
``[database] url`` names).  Nothing is ever written: SQLite is opened through a
``mode=ro`` URI (and ``PRAGMA query_only``), PostgreSQL sessions start with
``default_transaction_read_only=on``, MySQL/MariaDB sessions with ``SET SESSION
TRANSACTION READ ONLY``.  Reads are short: on PostgreSQL and MariaDB one
``REPEATABLE READ`` read-only transaction per build (MVCC snapshots, no row or table locks
that block Mailman's writes); on SQLite one statement at a time (a rollback-journal
reader blocks a writer's commit for as long as it reads, so policyd never holds a read
transaction open across statements) with the change token read before and after the
build to catch a build that straddled a commit.

What is read, and how it maps to ``ListSpec`` (Mailman 3.3.10's model/*.py; the semantics
in rules/moderation.py, model/roster.py and model/bans.py):

* ``domain``: ``mail_host``, and ``alias_domain`` -> mail host (LMTP maps it).
* ``mailinglist``: ``list_name@mail_host``, ``list_id``, ``display_name``,
  ``default_member_action``, ``default_nonmember_action``, ``emergency``, the four
  ``*_these_nonmembers`` pickles (``safe_pickle.loads_mailman3_list``), and
  ``nonmember_rejection_notice`` as the list's rejection notice (see below).
* ``member`` with ``role`` 1 (member) and 4 (nonmember): subscribed with an address
  (``address_id``) or as a user (``user_id``: the user's preferred address stands for
  it; without a preferred address Mailman's ``get_member`` cannot find it, so neither do
  we).  A direct membership wins over a user one for the same address (``get_member``).
* ``address`` / ``user``: every other address of a member address's user posts as that
  member (``_find_sender_member``: the user's addresses in the order the database returns
  them, the first one that is a member wins; a direct member address is never an alias).
* ``ban``: ``list_id`` NULL is site-wide.

The rejection notice: Mailman 3 has no per-list SMTP rejection text.  Its reject chain
bounces the message with the ``list:user:notice:rejected`` template (a URI in the
``template`` table, resolved by Mailman's template loader, with ``$reasons`` filled in per
message), which is not a text policyd could read or send at SMTP time.  The only per-list
text is the ``nonmember_rejection_notice`` column: imported from Mailman 2.1 by
``mailman import21`` and empty for lists created in Mailman 3 (their style sets ``''``).
policyd uses it when it is not empty, else its own ``[smtp] reject_text``.

Incremental refresh (``load_changes``, the native store's design): a full build of a
large site takes seconds, and most changes made through Mailman touch one list.  Each
snapshot carries a ``SourceState``: per list (``mailinglist.id``) a digest of its
``mailinglist`` row (the decision columns, the four pickles as raw bytes), aggregates of
its ``member`` rows (grouped by ``member.list_id``, the list-id string: count, id sum,
id-weighted sums of moderation action, role, address and user) and its list bans; and a
shared digest of the domains (alias domains included), the site bans, and the
``address``/``user`` rows that existed at that build (ids up to its maxima: every address
counted and, where ids can be reused, its email hashed; links to existing users; users'
preferred addresses).  When the token moves, only the lists whose digest changed are read
again (their members, the addresses and users behind those members, their bans) and
swapped into the previous snapshot (``snapshot.replace_lists``); the lists' ``@list``
references resolve through the snapshot at decision time, so unchanged lists stay valid.
Anything else is a full build: the shared digest changed, a new address was linked to an
existing user (its other addresses post as it on every list the user is on), no digest
explains the token change, or more than ``MAX_INCREMENTAL_LISTS`` lists changed.  An
existing address linked to a new user (Mailman's subscription workflow makes a user for
an address that had none) rebuilds the lists that address is a member of.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping
from urllib.parse import quote

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Unicode,
    case,
    cast,
    create_engine,
    event,
    func,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from ..errors import BadInput, StoreUnavailable
from ..core.snapshot import ListSpec, MemberSpec, Snapshot, build, replace_lists
from ..core.verdict import Action, Mode
from .engine import parse_url, safe_url
from .safe_pickle import UnsafePickleError, loads_mailman3_list

__all__ = ["Mailman3Backend", "UnknownSchemaError", "open_backend", "KNOWN_REVISIONS",
           "SourceState", "read_state", "MAX_INCREMENTAL_LISTS"]

# Alembic revisions of Mailman 3.3.x (mailman/database/alembic/versions in 3.3.10, newest
# last).  The first is dated 2019-07-17, the newest one older than the 3.3.0 release
# (2019-09-04, docs/NEWS.rst); the next is dated 2019-12-24.  Every one of them
# has every column read here.  A database at another revision is refused: an older one
# may lack a column, a newer one may have changed a meaning.
KNOWN_REVISIONS: dict[str, str] = {
    "83339e4039da": "add usenet watermark (Mailman 3.3.0)",
    "d151c0b8d6f7": "bounce parameters",
    "9735f5e5dbdb": "add archive rendering mode",
    "2b73fbcc97c9": "increase workflowstate data column size",
    "472e6d713047": "bounce increment",
    "ec5fe422e27c": "increase info",
    "bc0c49c6dda2": "use utf8mb4 in mysql",
    "98224512c9c2": "mysql extend autoresponse text fields",
    "2156fc3f6f7d": "add dmarc addresses",
    "729a8f2045da": "add domain webhost",
    "8cc1f79f4459": "add _member_id index on member (Mailman 3.3.10 head)",
}

GATE_MAX_AGE = 60.0
MEMBER_ROLE = 1
NONMEMBER_ROLE = 4

_ACTIONS = {int(action): action for action in Action}

# --- Mailman's tables, only the columns policyd reads (model/*.py) -------------------------

_metadata = MetaData()
domain_t = Table(
    "domain", _metadata,
    Column("id", Integer, primary_key=True),
    Column("mail_host", Unicode),
    Column("alias_domain", Unicode),
)
mailinglist_t = Table(
    "mailinglist", _metadata,
    Column("id", Integer, primary_key=True),
    Column("list_name", Unicode),
    Column("mail_host", Unicode),
    Column("list_id", Unicode),
    Column("display_name", Unicode),
    Column("default_member_action", Integer),
    Column("default_nonmember_action", Integer),
    Column("emergency", Boolean),
    Column("accept_these_nonmembers", LargeBinary),
    Column("hold_these_nonmembers", LargeBinary),
    Column("reject_these_nonmembers", LargeBinary),
    Column("discard_these_nonmembers", LargeBinary),
    Column("nonmember_rejection_notice", Unicode),
)
member_t = Table(
    "member", _metadata,
    Column("id", Integer, primary_key=True),
    Column("role", Integer),
    Column("list_id", Unicode),
    Column("moderation_action", Integer),
    Column("address_id", Integer),
    Column("user_id", Integer),
)
address_t = Table(
    "address", _metadata,
    Column("id", Integer, primary_key=True),
    Column("email", Unicode),
    Column("user_id", Integer),
)
user_t = Table(
    "user", _metadata,
    Column("id", Integer, primary_key=True),
    Column("_preferred_address_id", Integer),
)
ban_t = Table(
    "ban", _metadata,
    Column("id", Integer, primary_key=True),
    Column("email", Unicode),
    Column("list_id", Unicode),
)
alembic_t = Table("alembic_version", _metadata, Column("version_num", Unicode))

_LIST_SETTINGS = (
    "list_name", "mail_host", "list_id", "display_name", "default_member_action",
    "default_nonmember_action", "emergency", "accept_these_nonmembers",
    "hold_these_nonmembers", "reject_these_nonmembers", "discard_these_nonmembers",
    "nonmember_rejection_notice",
)
_NONMEMBER_COLUMNS = ("accept_these_nonmembers", "hold_these_nonmembers",
                      "reject_these_nonmembers", "discard_these_nonmembers")


class UnknownSchemaError(StoreUnavailable):
    """The database is not a Mailman 3.3.x core database policyd knows."""


class Mailman3DataError(StoreUnavailable):
    """A row policyd cannot interpret safely (an unsafe pickle, an unknown action)."""


# --- engine ------------------------------------------------------------------------------


def read_only_engine(url: str) -> Engine:
    """An engine that cannot write to the Mailman database, whatever it is asked."""
    parsed = parse_url(url, "Mailman 3 database URL")
    backend = parsed.get_backend_name()
    kwargs: dict = {}
    if backend == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            raise BadInput("the Mailman 3 database URL must name a SQLite file")
        if not database.startswith("file:"):
            database = "file:" + quote(database, safe="/")
        query = dict(parsed.query)
        query.update({"mode": "ro", "uri": "true"})
        parsed = parsed.set(database=database, query=query)
        kwargs["connect_args"] = {"timeout": 10}
    elif backend == "postgresql":
        kwargs["connect_args"] = {
            "options": "-c default_transaction_read_only=on -c lock_timeout=5000 "
                       "-c statement_timeout=120000",
            "application_name": "policyd",
        }
        kwargs["isolation_level"] = "REPEATABLE READ"
        kwargs["pool_pre_ping"] = True
    elif backend in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        kwargs["isolation_level"] = "REPEATABLE READ"
        kwargs["pool_pre_ping"] = True
        kwargs["pool_recycle"] = 3600
    else:
        raise BadInput(f"the Mailman 3 database URL {safe_url(url)} is neither SQLite, "
                       "PostgreSQL nor MySQL/MariaDB")
    try:
        engine = create_engine(parsed, pool_size=2, max_overflow=2, **kwargs)
    except (NoSuchModuleError, ImportError) as error:
        raise BadInput(f"Mailman 3 database URL {safe_url(url)}: no driver for it "
                       f"({error})") from None
    _install_hooks(engine, backend)
    return engine


def _crc32(value) -> int:
    if value is None:
        return 0
    return zlib.crc32(str(value).encode("utf-8", "surrogatepass"))


def _install_hooks(engine: Engine, backend: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        cursor = dbapi_connection.cursor()
        if backend == "sqlite":
            # Belt and braces: the URI already says mode=ro.
            cursor.execute("PRAGMA query_only = ON")
            dbapi_connection.create_function("policyd_crc32", 1, _crc32, deterministic=True)
        elif backend in ("mysql", "mariadb"):
            cursor.execute("SET SESSION TRANSACTION READ ONLY")
        cursor.close()


def _string_hash(dialect: str, column):
    """A cheap hash of a string column in SQL, or ``None`` where ids are never reused.

    Only SQLite (``INTEGER PRIMARY KEY`` without AUTOINCREMENT hands the id of a deleted
    last row to the next insert) and MySQL/MariaDB (older servers recompute
    AUTO_INCREMENT from MAX(id) at restart) can give a new row an old id; PostgreSQL's
    sequences never do, so there the id sums alone notice every insert."""
    if dialect in ("mysql", "mariadb"):
        return func.crc32(column) % 65521
    if dialect == "sqlite":
        return func.policyd_crc32(column) % 65521
    return None


# --- the backend ---------------------------------------------------------------------------


class Mailman3Backend:
    """``policyd.store`` Backend over a Mailman 3.3.x core database (read-only)."""

    kind = "mailman3"

    def __init__(self, url: str, *, known_revisions: Iterable[str] | None = None) -> None:
        self.url = url
        self.engine = read_only_engine(url)
        self.known_revisions = frozenset(
            KNOWN_REVISIONS if known_revisions is None else known_revisions)
        self._revision: str | None = None
        self._token_sql = self._token_statements()
        # SQLite only: PRAGMA data_version on one long-lived connection changes whenever
        # another connection (Mailman) commits; while it stays the same, the last token
        # still holds and the aggregates need not be recomputed.
        self._gate_lock = threading.Lock()
        self._gate_connection = None
        self._gate: tuple[int, str, float] | None = None

    @classmethod
    def from_config(cls, store_config) -> "Mailman3Backend":
        return cls(store_config.url)

    # -- Backend interface ----------------------------------------------------------------

    def check(self) -> None:
        with self._connect() as connection:
            self._check_schema(connection)
            connection.rollback()

    def describe(self) -> str:
        revision = self._revision or "not checked yet"
        label = KNOWN_REVISIONS.get(self._revision or "", "")
        label = f", {label}" if label else ""
        return f"mailman3 {safe_url(self.url)} (schema rev {revision}{label}; read-only)"

    def close(self) -> None:
        with self._gate_lock:
            if self._gate_connection is not None:
                self._gate_connection.close()
                self._gate_connection = None
            self._gate = None
        self.engine.dispose()

    def change_token(self) -> str:
        data_version = self._data_version()
        if data_version is not None:
            gate = self._gate
            # Recomputed once a minute anyway: a database file replaced under the same
            # name keeps the old file's data_version on the open connection.
            if (gate is not None and gate[0] == data_version
                    and time.monotonic() - gate[2] < GATE_MAX_AGE):
                return gate[1]
        with self._connect() as connection:
            token = self._token(connection)
            connection.rollback()
        if data_version is not None:
            # data_version was read first: a commit after it changes it again.
            self._gate = (data_version, token, time.monotonic())
        return token

    def _data_version(self) -> int | None:
        if self.engine.dialect.name != "sqlite":
            return None
        with self._gate_lock:
            try:
                if self._gate_connection is None:
                    self._gate_connection = self.engine.raw_connection()
                cursor = self._gate_connection.cursor()
                try:
                    cursor.execute("PRAGMA data_version")
                    return int(cursor.fetchone()[0])
                finally:
                    cursor.close()
            except Exception:
                if self._gate_connection is not None:
                    self._gate_connection.invalidate()
                    self._gate_connection = None
                self._gate = None
                return None

    def load_snapshot(self) -> Snapshot:
        """Build the snapshot.  ``version`` is the change token read before the rows; its
        ``source_state`` holds the digests the next ``load_changes`` compares."""
        return self._consistent_read(self._build)

    def load_changes(self, previous: Snapshot) -> Snapshot:
        """The snapshot after a change: ``previous`` with only the changed lists rebuilt
        when that is provably enough (see "Incremental refresh" in the module docstring),
        else a full build.  Read as consistently as ``load_snapshot``."""
        prior = previous.source_state
        if not isinstance(prior, SourceState) or prior.origin != self.url:
            return self.load_snapshot()
        return self._consistent_read(
            lambda connection, token: self._changes(connection, token, previous, prior))

    # -- internals --------------------------------------------------------------------------

    def _consistent_read(self, work: Callable[[Connection, str], Snapshot]) -> Snapshot:
        """``work(connection, token)`` on one consistent view of the database.

        PostgreSQL and MariaDB: one REPEATABLE READ read-only transaction.  SQLite reads
        statement by statement (see the module docstring); ``PRAGMA data_version`` read
        before and after shows whether a Mailman commit fell in between, and then the
        work is done again, up to three times."""
        if self.engine.dialect.name != "sqlite":
            with self._connect() as connection:
                token = self._token(connection)
                snapshot = work(connection, token)
                connection.rollback()
            return snapshot
        for attempt in range(3):
            before = self._data_version()
            gate = self._gate
            with self._connect() as connection:
                if (before is not None and gate is not None and gate[0] == before
                        and time.monotonic() - gate[2] < GATE_MAX_AGE):
                    token = gate[1]  # nothing committed since change_token() read it
                    self._check_schema(connection)
                else:
                    token = self._token(connection)
                snapshot = work(connection, token)
            if before is None:
                return snapshot
            if self._data_version() == before:
                self._gate = (before, token, time.monotonic())
                return snapshot
        # Mailman kept committing during every attempt: serve the last build; its version
        # is the token read before it, so the next refresh sees a change and reads again.
        return snapshot

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot open the Mailman 3 database "
                                   f"{safe_url(self.url)}: {_first_line(error)}") from None

    def _check_schema(self, connection: Connection) -> str:
        try:
            rows = connection.execute(select(alembic_t.c.version_num)).scalars().all()
        except SQLAlchemyError as error:
            raise UnknownSchemaError(
                f"{safe_url(self.url)} is not a Mailman 3 core database (no readable "
                f"alembic_version table: {_first_line(error)})") from None
        if len(rows) != 1:
            raise UnknownSchemaError(
                f"{safe_url(self.url)}: expected one Alembic revision, found {rows!r}")
        revision = rows[0]
        if revision not in self.known_revisions:
            raise UnknownSchemaError(
                f"{safe_url(self.url)}: unknown Mailman 3 schema revision {revision!r}; "
                "policyd knows the Mailman 3.3.x revisions "
                f"{', '.join(sorted(self.known_revisions))} "
                "(upgrade policyd, or check that this is a Mailman 3.3 database)")
        self._revision = revision
        return revision

    def _token_statements(self):
        """The change-detection queries.

        Why these are enough: every input of a decision lives in six tables.  The small
        ones (``domain``, ``mailinglist``'s decision columns with the raw pickles, ``ban``
        and ``alembic_version``) are read whole and hashed: a few hundred kilobytes for a
        thousand lists.  The big ones (``member``, ``address``, ``user``) are summarised
        by one aggregate each over the columns that matter: row count, highest id, and
        position-weighted sums of the foreign keys, role and moderation action, plus a
        hash of the strings (``list_id``, ``email``) so that SQLite reusing the id of a
        deleted last row for a new row with other values still changes the sum.
        Subscribe and unsubscribe change counts and sums, a moderation change changes the
        weighted action sum, a user linking an address or changing its preferred
        address changes the ``address``/``user`` sums, a new list or a settings change
        changes the ``mailinglist`` digest.  Each aggregate is one sequential scan of one
        table with no sort: tens of milliseconds for 200,000 memberships.
        """
        def weight(column):
            # BIGINT: PostgreSQL's int4 arithmetic would overflow on the products.
            return cast(column, BigInteger) % 65521 + 1

        member_hash = _string_hash(self.engine.dialect.name, member_t.c.list_id)
        address_hash = _string_hash(self.engine.dialect.name, address_t.c.email)
        member = select(
            func.count(),
            func.coalesce(func.max(member_t.c.id), 0),
            func.coalesce(func.sum(member_t.c.id), 0),
            func.coalesce(func.sum(
                (func.coalesce(member_t.c.moderation_action, 7) + 1) * weight(member_t.c.id)
                + func.coalesce(member_t.c.role, 0) * 8 * weight(member_t.c.id)), 0),
            func.coalesce(func.sum(
                func.coalesce(member_t.c.address_id, 0) * 3
                + func.coalesce(member_t.c.user_id, 0) * 5), 0),
            func.coalesce(func.sum(member_hash * weight(member_t.c.id)), 0)
            if member_hash is not None else literal(0),
        )
        address = select(
            func.count(),
            func.coalesce(func.max(address_t.c.id), 0),
            func.coalesce(func.sum(func.coalesce(address_t.c.user_id, 0)
                                   * weight(address_t.c.id)), 0),
            func.coalesce(func.sum(address_hash * weight(address_t.c.id)), 0)
            if address_hash is not None else literal(0),
        )
        user = select(
            func.count(),
            func.coalesce(func.max(user_t.c.id), 0),
            func.coalesce(func.sum(func.coalesce(user_t.c._preferred_address_id, 0)
                                   * weight(user_t.c.id)), 0),
        )
        lists = select(mailinglist_t.c.id, *(mailinglist_t.c[n] for n in _LIST_SETTINGS)
                       ).order_by(mailinglist_t.c.id)
        domains = select(domain_t).order_by(domain_t.c.id)
        bans = select(ban_t).order_by(ban_t.c.id)
        return member, address, user, lists, domains, bans

    def _token(self, connection: Connection) -> str:
        revision = self._check_schema(connection)
        digest = hashlib.sha256(revision.encode())
        try:
            member, address, user, lists, domains, bans = self._token_sql
            for statement in (member, address, user):
                digest.update(repr(tuple(int(v) for v in
                                         connection.execute(statement).one())).encode())
            for statement in (lists, domains, bans):
                for row in connection.execute(statement):
                    digest.update(repr(tuple(bytes(v) if isinstance(v, memoryview) else v
                                             for v in row)).encode())
                digest.update(b"|")
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot read the Mailman 3 database "
                                   f"{safe_url(self.url)}: {_first_line(error)}") from None
        return "mm3-" + digest.hexdigest()[:24]

    def _build(self, connection: Connection, token: str) -> Snapshot:
        started = time.time()
        try:
            state, _, _ = read_state(connection, self.engine.dialect.name, origin=self.url)
            rows = _read_rows(connection)
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot read the Mailman 3 database "
                                   f"{safe_url(self.url)}: {_first_line(error)}") from None
        specs, domains, site_bans, problems = specs_from_rows(*rows)
        snapshot = build(specs, domains=domains, site_bans=site_bans, version=token,
                         built_at=started, source_state=state)
        if problems:
            snapshot = replace(snapshot, problems=tuple(problems) + snapshot.problems)
        return snapshot

    def _changes(self, connection: Connection, token: str, previous: Snapshot,
                 prior: "SourceState") -> Snapshot:
        started = time.time()
        try:
            state, shared_same, relinked = read_state(
                connection, self.engine.dialect.name, prior, origin=self.url)
            changed = {id_ for id_, entry in state.lists.items()
                       if prior.lists.get(id_) != entry}
            changed.update(id_ for id_ in relinked if id_ in state.lists)
            removed = [posting for id_, (posting, _, _) in prior.lists.items()
                       if state.lists.get(id_, ("",))[0] != posting]
            if (not shared_same or not (changed or removed)
                    or len(changed) > MAX_INCREMENTAL_LISTS):
                rows = _read_rows(connection)
                partial = False
            else:
                rows = _read_list_rows(connection, self.engine.dialect.name,
                                       sorted(changed),
                                       sorted({state.lists[i][1] for i in changed}))
                partial = True
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot read the Mailman 3 database "
                                   f"{safe_url(self.url)}: {_first_line(error)}") from None
        specs, domains, site_bans, problems = specs_from_rows(*rows)
        if not partial:
            snapshot = build(specs, domains=domains, site_bans=site_bans, version=token,
                             built_at=started, source_state=state)
            if problems:
                snapshot = replace(snapshot, problems=tuple(problems) + snapshot.problems)
            return snapshot
        snapshot = replace_lists(previous, specs, removed, version=token, built_at=started,
                                 source_state=state)
        # replace_lists drops the rebuilt lists' own problems ("<posting>: ..."); the
        # ones specs_from_rows reports are "list <posting>: ...".
        gone = {f"list {posting}" for posting in removed}
        gone.update(f"list {state.lists[i][0]}" for i in changed)
        kept = tuple(p for p in snapshot.problems if p.split(":", 1)[0] not in gone)
        if problems or len(kept) != len(snapshot.problems):
            snapshot = replace(snapshot, problems=tuple(problems) + kept)
        return snapshot


def _read_rows(connection: Connection):
    domains = connection.execute(select(domain_t.c.mail_host, domain_t.c.alias_domain)).all()
    lists = connection.execute(
        select(*(mailinglist_t.c[n] for n in _LIST_SETTINGS)).order_by(mailinglist_t.c.id)
    ).all()
    # No ORDER BY: Mailman walks a user's addresses in the order the database returns
    # them (an unordered relationship); a plain scan returns them in that same order.
    addresses = connection.execute(
        select(address_t.c.id, address_t.c.email, address_t.c.user_id)).all()
    users = connection.execute(
        select(user_t.c.id, user_t.c._preferred_address_id)
        .where(user_t.c._preferred_address_id.is_not(None))).all()
    members = connection.execute(
        select(member_t.c.list_id, member_t.c.role, member_t.c.moderation_action,
               member_t.c.address_id, member_t.c.user_id)
        .where(member_t.c.role.in_((MEMBER_ROLE, NONMEMBER_ROLE)))
        .order_by(member_t.c.id)).all()
    bans = connection.execute(select(ban_t.c.email, ban_t.c.list_id).order_by(ban_t.c.id)
                              ).all()
    return domains, lists, addresses, users, members, bans


# --- incremental refresh -------------------------------------------------------------------

MAX_INCREMENTAL_LISTS = 64


@dataclass(frozen=True)
class SourceState:
    """What a snapshot was built from, in digests (``Snapshot.source_state``)."""

    origin: str  # the database URL: a state is only compared with one of the same database
    dialect: str
    lists: Mapping[int, tuple[str, str, tuple]]  # mailinglist.id -> (posting, list-id, digest)
    shared: tuple
    max_address_id: int
    max_user_id: int


def _plain(row) -> tuple:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def _ints(row) -> tuple:
    return tuple(0 if v is None else int(v) for v in row)


def _big(column):
    # BIGINT: PostgreSQL's int4 arithmetic would overflow on the products.
    return cast(column, BigInteger)


def read_state(connection: Connection, dialect: str, previous: SourceState | None = None,
               *, origin: str = "") -> tuple[SourceState, bool, frozenset[int]]:
    """The current ``SourceState``; whether what lists share is unchanged since
    ``previous`` (always False without one); and the lists (``mailinglist.id``) whose
    members' addresses were linked to a user created since ``previous``."""
    ml, m, a, u = mailinglist_t, member_t, address_t, user_t
    settings = [_plain(row) for row in connection.execute(
        select(ml.c.id, *(ml.c[n] for n in _LIST_SETTINGS)))]
    key = m.c.list_id
    if dialect == "sqlite":
        # Grouping on an expression: one table scan and a sort (0.17 s for 200,000 rows)
        # instead of walking ix_member_list_id with a row lookup per entry (0.3 s).
        key = key.op("||")(literal_column("''"))
    # Every role: an owner change is a (cheap) rebuild of its list, not an unexplained
    # change of the token.
    members = {row[0]: _ints(row[1:]) for row in connection.execute(select(
        key, func.count(), func.sum(m.c.id),
        func.sum(_big(m.c.id) * (func.coalesce(m.c.moderation_action, 7) + 1)),
        func.sum(_big(m.c.id) * func.coalesce(m.c.role, 0)),
        func.sum(func.coalesce(m.c.address_id, 0)), func.sum(func.coalesce(m.c.user_id, 0)),
        func.sum(_big(m.c.id) * func.coalesce(m.c.address_id, 0)),
        func.sum(_big(m.c.id) * func.coalesce(m.c.user_id, 0)),
    ).group_by(key))}
    list_bans: dict[str, list] = defaultdict(list)
    site_bans = []
    for row in connection.execute(select(ban_t.c.id, ban_t.c.email, ban_t.c.list_id)
                                  .order_by(ban_t.c.id)):
        if row[2] is None:
            site_bans.append(tuple(row))
        else:
            list_bans[row[2]].append(tuple(row[:2]))
    lists = {row[0]: (f"{row[1]}@{row[2]}", row[3],
                      (row, members.get(row[3]), tuple(list_bans.get(row[3], ()))))
             for row in settings}
    domains = tuple(tuple(row) for row in connection.execute(
        select(domain_t.c.id, domain_t.c.mail_host, domain_t.c.alias_domain)
        .order_by(domain_t.c.id)))
    max_address, max_user = _ints(connection.execute(select(
        select(func.max(a.c.id)).scalar_subquery(),
        select(func.max(u.c.id)).scalar_subquery())).one())
    email_hash = _string_hash(dialect, a.c.email)

    def shared_digest(address_bound: int, user_bound: int) -> tuple:
        # Only the address and user rows that existed at the previous build (ids up to
        # its maxima): a new address or user only matters to the lists it is subscribed
        # to, whose member digests show it.  The address digest counts every old row (a
        # deleted address changes it), hashes the emails where ids can be reused, and
        # covers the links to old users; a link to a user created since is handled
        # per list (``relinked`` below).
        to_old_user = a.c.user_id <= user_bound
        addresses = _ints(connection.execute(select(
            func.count(),
            func.sum(case((to_old_user, 1), else_=0)),
            func.sum(case((to_old_user, _big(a.c.id) * a.c.user_id), else_=0)),
            func.sum(email_hash * (_big(a.c.id) % 65521 + 1))
            if email_hash is not None else literal(0),
        ).where(a.c.id <= address_bound)).one())
        users = _ints(connection.execute(select(
            func.count(),
            func.sum(_big(u.c.id) * (func.coalesce(u.c._preferred_address_id, 0) + 1)),
        ).where(u.c.id <= user_bound)).one())
        return domains, tuple(site_bans), addresses, users

    state = SourceState(origin, dialect, lists, shared_digest(max_address, max_user),
                        max_address, max_user)
    if previous is None:
        return state, False, frozenset()
    if (previous.max_address_id, previous.max_user_id) == (max_address, max_user):
        same = state.shared == previous.shared
    else:
        same = shared_digest(previous.max_address_id, previous.max_user_id) == previous.shared
    if not same:
        return state, False, frozenset()
    # A new address linked to an existing user makes that user's other addresses post as
    # it on every list the user is on: a full build.
    if connection.execute(select(func.count()).where(
            a.c.id > previous.max_address_id, a.c.user_id <= previous.max_user_id)).scalar():
        return state, False, frozenset()
    # An existing address linked to a new user (Mailman's subscription workflow makes a
    # user for an address that had none): the user's other addresses now post as it on
    # the lists it is a member of, which are rebuilt with the changed ones.
    relinked_ids = select(a.c.id).where(a.c.id <= previous.max_address_id,
                                        a.c.user_id > previous.max_user_id)
    relinked_list_ids = set(connection.execute(
        select(m.c.list_id).where(m.c.address_id.in_(relinked_ids)).distinct()).scalars())
    relinked = frozenset(id_ for id_, (_, list_id, _) in lists.items()
                         if list_id in relinked_list_ids)
    return state, True, relinked


def _read_list_rows(connection: Connection, dialect: str, ids: list[int],
                    list_ids: list[str]):
    """``_read_rows`` for a few lists (``mailinglist.id``s and their list-ids): their
    settings, members and bans, and the addresses and users ``specs_from_rows`` needs to
    compute their members and user aliases exactly as a full read would."""
    ml, a, u, b = mailinglist_t, address_t, user_t, ban_t
    roles = (MEMBER_ROLE, NONMEMBER_ROLE)
    lists = connection.execute(
        select(*(ml.c[n] for n in _LIST_SETTINGS)).where(ml.c.id.in_(ids))
        .order_by(ml.c.id)).all()

    def member_column(name: str):
        mm = member_t.alias("mm_" + name)
        return select(mm.c[name]).where(mm.c.role.in_(roles), mm.c.list_id.in_(list_ids),
                                        mm.c[name].is_not(None))

    direct = member_column("address_id")
    through_user = member_column("user_id")
    uu = user_t.alias("uu")
    preferred = select(uu.c._preferred_address_id).where(
        uu.c.id.in_(through_user), uu.c._preferred_address_id.is_not(None))
    aa = address_t.alias("aa")
    owners = select(aa.c.user_id).where(or_(aa.c.id.in_(direct), aa.c.id.in_(preferred)),
                                        aa.c.user_id.is_not(None))
    # Every address of the members' users, in the order a plain scan (the full read)
    # returns them: specs_from_rows takes a user's first member address in that order.
    # That is the physical order: ctid on PostgreSQL, the rowid (= id) on SQLite, the
    # clustered primary key on InnoDB.
    physical = literal_column("address.ctid") if dialect == "postgresql" else a.c.id
    addresses = connection.execute(
        select(a.c.id, a.c.email, a.c.user_id)
        .where(or_(a.c.id.in_(direct), a.c.id.in_(preferred), a.c.user_id.in_(owners)))
        .order_by(physical)).all()
    users = connection.execute(
        select(u.c.id, u.c._preferred_address_id)
        .where(u.c.id.in_(through_user), u.c._preferred_address_id.is_not(None))).all()
    members = connection.execute(
        select(member_t.c.list_id, member_t.c.role, member_t.c.moderation_action,
               member_t.c.address_id, member_t.c.user_id)
        .where(member_t.c.role.in_(roles), member_t.c.list_id.in_(list_ids))
        .order_by(member_t.c.id)).all()
    bans = connection.execute(select(b.c.email, b.c.list_id).where(b.c.list_id.in_(list_ids))
                              .order_by(b.c.id)).all()
    return [], lists, addresses, users, members, bans


def _action(value, where: str) -> Action | None:
    if value is None:
        return None
    try:
        return _ACTIONS[int(value)]
    except (KeyError, ValueError, TypeError):
        raise Mailman3DataError(f"{where}: unknown Mailman action {value!r}") from None


def specs_from_rows(domains, lists, addresses, users, members, bans):
    """Turn Mailman's rows into ``ListSpec``s with Mailman's semantics (pure; see the
    module docstring).  Returns (specs, domain map, site bans, problems)."""
    intern = sys.intern
    problems: list[str] = []

    domain_map: dict[str, str] = {}
    for mail_host, alias_domain in domains:
        if not mail_host:
            continue
        host = mail_host.lower()
        domain_map[host] = host
        if alias_domain:
            domain_map.setdefault(alias_domain.lower(), host)

    email_of: dict[int, str] = {}
    owner_of: dict[int, int] = {}
    addresses_of: dict[int, list[int]] = defaultdict(list)
    for address_id, email, user_id in addresses:
        email_of[address_id] = intern(email)
        if user_id is not None:
            owner_of[address_id] = user_id
            addresses_of[user_id].append(address_id)
    preferred_of = {user_id: address_id for user_id, address_id in users}

    # list_id -> role -> (direct {address_id: action}, through-user {address_id: action})
    rosters: dict[str, dict[int, tuple[dict, dict]]] = {}
    for list_id, role, action_value, address_id, user_id in members:
        if role not in (MEMBER_ROLE, NONMEMBER_ROLE):
            continue  # owners and moderators are not members for posting (roster.py)
        roster = rosters.setdefault(list_id, {MEMBER_ROLE: ({}, {}),
                                              NONMEMBER_ROLE: ({}, {})})
        action = _action(action_value, f"member of {list_id}")
        direct, through_user = roster[role]
        if address_id is not None:
            direct.setdefault(address_id, action)
        elif user_id is not None:
            preferred = preferred_of.get(user_id)
            if preferred is not None:
                through_user.setdefault(preferred, action)

    bans_of: dict[str | None, list[str]] = defaultdict(list)
    for email, list_id in bans:
        if email:
            bans_of[list_id].append(email)

    specs = []
    for row in lists:
        (list_name, mail_host, list_id, display_name, member_default, nonmember_default,
         emergency, *pickles, notice) = row
        posting = f"{list_name}@{mail_host}"
        where = f"list {posting}"
        nonmember_lists = []
        for column, data in zip(_NONMEMBER_COLUMNS, pickles):
            try:
                nonmember_lists.append(tuple(loads_mailman3_list(data)))
            except UnsafePickleError as error:
                raise Mailman3DataError(
                    f"{where}: mailinglist.{column} holds a pickle policyd will not "
                    f"load: {error}") from None
        roster = rosters.get(list_id, {MEMBER_ROLE: ({}, {}), NONMEMBER_ROLE: ({}, {})})
        member_ids = _merge(*roster[MEMBER_ROLE])
        nonmember_ids = _merge(*roster[NONMEMBER_ROLE])
        aliases = {}
        for user_id in {owner_of[a] for a in member_ids if a in owner_of}:
            user_addresses = addresses_of[user_id]
            if len(user_addresses) < 2:
                continue
            target = next(a for a in user_addresses if a in member_ids)
            for other in user_addresses:
                if other not in member_ids:
                    aliases[email_of[other]] = email_of[target]
        default_member = _action(member_default, where)
        default_nonmember = _action(nonmember_default, where)
        if default_nonmember is None:
            problems.append(f"{where}: default_nonmember_action is NULL (Mailman would "
                            "fail on a nonmember post); holding")
        specs.append(ListSpec(
            posting_address=posting,
            mode=Mode.MAILMAN3,
            list_id=list_id,
            display_name=display_name or list_name,
            emergency=bool(emergency),
            # NULL: Mailman's member rule then has no opinion, exactly like defer.
            default_member_action=Action.DEFER if default_member is None else default_member,
            default_nonmember_action=(Action.HOLD if default_nonmember is None
                                      else default_nonmember),
            rejection_notice=(notice or None),
            members=tuple(MemberSpec(email_of[a], action)
                          for a, action in member_ids.items() if a in email_of),
            user_aliases=aliases,
            nonmembers=tuple(MemberSpec(email_of[a], action)
                             for a, action in nonmember_ids.items() if a in email_of),
            accept_these_nonmembers=nonmember_lists[0],
            hold_these_nonmembers=nonmember_lists[1],
            reject_these_nonmembers=nonmember_lists[2],
            discard_these_nonmembers=nonmember_lists[3],
            bans=tuple(bans_of.get(list_id, ())),
        ))
    return specs, domain_map, tuple(bans_of.get(None, ())), problems


def _merge(direct: dict, through_user: dict) -> dict:
    """``get_member``: a direct membership of an address wins over the user's."""
    if not through_user:
        return direct
    merged = dict(through_user)
    merged.update(direct)
    return merged


def open_backend(store_config) -> Mailman3Backend:
    return Mailman3Backend.from_config(store_config)


def _first_line(error: Exception) -> str:
    message = str(getattr(error, "orig", None) or error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
