"""The settings of the rules that read the message: moderator password (a passlib hash),
header matches, max_message_size, max_num_recipients, require_explicit_destination and
acceptable aliases, administrivia, bounce_matching_headers, newsgroup moderation.

Columns of ``lists`` (all off by default), so the ``lists`` update trigger of 0002 bumps
the list's revision when one changes: no new trigger.  ``header_matches`` is JSON
``[[header, pattern, action or null], ...]`` and ``acceptable_aliases`` one alias per line:
each is read whole with its list and never queried by value.

Revision ID: 0003_message_rules
Revises: 0002
Create Date: 2025-06-10

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003_message_rules"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_COLUMNS = (
    ("moderator_password", lambda: sa.Column("moderator_password", sa.String(255),
                                             nullable=True)),
    ("header_matches", lambda: sa.Column("header_matches", sa.Text(), nullable=True)),
    ("max_message_size", lambda: sa.Column("max_message_size", sa.Integer(),
                                           nullable=False, server_default="0")),
    ("max_num_recipients", lambda: sa.Column("max_num_recipients", sa.Integer(),
                                             nullable=False, server_default="0")),
    ("require_explicit_destination", lambda: sa.Column(
        "require_explicit_destination", sa.Boolean(), nullable=False,
        server_default=sa.false())),
    ("acceptable_aliases", lambda: sa.Column("acceptable_aliases", sa.Text(),
                                             nullable=True)),
    ("administrivia", lambda: sa.Column("administrivia", sa.Boolean(), nullable=False,
                                        server_default=sa.false())),
    ("bounce_matching_headers", lambda: sa.Column("bounce_matching_headers", sa.Text(),
                                                  nullable=True)),
    ("newsgroup_moderated", lambda: sa.Column("newsgroup_moderated", sa.Boolean(),
                                              nullable=False, server_default=sa.false())),
)


def upgrade() -> None:
    for _, column in _COLUMNS:
        op.add_column("lists", column())


def downgrade() -> None:
    _drop_list_columns([name for name, _ in reversed(_COLUMNS)])


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
