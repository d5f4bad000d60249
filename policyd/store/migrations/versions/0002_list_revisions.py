"""Per-list revisions kept by database triggers: exact change detection.

Every change to a row a list's policy is built from bumps that list's row in
``list_revisions`` (``list_id`` = ``lists.id``); a change to what every list shares
(domains, site bans) bumps row 0.  Triggers, not application code, so that any writer
(policyctl, an admin's SQL, a sync job) is seen, on SQLite, PostgreSQL and MariaDB alike.

Which lists a row affects:

* ``lists``, ``memberships``, ``nonmember_patterns``, list ``bans``: their list (old and
  new on an update);
* ``domains`` and site bans (``bans.list_id`` NULL): row 0;
* ``addresses``: the lists the address is a member of, the lists its user (old and new)
  is a member of through any address or as a user (a user's other addresses post as its
  member address), the lists of the users whose preferred address it is;
* ``users``: the lists the user is a member of (as a user, or through its addresses).

Deletes of ``lists``, ``addresses`` and ``users`` are caught *before* the row goes, while
the rows that reference it still exist: MariaDB does not fire triggers for the rows a
foreign key cascade deletes or nulls.  ``list_revisions`` has no foreign key and a row is
never deleted (a reused list id continues its counter), so a trigger only ever upserts
into a table nothing else constrains: it cannot make a writer fail.

On PostgreSQL, statement-level triggers also ``NOTIFY policyd_changes`` (``CHANNEL``) on
every change of ``list_revisions`` or ``store_state`` (which every tracked change
writes) and every ``TRUNCATE`` of a tracked table.  The payload is constant, and
PostgreSQL delivers identical notifications of one transaction once: a transaction of
10,000 rows wakes a listening daemon once.  The function notifies only while the
server's notification queue is less than half full, so that a listener that stopped
reading can never make a writer fail at commit ("too many notifications").

``store_state.store_id``: a random id of this store, set here (and by ``queries.bump``
when it re-creates a missing row).  A different store copied over an SQLite file, or a
database dropped and recreated under the same URL, has another id; the daemon's change
token and snapshot origin carry it, so it rebuilds in full.

``change_triggers``: the (table, trigger) pairs the daemon expects to find
(``policyd.store.engine.trigger_problem``), and ``recreate_triggers``: the SQL that makes
them as the schema at head has them; every migration that creates change triggers
defines both.

Creating the triggers is idempotent (dropped if they exist, then created): ``policyctl
migrate`` on a store whose triggers were dropped or disabled by hand recreates them
(``engine.repair_triggers``: each migration's ``recreate_triggers``, oldest first).

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01

"""
import uuid
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SHARED = 0
CHANNEL = "policyd_changes"
NOTIFY_FUNCTION = "policyd_notify_changes"
# PostgreSQL: the tables whose statements notify (``list_revisions`` and ``store_state``
# take every tracked change; TRUNCATE fires no row trigger, so each tracked table's
# TRUNCATE notifies itself).
NOTIFY_TABLES = ("list_revisions", "store_state")
TRUNCATE_TABLES = ("domains", "lists", "users", "addresses", "memberships",
                   "nonmember_patterns", "bans", "list_revisions", "store_state")


def _user_lists(user: str) -> list[str]:
    return [f"SELECT list_id AS x FROM memberships WHERE user_id = {user}",
            "SELECT mu.list_id AS x FROM memberships mu JOIN addresses au "
            f"ON au.id = mu.address_id WHERE au.user_id = {user}"]


def _address_lists(address: str) -> list[str]:
    return [f"SELECT list_id AS x FROM memberships WHERE address_id = {address}"]


def _preferred_lists(address: str) -> list[str]:
    return ["SELECT mp.list_id AS x FROM memberships mp JOIN users up ON up.id = mp.user_id "
            f"WHERE up.preferred_address_id = {address}"]


def _own(row: str, column: str = "list_id") -> list[str]:
    return [f"SELECT {row}.{column} AS x"]


# (table, timing, event) -> the SELECTs of the list ids to bump (NEW/OLD as in SQL).
TRIGGERS: dict[tuple[str, str, str], list[str]] = {
    ("domains", "AFTER", "INSERT"): [f"SELECT {SHARED} AS x"],
    ("domains", "AFTER", "UPDATE"): [f"SELECT {SHARED} AS x"],
    ("domains", "AFTER", "DELETE"): [f"SELECT {SHARED} AS x"],
    ("lists", "AFTER", "INSERT"): _own("NEW", "id"),
    ("lists", "AFTER", "UPDATE"): _own("OLD", "id") + _own("NEW", "id"),
    ("lists", "BEFORE", "DELETE"): _own("OLD", "id"),
    ("memberships", "AFTER", "INSERT"): _own("NEW"),
    ("memberships", "AFTER", "UPDATE"): _own("OLD") + _own("NEW"),
    ("memberships", "AFTER", "DELETE"): _own("OLD"),
    ("nonmember_patterns", "AFTER", "INSERT"): _own("NEW"),
    ("nonmember_patterns", "AFTER", "UPDATE"): _own("OLD") + _own("NEW"),
    ("nonmember_patterns", "AFTER", "DELETE"): _own("OLD"),
    ("bans", "AFTER", "INSERT"): [f"SELECT COALESCE(NEW.list_id, {SHARED}) AS x"],
    ("bans", "AFTER", "UPDATE"): [f"SELECT COALESCE(OLD.list_id, {SHARED}) AS x",
                                  f"SELECT COALESCE(NEW.list_id, {SHARED}) AS x"],
    ("bans", "AFTER", "DELETE"): [f"SELECT COALESCE(OLD.list_id, {SHARED}) AS x"],
    ("addresses", "AFTER", "INSERT"): _user_lists("NEW.user_id"),
    ("addresses", "AFTER", "UPDATE"): (
        _address_lists("NEW.id") + _address_lists("OLD.id") + _user_lists("OLD.user_id")
        + _user_lists("NEW.user_id") + _preferred_lists("NEW.id")
        + _preferred_lists("OLD.id")),
    ("addresses", "BEFORE", "DELETE"): (
        _address_lists("OLD.id") + _user_lists("OLD.user_id") + _preferred_lists("OLD.id")),
    ("users", "AFTER", "UPDATE"): _user_lists("OLD.id") + _user_lists("NEW.id"),
    ("users", "BEFORE", "DELETE"): _user_lists("OLD.id"),
}


def trigger_name(table: str, timing: str, event: str) -> str:
    return f"policyd_rev_{table}_{timing[0].lower()}{event[0].lower()}"


def change_triggers(dialect: str) -> list[tuple[str, str]]:
    """(table, trigger name) of the triggers that keep ``list_revisions``: without one of
    them the daemon cannot trust its incremental refresh (``engine.trigger_problem``).
    The NOTIFY triggers are not listed: without them changes are still polled."""
    return [(table, trigger_name(table, timing, event))
            for table, timing, event in TRIGGERS]


# Migration 0007: a random value below 2**60, drawn anew for each row.  SQLite's random()
# is a 64-bit CSPRNG value; PostgreSQL and MariaDB hash a random number with a value that
# is unique in time (the clock and the backend; a version 1 UUID).
NONCE = {
    "sqlite": "(random() & 1152921504606846975)",
    "postgresql": ("('x' || substr(md5(random()::text || clock_timestamp()::text "
                   "|| pg_backend_pid()::text), 1, 15))::bit(60)::bigint"),
    "mysql": "CAST(CONV(SUBSTR(MD5(CONCAT(UUID(), RAND())), 1, 15), 16, 10) AS UNSIGNED)",
}
NONCE["mariadb"] = NONCE["mysql"]


def _upsert(dialect: str, selects: list[str], nonce: bool = False) -> str:
    ids = " UNION ".join(selects)
    if nonce:
        # One row per list id (DISTINCT before the random value, which differs per row).
        head = ("INSERT INTO list_revisions (list_id, revision, nonce) "
                f"SELECT x, 1, {NONCE[dialect]} FROM (SELECT DISTINCT x FROM ({ids}) "
                "AS changed) AS distinct_ids WHERE x IS NOT NULL")
        if dialect in ("mysql", "mariadb"):
            return head + (" ON DUPLICATE KEY UPDATE revision = revision + 1, "
                           "nonce = VALUES(nonce)")
        return head + (" ON CONFLICT (list_id) DO UPDATE SET "
                       "revision = list_revisions.revision + 1, nonce = excluded.nonce")
    head = ("INSERT INTO list_revisions (list_id, revision) "
            f"SELECT DISTINCT x, 1 FROM ({ids}) AS changed WHERE x IS NOT NULL")
    if dialect in ("mysql", "mariadb"):
        return head + " ON DUPLICATE KEY UPDATE revision = revision + 1"
    return head + " ON CONFLICT (list_id) DO UPDATE SET revision = list_revisions.revision + 1"


def _notify_statements() -> list[str]:
    """PostgreSQL: the notifying function and its statement-level triggers."""
    out = [f"CREATE OR REPLACE FUNCTION {NOTIFY_FUNCTION}() RETURNS trigger "
           "LANGUAGE plpgsql AS $$ BEGIN "
           f"IF pg_notification_queue_usage() < 0.5 THEN PERFORM pg_notify('{CHANNEL}', ''); "
           "END IF; RETURN NULL; END $$"]
    for table in NOTIFY_TABLES:
        name = f"policyd_notify_{table}"
        out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        out.append(f"CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {NOTIFY_FUNCTION}()")
    for table in TRUNCATE_TABLES:
        name = f"policyd_notify_{table}_truncate"
        out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        out.append(f"CREATE TRIGGER {name} AFTER TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {NOTIFY_FUNCTION}()")
    return out


def recreate_triggers(dialect: str) -> list[str]:
    """This migration's triggers as the schema at head has them (0007's, with nonces)."""
    return statements(dialect, nonce=True)


def statements(dialect: str, nonce: bool = False) -> list[str]:
    """The SQL that (re)creates every trigger, idempotently; ``nonce``: the triggers of
    migration 0007, which also draw a new ``list_revisions.nonce`` with each bump."""
    out = _notify_statements() if dialect == "postgresql" else []
    for (table, timing, event), selects in TRIGGERS.items():
        out.extend(trigger_statements(dialect, table, timing, event, selects, nonce))
    return out


def trigger_statements(dialect: str, table: str, timing: str, event: str,
                       selects: list[str], nonce: bool = False) -> list[str]:
    """(Re)create one row trigger that bumps the lists ``selects`` name."""
    name = trigger_name(table, timing, event)
    body = _upsert(dialect, selects, nonce)
    if dialect == "postgresql":
        # A BEFORE trigger's function must return the row, or the change is skipped.
        result = "NULL" if timing == "AFTER" else "OLD" if event == "DELETE" else "NEW"
        return [f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger "
                f"LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN {result}; END $$",
                f"DROP TRIGGER IF EXISTS {name} ON {table}",
                f"CREATE TRIGGER {name} {timing} {event} ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"]
    if dialect in ("mysql", "mariadb"):
        return [f"DROP TRIGGER IF EXISTS {name}",
                f"CREATE TRIGGER {name} {timing} {event} ON {table} FOR EACH ROW {body}"]
    return [f"DROP TRIGGER IF EXISTS {name}",
            f"CREATE TRIGGER {name} {timing} {event} ON {table} "
            f"FOR EACH ROW BEGIN {body}; END"]


def drop_trigger_statements(dialect: str, table: str, timing: str, event: str) -> list[str]:
    name = trigger_name(table, timing, event)
    if dialect == "postgresql":
        return [f"DROP TRIGGER IF EXISTS {name} ON {table}", f"DROP FUNCTION IF EXISTS {name}()"]
    return [f"DROP TRIGGER IF EXISTS {name}"]


def drop_statements(dialect: str) -> list[str]:
    out = []
    if dialect == "postgresql":
        for table in NOTIFY_TABLES:
            out.append(f"DROP TRIGGER IF EXISTS policyd_notify_{table} ON {table}")
        for table in TRUNCATE_TABLES:
            out.append(f"DROP TRIGGER IF EXISTS policyd_notify_{table}_truncate ON {table}")
        out.append(f"DROP FUNCTION IF EXISTS {NOTIFY_FUNCTION}()")
    for table, timing, event in TRIGGERS:
        out.extend(drop_trigger_statements(dialect, table, timing, event))
    return out


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("list_revisions"):
        op.create_table(
            "list_revisions",
            sa.Column("list_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("revision", sa.BigInteger, nullable=False),
        )
    columns = {c["name"] for c in sa.inspect(bind).get_columns("store_state")}
    if "store_id" not in columns:
        op.add_column("store_state", sa.Column("store_id", sa.String(32), nullable=True))
    store_state = sa.table("store_state", sa.column("store_id"))
    op.execute(store_state.update().where(store_state.c.store_id.is_(None))
               .values(store_id=uuid.uuid4().hex))
    for statement in statements(bind.dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_statements(op.get_bind().dialect.name):
        op.execute(statement)
    op.drop_table("list_revisions")
    with op.batch_alter_table("store_state") as batch:
        batch.drop_column("store_id")
