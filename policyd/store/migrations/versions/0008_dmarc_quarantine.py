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
    with op.batch_alter_table("lists") as batch:
        batch.drop_column("dmarc_quarantine")
