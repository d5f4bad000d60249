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

A list whose rows policyd will not interpret (a pickle ``safe_pickle`` refuses, an unknown
action value in the list's or a member's row) does not fail the build: it becomes a
``ListSpec`` with ``broken`` set, answered with a temporary failure (``broken-list``) while
every other list is built, and the daemon logs it once.

The rejection notice: Mailman 3 has no per-list SMTP rejection text.  Its reject chain
bounces the message with the ``list:user:notice:rejected`` template (a URI in the
``template`` table, resolved by Mailman's template loader, with ``$reasons`` filled in per
message), which is not a text policyd could read or send at SMTP time.  The only per-list
text is the ``nonmember_rejection_notice`` column: imported from Mailman 2.1 by
``mailman import21`` and empty for lists created in Mailman 3 (their style sets ``''``).
policyd uses it when it is not empty, else its own ``[smtp] reject_text``.

Incremental refresh (``load_changes``, ``policyd.store.refresh``, the algorithm the
native store uses too): a full build of a large site takes seconds, and most changes
made through Mailman touch one list.  Mailman's database is read-only to policyd (no
triggers, no revision to read), so what changed is inferred from digests that do not
cancel: every digest of the big tables (``member``, ``address``, ``user``) is a count and
the sum, modulo 2**61, of a well-mixed hash of each row's relevant columns (``_hash_sum``:
PostgreSQL's seeded hashes chained column by column, MariaDB ``md5``, SQLite a Python
aggregate), so two
correlated edits (one member's action up, another's down) cannot cancel as they could in
a weighted sum.  Each snapshot carries a ``SourceState``: per list (``mailinglist.id``)
its ``mailinglist`` row (the decision columns, the four pickles as raw bytes), the hash
digest of its ``member`` rows (grouped by ``member.list_id``, the list-id string) and its
list bans; and a shared digest of the domains (alias domains included), the site bans,
and the ``address``/``user`` rows that existed at that build (ids up to its maxima: each
address's email and its link to an existing user, on PostgreSQL also where the row of a
linked address lies, since a user's addresses are walked in physical order; users'
preferred addresses).  The list rows include the list's header matches and acceptable
aliases, which the change token covers too.  When the
token moves, only the lists whose digest changed are read again (their members, the
addresses and users behind those members, their bans) and swapped into the previous
snapshot.  Anything else is a full build: the shared digest changed, a new address was
linked to an existing user (its other addresses post as it on every list the user is
on), no digest explains the token change, or more than
``refresh.MAX_INCREMENTAL_LISTS`` lists changed.  An existing address linked to a new
user (Mailman's subscription workflow makes a user for an address that had none)
rebuilds the lists that address is a member of.

Hashes make a missed change improbable, not impossible; so every ``verify_interval``
seconds (``[store] verify_interval``, default 600, 0 disables) the snapshot service asks
for a verification build (``load_verified``): a full build compared with what the
incremental path serves for the same state; a divergence is logged and the full build
swapped in.  A verification build that fails (its full scan past ``statement_timeout``)
is tried again ``verify_interval`` later; the refresh that tried it loads what changed
through the incremental path, as any other.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Iterable
from urllib.parse import quote, unquote

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
from sqlalchemy.dialects import mysql as mysql_types
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError
from sqlalchemy.types import UserDefinedType

from ..errors import BadInput, StoreUnavailable
from ..runtime.pacing import pace
from ..core.snapshot import ListSpec, MemberSpec, Snapshot, build
from ..core.verdict import Action, Mode
from .engine import (
    DEFAULT_TIMEOUTS,
    connect_args_for,
    first_line,
    install_timeouts,
    parse_url,
    safe_url,
)
from . import refresh
from .refresh import SourceState
from .safe_pickle import UnsafePickleError, loads_mailman3_list

__all__ = ["Mailman3Backend", "UnknownSchemaError", "open_backend", "KNOWN_REVISIONS",
           "SourceState", "read_state"]

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

# The revisions whose mailinglist has dmarc_addresses (2156fc3f6f7d and after).
_DMARC_ADDRESSES = frozenset({"2156fc3f6f7d", "729a8f2045da", "8cc1f79f4459"})

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
    # The rules that read the message (rules/approved.py, implicit_dest.py, ...).
    Column("moderator_password", LargeBinary),
    Column("max_message_size", Integer),
    Column("max_num_recipients", Integer),
    Column("require_explicit_destination", Boolean),
    Column("administrivia", Boolean),
    Column("bounce_matching_headers", Unicode),
    Column("newsgroup_moderation", Integer),
    # rules/dmarc.py (DMARCMitigateAction values; dmarc_addresses a pickled list, only
    # from revision 2156fc3f6f7d on: read by ``_content_tables``).
    Column("dmarc_mitigate_action", Integer),
    Column("dmarc_mitigate_unconditionally", Boolean),
    Column("dmarc_addresses", LargeBinary),
)
headermatch_t = Table(
    "headermatch", _metadata,
    Column("id", Integer, primary_key=True),
    Column("mailing_list_id", Integer),
    Column("position", Integer),
    Column("header", Unicode),
    Column("pattern", Unicode),
    Column("chain", Unicode),
)
acceptablealias_t = Table(
    "acceptablealias", _metadata,
    Column("id", Integer, primary_key=True),
    Column("mailing_list_id", Integer),
    Column("alias", Unicode),
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
    # Appended: the rows' leading positions are read by index elsewhere.
    "moderator_password", "max_message_size", "max_num_recipients",
    "require_explicit_destination", "administrivia", "bounce_matching_headers",
    "newsgroup_moderation", "dmarc_mitigate_action", "dmarc_mitigate_unconditionally",
    "id",
)
# The content settings' place in a list row: after the twelve moderation columns.
_CONTENT_AT = 12
# Mailman's NewsgroupModeration.moderated.
_NEWS_MODERATED = 2
_HEADER_CHAINS = {"accept": Action.ACCEPT, "hold": Action.HOLD, "reject": Action.REJECT,
                  "discard": Action.DISCARD}
_NONMEMBER_COLUMNS = ("accept_these_nonmembers", "hold_these_nonmembers",
                      "reject_these_nonmembers", "discard_these_nonmembers")


class UnknownSchemaError(StoreUnavailable):
    """The database is not a Mailman 3.3.x core database policyd knows."""


class Mailman3DataError(StoreUnavailable):
    """A row policyd cannot interpret safely (an unsafe pickle, an unknown action)."""


# --- engine ------------------------------------------------------------------------------


def _sqlite_file(engine: Engine) -> str | None:
    """The database file of a ``read_only_engine`` on SQLite (its URL names a
    ``file:`` URI), else None."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database or ""
    if database.startswith("file:"):
        database = unquote(database[len("file:"):].split("?", 1)[0])
    return database or None


def read_only_engine(url: str, timeouts=None) -> Engine:
    """An engine that cannot write to the Mailman database, whatever it is asked, and
    whose waits are bounded by ``timeouts`` (``engine.connect_args_for``)."""
    timeouts = timeouts or DEFAULT_TIMEOUTS
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
        kwargs["connect_args"] = connect_args_for(parsed, timeouts)
    elif backend == "postgresql":
        kwargs["connect_args"] = connect_args_for(
            parsed, timeouts, pg_options="-c default_transaction_read_only=on")
        kwargs["connect_args"].setdefault("application_name", "policyd")
        kwargs["isolation_level"] = "REPEATABLE READ"
        kwargs["pool_pre_ping"] = True
    elif backend in ("mysql", "mariadb"):
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        kwargs["connect_args"] = connect_args_for(parsed, timeouts)
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
    install_timeouts(engine, timeouts)
    return engine


HASH_MODULUS = 2 ** 61


_MASK64 = 2 ** 64 - 1


class _HashSum:
    """SQLite aggregate ``policyd_hash_sum(column, ...)``: the sum modulo 2**61 of a
    well-mixed hash of each row's values: CPython's tuple hash (the strings' hashes are
    salted per process, which is all a daemon-local digest needs) passed through the
    ``fmix64`` finalizer of MurmurHash3.  The tuple hash alone is not enough: it is close
    to linear in its last element, so the same edit made to two rows in opposite
    directions cancelled in the sum (one user's preferred address cleared while another
    user got it: ``hash((1, 1)) + hash((3, None)) == hash((1, None)) + hash((3, 1))``),
    and the incremental refresh kept serving the old members."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, *values) -> None:
        h = hash(values) & _MASK64
        h = ((h ^ (h >> 33)) * 0xFF51AFD7ED558CCD) & _MASK64
        h = ((h ^ (h >> 33)) * 0xC4CEB9FE1A85EC53) & _MASK64
        self.total += h ^ (h >> 33)

    def finalize(self) -> int:
        return self.total % HASH_MODULUS


def _install_hooks(engine: Engine, backend: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        cursor = dbapi_connection.cursor()
        if backend == "sqlite":
            # Belt and braces: the URI already says mode=ro.
            cursor.execute("PRAGMA query_only = ON")
            dbapi_connection.create_aggregate("policyd_hash_sum", -1, _HashSum)
        elif backend in ("mysql", "mariadb"):
            cursor.execute("SET SESSION TRANSACTION READ ONLY")
        cursor.close()


def _hash_sum(dialect: str, *columns):
    """An aggregate: the sum over the rows of a well-mixed hash of ``columns`` (every
    column of a row that matters), reduced modulo 2**61 by ``_digest``.  A change to any
    row changes the sum except with probability about 2**-60, whatever other rows change
    with it; a linear sum of the values (``sum(id * action)``) lets correlated edits
    cancel."""
    if dialect == "sqlite":
        return func.coalesce(func.policyd_hash_sum(*columns), 0)
    if dialect == "postgresql":
        return func.coalesce(func.sum(_pg_row_hash(columns)), 0)
    text = func.concat_ws("|", *(func.coalesce(c, "~") for c in columns))
    return func.coalesce(func.sum(cast(func.conv(func.substr(func.md5(text), 1, 15), 16, 10),
                                       mysql_types.BIGINT(unsigned=True))), 0)


def _pg_row_hash(columns):
    """A row's columns hashed on PostgreSQL (11 and later; a ``_Tid`` column 14 and
    later): each column's hash (``hashint8extended``, ``hashtextextended``,
    ``hashtidextended``) seeded with the hash of the columns before it, so the order
    counts.  A NULL hashes as the type's zero value under a seed with its low bit
    flipped, a different hash from the zero value itself.  No text is made of the
    integers: casting every value to text for one ``concat_ws`` was most of the change
    token's cost (bench/README.md, "Against 8cd0501")."""
    seed = literal(0, BigInteger)
    for column in columns:
        if isinstance(column.type, _Tid):
            hashed, zero = func.hashtidextended, literal_column("'(0,0)'::tid", _Tid)
        elif isinstance(column.type, Unicode):
            hashed, zero = func.hashtextextended, ""
        else:
            hashed, zero = func.hashint8extended, 0
        null = cast(cast(column.is_(None), Integer), BigInteger)
        seed = hashed(func.coalesce(column, zero), seed.op("#")(null), type_=BigInteger)
    return seed


class _Tid(UserDefinedType):
    """PostgreSQL's ``tid`` (a row's ``ctid``), hashed by ``hashtidextended``."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "tid"


def _hashes_tid(connection: Connection) -> bool:
    """Whether the server hashes a ``tid`` itself (PostgreSQL 14 and later); older ones
    hash its text."""
    version = connection.dialect.server_version_info
    return connection.dialect.name == "postgresql" and version is not None and version >= (14,)


def _address_order(dialect: str, user_bound: int | None = None, *,
                   tid: bool = False) -> tuple:
    """What else an address digest covers: on PostgreSQL the place (``ctid``) of each
    address linked to a user (to one that existed at the previous build, with
    ``user_bound``).  A user's addresses are walked in physical order (``_read_rows``),
    and there any UPDATE of an address row moves it, one of a column policyd does not
    read too (Mailman verifying an address sets ``verified_on``): which member address
    a user's other addresses post as can change with no value policyd hashes changing
    (found by tests/mailman3_backend/test_refresh_property_mm3.py).  An address with no
    user, or linked to a new user (``relinked`` in ``read_state``), moves nothing that a
    rebuild of its lists does not read again.  SQLite and InnoDB keep rows in id order.
    ``tid``: the ``ctid`` hashed as it is (``_hashes_tid``), not as text."""
    if dialect != "postgresql":
        return ()
    a = address_t
    linked = a.c.user_id.is_not(None) if user_bound is None else a.c.user_id <= user_bound
    place = literal_column("address.ctid", _Tid) if tid else cast(
        literal_column("address.ctid"), Unicode)
    return (case((linked, place), else_=None),)


def _digest(row) -> tuple:
    """A row of counts and ``_hash_sum``s as plain ints (sums modulo 2**61)."""
    return tuple(0 if v is None else int(v) % HASH_MODULUS for v in row)


# --- the backend ---------------------------------------------------------------------------


#: Reads of a SQLite database tried before one that straddled Mailman's commits is
#: served anyway (``_consistent_read``).
TORN_ATTEMPTS = 3


class Mailman3Backend:
    """``policyd.store`` Backend over a Mailman 3.3.x core database (read-only)."""

    kind = "mailman3"

    def __init__(self, url: str, *, known_revisions: Iterable[str] | None = None,
                 timeouts=None, verify_interval: float = 600.0,
                 site_header_checks=None) -> None:
        self.url = url
        # ``[mailman] config_file``'s site header checks, put in every full build.
        self.site_header_checks = site_header_checks
        self.engine = read_only_engine(url, timeouts)
        self.known_revisions = frozenset(
            KNOWN_REVISIONS if known_revisions is None else known_revisions)
        self._revision: str | None = None
        # Made on the first token, when the server's version is known (``_hashes_tid``).
        self._token_sql = None
        # The periodic verification build (``verification_due``, ``load_verified``).
        self.verifications = refresh.VerificationSchedule(verify_interval)
        # SQLite only: PRAGMA data_version on one long-lived connection changes whenever
        # another connection (Mailman) commits; while it stays the same, the last token
        # still holds and the aggregates need not be recomputed.  It stays the same too
        # when another file is put at the path (a restored backup), so the gate's key is
        # (data_version, the file's identity, size and modification time): see
        # ``_data_version``.
        self._gate_lock = threading.Lock()
        self._gate_connection = None
        self._gate: tuple[tuple, str, float] | None = None
        self._path = _sqlite_file(self.engine)
        # The ``stat`` of the file when the open connections were checked last.
        self._file_state: tuple | None = None

    @classmethod
    def from_config(cls, store_config) -> "Mailman3Backend":
        return cls(store_config.url, timeouts=store_config.timeouts,
                   verify_interval=getattr(store_config, "verify_interval", 600.0),
                   site_header_checks=getattr(store_config, "site_header_checks", None))

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
            # Recomputed once a minute anyway, on new connections (``_data_version``).
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

    def _data_version(self) -> tuple | None:
        """SQLite: what the gate compares, (PRAGMA data_version, the database file's
        device, inode, size and modification time), else None (no gate).

        data_version moves when another connection commits, not when another file is put
        at the path: a backup copied over the file (``cp``, same inode) whose SQLite
        change counter equals the old file's (two copies that diverged by as many
        transactions) keeps it, and so does every open connection's page cache, which
        SQLite trusts while that counter is the same; after ``mv`` the open connections
        still read the old file.  Either changes the file's ``stat``: then the open
        connections (the gate's and the pool's) are closed, so the next read opens the
        file now at the path with an empty cache.  (A commit by Mailman changes the
        ``stat`` too: it costs new connections, a few milliseconds.)"""
        if self.engine.dialect.name != "sqlite":
            return None
        with self._gate_lock:
            try:
                stat = os.stat(self._path) if self._path is not None else None
            except OSError:
                stat = None
            file_state = None if stat is None else (stat.st_dev, stat.st_ino, stat.st_size,
                                                    stat.st_mtime_ns, stat.st_ctime_ns)
            # Once a minute too (``GATE_MAX_AGE``: the token is then computed again),
            # should a file be put there within the file system's timestamp granularity
            # of the last write with the same size.
            expired = (self._gate is not None
                       and time.monotonic() - self._gate[2] >= GATE_MAX_AGE)
            if file_state != self._file_state or expired:
                if self._gate_connection is not None:
                    self._gate_connection.invalidate()
                    self._gate_connection = None
                self.engine.dispose()
                self._file_state = file_state
                self._gate = None
            try:
                if self._gate_connection is None:
                    self._gate_connection = self.engine.raw_connection()
                cursor = self._gate_connection.cursor()
                try:
                    cursor.execute("PRAGMA data_version")
                    return (int(cursor.fetchone()[0]), file_state)
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
        when that is provably enough (``refresh.load_changes``; see "Incremental refresh"
        in the module docstring), else a full build.  Read as consistently as
        ``load_snapshot``."""
        prior = refresh.prior_state(previous, self.url)
        if prior is None:
            return self.load_snapshot()
        return self._consistent_read(lambda connection, token: self._reading(
            lambda: refresh.load_changes(previous, prior, self._source(connection, token),
                                         version=token)))

    def verification_due(self) -> bool:
        """Whether the next refresh should be a verification build (``load_verified``):
        ``verify_interval`` seconds after the last full build or failed verification
        build."""
        return self.verifications.due()

    def load_verified(self, previous: Snapshot) -> tuple[Snapshot, list[str]]:
        """A full build, and how what the incremental path serves for the same state
        differs from it (``refresh.verify``); empty when they decide alike.  A failure
        counts as an attempt: the next one is due ``verify_interval`` later."""
        prior = refresh.prior_state(previous, self.url)
        return self.verifications.attempt(lambda: self._consistent_read(
            lambda connection, token: self._reading(
                lambda: refresh.verify(previous, prior, self._source(connection, token),
                                       version=token))))

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
        for attempt in range(TORN_ATTEMPTS):
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
        # Mailman kept committing during every attempt: the last build may mix rows read
        # before and after a commit.  Served (its rows are moments apart), said (``caveat``:
        # logged as it loads), and without its digests: its version is the token read
        # before it, so the next refresh reads again, and then a full build, never an
        # incremental one that trusts digests read at other moments than the rows.
        return replace(snapshot, source_state=None, caveat=(
            f"the Mailman 3 database changed during each of {TORN_ATTEMPTS} reads in a "
            "row: the rows may mix moments before and after a change; the next refresh "
            "reads everything again"))

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot open the Mailman 3 database "
                                   f"{safe_url(self.url)}: {first_line(error)}") from None

    def _check_schema(self, connection: Connection) -> str:
        try:
            rows = connection.execute(select(alembic_t.c.version_num)).scalars().all()
        except SQLAlchemyError as error:
            raise UnknownSchemaError(
                f"{safe_url(self.url)} is not a Mailman 3 core database (no readable "
                f"alembic_version table: {first_line(error)})") from None
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

    def _token_statements(self, tid: bool):
        """The change-detection queries.

        Why these are enough: every input of a decision lives in eight tables.  The small
        ones (``domain``, ``mailinglist``'s decision columns with the raw pickles, ``ban``,
        ``headermatch``, ``acceptablealias`` and ``alembic_version``) are read whole and
        hashed: a few hundred kilobytes for a
        thousand lists.  The big ones (``member``, ``address``, ``user``) are summarised
        by one aggregate each: row count, highest id, and the sum of a well-mixed hash
        of every column that matters of each row (``_hash_sum``), which no combination
        of edits cancels (a reused id with other values changes it too).  Each aggregate
        is one sequential scan of one table with no sort: tens of milliseconds for
        200,000 memberships.
        """
        dialect = self.engine.dialect.name
        m, a, u = member_t, address_t, user_t
        member = select(
            func.count(), func.coalesce(func.max(m.c.id), 0),
            _hash_sum(dialect, m.c.id, m.c.role, m.c.moderation_action, m.c.address_id,
                      m.c.user_id, m.c.list_id))
        address = select(
            func.count(), func.coalesce(func.max(a.c.id), 0),
            _hash_sum(dialect, a.c.id, a.c.user_id, a.c.email,
                      *_address_order(dialect, tid=tid)))
        user = select(
            func.count(), func.coalesce(func.max(u.c.id), 0),
            _hash_sum(dialect, u.c.id, u.c._preferred_address_id))
        lists = select(mailinglist_t.c.id, *(mailinglist_t.c[n] for n in _LIST_SETTINGS)
                       ).order_by(mailinglist_t.c.id)
        domains = select(domain_t).order_by(domain_t.c.id)
        bans = select(ban_t).order_by(ban_t.c.id)
        # The message rules' two tables (header matches, acceptable aliases): small, and
        # a change to them alone touches no other table (found by the state machine of
        # tests/mailman3_backend/test_refresh_property_mm3.py).
        matches = select(headermatch_t).order_by(headermatch_t.c.id)
        aliases = select(acceptablealias_t).order_by(acceptablealias_t.c.id)
        return member, address, user, lists, domains, bans, matches, aliases

    def _token(self, connection: Connection) -> str:
        revision = self._check_schema(connection)
        digest = hashlib.sha256(revision.encode())
        try:
            if self._token_sql is None:
                self._token_sql = self._token_statements(_hashes_tid(connection))
            member, address, user, *tables = self._token_sql
            for statement in (member, address, user):
                digest.update(repr(_digest(connection.execute(statement).one())).encode())
            for statement in tables:
                for row in connection.execute(statement):
                    digest.update(repr(tuple(bytes(v) if isinstance(v, memoryview) else v
                                             for v in row)).encode())
                digest.update(b"|")
            if revision in _DMARC_ADDRESSES:  # dmarc_addresses, where the schema has it
                ml = mailinglist_t
                for row in connection.execute(select(ml.c.id, ml.c.dmarc_addresses)
                                              .order_by(ml.c.id)):
                    digest.update(repr(_plain(row)).encode())
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot read the Mailman 3 database "
                                   f"{safe_url(self.url)}: {first_line(error)}") from None
        return "mm3-" + digest.hexdigest()[:24]

    def _source(self, connection: Connection, token: str) -> "_Source":
        return _Source(self, connection, token, time.time())

    def _reading(self, work: Callable[[], object]):
        try:
            return work()
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"cannot read the Mailman 3 database "
                                   f"{safe_url(self.url)}: {first_line(error)}") from None

    def _build(self, connection: Connection, token: str) -> Snapshot:
        source = self._source(connection, token)
        return self._reading(lambda: source.full(read_state(
            connection, source.dialect, origin=self.url)[0]))


class _Source:
    """``refresh.Source`` over one consistent read of a Mailman 3 database."""

    def __init__(self, backend: Mailman3Backend, connection: Connection, token: str,
                 started: float) -> None:
        self.backend = backend
        self.connection = connection
        self.dialect = backend.engine.dialect.name
        self.token = token
        self.started = started

    def read_state(self, prior: SourceState):
        return read_state(self.connection, self.dialect, prior, origin=self.backend.url)

    def full(self, state: SourceState) -> Snapshot:
        specs, domains, site_bans, problems = specs_from_rows(*_read_rows(self.connection))
        site = self.backend.site_header_checks
        snapshot = build(specs, domains=domains, site_bans=site_bans, version=self.token,
                         built_at=self.started, source_state=state, pause=pace,
                         **({} if site is None else {"site_header_checks": site}))
        if problems:
            snapshot = replace(snapshot, problems=tuple(problems) + snapshot.problems)
        self.backend.verifications.built()
        return snapshot

    def lists(self, state: SourceState, changed):
        rows = _read_list_rows(self.connection, self.dialect, list(changed),
                               sorted({state.lists[i][1][0] for i in changed}))
        specs, _, _, problems = specs_from_rows(*rows)
        return specs, problems


def _read_rows(connection: Connection):
    # By id: of two domains naming the same alias domain the older one takes it, on every
    # build (in physical order an UPDATE that changes no value would move the choice
    # without changing the token; found by tests/mailman3_backend/
    # test_refresh_property_mm3.py on PostgreSQL).
    domains = connection.execute(select(domain_t.c.mail_host, domain_t.c.alias_domain)
                                 .order_by(domain_t.c.id)).all()
    lists = _with_content(connection, connection.execute(
        select(*(mailinglist_t.c[n] for n in _LIST_SETTINGS)).order_by(mailinglist_t.c.id)
    ).all())
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


def _content_tables(connection: Connection, ids=None) -> dict[int, tuple]:
    """``mailinglist.id`` -> (header matches in Mailman's order as (header, pattern,
    chain), acceptable aliases): the two tables of a list's message-rule settings."""
    hm, aa = headermatch_t, acceptablealias_t
    matches = select(hm.c.mailing_list_id, hm.c.header, hm.c.pattern, hm.c.chain)
    aliases = select(aa.c.mailing_list_id, aa.c.alias)
    if ids is not None:
        matches = matches.where(hm.c.mailing_list_id.in_(ids))
        aliases = aliases.where(aa.c.mailing_list_id.in_(ids))
    out: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for list_pk, header, pattern, chain in connection.execute(
            matches.order_by(hm.c.mailing_list_id, hm.c.position, hm.c.id)):
        out[list_pk][0].append((header, pattern, chain))
    for list_pk, alias in connection.execute(aliases.order_by(aa.c.id)):
        out[list_pk][1].append(alias)
    # dmarc_addresses (a column of mailinglist, absent before revision 2156fc3f6f7d).
    dmarc = {}
    if connection.execute(select(alembic_t.c.version_num)).scalar() in _DMARC_ADDRESSES:
        ml = mailinglist_t
        rows = select(ml.c.id, ml.c.dmarc_addresses).where(ml.c.dmarc_addresses.is_not(None))
        if ids is not None:
            rows = rows.where(ml.c.id.in_(ids))
        for list_pk, data in connection.execute(rows):
            dmarc[list_pk] = bytes(data) if isinstance(data, memoryview) else data
    return {key: (tuple(m), tuple(sorted(a)), dmarc.get(key))
            for key, (m, a) in out.items()} | {
        key: ((), (), data) for key, data in dmarc.items() if key not in out}


def _with_content(connection: Connection, rows, ids=None) -> list[tuple]:
    """The list rows, each with its ``_content_tables`` entry appended."""
    tables = _content_tables(connection, ids)
    return [tuple(row) + (tables.get(row[-1], ((), ())),) for row in rows]


# --- incremental refresh -------------------------------------------------------------------

def _plain(row) -> tuple:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def read_state(connection: Connection, dialect: str, previous: SourceState | None = None,
               *, origin: str = "") -> tuple[SourceState, bool, frozenset[int]]:
    """The current ``SourceState`` (lists: ``mailinglist.id`` -> (posting address,
    (list-id, digest)); bounds: the highest address and user ids); whether what lists
    share is unchanged since ``previous`` (always False without one); and the lists
    (``mailinglist.id``) whose members' addresses were linked to a user created since
    ``previous``."""
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
    members = {row[0]: _digest(row[1:]) for row in connection.execute(select(
        key, func.count(),
        _hash_sum(dialect, m.c.id, m.c.role, m.c.moderation_action, m.c.address_id,
                  m.c.user_id),
    ).group_by(key))}
    list_bans: dict[str, list] = defaultdict(list)
    site_bans = []
    for row in connection.execute(select(ban_t.c.id, ban_t.c.email, ban_t.c.list_id)
                                  .order_by(ban_t.c.id)):
        if row[2] is None:
            site_bans.append(tuple(row))
        else:
            list_bans[row[2]].append(tuple(row[:2]))
    content = _content_tables(connection)
    lists = {row[0]: (f"{row[1]}@{row[2]}",
                      (row[3], (row, members.get(row[3]), tuple(list_bans.get(row[3], ())),
                                content.get(row[0]))))
             for row in settings}
    domains = tuple(tuple(row) for row in connection.execute(
        select(domain_t.c.id, domain_t.c.mail_host, domain_t.c.alias_domain)
        .order_by(domain_t.c.id)))
    max_address, max_user = _digest(connection.execute(select(
        select(func.max(a.c.id)).scalar_subquery(),
        select(func.max(u.c.id)).scalar_subquery())).one())

    def shared_digest(address_bound: int, user_bound: int) -> tuple:
        # Only the address and user rows that existed at the previous build (ids up to
        # its maxima): a new address or user only matters to the lists it is subscribed
        # to, whose member digests show it.  The address digest covers every old row (a
        # deleted address changes it), its email and its link to an old user; a link to
        # a user created since is handled per list (``relinked`` below).
        old_user = case((a.c.user_id <= user_bound, a.c.user_id), else_=-1)
        addresses = _digest(connection.execute(select(
            func.count(), _hash_sum(dialect, a.c.id, old_user, a.c.email,
                                    *_address_order(dialect, user_bound,
                                                    tid=_hashes_tid(connection))),
        ).where(a.c.id <= address_bound)).one())
        users = _digest(connection.execute(select(
            func.count(), _hash_sum(dialect, u.c.id, u.c._preferred_address_id),
        ).where(u.c.id <= user_bound)).one())
        return domains, tuple(site_bans), addresses, users

    state = SourceState(origin, lists, shared_digest(max_address, max_user),
                        (max_address, max_user))
    if previous is None:
        return state, False, frozenset()
    old_address, old_user = previous.bounds
    if (old_address, old_user) == (max_address, max_user):
        same = state.shared == previous.shared
    else:
        same = shared_digest(old_address, old_user) == previous.shared
    if not same:
        return state, False, frozenset()
    # A new address linked to an existing user makes that user's other addresses post as
    # it on every list the user is on: a full build.
    if connection.execute(select(func.count()).where(
            a.c.id > old_address, a.c.user_id <= old_user)).scalar():
        return state, False, frozenset()
    # An existing address linked to a new user (Mailman's subscription workflow makes a
    # user for an address that had none): the user's other addresses now post as it on
    # the lists it is a member of, which are rebuilt with the changed ones.
    relinked_ids = select(a.c.id).where(a.c.id <= old_address, a.c.user_id > old_user)
    relinked_list_ids = set(connection.execute(
        select(m.c.list_id).where(m.c.address_id.in_(relinked_ids)).distinct()).scalars())
    relinked = frozenset(id_ for id_, (_, (list_id, _)) in lists.items()
                         if list_id in relinked_list_ids)
    return state, True, relinked


def _read_list_rows(connection: Connection, dialect: str, ids: list[int],
                    list_ids: list[str]):
    """``_read_rows`` for a few lists (``mailinglist.id``s and their list-ids): their
    settings, members and bans, and the addresses and users ``specs_from_rows`` needs to
    compute their members and user aliases exactly as a full read would."""
    ml, a, u, b = mailinglist_t, address_t, user_t, ban_t
    roles = (MEMBER_ROLE, NONMEMBER_ROLE)
    lists = _with_content(connection, connection.execute(
        select(*(ml.c[n] for n in _LIST_SETTINGS)).where(ml.c.id.in_(ids))
        .order_by(ml.c.id)).all(), ids)

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
    module docstring).  Returns (specs, domain map, site bans, problems).

    A list whose rows policyd cannot interpret safely (a pickle it will not load, an
    unknown action value in the list or one of its member rows) comes back as a
    ``ListSpec`` with ``broken`` set to the reason: that list is answered with a
    temporary failure, every other list is built as usual."""
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
    unreadable: dict[str, str] = {}  # list-id -> why one of its member rows is unreadable
    for list_id, role, action_value, address_id, user_id in members:
        if role not in (MEMBER_ROLE, NONMEMBER_ROLE):
            continue  # owners and moderators are not members for posting (roster.py)
        roster = rosters.setdefault(list_id, {MEMBER_ROLE: ({}, {}),
                                              NONMEMBER_ROLE: ({}, {})})
        try:
            action = _action(action_value, "member.moderation_action")
        except Mailman3DataError as error:
            unreadable.setdefault(list_id, f"a member row: {error}")
            continue
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
         emergency, *pickles, notice) = row[:_CONTENT_AT]
        posting = f"{list_name}@{mail_host}"
        where = f"list {posting}"
        broken = unreadable.get(list_id)
        nonmember_lists = []
        for column, data in zip(_NONMEMBER_COLUMNS, pickles):
            try:
                nonmember_lists.append(tuple(loads_mailman3_list(data)))
            except UnsafePickleError as error:
                broken = broken or (f"mailinglist.{column} holds a pickle policyd will "
                                    f"not load: {error}")
        try:
            default_member = _action(member_default, "default_member_action")
            default_nonmember = _action(nonmember_default, "default_nonmember_action")
        except Mailman3DataError as error:
            broken = broken or str(error)
        if broken is not None:
            specs.append(ListSpec(posting_address=posting, mode=Mode.MAILMAN3,
                                  list_id=list_id, display_name=display_name or list_name,
                                  broken=broken))
            continue
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
            **_content_spec(row[_CONTENT_AT:], where, problems),
        ))
    return specs, domain_map, tuple(bans_of.get(None, ())), problems


def _content_spec(values, where: str, problems: list[str]) -> dict:
    """The ``ListSpec`` keywords of the message rules from a list row's content columns
    and its ``_content_tables`` entry (absent in rows made by hand: all off)."""
    if len(values) < 11:
        return {}
    (password, max_size, max_recipients, explicit, administrivia, bounce, news,
     dmarc_action, dmarc_unconditionally, _pk, (matches, aliases, *dmarc)) = values
    if isinstance(password, memoryview):
        password = bytes(password)
    if isinstance(password, bytes):
        password = password.decode("utf-8", "replace")
    header_matches = []
    for header, pattern, chain in matches:
        if chain is not None and chain not in _HEADER_CHAINS:
            problems.append(f"{where}: header_matches {header}: {pattern} jumps to chain "
                            f"{chain!r}, which policyd does not mirror; skipped")
            continue
        header_matches.append((header or "", pattern or "",
                               None if chain is None else _HEADER_CHAINS[chain]))
    return {
        "moderator_password": password or None,
        "header_matches": tuple(header_matches),
        "max_message_size": max_size or 0,
        "max_num_recipients": max_recipients or 0,
        "require_explicit_destination": bool(explicit),
        "acceptable_aliases": aliases,
        "administrivia": bool(administrivia),
        "bounce_matching_headers": bounce or "",
        "newsgroup_moderated": news == _NEWS_MODERATED,
        **_dmarc_spec(dmarc_action, dmarc_unconditionally, dmarc[0] if dmarc else None,
                      where, problems),
    }


def _dmarc_spec(action, unconditionally, addresses, where: str, problems: list[str]
                ) -> dict:
    """rules/dmarc.py's settings; an unknown action or an unloadable dmarc_addresses
    pickle is reported and read as off/empty."""
    if action not in (None, 0, 1, 2, 3, 4):
        problems.append(f"{where}: dmarc_mitigate_action {action!r} is no "
                        "DMARCMitigateAction; read as no_mitigation")
        action = 0
    try:
        listed = tuple(loads_mailman3_list(addresses))
    except UnsafePickleError as error:
        problems.append(f"{where}: mailinglist.dmarc_addresses holds a pickle policyd "
                        f"will not load ({error}); read as empty")
        listed = ()
    return {"dmarc_mitigate_action": action or 0,
            "dmarc_mitigate_unconditionally": bool(unconditionally),
            "dmarc_addresses": listed}


def _merge(direct: dict, through_user: dict) -> dict:
    """``get_member``: a direct membership of an address wins over the user's."""
    if not through_user:
        return direct
    merged = dict(through_user)
    merged.update(direct)
    return merged


def open_backend(store_config) -> Mailman3Backend:
    return Mailman3Backend.from_config(store_config)

