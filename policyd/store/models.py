"""The native store's schema: plain SQLAlchemy 2 models, nothing else.

Tables (every change goes through an Alembic migration in ``migrations/versions``):

``domains``            mail hosts, and alias domains (``alias_of_id``) mapped to one
``lists``              one row per list; ``posting_address`` = ``list_name@mail_host``
``addresses``          ``email`` normalised (lower case, IDNA), ``original`` as typed,
                       optionally owned by a user
``users``              a person with several addresses and an optional preferred one
``memberships``        (list, address *or* user, role) with a nullable moderation action;
                       a user membership posts through the user's preferred address
``nonmember_patterns`` the four ``*_these_nonmembers`` lists (``kind`` is the Action)
``bans``               list bans, and site-wide bans (``list_id`` NULL)
``list_revisions``     per list, a revision and a random nonce, both written by triggers
                       on every change (migrations 0002, 0007; ``ListRevision``)
``store_state``        one row; ``generation`` is bumped by every write (see below);
                       ``store_id``, random, set when the store is created (migration
                       0002): a different store (a copied-over SQLite file, a recreated
                       database) has another one, which the daemon's change token and
                       snapshot origin carry, so it makes a full build

Actions are stored as Mailman 3's integers (hold 0, reject 1, discard 2, accept 3,
defer 4) and roles as Mailman 3's (member 1, owner 2, moderator 3, nonmember 4).

Change tracking: every writer should run ``UPDATE store_state SET generation =
generation + 1 WHERE id = 1`` in the same transaction as its change (``policyd.store.
queries.bump`` does; ``Store.write()`` calls it).  The daemon's cheap change token also
carries the list revisions and the sums of their nonces, which the triggers move on any
writer's change, and the row count and highest id of every table (a TRUNCATE fires no
row trigger: on PostgreSQL a TRUNCATE trigger bumps the shared revision, on MariaDB the
tables' InnoDB ids show it; migration 0010, ``native.table_ids``).
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from ..core.verdict import Action, Mode

ADDRESS_LENGTH = 255
PATTERN_LENGTH = 255


def text_column(length: int):
    """A VARCHAR compared byte for byte on every database.

    MariaDB's default collations are case-insensitive: ``^Foo`` and ``^foo`` would be one
    pattern there and two on PostgreSQL and SQLite.  A binary collation makes all three
    agree (addresses are stored lower-cased anyway).
    """
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


class MemberRole(enum.IntEnum):
    """Mailman 3's ``MemberRole`` integers."""

    MEMBER = 1
    OWNER = 2
    MODERATOR = 3
    NONMEMBER = 4

    @classmethod
    def from_name(cls, name: str) -> "MemberRole":
        try:
            return cls[name.strip().upper()]
        except KeyError:
            allowed = ", ".join(r.name.lower() for r in cls)
            raise ValueError(f"unknown role {name!r} (allowed: {allowed})") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class ActionType(TypeDecorator):
    """``Action`` <-> Mailman's integer."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else int(Action(value))

    def process_result_value(self, value, dialect):
        return None if value is None else Action(value)


class RoleType(TypeDecorator):
    """``MemberRole`` <-> Mailman's integer."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else int(MemberRole(value))

    def process_result_value(self, value, dialect):
        return None if value is None else MemberRole(value)


class ModeType(TypeDecorator):
    """``Mode`` <-> ``"mailman3"``/``"mailman2"``."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else Mode(value).value

    def process_result_value(self, value, dialect):
        return None if value is None else Mode(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    })


class StoreState(Base):
    __tablename__ = "store_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # Random, one per store (``new_store_id``); NULL only in a row an old writer made.
    store_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


def new_store_id() -> str:
    """A fresh random store id (``StoreState.store_id``)."""
    import uuid

    return uuid.uuid4().hex


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False, unique=True)
    alias_of_id: Mapped[int | None] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE"), nullable=True, index=True
    )


class MailingList(Base):
    __tablename__ = "lists"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[int] = mapped_column(
        ForeignKey("domains.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    list_name: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    posting_address: Mapped[str] = mapped_column(
        text_column(ADDRESS_LENGTH), nullable=False, unique=True
    )
    list_id: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False, unique=True)
    display_name: Mapped[str] = mapped_column(String(255), nullable=False)
    mode: Mapped[Mode] = mapped_column(ModeType, nullable=False, default=Mode.MAILMAN3)
    emergency: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    default_member_action: Mapped[Action] = mapped_column(
        ActionType, nullable=False, default=Action.DEFER
    )
    default_nonmember_action: Mapped[Action] = mapped_column(
        ActionType, nullable=False, default=Action.HOLD
    )
    rejection_notice: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The rules that read the message (Mailman 3's columns of the same names; migration
    # 0003).  Off by default.  ``moderator_password`` is a passlib hash (Mailman's
    # scheme), never the password; ``header_matches`` is JSON
    # ``[[header, pattern, action or null], ...]``; ``acceptable_aliases`` one per line.
    moderator_password: Mapped[str | None] = mapped_column(String(255), nullable=True)
    header_matches: Mapped[str | None] = mapped_column(Text, nullable=True)
    max_message_size: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_num_recipients: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    require_explicit_destination: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False)
    acceptable_aliases: Mapped[str | None] = mapped_column(Text, nullable=True)
    administrivia: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    bounce_matching_headers: Mapped[str | None] = mapped_column(Text, nullable=True)
    newsgroup_moderated: Mapped[bool] = mapped_column(Boolean, nullable=False,
                                                      default=False)
    # SMTP-time moderation of nonmember posts (migration 0004, ``core.moderation``):
    # off, greylist or moderate.
    smtp_moderation: Mapped[str] = mapped_column(String(16), nullable=False, default="off")
    # DMARC mitigation (migration 0005, ``core.dmarc``): Mailman's DMARCMitigateAction
    # value (0 no_mitigation .. 4 discard), its flag, dmarc_addresses one per line.
    dmarc_mitigate_action: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    dmarc_mitigate_unconditionally: Mapped[bool] = mapped_column(Boolean, nullable=False,
                                                                 default=False)
    dmarc_addresses: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Mailman 2's dmarc_quarantine_moderation_action (migration 0008): whether a
    # mailman2-mode list mitigates a From: domain whose DMARC policy is quarantine.
    dmarc_quarantine: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # Why the list's source data cannot be trusted (migration 0006): a Mailman 2 list
    # whose config.pck could not be read.  Set, the list's posts get a temporary failure
    # (``ListSpec.broken``, the ``broken-list`` rule); NULL for a list that is fine.
    broken: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The Mailman 2 ``lists`` directory (absolute) a ``mailman2``-mode list was imported
    # from (migration 0009): an import of that directory removes the list once its
    # directory is gone (``rmlist``).  NULL: not imported, or before 0009.
    mailman2_root: Mapped[str | None] = mapped_column(Text, nullable=True)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False, unique=True)
    display_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    preferred_address_id: Mapped[int | None] = mapped_column(
        ForeignKey("addresses.id", ondelete="SET NULL", use_alter=True,
                   name="fk_users_preferred_address"),
        nullable=True,
    )


class Address(Base):
    __tablename__ = "addresses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False, unique=True)
    original: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True, index=True
    )


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("list_id", "address_id", "role", name="uq_memberships_address"),
        UniqueConstraint("list_id", "user_id", "role", name="uq_memberships_user"),
        CheckConstraint(
            "(address_id IS NULL) <> (user_id IS NULL)", name="ck_memberships_subscriber"
        ),
        Index("ix_memberships_address_id", "address_id"),
        Index("ix_memberships_user_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    list_id: Mapped[int] = mapped_column(
        ForeignKey("lists.id", ondelete="CASCADE"), nullable=False
    )
    address_id: Mapped[int | None] = mapped_column(
        ForeignKey("addresses.id", ondelete="CASCADE"), nullable=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    role: Mapped[MemberRole] = mapped_column(RoleType, nullable=False, default=MemberRole.MEMBER)
    moderation_action: Mapped[Action | None] = mapped_column(ActionType, nullable=True)


class NonmemberPattern(Base):
    __tablename__ = "nonmember_patterns"
    __table_args__ = (
        UniqueConstraint("list_id", "kind", "pattern", name="uq_nonmember_patterns"),
        CheckConstraint("kind IN (0, 1, 2, 3)", name="ck_nonmember_patterns_kind"),
        Index("ix_nonmember_patterns_order", "list_id", "kind", "position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    list_id: Mapped[int] = mapped_column(
        ForeignKey("lists.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[Action] = mapped_column(ActionType, nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    pattern: Mapped[str] = mapped_column(text_column(PATTERN_LENGTH), nullable=False)


class Ban(Base):
    __tablename__ = "bans"
    __table_args__ = (
        UniqueConstraint("list_id", "pattern", name="uq_bans"),
        Index("ix_bans_pattern", "pattern"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    list_id: Mapped[int | None] = mapped_column(
        ForeignKey("lists.id", ondelete="CASCADE"), nullable=True
    )
    pattern: Mapped[str] = mapped_column(text_column(PATTERN_LENGTH), nullable=False)


class ModerationEntry(Base):
    """A greylist entry of SMTP-time moderation (migration 0004): the first attempt of one
    (list, sender, network, Message-ID).  ``key_hash`` is the SHA-256 of the key (one
    short unique column whatever the database's index limits).  Times are Unix seconds.
    Not tracked for change detection: writing one never rebuilds the snapshot."""

    __tablename__ = "moderation_greylist"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    list: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    sender: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    network: Mapped[str] = mapped_column(String(64), nullable=False)
    message_id: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    first_seen: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    last_seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)


class ModerationSender(Base):
    """A sender that passed the greylist of a list, remembered ``until`` (Unix seconds)."""

    __tablename__ = "moderation_remembered"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    list: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    sender: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    until: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)


class ModerationTicket(Base):
    """A post held for a moderator (``moderate``): ``decision`` is NULL until
    ``policyctl approve|reject|discard`` sets it (approve, reject, discard)."""

    __tablename__ = "moderation_tickets"

    id: Mapped[str] = mapped_column(String(8), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    list: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False,
                                      index=True)
    sender: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    network: Mapped[str] = mapped_column(String(64), nullable=False)
    message_id: Mapped[str] = mapped_column(text_column(ADDRESS_LENGTH), nullable=False)
    subject: Mapped[str] = mapped_column(String(255), nullable=False)
    client: Mapped[str] = mapped_column(String(64), nullable=False)
    first_seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_seen: Mapped[int] = mapped_column(BigInteger, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str] = mapped_column(String(300), nullable=False)
    decided_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # ``core.moderation.post_digest`` of the post (migration 0011; "" before it).
    digest: Mapped[str] = mapped_column(String(32), nullable=False, server_default="")


class ListRevision(Base):
    """A list's revision, bumped by database triggers (migration 0002) on every change to
    a row its policy is built from; ``list_id`` 0 (``SHARED_REVISION``) counts changes to
    what every list shares (domains, site bans).  No foreign key: a row outlives its list,
    so a reused list id continues its counter, and a trigger never fails a writer.

    ``nonce`` (migration 0007): a random value below 2**60 that the same triggers draw
    anew with every bump.  A count says how many changes a list had, not which: two
    copies of one store that diverged (a backup restored over the store, a copy edited
    elsewhere) can hold other members at the same revision.  Their nonces differ (except
    with probability 2**-60), and the change token and a list's fingerprint carry them."""

    __tablename__ = "list_revisions"

    list_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(BigInteger, nullable=False)
    nonce: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


SHARED_REVISION = 0

# PostgreSQL: the channel the triggers of migration 0002 NOTIFY (spelled there too, as a
# migration must not import the application).
NOTIFY_CHANNEL = "policyd_changes"

# The tables the change token watches, in a fixed order.
TRACKED = (Domain, MailingList, User, Address, Membership, NonmemberPattern, Ban)
