"""The native store as the daemon sees it: a cheap change token and a snapshot loader.

Everything here is blocking and runs in a thread (never on the reactor).  The bulk paths
read plain rows with Core selects, no ORM objects, and share one string object (and one
dict of members per list) per address across lists.

Mailman 3 semantics of the loaded data:

* members and nonmembers: a membership is direct (an address) or through a user, which
  then posts with its preferred address; when an address has both, the direct one wins
  (``model/roster.py get_member``);
* ``user_aliases``: a sender that is not itself a member but belongs to a user counts as
  the first address of that user (in address order) that is a member
  (``rules/moderation.py _find_sender_member``);
* patterns in position order, list bans, site bans (``list_id`` NULL), and every domain
  with its alias domains mapped to their mail host.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from typing import Collection, Iterator

from sqlalchemy import (SmallInteger, column, func, null, or_, select, table,
                        type_coerce)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..core import snapshot as snapshot_module
from ..errors import StoreUnavailable
from ..runtime import heap
from ..runtime.pacing import pace
from ..core.snapshot import ListSpec, Snapshot
from ..core.verdict import Action, Mode
from . import engine as engine_module
from . import queries, refresh
from .models import (
    SHARED_REVISION,
    TRACKED,
    Address,
    Ban,
    Domain,
    NOTIFY_CHANNEL,
    ListRevision,
    MailingList,
    Membership,
    MemberRole,
    NonmemberPattern,
    StoreState,
    User,
)
from .refresh import SourceState

_ACTIONS = {int(a): a for a in Action}
_KIND_FIELD = {
    int(Action.ACCEPT): "accept_these_nonmembers",
    int(Action.HOLD): "hold_these_nonmembers",
    int(Action.REJECT): "reject_these_nonmembers",
    int(Action.DISCARD): "discard_these_nonmembers",
}
_MEMBER = int(MemberRole.MEMBER)
_NONMEMBER = int(MemberRole.NONMEMBER)


def _raw(column):
    """The column's stored integer, without the TypeDecorator's per-row conversion."""
    return type_coerce(column, SmallInteger)


# The list revisions' nonces (below 2**60) are summed in two halves of 30 bits: a sum of
# whole nonces would overflow SQLite's 64-bit integers (sum() then fails) at 8 lists.
NONCE_HALF = 30
NONCE_LOW = (1 << NONCE_HALF) - 1


def token_query():
    """One statement: the generation, the store's id, the count and sum of the list
    revisions (bumped by triggers on every change, whoever writes) and the sums of their
    nonces (drawn anew with every bump: a diverged copy of the store with the same counts
    has other nonces), and count + max(id) of every tracked table (what a write that
    fires no trigger, a TRUNCATE, still changes).  One row per list, never a
    membership."""
    r = ListRevision.__table__
    columns = [select(StoreState.generation).where(StoreState.id == 1).scalar_subquery(),
               select(StoreState.store_id).where(StoreState.id == 1).scalar_subquery(),
               select(func.count()).select_from(r).scalar_subquery(),
               select(func.coalesce(func.sum(r.c.revision), 0)).scalar_subquery(),
               select(func.coalesce(func.sum(r.c.nonce.op(">>")(NONCE_HALF)), 0)
                      ).scalar_subquery(),
               select(func.coalesce(func.sum(r.c.nonce.op("&")(NONCE_LOW)), 0)
                      ).scalar_subquery()]
    for model in TRACKED:
        table = model.__table__
        columns.append(select(func.count()).select_from(table).scalar_subquery())
        columns.append(select(func.max(table.c.id)).scalar_subquery())
    return select(*columns)


def read_token(connection: Connection, identity: str = "") -> str:
    """The change token; ``identity``: the SQLite file's, so a replaced file changes it."""
    return read_token_and_id(connection, identity)[0]


def read_token_and_id(connection: Connection, identity: str = "") -> tuple[str, str]:
    """(the change token, the store's id): the id (``store_state.store_id``) is part of
    the token, so a different store under the same URL (a copied-over SQLite file, a
    recreated database) changes it even at the same generation and row counts."""
    row = tuple(connection.execute(token_query()).one())
    generation = row[0] if row[0] is not None else 0
    store_id = row[1] or ""
    digest = hashlib.sha1(repr((identity, store_id) + tuple(
        int(v) if v is not None else None for v in row[2:])).encode()).hexdigest()[:12]
    return f"{generation}.{digest}", store_id


def _raw_rows(connection: Connection, statement, size: int = 1000):
    """Batches of plain DBAPI tuples for a parameterless statement (the bulk paths:
    no per-row Result processing), in the connection's current transaction.  Batches stay
    small because the driver converts one in a single call that holds the GIL, and the
    reactor thread waits for it (sqlite3: 2.5-4 ms for 5,000 rows, 0.5 ms for 1,000, the
    same in total)."""
    compiled = statement.compile(dialect=connection.dialect,
                                 compile_kwargs={"literal_binds": True})
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.execute(str(compiled))
        while rows := cursor.fetchmany(size):
            yield rows
    finally:
        cursor.close()


class _Sparse(dict):
    """The sparse form of an id table (see ``_id_table``): an id it lacks reads as None,
    like a gap in the dense form (``__missing__`` is only called on a miss)."""

    __slots__ = ()

    def __missing__(self, key):
        return None


def _id_table(connection: Connection, statement, count: int, max_id: int
              ) -> tuple[list | _Sparse, int]:
    """(table, rows) for a statement of (id, value) rows whose ids are at most ``max_id``
    out of ``count`` in their table: ``table[id]`` is the value, or None.

    A list indexed by id when the ids are dense (autoincrement, few deletions): a dict of
    a few hundred thousand entries rehashes all of them in one C call each time it grows,
    a 10 ms pause for the reactor thread at 350,000 on a slow core; a list of pointers is
    made in one cheap allocation and is a fifth of the size.  Filled row by row from a
    Python loop, so the reactor thread gets its turns.  Sparse ids (most rows deleted)
    get a dict, which pauses as it grows but costs no more memory than the ids it holds.
    """
    rows = 0
    if max_id <= 2 * count + 1024:
        table: list | _Sparse = [None] * (max_id + 1)
        for batch in _raw_rows(connection, statement):
            rows += len(batch)
            for id_, value in batch:
                table[id_] = value
            pace()
    else:
        table = _Sparse()
        for batch in _raw_rows(connection, statement):
            rows += len(batch)
            table.update(batch)
            pace()
    return table, rows


def _in_id_order(table: list | _Sparse) -> Iterator[tuple[int, object]]:
    """(id, value) of an ``_id_table``'s entries, by increasing id."""
    if isinstance(table, list):
        return ((id_, value) for id_, value in enumerate(table) if value is not None)
    return iter(sorted(table.items()))


def load_specs(connection: Connection, list_ids: Collection[int] | None = None
               ) -> tuple[list[ListSpec], dict[str, str], list[str]]:
    """(list specs, domain -> mail host, site bans) from one consistent read; with
    ``list_ids``, only those lists (an incremental refresh)."""
    domain_table = Domain.__table__
    host = domain_table.alias("host")
    domain_map: dict[str, str] = {}
    for name, host_name in connection.execute(
        select(domain_table.c.name, host.c.name)
        .select_from(domain_table.outerjoin(host, domain_table.c.alias_of_id == host.c.id))
    ):
        domain_map[name] = host_name or name

    lists_table = MailingList.__table__
    lists: dict[int, dict] = {}
    m = Membership.__table__
    a = Address.__table__
    u = User.__table__
    wanted_lists = None if list_ids is None else sorted(list_ids)

    def only(column, statement):
        return statement if wanted_lists is None else statement.where(column.in_(wanted_lists))

    for row in connection.execute(only(lists_table.c.id, select(
        lists_table.c.id, lists_table.c.posting_address, lists_table.c.list_id,
        lists_table.c.display_name, lists_table.c.mode, lists_table.c.emergency,
        _raw(lists_table.c.default_member_action), _raw(lists_table.c.default_nonmember_action),
        lists_table.c.rejection_notice,
        *(lists_table.c[name] for name in queries.CONTENT_SETTINGS),
        lists_table.c.smtp_moderation, lists_table.c.broken,
    ))):
        (id_, posting, list_id, display_name, mode, emergency, member_action,
         nonmember_action, notice) = row[:9]
        lists[id_] = {
            "posting_address": posting, "list_id": list_id, "display_name": display_name,
            "mode": Mode(mode), "emergency": bool(emergency),
            "default_member_action": _ACTIONS[member_action],
            "default_nonmember_action": _ACTIONS[nonmember_action],
            "rejection_notice": notice,
            **queries.content_spec(dict(zip(queries.CONTENT_SETTINGS, row[9:-2]))),
            "smtp_moderation": row[-2] or "off",
            # Set by the Mailman 2 import when the list's config.pck cannot be read.
            "broken": row[-1] or None,
        }

    # One string per address, shared by every list it is on (no join: the membership
    # rows are plain integers, the cheapest thing a database can send).  For a few lists,
    # only their members' addresses and the addresses that belong to users.
    address_count, max_address_id = connection.execute(
        select(func.count(), func.coalesce(func.max(a.c.id), 0))).one()
    email_query = select(a.c.id, a.c.email)
    if wanted_lists is not None:
        # The preferred addresses of member users too: one need not belong to its user
        # (nothing in the schema says so), and a full build reads it all the same.
        email_query = email_query.where(or_(
            a.c.user_id.is_not(None),
            a.c.id.in_(select(m.c.address_id).where(m.c.list_id.in_(wanted_lists))),
            a.c.id.in_(select(u.c.preferred_address_id).where(u.c.id.in_(
                select(m.c.user_id).where(m.c.list_id.in_(wanted_lists)))))))
    emails, _ = _id_table(connection, email_query, address_count, max_address_id)
    address_user, linked = _id_table(
        connection, select(a.c.id, a.c.user_id).where(a.c.user_id.is_not(None)),
        address_count, max_address_id)
    # list id -> {address: own action}, direct memberships first so that they win (the
    # first entry of an address is kept); users behind members.  Plain dicts, no object
    # per membership.
    members: dict[int, dict[str, Action | None]] = defaultdict(dict)
    nonmembers: dict[int, dict[str, Action | None]] = defaultdict(dict)
    member_users: dict[int, set[int]] = defaultdict(set)

    actions = _ACTIONS

    def add(rows, with_users: bool) -> None:
        # The hot loop (one iteration per membership): everything inlined.
        for list_id, role, action, address_id, user_id in rows:
            email = emails[address_id]
            target = (members if role == _MEMBER else nonmembers)[list_id]
            if email not in target:
                target[email] = None if action is None else actions[action]
            if with_users and role == _MEMBER:
                user_id = user_id or address_user[address_id]
                if user_id is not None:
                    member_users[list_id].add(user_id)

    roles = m.c.role.in_((_MEMBER, _NONMEMBER))
    direct = only(m.c.list_id, select(
        m.c.list_id, _raw(m.c.role), _raw(m.c.moderation_action), m.c.address_id,
        null().label("user_id")).where(roles, m.c.address_id.is_not(None)))
    for rows in _raw_rows(connection, direct):
        add(rows, linked > 0)
        pace()
    through_user = only(m.c.list_id, (
        select(m.c.list_id, _raw(m.c.role), _raw(m.c.moderation_action),
               u.c.preferred_address_id, u.c.id)
        .select_from(m.join(u, u.c.id == m.c.user_id))
        .where(roles, u.c.preferred_address_id.is_not(None))
    ))
    for rows in _raw_rows(connection, through_user):
        add(rows, True)
        pace()

    # Addresses of the users behind members, in address order.  (A set grown list by
    # list, not one union of them all: one C call over every entry.)
    wanted: set[int] = set()
    for users in member_users.values():
        wanted.update(users)
    user_addresses: dict[int, list[str]] = defaultdict(list)
    for count, (address_id, user_id) in enumerate(_in_id_order(address_user)):
        if user_id in wanted:
            user_addresses[user_id].append(emails[address_id])
        if not count % 4096:
            pace()
    heap.free_piecewise(emails, address_user, wanted, pause=pace)

    patterns: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    p = NonmemberPattern.__table__
    for list_id, kind, text in connection.execute(only(
        p.c.list_id, select(p.c.list_id, _raw(p.c.kind), p.c.pattern))
        .order_by(p.c.list_id, p.c.kind, p.c.position, p.c.id)
    ):
        field = _KIND_FIELD.get(kind)
        if field is not None:
            patterns[list_id][field].append(text)

    list_bans: dict[int, list[str]] = defaultdict(list)
    site_bans: list[str] = []
    b = Ban.__table__
    ban_query = select(b.c.list_id, b.c.pattern).order_by(b.c.id)
    if wanted_lists is not None:
        ban_query = ban_query.where(or_(b.c.list_id.in_(wanted_lists), b.c.list_id.is_(None)))
    for list_id, text in connection.execute(ban_query):
        if list_id is None:
            site_bans.append(text)
        else:
            list_bans[list_id].append(text)

    specs = []
    for id_, settings in lists.items():
        pace()
        list_members = members.pop(id_, {})
        aliases: dict[str, str] = {}
        users = member_users.get(id_, ())
        for user_id in users:
            addresses = user_addresses.get(user_id, ())
            if len(addresses) < 2:
                continue
            first = next((e for e in addresses if e in list_members), None)
            if first is None:
                continue
            for email in addresses:
                if email not in list_members and email not in aliases:
                    aliases[email] = first
        list_patterns = patterns.get(id_, {})
        specs.append(ListSpec(
            **settings,
            members=list_members,
            user_aliases=aliases,
            nonmembers=nonmembers.pop(id_, {}),
            accept_these_nonmembers=tuple(list_patterns.get("accept_these_nonmembers", ())),
            hold_these_nonmembers=tuple(list_patterns.get("hold_these_nonmembers", ())),
            reject_these_nonmembers=tuple(list_patterns.get("reject_these_nonmembers", ())),
            discard_these_nonmembers=tuple(list_patterns.get("discard_these_nonmembers", ())),
            bans=tuple(list_bans.get(id_, ())),
        ))
    heap.free_piecewise(member_users, user_addresses, pause=pace)
    return specs, domain_map, site_bans


# --- incremental refresh -------------------------------------------------------------------
#
# Exact: database triggers (migration 0002) bump a list's row in ``list_revisions`` on
# every change to a row its policy is built from, and row 0 on a change to what every list
# shares (domains, site bans), and draw a new random nonce for it (migration 0007).  A
# snapshot's ``SourceState`` holds, per list, its posting address, revision and nonce,
# and the shared ones; ``refresh.load_changes`` rebuilds the lists whose revision or
# nonce moved (a diverged copy of the store copied over it: same revision, other nonce).
#
# Exact as long as the triggers fire.  A writer can bypass them: a PostgreSQL session
# with ``session_replication_role = replica`` (a logical replication subscriber,
# ``pg_restore --disable-triggers``), ``ALTER TABLE ... DISABLE TRIGGER``, a trigger
# dropped by hand.  So, as for Mailman 3, every ``[store] verify_interval`` seconds the
# snapshot service asks for a verification build (``load_verified``).  And every load
# looks for the triggers themselves (``engine.trigger_problem``): while one is missing or
# disabled, ``change_detection_problem`` says which (``status`` shows the store
# unhealthy), every change is a full build and every refresh a verification build.


def read_state(connection: Connection, origin: str = "") -> SourceState:
    """The current ``SourceState``: every list's (posting address, (revision, nonce)) and
    the shared (revision, nonce).  The nonce tells apart two lists at the same revision
    in diverged copies of the store (migration 0007).  MariaDB: the shared fingerprint
    also carries the tables' InnoDB ids (``table_ids``)."""
    lt, r = MailingList.__table__, ListRevision.__table__
    lists = {id_: (posting, (revision or 0, int(nonce or 0)))
             for id_, posting, revision, nonce in connection.execute(
                 select(lt.c.id, lt.c.posting_address, r.c.revision, r.c.nonce)
                 .select_from(lt.outerjoin(r, r.c.list_id == lt.c.id)))}
    row = connection.execute(
        select(r.c.revision, r.c.nonce).where(r.c.list_id == SHARED_REVISION)).first()
    shared = (0, 0) if row is None else (row[0] or 0, int(row[1] or 0))
    if connection.dialect.name in ("mysql", "mariadb"):
        shared += (table_ids(connection),)
    return SourceState(origin, lists, shared)


# MariaDB fires no trigger for a TRUNCATE (it re-creates the table), and a sync job that
# reloads a table re-inserts only some lists' rows, whose triggers then explain the
# token's move: the emptied lists would keep their old members.  A re-created table has
# a new InnoDB table id, so the shared fingerprint carries the ids, and a TRUNCATE makes
# the next refresh a full build (migration 0010 does the same with PostgreSQL's TRUNCATE
# triggers).  Reading them needs the PROCESS privilege; without it a full build says so.
INNODB_TABLES = table("INNODB_SYS_TABLES", column("NAME"), column("TABLE_ID"),
                      schema="information_schema")
TRUNCATE_UNSEEN = ("store: cannot read information_schema.INNODB_SYS_TABLES (grant the "
                   "PROCESS privilege): a TRUNCATE of a store table is not noticed until "
                   "a full build")


def _innodb_name(database: str, name: str) -> str | None:
    """InnoDB's ``database/table`` name: other ASCII characters than letters, digits and
    ``_`` are ``@`` and four hex digits (None for a name outside ASCII)."""
    if not database.isascii():
        return None
    return "".join(c if c.isalnum() or c == "_" else f"@{ord(c):04x}"
                   for c in database) + "/" + name


def table_ids(connection: Connection) -> tuple | None:
    """MariaDB: the InnoDB ids of the tracked tables and ``list_revisions``, in a fixed
    order, or None when the server does not show them (no PROCESS privilege)."""
    database = connection.execute(select(func.database())).scalar() or ""
    names = [_innodb_name(database, model.__table__.name)
             for model in TRACKED + (ListRevision,)]
    if None in names:
        return None
    try:
        ids = dict(connection.execute(select(INNODB_TABLES.c.NAME, INNODB_TABLES.c.TABLE_ID)
                                      .where(INNODB_TABLES.c.NAME.in_(names))).all())
    except DBAPIError:
        # MariaDB keeps the transaction of a failed statement.
        return None
    if not ids:
        return None
    return tuple(ids.get(name) for name in names)


class _NativeSource:
    """``refresh.Source`` over one consistent read of the native store."""

    def __init__(self, connection: Connection, origin: str, version: str,
                 started: float,
                 site_header_checks=snapshot_module.NO_SITE_CHECKS,
                 verifications: refresh.VerificationSchedule | None = None) -> None:
        self.connection = connection
        self.verifications = verifications
        self.site_header_checks = site_header_checks
        self.origin = origin
        self.version = version
        self.started = started

    def read_state(self, prior: SourceState):
        state = read_state(self.connection, self.origin)
        return state, state.shared == prior.shared, ()

    def full(self, state: SourceState) -> Snapshot:
        specs, domain_map, site_bans = load_specs(self.connection)
        snapshot = snapshot_module.build(specs, domains=domain_map, site_bans=site_bans,
                                         version=self.version, built_at=self.started,
                                         source_state=state, pause=pace,
                                         site_header_checks=self.site_header_checks)
        heap.free_piecewise(specs, pause=pace)
        if self.verifications is not None:
            self.verifications.built()
        if len(state.shared) > 2 and state.shared[2] is None:
            snapshot = replace(snapshot, problems=(TRUNCATE_UNSEEN,) + snapshot.problems)
        return snapshot

    def lists(self, state: SourceState, changed):
        specs, _, _ = load_specs(self.connection, changed)
        return specs, ()


class NativeBackend:
    """The daemon's view of the native store (``policyd.store.open_backend``)."""

    name = "native"

    def __init__(self, url: str, timeouts=None,
                 site_header_checks=snapshot_module.NO_SITE_CHECKS,
                 verify_interval: float = 600.0) -> None:
        self.url = url
        # The periodic verification build (``verification_due``, ``load_verified``).
        self.verifications = refresh.VerificationSchedule(verify_interval)
        # Why the triggers cannot be trusted (``engine.trigger_problem``), from the last
        # load or check; None while they all fire.
        self.change_detection_problem: str | None = None
        # ``[mailman] config_file``'s site header checks, put in every full build.
        self.site_header_checks = site_header_checks
        self.timeouts = timeouts
        # ``timeouts``: a config.StoreTimeouts, else engine.DEFAULT_TIMEOUTS.
        self.engine = engine_module.make_engine(url, timeouts=timeouts)
        # PostgreSQL: the engine of the LISTEN connection (``listen``), made on first use.
        self._listen_engine = None
        self._path = engine_module.sqlite_path(self.engine)
        # SQLite: the (device, inode) of the file the engine's connections have open.
        self._identity = ""

    def _origin(self, store_id: str) -> str:
        """The store a ``SourceState`` comes from: the URL, the store's id, and for SQLite
        the file."""
        return f"{self.url}#{store_id}#{self._identity}"

    def _check_file(self) -> None:
        """SQLite: notice a store file that was replaced (``mv new.sqlite store.sqlite``),
        recreated (``rm`` + ``policyctl init``) or removed since the engine opened it.
        The open connections still read the old file: close them, so the next read opens
        the file now at the path; the new identity is part of the change token and of the
        origin, so the next refresh is a full build."""
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            if self._identity:
                self.engine.dispose()
                self._identity = ""
            raise StoreUnavailable(f"no store at {self._path}; run `policyctl init`") from None
        except OSError as error:
            raise StoreUnavailable(f"store {self._path}: {error}") from None
        identity = f"{stat.st_dev}:{stat.st_ino}"
        if identity != self._identity:
            if self._identity:
                self.engine.dispose()
            self._identity = identity

    @contextmanager
    def _connection(self, *, consistent: bool = False) -> Iterator[Connection]:
        if self._path is not None:
            self._check_file()
        try:
            with self.engine.connect() as connection:
                if consistent and self.engine.dialect.name != "sqlite":
                    connection = connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except SQLAlchemyError as error:
            # A store of an older schema fails with "no such column" (a package upgraded,
            # ``policyctl migrate`` not run yet): say what to do, not only what failed.
            problem = self._schema_problem()
            raise StoreUnavailable(f"store {engine_module.safe_url(self.url)}: "
                                   f"{problem or engine_module.first_line(error)}") from None

    def _schema_problem(self) -> str | None:
        """``schema_problem`` on a connection of its own, ``None`` if it cannot tell."""
        try:
            with self.engine.connect() as connection:
                return engine_module.schema_problem(connection)
        except Exception:
            return None

    def change_token(self) -> str:
        with self._connection() as connection:
            return read_token(connection, self._identity)

    def _source(self, connection: Connection, started: float) -> tuple[_NativeSource, str]:
        """(a ``_NativeSource`` over ``connection``, the change token), after looking
        for the triggers."""
        # After the connection: it notices a replaced SQLite file, and the store id
        # another store copied over it or a recreated database (a new origin).
        version, store_id = read_token_and_id(connection, self._identity)
        self._check_triggers(connection)
        return _NativeSource(connection, self._origin(store_id), version, started,
                             self.site_header_checks, self.verifications), version

    def _check_triggers(self, connection: Connection) -> None:
        self.change_detection_problem = engine_module.trigger_problem(connection)

    def load_snapshot(self) -> Snapshot:
        started = time.time()
        with self._connection(consistent=True) as connection:
            source, _ = self._source(connection, started)
            return source.full(read_state(connection, source.origin))

    def load_changes(self, previous: Snapshot) -> Snapshot:
        """The snapshot after a change: ``previous`` with only the lists whose revision
        moved rebuilt (``refresh.load_changes``), else a full build (always while the
        triggers cannot be trusted)."""
        started = time.time()
        with self._connection(consistent=True) as connection:
            source, version = self._source(connection, started)
            prior = refresh.prior_state(previous, source.origin)
            if prior is None:
                return source.full(read_state(connection, source.origin))
            if self.change_detection_problem is not None:
                return replace(source.full(read_state(connection, source.origin)),
                               built_how="full build: change triggers do not all fire")
            return refresh.load_changes(previous, prior, source, version=version,
                                        started=started)

    def verification_due(self) -> bool:
        """Whether the next refresh should be a verification build (``load_verified``):
        ``verify_interval`` seconds after the last full build or failed verification
        build, and at every refresh while the triggers cannot be trusted."""
        return self.verifications.due(always=self.change_detection_problem is not None)

    def load_verified(self, previous: Snapshot) -> tuple[Snapshot, list[str]]:
        """A full build, and how what the incremental path serves for the same state
        differs from it (``refresh.verify``): a write that bypassed the triggers shows
        there.  A failure counts as an attempt (``VerificationSchedule.attempt``)."""
        return self.verifications.attempt(lambda: self._verify(previous))

    def _verify(self, previous: Snapshot) -> tuple[Snapshot, list[str]]:
        started = time.time()
        with self._connection(consistent=True) as connection:
            source, version = self._source(connection, started)
            return refresh.verify(previous, refresh.prior_state(previous, source.origin),
                                  source, version=version, started=started)

    def check(self) -> None:
        """``StoreUnavailable`` unless the store answers with the current schema; missing
        or disabled triggers are not an error (full builds stay right): they are
        ``change_detection_problem``, which ``describe()`` names."""
        with self._connection() as connection:
            engine_module.ping(connection)
            problem = engine_module.schema_problem(connection)
            if problem is None:
                self._check_triggers(connection)
        if problem is not None:
            raise StoreUnavailable(f"store {engine_module.safe_url(self.url)}: {problem}")

    def revision(self) -> str | None:
        with self._connection() as connection:
            return engine_module.current_revision(connection)

    def describe(self) -> str:
        try:
            revision = self.revision() or "none"
        except StoreUnavailable:
            revision = "unknown"
        problem = self.change_detection_problem
        return (f"native {engine_module.safe_url(self.url)} (schema rev {revision})"
                + ("" if problem is None else f"; {problem}"))

    # --- notifications (PostgreSQL) -----------------------------------------------------

    @property
    def moderation_engine(self):
        """Where SMTP-time moderation keeps its state (``policyd.store.moderation``):
        this store's database."""
        return self.engine

    def notify_channel(self) -> str | None:
        """The channel the store's triggers NOTIFY on a change (PostgreSQL), else None:
        this store can only be polled."""
        return NOTIFY_CHANNEL if self.engine.dialect.name == "postgresql" else None

    def watch_path(self) -> str | None:
        """The database file a ``policyd.sqlite_watch.SqliteWatcher`` can watch (an
        SQLite store in a file), else None."""
        return None if self._path is None else str(self._path)

    def listen(self):
        """A new connection of its own (not pooled: ``application_name`` policyd-listen),
        in autocommit, LISTENing on ``notify_channel()``: (the DBAPI connection, a callable
        that closes it).  Blocking: for ``policyd.change_listener``'s thread only."""
        if self._listen_engine is None:
            self._listen_engine = engine_module.make_engine(
                self.url, timeouts=self.timeouts, application_name="policyd-listen",
                pooled=False)
        try:
            raw = self._listen_engine.raw_connection()
        except SQLAlchemyError as error:
            raise StoreUnavailable(f"store {engine_module.safe_url(self.url)}: "
                                   f"{engine_module.first_line(error)}") from None
        try:
            connection = raw.dbapi_connection
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException:
            raw.invalidate()
            raise
        return connection, raw.invalidate

    def close(self) -> None:
        self.engine.dispose()
        if self._listen_engine is not None:
            self._listen_engine.dispose()
