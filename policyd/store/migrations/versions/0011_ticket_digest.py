"""What identifies a held post beyond its key: ``moderation_tickets.digest``.

A ticket is keyed by (list, From:, Message-ID); a decided one answered any post with that
key for ``max_age``, so a message that reused an approved post's From: and Message-ID was
accepted as approved.  The digest (``core.moderation.post_digest``, of the Subject) tells
the approved post from another one, which gets the list's normal outcome.  Rows written
before this revision have ``""`` and are not compared (they expire within ``max_age``).

``moderation_tickets`` is not tracked for change detection: no trigger.

Revision ID: 0011_ticket_digest
Revises: 0010_truncate_and_replace
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011_ticket_digest"
down_revision: Union[str, Sequence[str], None] = "0010_truncate_and_replace"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("moderation_tickets",
                  sa.Column("digest", sa.String(32), nullable=False, server_default=""))


def downgrade() -> None:
    # SQLite drops the column in place (3.35 and later), as 0009 does: no batch-mode
    # rebuild of the table (a DROP TABLE that cascades on a connection with foreign keys
    # on).
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE moderation_tickets DROP COLUMN digest")
    else:
        op.drop_column("moderation_tickets", "digest")
