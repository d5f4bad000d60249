"""Any sequence of changes, by any writer: the incremental snapshot equals a full build.

A hypothesis state machine applies random batches of changes of every kind to a native
store (members and nonmembers added, removed, their action and role changed; addresses
linked to and unlinked from users, preferred addresses, addresses and users deleted;
patterns; list and site bans; list settings; lists added and removed; alias domains;
rows replaced as each database's "replace" does; a table reloaded after a TRUNCATE),
half of them through ``policyctl``'s queries (which bump the generation) and half as raw
SQL (which only the triggers see).  Between batches it refreshes the way the daemon does
(the change token first, then ``load_changes``) and checks that the snapshot holds
exactly what a fresh full build holds (``refresh.content``: every input of a decision).

Examples: ``POLICYD_PROPERTY_EXAMPLES`` (default 150), up to 40 steps each.  The same
machine runs on PostgreSQL and MariaDB in ``tests/integration/store``.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from policyd.core.verdict import Action
from policyd.store import NativeBackend, Store
from policyd.store import queries as q
from policyd.store.models import (
    Address,
    Ban,
    Domain,
    MailingList,
    Membership,
    MemberRole,
    NonmemberPattern,
    User,
)
from policyd.store.refresh import content

EXAMPLES = int(os.environ.get("POLICYD_PROPERTY_EXAMPLES", "150"))
DOMAIN = "lists.example.org"
LISTS = [f"l{i}@{DOMAIN}" for i in range(4)]
ADDRESSES = [f"a{i}@x.org" for i in range(8)]
USERS = ["u0", "u1", "u2"]
PATTERNS = ["^a[0-3]@x\\.org$", "a5@x.org", f"@l1@{DOMAIN}", "^a.*"]
ACTIONS = st.sampled_from([None] + [int(a) for a in Action])
ROLES = st.sampled_from([int(r) for r in MemberRole])

m, a, u = Membership.__table__, Address.__table__, User.__table__
lt, p, b, d = (MailingList.__table__, NonmemberPattern.__table__, Ban.__table__,
               Domain.__table__)


def seed(url: str) -> None:
    """The starting store: a domain, four lists, eight addresses, three users."""
    store = Store(url)
    try:
        store.upgrade()
        with store.write() as session:
            q.add_domain(session, DOMAIN)
            for posting in LISTS:
                q.add_list(session, posting)
            q.ensure_addresses(session, q.entries_from(ADDRESSES, None))
            for index, name in enumerate(USERS):
                q.link_addresses(session, q.get_or_create_user(session, name)[0],
                                 q.entries_from([ADDRESSES[index]], None))
    finally:
        store.close()


class RefreshMachine(RuleBasedStateMachine):
    """Subclasses set ``make_url`` (a fresh seeded store per example)."""

    make_url = None

    @initialize()
    def open(self):
        self.url = type(self).make_url()
        self.store = Store(self.url)
        self.backend = NativeBackend(self.url)
        self.current = self.backend.load_snapshot()
        self.refreshes = 0

    def teardown(self):
        if hasattr(self, "backend"):
            self.check_refresh()
            self.backend.close()
            self.store.close()

    # --- writers -------------------------------------------------------------------------

    def sql(self, *statements):
        """Raw SQL, one transaction, no generation bump: a change only the triggers see.
        A statement a constraint refuses changes nothing."""
        try:
            with self.store.engine.begin() as connection:
                for statement in statements:
                    connection.execute(statement)
        except IntegrityError:
            pass

    def ids(self, table, column, value):
        with self.store.engine.connect() as connection:
            return connection.execute(select(table.c.id).where(column == value)).scalar()

    def list_id(self, index):
        return self.ids(lt, lt.c.posting_address, LISTS[index])

    def address_id(self, index):
        return self.ids(a, a.c.email, ADDRESSES[index])

    def user_id(self, index):
        return self.ids(u, u.c.name, USERS[index])

    # --- rules: memberships ----------------------------------------------------------------

    @rule(list_=st.integers(0, 3), address=st.integers(0, 7), role=ROLES, action=ACTIONS,
          through_user=st.booleans())
    def subscribe(self, list_, address, role, action, through_user):
        list_id = self.list_id(list_)
        if list_id is None:
            return
        if through_user:
            user = self.user_id(address % len(USERS))
            if user is None:
                return
            row = {"address_id": None, "user_id": user}
        else:
            address_id = self.address_id(address)
            if address_id is None:
                return
            row = {"address_id": address_id, "user_id": None}
        self.sql(insert(m).values(list_id=list_id, role=role, moderation_action=action, **row))

    @rule(list_=st.integers(0, 3), address=st.integers(0, 7))
    def unsubscribe(self, list_, address):
        self.sql(delete(m).where(m.c.list_id == self.list_id(list_),
                                 m.c.address_id == self.address_id(address)))

    @rule(list_=st.integers(0, 3), action=ACTIONS, role=ROLES, pick=st.integers(0, 7))
    def change_a_membership(self, list_, action, role, pick):
        with self.store.engine.connect() as connection:
            rows = connection.execute(select(m.c.id).where(m.c.list_id == self.list_id(list_))
                                      .order_by(m.c.id)).scalars().all()
        if rows:
            row = rows[pick % len(rows)]
            values = {"moderation_action": action} if pick % 2 else {"role": role}
            self.sql(update(m).where(m.c.id == row).values(**values))

    @rule(list_=st.integers(0, 3), addresses=st.lists(st.integers(0, 7), min_size=1,
                                                      max_size=3),
          action=st.sampled_from(list(Action)))
    def policyctl_set_members(self, list_, addresses, action):
        try:
            with self.store.write() as session:
                mlist = q.find_list(session, LISTS[list_])
                entries = q.entries_from([ADDRESSES[i] for i in set(addresses)], action)
                q.add_members(session, mlist, entries)
                q.set_members(session, mlist, entries)
        except Exception:
            pass  # e.g. the list does not exist

    # --- rules: addresses and users ----------------------------------------------------------

    @rule(address=st.integers(0, 7), user=st.integers(-1, 2))
    def link(self, address, user):
        self.sql(update(a).where(a.c.email == ADDRESSES[address])
                 .values(user_id=None if user < 0 else self.user_id(user)))

    @rule(user=st.integers(0, 2), address=st.integers(-1, 7))
    def prefer(self, user, address):
        self.sql(update(u).where(u.c.name == USERS[user]).values(
            preferred_address_id=None if address < 0 else self.address_id(address)))

    @rule(address=st.integers(0, 7))
    def delete_address(self, address):
        self.sql(update(u).where(u.c.preferred_address_id == self.address_id(address))
                 .values(preferred_address_id=None),
                 delete(a).where(a.c.email == ADDRESSES[address]))

    @rule(address=st.integers(0, 7), user=st.integers(-1, 2))
    def add_address(self, address, user):
        self.sql(insert(a).values(email=ADDRESSES[address], original=ADDRESSES[address],
                                  user_id=None if user < 0 else self.user_id(user)))

    @rule(user=st.integers(0, 2))
    def delete_user(self, user):
        self.sql(delete(u).where(u.c.name == USERS[user]))

    @rule(user=st.integers(0, 2))
    def add_user(self, user):
        self.sql(insert(u).values(name=USERS[user]))

    # --- rules: what a sync job does (migration 0010) ------------------------------------
    #
    # Each refreshes at once: a later change to the same list would bump it and hide a
    # change the refresh missed.

    def replace(self, table, row: dict):
        """``row`` over the row with its id: SQLite's ``INSERT OR REPLACE``, MariaDB's
        ``REPLACE INTO``, PostgreSQL's ``INSERT ... ON CONFLICT DO UPDATE``; then a
        refresh."""
        columns, values = ", ".join(row), ", ".join(f":{c}" for c in row)
        dialect = self.store.engine.dialect.name
        if dialect == "sqlite":
            sql = f"INSERT OR REPLACE INTO {table.name} ({columns}) VALUES ({values})"
        elif dialect == "postgresql":
            sql = (f"INSERT INTO {table.name} ({columns}) VALUES ({values}) "
                   "ON CONFLICT (id) DO UPDATE SET "
                   + ", ".join(f"{c} = excluded.{c}" for c in row if c != "id"))
        else:
            sql = f"REPLACE INTO {table.name} ({columns}) VALUES ({values})"
        self.sql(text(sql).bindparams(**row))
        self.check_refresh()

    def row(self, table, pick):
        with self.store.engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(
                select(table).order_by(table.c.id))]
        return rows[pick % len(rows)] if rows else None

    @rule(pick=st.integers(0, 15), list_=st.integers(0, 3))
    def replace_a_membership(self, pick, list_):
        row, list_id = self.row(m, pick), self.list_id(list_)
        if row is not None and list_id is not None:
            self.replace(m, {**row, "list_id": list_id})

    @rule(pick=st.integers(0, 7), email=st.integers(0, 7), user=st.integers(-1, 2))
    def replace_an_address(self, pick, email, user):
        row = self.row(a, pick)
        if row is not None:
            self.replace(a, {**row, "email": ADDRESSES[email], "original": ADDRESSES[email],
                             "user_id": None if user < 0 else self.user_id(user)})

    @rule(pick=st.integers(0, 2), address=st.integers(-1, 7))
    def replace_a_user(self, pick, address):
        row = self.row(u, pick)
        if row is not None:
            self.replace(u, {**row, "preferred_address_id":
                             None if address < 0 else self.address_id(address)})

    @rule(table=st.sampled_from([m, b]), keep=st.sets(st.integers(0, 3)))
    def reload_after_truncate(self, table, keep):
        """TRUNCATE (SQLite has none: DELETE without WHERE), then only the rows of the
        lists ``keep``; then a refresh."""
        ids = [self.list_id(i) for i in keep]
        with self.store.engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(
                select(table).where(table.c.list_id.in_(ids)))]
        empty = {"sqlite": f"DELETE FROM {table.name}",
                 "postgresql": f"TRUNCATE {table.name}"}.get(
                     self.store.engine.dialect.name, f"TRUNCATE TABLE {table.name}")
        self.sql(text(empty), *[insert(table).values(**row) for row in rows])
        self.check_refresh()

    # --- rules: patterns, bans, settings, lists, domains -------------------------------------

    @rule(list_=st.integers(0, 3), kind=st.sampled_from([0, 1, 2, 3]),
          pattern=st.sampled_from(PATTERNS), position=st.integers(0, 3))
    def add_pattern(self, list_, kind, pattern, position):
        self.sql(insert(p).values(list_id=self.list_id(list_), kind=kind, pattern=pattern,
                                  position=position))

    @rule(list_=st.integers(0, 3), pattern=st.sampled_from(PATTERNS))
    def remove_pattern(self, list_, pattern):
        self.sql(delete(p).where(p.c.list_id == self.list_id(list_), p.c.pattern == pattern))

    @rule(list_=st.integers(-1, 3), pattern=st.sampled_from(PATTERNS), add=st.booleans())
    def ban(self, list_, pattern, add):
        list_id = None if list_ < 0 else self.list_id(list_)
        if list_ >= 0 and list_id is None:
            return
        if add:
            self.sql(insert(b).values(list_id=list_id, pattern=pattern))
        else:
            where = b.c.list_id.is_(None) if list_id is None else b.c.list_id == list_id
            self.sql(delete(b).where(where, b.c.pattern == pattern))

    @rule(list_=st.integers(0, 3), emergency=st.booleans(),
          member=st.sampled_from(list(Action)), nonmember=st.sampled_from(list(Action)))
    def settings(self, list_, emergency, member, nonmember):
        self.sql(update(lt).where(lt.c.posting_address == LISTS[list_]).values(
            emergency=emergency, default_member_action=int(member),
            default_nonmember_action=int(nonmember)))

    @rule(list_=st.integers(0, 3), remove=st.booleans())
    def add_or_remove_list(self, list_, remove):
        try:
            with self.store.write() as session:
                if remove:
                    q.remove_list(session, LISTS[list_])
                else:
                    q.add_list(session, LISTS[list_])
        except Exception:
            pass  # already there / not there

    @rule(alias=st.integers(0, 2), remove=st.booleans())
    def alias_domain(self, alias, remove):
        name = f"alias{alias}.example.org"
        if remove:
            self.sql(delete(d).where(d.c.name == name))
        else:
            self.sql(insert(d).values(name=name,
                                      alias_of_id=self.ids(d, d.c.name, DOMAIN)))

    # --- the property ------------------------------------------------------------------------

    @rule()
    def refresh(self):
        self.check_refresh()

    def check_refresh(self):
        """What the snapshot service does on a tick, then: equal to a full build."""
        token = self.backend.change_token()
        if token != self.current.version:
            self.current = self.backend.load_changes(self.current)
            self.refreshes += 1
        assert self.current.version == token
        assert content(self.current) == content(self.backend.load_snapshot())

    @invariant()
    def snapshot_is_a_snapshot(self):
        if hasattr(self, "current"):
            assert self.current.lists is not None


def machine_settings(examples: int = EXAMPLES):
    return settings(max_examples=examples, stateful_step_count=40, deadline=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "seed.sqlite"
    seed(f"sqlite:///{path}")
    return path


def test_incremental_equals_full_on_sqlite(sqlite_template, tmp_path):
    """The state machine on SQLite (each example a copy of one seeded store)."""
    def make_url():
        target = tmp_path / f"{uuid.uuid4().hex}.sqlite"
        shutil.copyfile(sqlite_template, target)
        return f"sqlite:///{target}"

    class Machine(RefreshMachine):
        pass

    Machine.make_url = staticmethod(make_url)
    Machine.TestCase.settings = machine_settings()
    Machine.TestCase().runTest()


def reseed(url: str) -> str:
    """Empty the store's rows (the schema and its triggers stay) and seed it again: a
    fresh example on a server database without recreating it each time."""
    store = Store(url)
    try:
        store.upgrade()
        with store.engine.begin() as connection:
            connection.execute(update(u).values(preferred_address_id=None))
            for table in (m, p, b, lt, a, u):
                connection.execute(delete(table))
            connection.execute(delete(d).where(d.c.alias_of_id.is_not(None)))
            connection.execute(delete(d))
    finally:
        store.close()
    store = Store(url)
    try:
        with store.write() as session:
            q.add_domain(session, DOMAIN)
            for posting in LISTS:
                q.add_list(session, posting)
            q.ensure_addresses(session, q.entries_from(ADDRESSES, None))
            for index, name in enumerate(USERS):
                q.link_addresses(session, q.get_or_create_user(session, name)[0],
                                 q.entries_from([ADDRESSES[index]], None))
    finally:
        store.close()
    return url


def run_on_server(url: str, examples: int) -> None:
    """The state machine on one server database, reseeded for every example."""
    class Machine(RefreshMachine):
        pass

    Machine.make_url = staticmethod(lambda: reseed(url))
    Machine.TestCase.settings = machine_settings(examples)
    Machine.TestCase().runTest()
