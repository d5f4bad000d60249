"""Where a Mailman 2 list was imported from: ``lists.mailman2_root``, the absolute path of
the Mailman 2 ``lists`` directory that holds its ``NAME`` directory (NULL for a list not
imported, or imported before this revision).  ``policyctl import-mailman2`` sets it, and
an import of that ``lists`` directory removes the lists it recorded there whose directory
is gone (Mailman 2's ``rmlist``), and no other: not a list of another Mailman 2
installation, nor one made with ``policyctl list add``.

A column of ``lists``, so the ``lists`` update trigger of 0002 bumps the list's revision
when it changes: no new trigger.

Revision ID: 0009_mailman2_root
Revises: 0008_dmarc_quarantine
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009_mailman2_root"
down_revision: Union[str, Sequence[str], None] = "0008_dmarc_quarantine"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("lists", sa.Column("mailman2_root", sa.Text(), nullable=True))


def downgrade() -> None:
    # SQLite drops the column in place (3.35 and later): Alembic's batch mode would
    # rebuild ``lists``, and the DROP TABLE of that rebuild deletes every membership,
    # pattern and ban through their ON DELETE CASCADE on a connection with foreign keys
    # on (policyd's), and drops 0002's triggers on ``lists``.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE lists DROP COLUMN mailman2_root")
    else:
        op.drop_column("lists", "mailman2_root")
