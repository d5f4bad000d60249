"""A list whose source data cannot be trusted: ``lists.broken``, the reason (NULL for
a list that is fine).  Set by ``policyctl import-mailman2`` when a Mailman 2 list's
``config.pck`` (and ``config.pck.last``) cannot be read or is not a usable pickle,
cleared by the next import that reads it.  The snapshot loader passes it as
``ListSpec.broken``: the list's posts get a temporary failure (``broken-list``) instead
of an answer from rows that may be stale.

A column of ``lists``, so the ``lists`` update trigger of 0002 bumps the list's revision
when it changes: no new trigger.

Revision ID: 0006_list_broken
Revises: 0005_dmarc_mitigation
Create Date: 2026-12-07

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006_list_broken"
down_revision: Union[str, Sequence[str], None] = "0005_dmarc_mitigation"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("lists", sa.Column("broken", sa.Text(), nullable=True))


def downgrade() -> None:
    _drop_list_columns(["broken"])


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
