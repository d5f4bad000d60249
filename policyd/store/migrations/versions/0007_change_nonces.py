"""A random nonce beside each list revision: a diverged copy of the store is a change.

``list_revisions.revision`` counts a list's changes; it does not say which changes they
were.  Two copies of one store that diverged (a backup restored with ``cp backup.sqlite
policyd.sqlite``, a copy edited elsewhere, a PostgreSQL or MariaDB database restored from
a dump) keep the store's id and can hold other members at the same revisions, generation
and row counts: the daemon's change token did not move, and it went on answering from
the old snapshot.  Now every bump also writes ``nonce``, a random value below 2**60
drawn anew by the trigger (``0002_list_revisions.NONCE``), and the change token sums the
nonces (in two 30-bit halves, so no sum overflows) and a list's fingerprint carries its
nonce: two diverged histories differ in the nonce of every list either changed since they
parted, so their tokens differ except with probability about 2**-60.

The upgrade adds the column, gives every existing row a random nonce, and recreates the
triggers of 0002 with the nonce (idempotently, as 0002 does); the downgrade drops the
column and puts 0002's triggers back.

Revision ID: 0007_change_nonces
Revises: 0006_list_broken
Create Date: 2026-12-07

"""
import importlib.util
import secrets
from pathlib import Path
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007_change_nonces"
down_revision: Union[str, Sequence[str], None] = "0006_list_broken"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _triggers():
    """Migration 0002's module: its trigger table and statements (a migration does not
    import the application; this is the sibling file, loaded by its path)."""
    path = Path(__file__).with_name("0002_list_revisions.py")
    spec = importlib.util.spec_from_file_location("policyd_migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("list_revisions")}
    if "nonce" not in columns:
        op.add_column("list_revisions", sa.Column("nonce", sa.BigInteger(), nullable=False,
                                                  server_default="0"))
    revisions = sa.table("list_revisions", sa.column("list_id"), sa.column("nonce"))
    for (list_id,) in bind.execute(sa.select(revisions.c.list_id)).all():
        bind.execute(revisions.update().where(revisions.c.list_id == list_id)
                     .values(nonce=secrets.randbits(60)))
    for statement in _triggers().statements(bind.dialect.name, nonce=True):
        op.execute(statement)


def downgrade() -> None:
    # Without triggers while the column goes: SQLite's batch mode renames a copy of the
    # table into place, which fails while a trigger names the table.
    triggers, dialect = _triggers(), op.get_bind().dialect.name
    for statement in triggers.drop_statements(dialect):
        op.execute(statement)
    with op.batch_alter_table("list_revisions") as batch:
        batch.drop_column("nonce")
    for statement in triggers.statements(dialect):
        op.execute(statement)
