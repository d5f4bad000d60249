"""SMTP-time moderation (issue 17): ``lists.smtp_moderation`` (off, greylist, moderate;
off by default) and the state the daemons share: greylist entries, remembered senders and
moderation tickets.

The state tables are not tracked for change detection and have no triggers: writing them
never bumps a list's revision or rebuilds a snapshot.  ``lists.smtp_moderation`` is a
column of ``lists``, so the ``lists`` update trigger of 0002 bumps the list's revision
when it changes: no new trigger.  Keys are SHA-256 hex (``key_hash``): one short unique
column whatever the database's index length limits.

Revision ID: 0004_smtp_moderation
Revises: 0003_message_rules
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004_smtp_moderation"
down_revision: Union[str, Sequence[str], None] = "0003_message_rules"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _text(length: int = 255):
    # ``models.text_column``, spelled here (a migration must not import the application).
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


def upgrade() -> None:
    op.add_column("lists", sa.Column("smtp_moderation", sa.String(16), nullable=False,
                                     server_default="off"))
    op.create_table(
        "moderation_greylist",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("list", _text(), nullable=False),
        sa.Column("sender", _text(), nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("message_id", _text(), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
    )
    op.create_index("ix_moderation_greylist_first_seen", "moderation_greylist",
                    ["first_seen"])
    op.create_table(
        "moderation_remembered",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("list", _text(), nullable=False),
        sa.Column("sender", _text(), nullable=False),
        sa.Column("until", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_moderation_remembered_until", "moderation_remembered", ["until"])
    op.create_table(
        "moderation_tickets",
        sa.Column("id", sa.String(8), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("list", _text(), nullable=False),
        sa.Column("sender", _text(), nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("message_id", _text(), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("decided_at", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_moderation_tickets_key_hash", "moderation_tickets", ["key_hash"])
    op.create_index("ix_moderation_tickets_list", "moderation_tickets", ["list"])


def downgrade() -> None:
    op.drop_table("moderation_tickets")
    op.drop_table("moderation_remembered")
    op.drop_table("moderation_greylist")
    _drop_list_columns(["smtp_moderation"])


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
