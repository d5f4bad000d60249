"""DMARC mitigation (issue 16): ``lists.dmarc_mitigate_action`` (Mailman's
DMARCMitigateAction value: 0 no_mitigation, 1 munge_from, 2 wrap_message, 3 reject,
4 discard), ``lists.dmarc_mitigate_unconditionally`` and ``lists.dmarc_addresses`` (one
address or ``^regex`` per line).  Off by default.

Columns of ``lists``, so the ``lists`` update trigger of 0002 bumps the list's revision
when one changes: no new trigger.

Revision ID: 0005_dmarc_mitigation
Revises: 0004_smtp_moderation
Create Date: 2026-12-06

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005_dmarc_mitigation"
down_revision: Union[str, Sequence[str], None] = "0004_smtp_moderation"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("lists", sa.Column("dmarc_mitigate_action", sa.Integer(), nullable=False,
                                     server_default="0"))
    op.add_column("lists", sa.Column("dmarc_mitigate_unconditionally", sa.Boolean(),
                                     nullable=False, server_default=sa.false()))
    op.add_column("lists", sa.Column("dmarc_addresses", sa.Text(), nullable=True))


def downgrade() -> None:
    _drop_list_columns(["dmarc_addresses", "dmarc_mitigate_unconditionally",
                        "dmarc_mitigate_action"])


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
