"""Writes that remove rows without firing their delete triggers: TRUNCATE and REPLACE.

A sync job that reloads a table (``TRUNCATE memberships`` and the rows of the lists its
source still has) removed the rows of the other lists without a trigger naming them.
The inserted rows bumped their lists, so the daemon's refresh found a list that explained
the change, rebuilt it, and went on serving the emptied lists' old members.

* PostgreSQL fires statement-level ``TRUNCATE`` triggers: each tracked table's now also
  bumps the shared row 0 (``policyd_rev_<table>_at``), so the next refresh is a full
  build.
* MariaDB fires no trigger for a TRUNCATE (it re-creates the table).  It gives the table
  a new InnoDB table id, which the change token and the shared fingerprint carry
  (``policyd.store.native``); nothing to do here.
* SQLite has no TRUNCATE (a ``DELETE`` without ``WHERE`` fires the row triggers), but
  ``INSERT OR REPLACE`` / ``REPLACE INTO`` (and ``UPDATE OR REPLACE``) delete the rows
  the new one conflicts with without firing their delete triggers, unless
  ``recursive_triggers`` is on in the writer's connection, which policyd cannot set for
  other writers (the ``sqlite3`` shell, a sync job).  ``BEFORE INSERT`` and ``BEFORE
  UPDATE`` triggers now bump the lists of every row such a write would delete (same
  primary key or same unique column) as its delete trigger would.  MariaDB's ``REPLACE``
  fires the delete triggers, and PostgreSQL's ``INSERT ... ON CONFLICT DO UPDATE`` the
  update triggers, so both need none.

On every database, inserting a user or an address also bumps the lists whose rows
already name its id: rows left dangling by a delete without foreign key checks (SQLite's
default for a writer that does not enable them, MariaDB's ``foreign_key_checks = 0``)
count again once a row with that id comes back.

Creating the triggers is idempotent, as in 0002; the downgrade puts 0007's back.

Revision ID: 0010_truncate_and_replace
Revises: 0009_mailman2_root
Create Date: 2026-12-07

"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op

revision: str = "0010_truncate_and_replace"
down_revision: Union[str, Sequence[str], None] = "0009_mailman2_root"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SHARED = 0


def _triggers():
    """Migration 0002's module: its trigger helpers (a migration does not import the
    application; this is the sibling file, loaded by its path)."""
    path = Path(__file__).with_name("0002_list_revisions.py")
    spec = importlib.util.spec_from_file_location("policyd_migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _user_lists(users: str) -> list[str]:
    """The lists of the users ``users`` (a subquery) select, as 0002's ``_user_lists``."""
    return [f"SELECT list_id AS x FROM memberships WHERE user_id IN ({users})",
            "SELECT mu.list_id AS x FROM memberships mu JOIN addresses au "
            f"ON au.id = mu.address_id WHERE au.user_id IN ({users})"]


def _own_address_lists(addresses: str) -> list[str]:
    """The lists of the addresses ``addresses`` select, as members and as their users'
    preferred address."""
    return [f"SELECT list_id AS x FROM memberships WHERE address_id IN ({addresses})",
            "SELECT mp.list_id AS x FROM memberships mp JOIN users up "
            f"ON up.id = mp.user_id WHERE up.preferred_address_id IN ({addresses})"]


def _address_lists(addresses: str) -> list[str]:
    """What 0002's ``addresses`` delete trigger bumps, for the addresses ``addresses``
    select: their lists, and their users' lists."""
    return (_own_address_lists(addresses)
            + _user_lists(f"SELECT user_id FROM addresses WHERE id IN ({addresses})"))


def _conflicts(table: str, columns: tuple[str, ...]) -> str:
    """The ids of the rows of ``table`` that NEW conflicts with."""
    match = " OR ".join(f"{column} = NEW.{column}" for column in columns)
    return f"SELECT id FROM {table} WHERE {match}"


# SQLite: table -> the lists of the rows a REPLACE of NEW deletes (the primary key and
# every unique column; the unique keys of memberships, patterns and bans include NEW's
# list, which NEW's own trigger bumps).
REPLACED: dict[str, list[str]] = {
    "domains": [f"SELECT {SHARED} AS x FROM domains WHERE id = NEW.id OR name = NEW.name"],
    "lists": ["SELECT id AS x FROM lists WHERE id = NEW.id "
              "OR posting_address = NEW.posting_address OR list_id = NEW.list_id"],
    "memberships": ["SELECT list_id AS x FROM memberships WHERE id = NEW.id"],
    "nonmember_patterns": ["SELECT list_id AS x FROM nonmember_patterns WHERE id = NEW.id"],
    "bans": [f"SELECT COALESCE(list_id, {SHARED}) AS x FROM bans WHERE id = NEW.id"],
    "addresses": _address_lists(_conflicts("addresses", ("id", "email"))),
    "users": _user_lists(_conflicts("users", ("id", "name"))),
}

# Every database: the inserts that pick up rows naming their id (replacing 0002's
# ``addresses`` insert trigger, which bumped only the lists of the address's user).
INSERTED: dict[str, list[str]] = {
    "addresses": _own_address_lists("NEW.id") + _user_lists("NEW.user_id"),
    "users": _user_lists("NEW.id"),
}

TRUNCATE_FUNCTION = "policyd_rev_truncate"


def _truncate_statements(triggers) -> list[str]:
    """PostgreSQL: every tracked table's TRUNCATE bumps the shared row."""
    body = triggers._upsert("postgresql", [f"SELECT {SHARED} AS x"], nonce=True)
    out = [f"CREATE OR REPLACE FUNCTION {TRUNCATE_FUNCTION}() RETURNS trigger "
           f"LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN NULL; END $$"]
    for table in triggers.TRUNCATE_TABLES:
        name = triggers.trigger_name(table, "AFTER", "TRUNCATE")
        out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        out.append(f"CREATE TRIGGER {name} AFTER TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {TRUNCATE_FUNCTION}()")
    return out


def change_triggers(dialect: str) -> list[tuple[str, str]]:
    """(table, trigger name) of this migration's change triggers, for
    ``engine.expected_triggers`` (0002's ``change_triggers`` says why)."""
    triggers = _triggers()
    out = []
    if dialect == "postgresql":
        out += [(table, triggers.trigger_name(table, "AFTER", "TRUNCATE"))
                for table in triggers.TRUNCATE_TABLES]
    out += [(table, triggers.trigger_name(table, "AFTER", "INSERT")) for table in INSERTED]
    if dialect == "sqlite":
        out += [(table, triggers.trigger_name(table, "BEFORE", event))
                for table in REPLACED for event in ("INSERT", "UPDATE")]
    return out


def recreate_triggers(dialect: str) -> list[str]:
    return statements(dialect)


def statements(dialect: str) -> list[str]:
    """The SQL that (re)creates this migration's triggers, idempotently."""
    triggers = _triggers()
    out = _truncate_statements(triggers) if dialect == "postgresql" else []
    for table, selects in INSERTED.items():
        out += triggers.trigger_statements(dialect, table, "AFTER", "INSERT", selects,
                                           nonce=True)
    if dialect == "sqlite":
        for table, selects in REPLACED.items():
            for event in ("INSERT", "UPDATE"):
                out += triggers.trigger_statements(dialect, table, "BEFORE", event, selects,
                                                   nonce=True)
    return out


def drop_statements(dialect: str) -> list[str]:
    """Drop this migration's triggers and put 0007's back."""
    triggers = _triggers()
    out = []
    if dialect == "postgresql":
        for table in triggers.TRUNCATE_TABLES:
            name = triggers.trigger_name(table, "AFTER", "TRUNCATE")
            out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        out.append(f"DROP FUNCTION IF EXISTS {TRUNCATE_FUNCTION}()")
    out += triggers.drop_trigger_statements(dialect, "users", "AFTER", "INSERT")
    for table in REPLACED:
        for event in ("INSERT", "UPDATE"):
            out += triggers.drop_trigger_statements(dialect, table, "BEFORE", event)
    return out + triggers.statements(dialect, nonce=True)


def upgrade() -> None:
    for statement in statements(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_statements(op.get_bind().dialect.name):
        op.execute(statement)
