"""Mailman 2's ``dmarc_quarantine_moderation_action`` (``lists.dmarc_quarantine``): whether
a ``mailman2``-mode list whose ``dmarc_moderation_action`` is reject or discard applies it
to a From: domain whose DMARC policy is quarantine, as it does to one whose policy is
reject.  Mailman 2.1's default is yes, and so is the column's; Mailman 3 always counts
quarantine, and its lists do not read it.

A column of ``lists``, so the ``lists`` update trigger of 0002 bumps the list's revision
when it changes: no new trigger.

Revision ID: 0008_dmarc_quarantine
Revises: 0007_change_nonces
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008_dmarc_quarantine"
down_revision: Union[str, Sequence[str], None] = "0007_change_nonces"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("lists", sa.Column("dmarc_quarantine", sa.Boolean(), nullable=False,
                                     server_default=sa.true()))


def downgrade() -> None:
    _drop_list_columns(["dmarc_quarantine"])


def _drop_list_columns(names) -> None:
    """SQLite drops each column in place (3.35 and later): Alembic's batch mode would
    rebuild ``lists``, and the DROP TABLE of that rebuild deletes every membership,
    pattern and ban through their ON DELETE CASCADE on a connection with foreign keys
    on (policyd's), and drops the triggers on ``lists``."""
    if op.get_bind().dialect.name == "sqlite":
        for name in names:
            op.execute(f"ALTER TABLE lists DROP COLUMN {name}")
    else:
        for name in names:
            op.drop_column("lists", name)
