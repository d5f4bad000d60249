"""The first native store schema.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _text(length: int):
    # Same as policyd.store.models.text_column, frozen here as migrations must be.
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "store_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(sa.table("store_state", sa.column("id"), sa.column("generation")),
                   [{"id": 1, "generation": 1}])
    op.create_table(
        "domains",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", _text(255), nullable=False),
        sa.Column("alias_of_id", sa.Integer,
                  sa.ForeignKey("domains.id", name="fk_domains_alias_of_id_domains",
                                ondelete="CASCADE"),
                  nullable=True),
        sa.UniqueConstraint("name", name="uq_domains_name"),
    )
    op.create_index("ix_domains_alias_of_id", "domains", ["alias_of_id"])
    op.create_table(
        "lists",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("domain_id", sa.Integer,
                  sa.ForeignKey("domains.id", name="fk_lists_domain_id_domains",
                                ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("list_name", _text(255), nullable=False),
        sa.Column("posting_address", _text(255), nullable=False),
        sa.Column("list_id", _text(255), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("emergency", sa.Boolean, nullable=False),
        sa.Column("default_member_action", sa.SmallInteger, nullable=False),
        sa.Column("default_nonmember_action", sa.SmallInteger, nullable=False),
        sa.Column("rejection_notice", sa.Text, nullable=True),
        sa.UniqueConstraint("posting_address", name="uq_lists_posting_address"),
        sa.UniqueConstraint("list_id", name="uq_lists_list_id"),
    )
    op.create_index("ix_lists_domain_id", "lists", ["domain_id"])
    user_columns = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", _text(255), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=True),
    ]
    if sqlite:
        # SQLite cannot add a constraint later, and accepts a forward reference.
        user_columns.append(sa.Column(
            "preferred_address_id", sa.Integer,
            sa.ForeignKey("addresses.id", name="fk_users_preferred_address",
                          ondelete="SET NULL"),
            nullable=True))
    else:
        user_columns.append(sa.Column("preferred_address_id", sa.Integer, nullable=True))
    op.create_table("users", *user_columns,
                    sa.UniqueConstraint("name", name="uq_users_name"))
    op.create_table(
        "addresses",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", _text(255), nullable=False),
        sa.Column("original", _text(255), nullable=False),
        sa.Column("user_id", sa.Integer,
                  sa.ForeignKey("users.id", name="fk_addresses_user_id_users",
                                ondelete="SET NULL"),
                  nullable=True),
        sa.UniqueConstraint("email", name="uq_addresses_email"),
    )
    op.create_index("ix_addresses_user_id", "addresses", ["user_id"])
    if not sqlite:
        op.create_foreign_key("fk_users_preferred_address", "users", "addresses",
                              ["preferred_address_id"], ["id"], ondelete="SET NULL")
    op.create_table(
        "memberships",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.Integer,
                  sa.ForeignKey("lists.id", name="fk_memberships_list_id_lists",
                                ondelete="CASCADE"),
                  nullable=False),
        sa.Column("address_id", sa.Integer,
                  sa.ForeignKey("addresses.id", name="fk_memberships_address_id_addresses",
                                ondelete="CASCADE"),
                  nullable=True),
        sa.Column("user_id", sa.Integer,
                  sa.ForeignKey("users.id", name="fk_memberships_user_id_users",
                                ondelete="CASCADE"),
                  nullable=True),
        sa.Column("role", sa.SmallInteger, nullable=False),
        sa.Column("moderation_action", sa.SmallInteger, nullable=True),
        sa.UniqueConstraint("list_id", "address_id", "role", name="uq_memberships_address"),
        sa.UniqueConstraint("list_id", "user_id", "role", name="uq_memberships_user"),
        sa.CheckConstraint("(address_id IS NULL) <> (user_id IS NULL)",
                           name="ck_memberships_subscriber"),
    )
    op.create_index("ix_memberships_address_id", "memberships", ["address_id"])
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])
    op.create_table(
        "nonmember_patterns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.Integer,
                  sa.ForeignKey("lists.id", name="fk_nonmember_patterns_list_id_lists",
                                ondelete="CASCADE"),
                  nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("pattern", _text(255), nullable=False),
        sa.UniqueConstraint("list_id", "kind", "pattern", name="uq_nonmember_patterns"),
        sa.CheckConstraint("kind IN (0, 1, 2, 3)", name="ck_nonmember_patterns_kind"),
    )
    op.create_index("ix_nonmember_patterns_order", "nonmember_patterns",
                    ["list_id", "kind", "position"])
    op.create_table(
        "bans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("list_id", sa.Integer,
                  sa.ForeignKey("lists.id", name="fk_bans_list_id_lists", ondelete="CASCADE"),
                  nullable=True),
        sa.Column("pattern", _text(255), nullable=False),
        sa.UniqueConstraint("list_id", "pattern", name="uq_bans"),
    )
    op.create_index("ix_bans_pattern", "bans", ["pattern"])


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in ("bans", "nonmember_patterns", "memberships"):
        op.drop_table(table)
    if not sqlite:
        op.drop_constraint("fk_users_preferred_address", "users", type_="foreignkey")
    for table in ("addresses", "users", "lists", "domains", "store_state"):
        op.drop_table(table)
