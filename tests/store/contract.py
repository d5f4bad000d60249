"""The native store's contract, one mixin run against SQLite, PostgreSQL and MariaDB.

A subclass provides ``fresh_database``: a factory returning the URL of a new, empty
database that it drops afterwards.  Everything else (schema, writes, change token,
snapshot loading, decisions) is the same code on every database.
"""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, insert, select, text, update

from policyd import demo
from policyd.core.chain import decide
from policyd.errors import BadInput, NotFound, StoreUnavailable
from policyd.store import NativeBackend, Store, open_backend
from policyd.store import queries as q
from policyd.store.engine import head_revision
from policyd.store.models import (
    Address,
    Base,
    Domain,
    ListRevision,
    MailingList,
    Membership,
    MemberRole,
    StoreState,
    User,
)
from policyd.config import StoreConfig
from policyd.core.verdict import Action, Mode, Query, Verdict

LIST = "discuss@lists.example.org"


class StoreContract:
    # --- fixtures ------------------------------------------------------------------------

    @pytest.fixture
    def url(self, fresh_database) -> str:
        return fresh_database()

    @pytest.fixture
    def store(self, url):
        store = Store(url)
        store.upgrade()
        yield store
        store.close()

    @pytest.fixture
    def backend(self, store):
        backend = NativeBackend(store.url)
        yield backend
        backend.close()

    @pytest.fixture
    def mlist(self, store):
        with store.write() as session:
            q.add_list(session, LIST)
        return LIST

    def snapshot(self, backend):
        return backend.load_snapshot()

    def policy(self, backend, address=LIST):
        return backend.load_snapshot().lists[address]

    def add(self, store, addresses, action=None, role=MemberRole.MEMBER, user=None,
            target=LIST):
        with store.write() as session:
            mlist = q.find_list(session, target)
            u = q.get_or_create_user(session, user)[0] if user else None
            return q.add_members(session, mlist, q.entries_from(addresses, action), role, u)

    # --- schema --------------------------------------------------------------------------

    def test_upgrade_creates_the_schema_at_head_and_is_idempotent(self, url):
        """The first upgrade creates the schema, a second one changes nothing."""
        store = Store(url)
        try:
            assert store.upgrade() == (None, head_revision())
            assert store.upgrade() == (head_revision(), head_revision())
            assert store.revision() == head_revision()
        finally:
            store.close()

    def test_models_match_the_migrations(self, store):
        """Alembic finds no difference between the models and the migrated schema."""
        with store.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []

    def test_moderation_state_round_trip(self, store, backend, mlist):
        """SMTP-time moderation's rows (migration 0004): a batch written, read back by
        another daemon, a moderator's decision never overwritten by a daemon's update,
        expired rows pruned, and ``smtp_moderation`` in the snapshot."""
        from policyd.core.moderation import (Decision, Key, ModerationState, Settings,
                                             SmtpModeration)
        from policyd.store import moderation as sm

        now = [1_800_000_000.0]
        state = ModerationState(clock=lambda: now[0])
        key = Key(LIST, "nobody@x.example", "2001:db8::/64", "<m@x>")
        state.check(SmtpModeration.GREYLIST, key)
        held = state.check(SmtpModeration.MODERATE, key, subject="Hi", client="2001:db8::1")
        engine = backend.moderation_engine
        sm.write_changes(engine, state.drain())
        entries, remembered, tickets = sm.load_state(engine, Settings(), now[0])
        assert [e.key for e in entries] == [key] and [t.id for t in tickets] == [held.ticket]
        with store.write() as session:
            sm.decide_ticket(session, held.ticket, Decision.REJECT, now[0], "No")
        now[0] += 600
        state.check(SmtpModeration.MODERATE, key)  # attempts + 1, decision unknown here
        state.check(SmtpModeration.GREYLIST, key)  # passes: entry gone, sender remembered
        sm.write_changes(engine, state.drain())
        entries, remembered, tickets = sm.read_since(engine, now[0] - 60, Settings().remember)
        assert entries == [] and [(r[0], r[1]) for r in remembered] == [(LIST, key.sender)]
        [ticket] = tickets
        assert (ticket.decision, ticket.reason, ticket.attempts) == (Decision.REJECT, "No", 2)
        assert sm.prune_rows(engine, Settings(), now[0] + 40 * 86400) == 2
        with store.write() as session:
            q.set_list(session, LIST, smtp_moderation="greylist")
        assert self.policy(backend).smtp_moderation is SmtpModeration.GREYLIST

    def test_a_ticket_id_held_for_another_post_is_reported_not_updated(self, backend):
        """Two daemons drew one ticket id for two posts: the second daemon's write
        neither updates the first post's row (its attempts, its decision's post) nor
        inserts over it, and returns the id as a conflict for ``redraw``."""
        from policyd.core.moderation import Key, ModerationState, SmtpModeration
        from policyd.store import moderation as sm

        engine = backend.moderation_engine
        rows = []
        for attempts, sender in enumerate(("alice@x.example", "bob@x.example"), 2):
            state = ModerationState(clock=lambda: 1_800_000_000.0,
                                    ticket_id=iter(["K7Q2M9", "N3W1D2"]).__next__)
            key = Key(LIST, sender, "", f"<{sender}>")
            for _ in range(attempts):
                state.check(SmtpModeration.MODERATE, key)
            rows.append(sm.write_changes(engine, state.drain()))
        assert rows == [[], ["K7Q2M9"]]
        [ticket] = sm.read_since(engine, 0, 0)[2]
        assert (ticket.key.sender, ticket.attempts) == ("alice@x.example", 2)
        state.redraw(rows[1])
        assert sm.write_changes(engine, state.drain()) == []
        assert len(sm.read_since(engine, 0, 0)[2]) == 2

    def test_a_tickets_digest_round_trips_and_0011_downgrades(self, store, backend):
        """A ticket's post digest (migration 0011) is written and read back; downgrading
        0011 drops only the column (the ticket stays) and upgrading brings it back."""
        from alembic import command

        from policyd.core.moderation import Key, ModerationState, SmtpModeration
        from policyd.store import engine as engine_module
        from policyd.store import moderation as sm

        engine = backend.moderation_engine
        state = ModerationState(clock=lambda: 1_800_000_000.0)
        held = state.check(SmtpModeration.MODERATE, Key(LIST, "a@x.example", "", "<a@x>"),
                           digest="0123456789abcdef0123456789abcdef")
        sm.write_changes(engine, state.drain())
        [ticket] = sm.read_since(engine, 0, 0)[2]
        assert (ticket.id, ticket.digest) == (held.ticket, "0123456789abcdef0123456789abcdef")
        with store.engine.begin() as connection:
            command.downgrade(engine_module._alembic_config(connection),
                              "0010_truncate_and_replace")
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql(
                "SELECT id FROM moderation_tickets").scalars().all() == [held.ticket]
        assert store.upgrade() == ("0010_truncate_and_replace", head_revision())
        [ticket] = sm.read_since(engine, 0, 0)[2]
        assert (ticket.id, ticket.digest) == (held.ticket, "")

    def test_backend_check_fails_on_a_store_without_schema(self, url):
        """check() raises StoreUnavailable naming `policyctl init` for an empty database."""
        backend = NativeBackend(url)
        try:
            with pytest.raises(StoreUnavailable, match="policyctl init"):
                backend.check()
        finally:
            backend.close()

    def test_a_store_of_an_older_schema_says_run_migrate(self, url):
        """A package upgraded, ``policyctl migrate`` not run: the snapshot load failed
        with the database's "no such column" alone; it names the revisions and the
        command (the daemon's status and log show this reason)."""
        from policyd.store import engine as engine_module

        store = Store(url)
        backend = NativeBackend(url)
        try:
            engine_module.upgrade(store.engine, "0005_dmarc_mitigation")
            with pytest.raises(StoreUnavailable,
                               match=r"revision 0005_dmarc_mitigation, this policyd needs "
                               r".*run `policyctl migrate`"):
                backend.load_snapshot()
        finally:
            backend.close()
            store.close()

    def test_check_and_describe(self, backend):
        """A migrated store passes check(); describe() names the revision, no password."""
        backend.check()
        description = backend.describe()
        assert description.startswith("native ")
        assert f"schema rev {head_revision()}" in description
        assert "secret" not in description

    def test_open_backend_native(self, store):
        """open_backend(StoreConfig) gives the native backend for backend = native."""
        backend = open_backend(StoreConfig("native", store.url, 2.0))
        try:
            assert isinstance(backend, NativeBackend)
            backend.check()
        finally:
            backend.close()

    # --- change token --------------------------------------------------------------------

    def test_token_is_stable_without_changes(self, backend, mlist):
        """Reading twice without a write gives the same token."""
        assert backend.change_token() == backend.change_token()

    def test_every_write_changes_the_token(self, store, backend, mlist):
        """Each policyctl-style write transaction bumps the generation, so the token moves,
        even for an in-place update that changes no row count."""
        tokens = {backend.change_token()}
        with store.write() as session:
            q.set_list(session, LIST, emergency=True)
        tokens.add(backend.change_token())
        self.add(store, ["a@example.com"])
        tokens.add(backend.change_token())
        with store.write() as session:
            q.set_members(session, q.find_list(session, LIST),
                          q.entries_from(["a@example.com"], Action.HOLD))
        tokens.add(backend.change_token())
        assert len(tokens) == 4

    def test_token_notices_foreign_inserts_and_deletes(self, store, backend, mlist):
        """A writer that forgets to bump the generation is still noticed when it inserts
        or deletes rows."""
        table = Address.__table__
        before = backend.change_token()
        with store.engine.begin() as connection:
            connection.execute(insert(table), [
                {"email": f"foreign{i}@example.com", "original": f"foreign{i}@example.com"}
                for i in range(2)])
        inserted = backend.change_token()
        assert inserted != before
        with store.engine.begin() as connection:
            connection.execute(delete(table).where(table.c.email == "foreign0@example.com"))
        assert backend.change_token() not in (before, inserted)

    def test_snapshot_version_is_the_token(self, backend, mlist):
        """load_snapshot() sets Snapshot.version to the change token it read."""
        assert backend.load_snapshot().version == backend.change_token()

    def test_failed_write_leaves_nothing(self, store, backend, mlist):
        """An exception inside a write transaction rolls everything back, the generation
        bump included."""
        before = backend.change_token()
        with pytest.raises(BadInput):
            with store.write() as session:
                q.add_list(session, "other@lists.example.org")
                q.add_members(session, q.find_list(session, LIST),
                              q.entries_from(["x@example.com"], None))
                raise BadInput("stop")
        assert backend.change_token() == before
        assert "other@lists.example.org" not in backend.load_snapshot().lists

    # --- domains and lists ---------------------------------------------------------------

    def test_domains_and_alias_domains(self, store, backend):
        """Alias domains map to their mail host; a list is reachable through both."""
        with store.write() as session:
            q.add_domain(session, "Lists.Example.ORG")
            q.add_domain(session, "lists.example.net", alias_of="lists.example.org")
            q.add_domain(session, "empty.example")
            q.add_list(session, LIST)
        snapshot = backend.load_snapshot()
        assert dict(snapshot.domains) == {
            "lists.example.org": "lists.example.org",
            "lists.example.net": "lists.example.org",
            "empty.example": "empty.example",
        }
        assert snapshot.resolve("Discuss@lists.example.net").list.posting_address == LIST
        with store.read() as session:
            assert q.domains(session) == [("empty.example", None),
                                          ("lists.example.org", None),
                                          ("lists.example.net", "lists.example.org")]

    def test_domain_rules(self, store):
        """Duplicate domains, aliases of aliases, lists on alias domains and removing a
        domain that has lists are bad input; unknown domains are not found."""
        with store.write() as session:
            q.add_domain(session, "lists.example.org")
            q.add_domain(session, "alias.example", alias_of="lists.example.org")
            q.add_list(session, LIST)
        for action, error in (
            (lambda s: q.add_domain(s, "LISTS.example.org"), BadInput),
            (lambda s: q.add_domain(s, "x.example", alias_of="alias.example"), BadInput),
            (lambda s: q.add_domain(s, "x.example", alias_of="nowhere.example"), NotFound),
            (lambda s: q.add_list(s, "l@alias.example"), BadInput),
            (lambda s: q.remove_domain(s, "lists.example.org"), BadInput),
            (lambda s: q.remove_domain(s, "nowhere.example"), NotFound),
            (lambda s: q.add_domain(s, "not a domain"), BadInput),
        ):
            with pytest.raises(error):
                with store.write() as session:
                    action(session)
        with store.write() as session:
            q.remove_list(session, LIST)
            assert q.remove_domain(session, "lists.example.org") == ["alias.example"]
            assert q.domains(session) == []

    def test_list_settings_round_trip(self, store, backend):
        """Every list setting reaches the snapshot, and set_list changes it."""
        with store.write() as session:
            row, created = q.add_list(
                session, "Team@Lists.Example.org", display_name="Équipe ☃",
                mode=Mode.MAILMAN2, emergency=True, default_member_action=Action.REJECT,
                default_nonmember_action=Action.DISCARD,
                rejection_notice="Members only, sorry")
            assert created
        policy = self.policy(backend, "team@lists.example.org")
        assert (policy.list_id, policy.display_name, policy.mode, policy.emergency) == (
            "team.lists.example.org", "Équipe ☃", Mode.MAILMAN2, True)
        assert policy.default_member_action is Action.REJECT
        assert policy.default_nonmember_action is Action.DISCARD
        assert policy.rejection_notice == "Members only, sorry"
        with store.write() as session:
            q.set_list(session, "team.lists.example.org", mode=Mode.MAILMAN3, emergency=False,
                       default_member_action=Action.DEFER,
                       default_nonmember_action=Action.ACCEPT, rejection_notice="",
                       display_name="Team")
        policy = self.policy(backend, "team@lists.example.org")
        assert (policy.mode, policy.emergency, policy.default_member_action,
                policy.default_nonmember_action, policy.rejection_notice,
                policy.display_name) == (Mode.MAILMAN3, False, Action.DEFER, Action.ACCEPT,
                                         None, "Team")

    def test_list_errors(self, store, mlist):
        """Duplicate lists, bad names, unknown lists and bad settings are refused."""
        for action, error in (
            (lambda s: q.add_list(s, LIST.upper()), BadInput),
            (lambda s: q.add_list(s, "a+b@lists.example.org"), BadInput),
            (lambda s: q.add_list(s, "not an address"), BadInput),
            (lambda s: q.add_list(s, "x@lists.example.org", list_id="discuss.lists.example.org"),
             BadInput),
            (lambda s: q.find_list(s, "nosuch@lists.example.org"), NotFound),
            (lambda s: q.set_list(s, LIST, colour="red"), BadInput),
            (lambda s: q.set_list(s, LIST, rejection_notice="two\nlines"), BadInput),
        ):
            with pytest.raises(error):
                with store.write() as session:
                    action(session)

    def test_remove_list_removes_its_rows(self, store, backend, mlist):
        """Removing a list removes its memberships, patterns and bans; addresses stay."""
        self.add(store, ["a@example.com"])
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            q.add_pattern(session, mlist_row, Action.HOLD, "^.*@x\\.example$")
            q.add_ban(session, mlist_row, "b@example.com")
            q.add_ban(session, None, "c@example.com")
            q.remove_list(session, LIST)
        snapshot = backend.load_snapshot()
        assert LIST not in snapshot.lists
        assert snapshot.site_bans.match("c@example.com")
        with store.read() as session:
            assert session.scalar(select(Address.id).where(Address.email == "a@example.com"))
            assert session.execute(select(Membership.id)).all() == []
            assert q.totals(session)["bans"] == 1

    # --- members -------------------------------------------------------------------------

    def test_members_nonmembers_and_roles(self, store, backend, mlist):
        """Role member goes to members, role nonmember to nonmembers, each with its action;
        owners and moderators are neither."""
        self.add(store, ["m1@example.com"])
        self.add(store, ["M2@Example.com"], Action.REJECT)
        self.add(store, ["n1@example.com"], Action.ACCEPT, MemberRole.NONMEMBER)
        self.add(store, ["n2@example.com"], None, MemberRole.NONMEMBER)
        self.add(store, ["owner@example.com"], None, MemberRole.OWNER)
        self.add(store, ["mod@example.com"], None, MemberRole.MODERATOR)
        policy = self.policy(backend)
        assert set(policy.members) == {"m1@example.com", "m2@example.com"}
        assert policy.find_member("m2@example.com") == ("m2@example.com", Action.REJECT)
        assert policy.find_member("m1@example.com") == ("m1@example.com", None)
        assert dict(policy.nonmembers) == {"n1@example.com": Action.ACCEPT,
                                           "n2@example.com": None}
        with store.read() as session:
            rows = q.members(session, q.find_list(session, LIST))
        assert [(r["address"], r["original"], r["action"]) for r in rows] == [
            ("m1@example.com", "m1@example.com", None),
            ("m2@example.com", "M2@Example.com", Action.REJECT)]

    def test_bulk_add_and_existing_members(self, store, backend, mlist):
        """A bulk add of thousands inserts them all; adding again reports them as existing
        and changes nothing."""
        addresses = [f"user{i}@bulk{i % 7}.example" for i in range(3000)]
        added, existing = self.add(store, addresses)
        assert (len(added), existing) == (3000, [])
        added, existing = self.add(store, addresses[:10] + ["new@example.com"], Action.HOLD)
        assert (added, len(existing)) == (["new@example.com"], 10)
        policy = self.policy(backend)
        assert len(policy.members) == 3001
        assert policy.find_member("user5@bulk5.example") == ("user5@bulk5.example", None)

    def test_duplicate_entries_with_different_actions_are_bad_input(self, store, mlist):
        """The same address twice with two different actions is refused."""
        with pytest.raises(BadInput, match="twice"):
            with store.write() as session:
                mlist_row = q.find_list(session, LIST)
                q.add_members(session, mlist_row, [q.Entry("a@x.example", "a@x.example", None),
                                                   q.Entry("a@x.example", "A@x.example",
                                                           Action.HOLD)])

    def test_set_and_remove_members(self, store, backend, mlist):
        """set_members changes actions (None = list default); remove_members removes; an
        address that is not subscribed is NotFound and nothing else changes."""
        self.add(store, ["a@example.com", "b@example.com", "c@example.com"])
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            assert q.set_members(session, mlist_row,
                                 q.entries_from(["a@example.com", "b@example.com"],
                                                Action.DISCARD)) == 2
        policy = self.policy(backend)
        assert policy.find_member("a@example.com")[1] is Action.DISCARD
        with pytest.raises(NotFound, match="zed@example.com"):
            with store.write() as session:
                mlist_row = q.find_list(session, LIST)
                q.remove_members(session, mlist_row,
                                 q.entries_from(["a@example.com", "zed@example.com"], None))
        assert "a@example.com" in self.policy(backend).members
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            q.set_members(session, mlist_row, q.entries_from(["a@example.com"], None))
            q.remove_members(session, mlist_row, q.entries_from(["b@example.com"], None))
        policy = self.policy(backend)
        assert set(policy.members) == {"a@example.com", "c@example.com"}
        assert policy.find_member("a@example.com")[1] is None

    def test_idn_addresses_are_stored_normalised(self, store, backend, mlist):
        """A Unicode domain is stored as IDNA A-labels, the original as typed."""
        self.add(store, ["Jörg@Bücher.example"])
        with store.read() as session:
            row = session.execute(select(Address.email, Address.original)).one()
        assert tuple(row) == ("jörg@xn--bcher-kva.example", "Jörg@Bücher.example")
        assert "jörg@xn--bcher-kva.example" in self.policy(backend).members

    # --- users ---------------------------------------------------------------------------

    def test_other_addresses_of_a_member_user_are_aliases(self, store, backend, mlist):
        """Mailman 3: an address of a user counts as that user's subscribed address."""
        with store.write() as session:
            q.add_user(session, "ann", q.entries_from(
                ["ann@work.example", "ann@home.example", "ann@phone.example"], None))
        self.add(store, ["ann@home.example"], Action.HOLD)
        policy = self.policy(backend)
        assert dict(policy.member_aliases) == {"ann@work.example": "ann@home.example",
                                               "ann@phone.example": "ann@home.example"}
        assert policy.find_member("ann@phone.example") == ("ann@home.example", Action.HOLD)

    def test_user_membership_posts_through_the_preferred_address(self, store, backend, mlist):
        """A user membership makes the preferred address the member; changing the
        preferred address moves it."""
        with store.write() as session:
            user = q.add_user(session, "bo", q.entries_from(
                ["bo@one.example", "bo@two.example"], None))
            q.subscribe_user(session, q.find_list(session, LIST), user,
                             action=Action.REJECT)
        policy = self.policy(backend)
        assert set(policy.members) == {"bo@one.example"}
        assert policy.find_member("bo@two.example") == ("bo@one.example", Action.REJECT)
        with store.write() as session:
            q.set_preferred(session, q.find_user(session, "bo"), "bo@two.example")
        policy = self.policy(backend)
        assert set(policy.members) == {"bo@two.example"}
        assert dict(policy.member_aliases) == {"bo@one.example": "bo@two.example"}

    def test_direct_membership_wins_over_user_membership(self, store, backend, mlist):
        """When an address is subscribed directly and through its user, the direct
        membership's action applies (Mailman's roster get_member)."""
        with store.write() as session:
            user = q.add_user(session, "cy", q.entries_from(["cy@example.com"], None))
            mlist_row = q.find_list(session, LIST)
            q.subscribe_user(session, mlist_row, user, action=Action.ACCEPT)
            q.add_members(session, mlist_row, q.entries_from(["cy@example.com"], Action.DISCARD))
        assert self.policy(backend).find_member("cy@example.com") == (
            "cy@example.com", Action.DISCARD)

    def test_alias_goes_to_the_first_member_address_of_the_user(self, store, backend, mlist):
        """With two subscribed addresses, another address of the user stands for the first
        one in address order (Mailman iterates user.addresses)."""
        with store.write() as session:
            q.add_user(session, "di", q.entries_from(
                ["di@a.example", "di@b.example", "di@c.example"], None))
        self.add(store, ["di@c.example"], Action.REJECT)
        self.add(store, ["di@b.example"], Action.HOLD)
        assert self.policy(backend).find_member("di@a.example") == ("di@b.example", Action.HOLD)

    def test_user_links(self, store, backend, mlist):
        """add_members with a user links the addresses; an address of another user is bad
        input; unlinking and removing a user drop the aliases but keep direct members."""
        with store.write() as session:
            user, created = q.get_or_create_user(session, "ed")
            assert created
            q.add_members(session, q.find_list(session, LIST),
                          q.entries_from(["ed@a.example"], None), user=user)
            q.link_addresses(session, user, q.entries_from(["ed@b.example"], None))
        assert self.policy(backend).find_member("ed@b.example") == ("ed@a.example", None)
        with pytest.raises(BadInput, match="another user"):
            with store.write() as session:
                other = q.add_user(session, "fi", [])
                q.link_addresses(session, other, q.entries_from(["ed@b.example"], None))
        with store.write() as session:
            q.unlink_addresses(session, ["ed@b.example"])
        assert self.policy(backend).find_member("ed@b.example") is None
        with store.write() as session:
            q.link_addresses(session, q.find_user(session, "ed"),
                             q.entries_from(["ed@b.example"], None))
            q.remove_user(session, "ed")
        policy = self.policy(backend)
        assert set(policy.members) == {"ed@a.example"}
        assert dict(policy.member_aliases) == {}

    def test_sparse_address_ids_load_like_dense_ones(self, store, backend, mlist):
        """Address ids far apart (most rows deleted) make the loader keep its id tables
        as dicts instead of lists indexed by id: members, actions and aliases are the
        same, in a full and in an incremental load."""
        with store.write() as session:
            q.add_user(session, "jo", q.entries_from(["jo@a.example", "jo@b.example"], None))
        self.add(store, ["jo@b.example", "kim@example.com"], Action.HOLD)
        with store.write() as session:
            session.execute(insert(Address).values(
                id=5_000_000, email="zed@example.com", original="zed@example.com",
                user_id=q.find_user(session, "jo").id))
        before = backend.load_snapshot()
        self.add(store, ["zed@example.com"], Action.REJECT)
        for snapshot in (backend.load_snapshot(), backend.load_changes(before)):
            policy = snapshot.lists[LIST]
            assert set(policy.members) == {"jo@b.example", "kim@example.com",
                                           "zed@example.com"}
            assert policy.find_member("zed@example.com") == ("zed@example.com",
                                                             Action.REJECT)
            assert dict(policy.member_aliases) == {"jo@a.example": "jo@b.example"}

    def test_user_without_preferred_address_cannot_subscribe(self, store, mlist):
        """subscribe_user needs a preferred address."""
        with pytest.raises(BadInput, match="preferred"):
            with store.write() as session:
                user = q.add_user(session, "gus", [])
                q.subscribe_user(session, q.find_list(session, LIST), user)

    # --- patterns and bans ---------------------------------------------------------------

    def test_patterns_keep_their_order(self, store, backend, mlist):
        """Entries load in position order per kind; --position inserts; removal works;
        duplicates and bad regexes are bad input."""
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            q.add_pattern(session, mlist_row, Action.ACCEPT, "^a.*@x\\.example$")
            q.add_pattern(session, mlist_row, Action.ACCEPT, "Someone@X.example")
            assert q.add_pattern(session, mlist_row, Action.ACCEPT, "^first@", position=1) == 1
            q.add_pattern(session, mlist_row, Action.DISCARD, "^.*@spam\\.example$")
            q.add_pattern(session, mlist_row, Action.HOLD, "held@example.com")
            q.add_pattern(session, mlist_row, Action.ACCEPT, "@Other@Lists.example.org")
        policy = self.policy(backend)
        groups = {action: [p.text for p in patterns]
                  for action, patterns in policy.nonmember_patterns}
        assert groups[Action.ACCEPT] == ["^first@", "^a.*@x\\.example$", "someone@x.example",
                                         "@other@lists.example.org"]
        assert groups[Action.HOLD] == ["held@example.com"]
        assert groups[Action.DISCARD] == ["^.*@spam\\.example$"]
        assert groups[Action.REJECT] == []
        for text, kind in (("^first@", Action.ACCEPT), ("^(", Action.HOLD)):
            with pytest.raises(BadInput):
                with store.write() as session:
                    q.add_pattern(session, q.find_list(session, LIST), kind, text)
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            q.remove_pattern(session, mlist_row, Action.ACCEPT, "SOMEONE@x.example")
            assert [t for _, _, t in q.patterns(session, mlist_row, Action.ACCEPT)] == [
                "^first@", "^a.*@x\\.example$", "@other@lists.example.org"]
        with pytest.raises(NotFound):
            with store.write() as session:
                q.remove_pattern(session, q.find_list(session, LIST), Action.REJECT, "^x")

    def test_patterns_are_case_sensitive_on_every_database(self, store, backend, mlist):
        """``^Foo`` and ``^foo`` are two entries (MariaDB's default collation would fold
        them), and load as written."""
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            q.add_pattern(session, mlist_row, Action.REJECT, "^Foo@x")
            q.add_pattern(session, mlist_row, Action.REJECT, "^foo@x")
            q.remove_pattern(session, mlist_row, Action.REJECT, "^Foo@x")
        groups = dict(self.policy(backend).nonmember_patterns)
        assert [p.text for p in groups[Action.REJECT]] == ["^foo@x"]

    def test_list_and_site_bans(self, store, backend, mlist):
        """List bans go to the list, site bans to Snapshot.site_bans; duplicates are bad
        input, removing a missing ban is not found."""
        with store.write() as session:
            mlist_row = q.find_list(session, LIST)
            assert q.add_ban(session, mlist_row, "Troll@Example.net") == "troll@example.net"
            q.add_ban(session, mlist_row, "^.*@spam\\.example$")
            q.add_ban(session, None, "^bad@")
            q.add_ban(session, None, "troll@example.net")
        snapshot = backend.load_snapshot()
        assert snapshot.lists[LIST].bans.match("troll@example.net") == "troll@example.net"
        assert snapshot.lists[LIST].bans.match("x@spam.example") == "^.*@spam\\.example$"
        assert snapshot.site_bans.match("bad@anywhere.example") == "^bad@"
        for action, error in (
            (lambda s: q.add_ban(s, None, "^bad@"), BadInput),
            (lambda s: q.add_ban(s, None, "^(oops"), BadInput),
            (lambda s: q.remove_ban(s, None, "nobody@example.com"), NotFound),
        ):
            with pytest.raises(error):
                with store.write() as session:
                    action(session)
        with store.write() as session:
            q.remove_ban(session, None, "TROLL@example.net")
            assert q.bans(session, None) == ["^bad@"]
            assert q.bans(session, q.find_list(session, LIST)) == [
                "troll@example.net", "^.*@spam\\.example$"]

    # --- the whole path ------------------------------------------------------------------

    def test_demo_data_decides_as_documented(self, store, backend):
        """load_snapshot + decide give the verdicts policyd.demo documents."""
        with store.write() as session:
            demo.load_demo(session)
        snapshot = backend.load_snapshot()
        assert snapshot.problems == ()
        for recipient, sender, from_header, expected in demo.EXAMPLES:
            decision = decide(snapshot, Query(recipient, sender, from_header))
            assert decision.verdict is Verdict(expected), (recipient, sender, decision)

    def test_generation_row_is_recreated_if_missing(self, store, backend, mlist):
        """bump() re-creates the store_state row if someone deleted it."""
        with store.engine.begin() as connection:
            connection.execute(delete(StoreState.__table__))
        self.add(store, ["z@example.com"])
        with store.read() as session:
            assert q.generation(session) == 1
        assert backend.change_token().startswith("1.")

    def test_snapshot_reads_a_consistent_state(self, store, backend, mlist):
        """The loader reads inside one transaction: the rows it returns match the token."""
        self.add(store, [f"u{i}@example.com" for i in range(50)])
        snapshot = backend.load_snapshot()
        with store.engine.connect() as connection:
            count = connection.execute(text("SELECT count(*) FROM memberships")).scalar()
        assert snapshot.membership_count == count == 50
        assert snapshot.version == backend.change_token()

    def test_list_count_helpers(self, store, mlist):
        """list_counts and totals count per role and per table."""
        self.add(store, ["a@example.com", "b@example.com"])
        self.add(store, ["o@example.com"], role=MemberRole.OWNER)
        with store.read() as session:
            counts = q.list_counts(session, q.find_list(session, LIST))
            totals = q.totals(session)
            lists = session.scalars(select(MailingList.posting_address)).all()
        assert counts == {"member": 2, "owner": 1, "moderator": 0, "nonmember": 0,
                          "patterns": 0, "bans": 0}
        assert totals["memberships"] == 3 and totals["addresses"] == 3
        assert lists == [LIST]

    # --- incremental refresh ---------------------------------------------------------------

    @staticmethod
    def content(snapshot) -> dict:
        """Everything a decision reads, as plain data."""
        return {
            "domains": dict(snapshot.domains),
            "site_bans": (snapshot.site_bans.exact,
                          [p.text for p in snapshot.site_bans.patterns]),
            "lists": {
                posting: (policy.members, dict(policy.member_actions),
                          dict(policy.member_aliases), dict(policy.nonmembers),
                          [(a, [p.text for p in ps]) for a, ps in policy.nonmember_patterns],
                          policy.bans.exact, [p.text for p in policy.bans.patterns],
                          policy.emergency, policy.default_member_action,
                          policy.default_nonmember_action, policy.rejection_notice,
                          policy.mode, policy.display_name)
                for posting, policy in snapshot.lists.items()},
        }

    OTHER = "other@lists.example.org"

    @pytest.fixture
    def two_lists(self, store, mlist):
        with store.write() as session:
            q.add_list(session, self.OTHER)
        self.add(store, ["a@example.com", "b@example.com"])
        self.add(store, ["c@example.com"], target=self.OTHER)
        self.add(store, ["u1@example.com", "u2@example.com"], user="pat")
        return LIST

    def _changes(self, store, backend, write):
        before = backend.load_snapshot()
        with store.write() as session:
            write(session)
        after = backend.load_changes(before)
        assert after.version == backend.change_token()
        assert self.content(after) == self.content(backend.load_snapshot())
        return before, after

    @pytest.mark.parametrize("change", [
        "member add", "member action", "member remove", "pattern", "list ban", "setting",
        "subscribe new user", "link address",
    ])
    def test_incremental_refresh_rebuilds_only_the_changed_list(self, store, backend,
                                                                two_lists, change):
        """A change to one list swaps in a new policy for that list only; the others are
        the very same objects; the result equals a full build.  Linking a new address to
        a member's user rebuilds exactly the lists that user is on (the list revisions say
        which)."""
        def write(session):
            mlist = q.find_list(session, LIST)
            if change == "member add":
                q.add_members(session, mlist, q.entries_from(["new@example.com"], None))
            elif change == "member action":
                q.set_members(session, mlist, q.entries_from(["a@example.com"], Action.HOLD))
            elif change == "member remove":
                q.remove_members(session, mlist, q.entries_from(["b@example.com"], None))
            elif change == "pattern":
                q.add_pattern(session, mlist, Action.REJECT, "^spam@")
            elif change == "list ban":
                q.add_ban(session, mlist, "troll@example.net")
            elif change == "setting":
                q.set_list(session, LIST, emergency=True)
            elif change == "link address":
                q.link_addresses(session, q.find_user(session, "pat"),
                                 q.entries_from(["u3@example.com"], None))
            else:
                user = q.get_or_create_user(session, "newcomer")[0]
                q.add_members(session, mlist, q.entries_from(["n1@example.com"], None),
                              MemberRole.MEMBER, user)
        before, after = self._changes(store, backend, write)
        assert after.lists[LIST] is not before.lists[LIST]
        assert after.lists[self.OTHER] is before.lists[self.OTHER]
        assert after.built_how == "incremental: 1 list read again"

    @pytest.mark.parametrize("change", ["domain", "site ban", "no visible"])
    def test_shared_changes_rebuild_everything(self, store, backend, two_lists, change):
        """Domains, site bans, and a change no list revision explains are full builds (every policy new), equal to a fresh full build, even
        when a list changed in the same transaction."""
        def write(session):
            if change != "no visible":
                q.add_members(session, q.find_list(session, LIST),
                              q.entries_from(["also@example.com"], None))
            if change == "domain":
                q.add_domain(session, "lists.example.net", alias_of="lists.example.org")
            elif change == "site ban":
                q.add_ban(session, None, "^.*@spam\\.example$")
            # "no visible": the write transaction only bumps the generation.
        before, after = self._changes(store, backend, write)
        assert all(after.lists[p] is not before.lists[p] for p in before.lists)
        assert after.built_how == ("full build: no list explains the change"
                                   if change == "no visible" else
                                   "full build: shared data changed")

    def test_incremental_refresh_of_added_and_removed_lists(self, store, backend, two_lists):
        """A new list appears and a removed one disappears without a full build."""
        def write(session):
            q.add_list(session, "third@lists.example.org")
            q.remove_list(session, self.OTHER)
        before, after = self._changes(store, backend, write)
        assert self.OTHER not in after.lists and "third@lists.example.org" in after.lists
        assert after.lists[LIST] is before.lists[LIST]
        assert after.built_how == "incremental: 1 list read again, 1 list removed"

    def test_linked_address_of_a_member_posts_after_an_incremental_refresh(
            self, store, backend, two_lists):
        """Linking a new address to a subscribed user's account lets it post at once."""
        with store.write() as session:
            q.set_list(session, LIST, default_nonmember_action=Action.REJECT)
        before = backend.load_snapshot()
        with store.write() as session:
            q.link_addresses(session, q.find_user(session, "pat"),
                             q.entries_from(["pat@home.example"], None))
        after = backend.load_changes(before)
        decision = decide(after, Query(LIST, "pat@home.example"))
        assert decision.verdict is Verdict.ACCEPT

    # --- exact change detection (list revisions kept by triggers) -------------------------

    def test_correlated_changes_in_one_window_are_not_missed(self, store, backend, mlist):
        """Issue 12's reproduction: members id 1 (default action) and id 2 (hold); in one
        refresh window id 1 becomes reject, id 2 accept, and another list gets a member.
        A weighted sum of ids and actions cancels exactly there; the list revisions do
        not, so the incremental refresh rebuilds both lists and decides like a full
        build."""
        with store.write() as session:
            q.add_list(session, self.OTHER)
        self.add(store, ["one@example.com"])
        self.add(store, ["two@example.com"], Action.HOLD)
        with store.engine.connect() as connection:
            ids = dict(connection.execute(
                select(Address.email, Membership.id)
                .join(Address, Address.id == Membership.address_id)).all())
        assert ids == {"one@example.com": 1, "two@example.com": 2}
        before = backend.load_snapshot()
        with store.write() as session:
            q.set_members(session, q.find_list(session, LIST),
                          q.entries_from(["one@example.com"], Action.REJECT))
        with store.write() as session:
            q.set_members(session, q.find_list(session, LIST),
                          q.entries_from(["two@example.com"], Action.ACCEPT))
        self.add(store, ["three@example.com"], target=self.OTHER)
        token = backend.change_token()
        assert token != before.version
        after = backend.load_changes(before)
        assert decide(after, Query(LIST, "one@example.com")).verdict is Verdict.REJECT
        assert decide(after, Query(LIST, "two@example.com")).verdict is Verdict.ACCEPT
        assert self.content(after) == self.content(backend.load_snapshot())
        assert after.lists[LIST] is not before.lists[LIST]

    @pytest.mark.parametrize("change", ["update", "insert", "delete address",
                                        "delete user", "unlink"])
    def test_raw_sql_writers_bump_the_revision(self, store, backend, two_lists, change):
        """A writer that goes around policyctl (an admin's SQL, no generation bump) still
        moves the change token and the revision of exactly the lists it touched, through
        the triggers; deletes that cascade (MariaDB fires no trigger for the cascaded
        rows) are caught on the parent row."""
        m, a, u = Membership.__table__, Address.__table__, User.__table__
        before = backend.load_snapshot()
        with store.engine.begin() as connection:
            address_id = connection.execute(
                select(a.c.id).where(a.c.email == "a@example.com")).scalar_one()
            if change == "update":
                connection.execute(update(m).where(m.c.address_id == address_id)
                                   .values(moderation_action=int(Action.DISCARD)))
            elif change == "insert":
                list_id = connection.execute(select(MailingList.__table__.c.id).where(
                    MailingList.__table__.c.posting_address == LIST)).scalar_one()
                new = connection.execute(insert(a).values(
                    email="raw@example.com", original="raw@example.com")).inserted_primary_key[0]
                connection.execute(insert(m).values(list_id=list_id, address_id=new,
                                                    role=int(MemberRole.MEMBER)))
            elif change == "delete address":
                connection.execute(delete(a).where(a.c.id == address_id))
            elif change == "delete user":
                connection.execute(update(a).where(a.c.user_id.is_not(None))
                                   .values(user_id=None))
                connection.execute(delete(u))
            else:
                connection.execute(update(a).where(a.c.email == "u2@example.com")
                                   .values(user_id=None))
        assert backend.change_token() != before.version
        after = backend.load_changes(before)
        assert self.content(after) == self.content(backend.load_snapshot())
        assert after.lists[LIST] is not before.lists[LIST]
        assert after.lists[self.OTHER] is before.lists[self.OTHER]

    def test_migrating_again_keeps_one_set_of_triggers(self, store, backend, mlist):
        """Re-running the trigger migrations' statements (what an upgrade does) leaves
        exactly one trigger per table and event: a change bumps a revision by one and
        draws a new nonce (migration 0007's triggers)."""
        import importlib

        versions = "policyd.store.migrations.versions."
        migration = importlib.import_module(versions + "0002_list_revisions")
        later = importlib.import_module(versions + "0010_truncate_and_replace")
        r = ListRevision.__table__
        with store.engine.begin() as connection:
            for statement in (migration.statements(connection.dialect.name, nonce=True)
                              + later.statements(connection.dialect.name)):
                connection.exec_driver_sql(statement)
        with store.engine.connect() as connection:
            list_id = connection.execute(select(MailingList.__table__.c.id)).scalar_one()
            revision, nonce = connection.execute(
                select(r.c.revision, r.c.nonce).where(r.c.list_id == list_id)).one()
        self.add(store, ["x@example.com"])
        with store.engine.connect() as connection:
            after = connection.execute(
                select(r.c.revision, r.c.nonce).where(r.c.list_id == list_id)).one()
        assert after[0] == revision + 1
        assert after[1] != nonce and 0 <= after[1] < 2 ** 60

    # --- writes that remove rows without their delete triggers (migration 0010) ----------

    def _foreign_write(self, store, statement: str, rows: list[dict] = ()) -> None:
        """``statement`` (named parameters) for each of ``rows``, as another writer runs
        it: on SQLite the ``sqlite3`` module, whose connections (like the ``sqlite3``
        shell's) leave foreign keys and recursive triggers off."""
        if store.engine.dialect.name == "sqlite":
            import sqlite3

            connection = sqlite3.connect(store.engine.url.database, isolation_level=None)
            try:
                for row in rows or [{}]:
                    connection.execute(statement, row)
            finally:
                connection.close()
        else:
            with store.engine.begin() as connection:
                for row in rows or [{}]:
                    connection.execute(text(statement), row)

    def _row(self, store, table, where) -> dict:
        with store.engine.connect() as connection:
            return dict(connection.execute(select(table).where(where)).one()._mapping)

    def _replace(self, store, table, row: dict) -> None:
        """Write ``row`` over the row with its id (and any other it conflicts with) as
        each database's "replace" does: SQLite's ``INSERT OR REPLACE``, MariaDB's
        ``REPLACE INTO``, PostgreSQL's ``INSERT ... ON CONFLICT DO UPDATE``."""
        columns = ", ".join(row)
        values = ", ".join(f":{c}" for c in row)
        dialect = store.engine.dialect.name
        if dialect == "sqlite":
            statement = f"INSERT OR REPLACE INTO {table.name} ({columns}) VALUES ({values})"
        elif dialect == "postgresql":
            updates = ", ".join(f"{c} = excluded.{c}" for c in row if c != "id")
            statement = (f"INSERT INTO {table.name} ({columns}) VALUES ({values}) "
                         f"ON CONFLICT (id) DO UPDATE SET {updates}")
        else:
            statement = f"REPLACE INTO {table.name} ({columns}) VALUES ({values})"
        self._foreign_write(store, statement, [row])

    @pytest.mark.parametrize("change", ["user", "membership", "address"])
    def test_a_replaced_row_rebuilds_the_lists_it_left(self, store, backend, two_lists,
                                                       change):
        """A sync job "upserts" rows: the user bo's row with another preferred address, a's
        membership row (same id) onto the other list, a's address row (same id) with
        another email.  SQLite's REPLACE deleted the old row without firing its delete
        trigger (the old code served bo@one, a on the first list, a's old address); the
        refresh now equals a full build, on every database."""
        a, m, u = Address.__table__, Membership.__table__, User.__table__
        with store.write() as session:
            user = q.add_user(session, "bo", q.entries_from(
                ["bo@one.example", "bo@two.example"], None))
            q.subscribe_user(session, q.find_list(session, LIST), user)
        before = backend.load_snapshot()
        assert {"bo@one.example", "a@example.com"} <= set(before.lists[LIST].members)
        if change == "user":
            row = self._row(store, u, u.c.name == "bo")
            row["preferred_address_id"] = self._row(
                store, a, a.c.email == "bo@two.example")["id"]
            self._replace(store, u, row)
        elif change == "membership":
            address = self._row(store, a, a.c.email == "a@example.com")["id"]
            row = self._row(store, m, m.c.address_id == address)
            row["list_id"] = self._row(store, MailingList.__table__,
                                       MailingList.__table__.c.posting_address
                                       == self.OTHER)["id"]
            self._replace(store, m, row)
        else:
            row = self._row(store, a, a.c.email == "a@example.com")
            row.update(email="a2@example.com", original="a2@example.com")
            self._replace(store, a, row)
        assert backend.change_token() != before.version
        after = backend.load_changes(before)
        assert self.content(after) == self.content(backend.load_snapshot())
        members = set(after.lists[LIST].members)
        assert ("bo@one.example" in members) is (change != "user")
        assert ("a@example.com" in members) is (change == "user")

    @pytest.mark.parametrize("reloaded", ["memberships", "bans"])
    def test_a_table_reloaded_after_truncate_is_read_again(self, store, backend, two_lists,
                                                           reloaded):
        """A sync job reloads a table: TRUNCATE (SQLite: DELETE without WHERE), then only
        the rows of the other list.  The TRUNCATE fired no row trigger (PostgreSQL:
        only a notification; MariaDB: none), the other list's inserts explained the
        token's move, and the old code went on serving the first list's members and
        ban; now the refresh is a full build, equal to a fresh one."""
        with store.write() as session:
            q.add_ban(session, q.find_list(session, LIST), "troll@example.net")
            q.add_ban(session, q.find_list(session, self.OTHER), "spam@example.net")
        table = Base.metadata.tables[reloaded]
        other = self._row(store, MailingList.__table__,
                          MailingList.__table__.c.posting_address == self.OTHER)["id"]
        with store.engine.connect() as connection:
            kept = [dict(r._mapping) for r in connection.execute(
                select(table).where(table.c.list_id == other))]
        before = backend.load_snapshot()
        dialect = store.engine.dialect.name
        self._foreign_write(store, {"sqlite": f"DELETE FROM {reloaded}",
                                    "postgresql": f"TRUNCATE {reloaded}"}.get(
                                        dialect, f"TRUNCATE TABLE {reloaded}"))
        columns = ", ".join(kept[0])
        values = ", ".join(f":{c}" for c in kept[0])
        self._foreign_write(store, f"INSERT INTO {reloaded} ({columns}) VALUES ({values})",
                            kept)
        assert backend.change_token() != before.version
        after = backend.load_changes(before)
        assert self.content(after) == self.content(backend.load_snapshot())
        if reloaded == "memberships":
            assert set(after.lists[LIST].members) == set()
        else:
            assert after.lists[LIST].bans.exact == frozenset()
        assert after.lists[self.OTHER] == backend.load_snapshot().lists[self.OTHER]

    def test_downgrades_keep_every_row_and_the_triggers_on_lists(self, store,
                                                                       two_lists):
        """Downgrading to 0002 (each migration since that added a column to ``lists``
        drops it) through policyd's own engine (foreign keys on, on SQLite) keeps every
        membership and 0002's triggers on ``lists``: Alembic's batch mode rebuilt the
        table, and its DROP TABLE cascaded to the memberships and dropped those
        triggers."""
        from alembic import command

        from policyd.store import engine as engine_module

        with store.engine.connect() as connection:
            members = connection.execute(select(func.count()).select_from(
                Membership.__table__)).scalar()
            before = set(engine_module._triggers_present(connection))
        assert members > 0
        with store.engine.begin() as connection:
            command.downgrade(engine_module._alembic_config(connection),
                              "0002")
        assert store.revision() == "0002"
        with store.engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(
                Membership.__table__)).scalar() == members
            after = set(engine_module._triggers_present(connection))
        import importlib

        first = importlib.import_module("policyd.store.migrations.versions.0002_list_revisions")
        lists_triggers = {t for t in first.change_triggers(store.engine.dialect.name)
                          if t[0] == "lists"}
        assert lists_triggers and lists_triggers <= before
        assert lists_triggers <= after
        assert store.upgrade() == ("0002", head_revision())
        with store.engine.connect() as connection:
            assert engine_module.trigger_problem(connection) is None

    def test_migration_0010_downgrades_and_upgrades_again(self, store, backend, two_lists):
        """Downgrading 0010 puts 0007's triggers back (a change still bumps its list);
        upgrading again brings 0010's back: a REPLACE is seen again."""
        from alembic import command

        from policyd.store import engine as engine_module

        with store.engine.begin() as connection:
            command.downgrade(engine_module._alembic_config(connection),
                              "0009_mailman2_root")
        assert store.revision() == "0009_mailman2_root"
        before = backend.load_snapshot()
        m = Membership.__table__
        with store.engine.begin() as connection:
            connection.execute(update(m).values(moderation_action=int(Action.HOLD)))
        # 0007's triggers moved the token; the daemon reads it with a full build while
        # 0010's triggers are missing (``engine.trigger_problem``).
        assert backend.change_token() != before.version
        after = backend.load_changes(before)
        assert set(after.lists[LIST].member_actions.values()) == {Action.HOLD}
        assert store.upgrade() == ("0009_mailman2_root", head_revision())
        self.test_a_replaced_row_rebuilds_the_lists_it_left(store, backend, two_lists,
                                                            "membership")

    # --- a diverged copy of the store ----------------------------------------------------

    def _dump(self, store) -> dict:
        """Every row of every table of the schema, as a dump would hold them."""
        with store.engine.connect() as connection:
            return {table.name: [dict(row._mapping) for row in connection.execute(
                select(table).order_by(*table.primary_key.columns))]
                for table in Base.metadata.sorted_tables}

    def _restore(self, store, dump: dict) -> None:
        """Put ``dump`` back as a restore does: the rows as they were, the revisions and
        the generation included (what the triggers did while the rows went in is
        overwritten by the dumped ``list_revisions`` and ``store_state``)."""
        tables = Base.metadata.sorted_tables
        with store.engine.begin() as connection:
            for table in reversed(tables):
                connection.execute(delete(table))
            for table in tables:
                if dump[table.name] and table.name not in ("list_revisions", "store_state"):
                    connection.execute(insert(table), dump[table.name])
            for name in ("list_revisions", "store_state"):
                table = Base.metadata.tables[name]
                connection.execute(delete(table))
                if dump[name]:
                    connection.execute(insert(table), dump[name])

    def test_a_diverged_restore_with_the_same_counts_changes_the_token(
            self, store, backend, mlist):
        """A dump of the store, restored after the store diverged from it with the same
        number of changes (the dump: bob's posts rejected; the store: alice's held
        instead), keeps the store id, the generation, every list revision, row count and
        highest id.  The change token still moves (each change drew another nonce), and
        the refresh serves the restored rows (the old code kept the token, and the daemon
        answered from the store it no longer had)."""
        self.add(store, ["alice@example.com", "bob@example.com"])
        common = self._dump(store)

        def moderate(address, action):
            with store.write() as session:
                q.set_members(session, q.find_list(session, LIST),
                              q.entries_from([address], action))

        moderate("bob@example.com", Action.REJECT)
        restored = self._dump(store)
        self._restore(store, common)
        moderate("alice@example.com", Action.HOLD)
        live = backend.load_snapshot()
        assert live.version == backend.change_token()
        assert dict(live.lists[LIST].member_actions) == {"alice@example.com": Action.HOLD}

        self._restore(store, restored)
        assert self._dump(store) == restored
        token = backend.change_token()
        assert token != live.version
        assert token.split(".")[0] == live.version.split(".")[0]  # same generation
        for after in (backend.load_changes(live), backend.load_snapshot()):
            assert after.version == token
            assert dict(after.lists[LIST].member_actions) == {
                "bob@example.com": Action.REJECT}
        # Only the list that differs is read again (its nonce differs, not its revision).
        assert backend.load_changes(live).built_how == "incremental: 1 list read again"

    def test_an_old_store_is_upgraded_with_nonces(self, url):
        """A store made before migration 0007 (list revisions without nonces) is upgraded
        by ``Store.upgrade``: every existing revision gets a random nonce, and from then
        on each change draws a new one."""
        from policyd.store import engine as engine_module

        store = Store(url)
        r = ListRevision.__table__
        try:
            engine_module.upgrade(store.engine, "0006_list_broken")
            with store.engine.begin() as connection:
                # 0002's triggers: the shared revision, without a nonce.
                connection.execute(insert(Domain.__table__).values(name="lists.example.org"))
                assert connection.exec_driver_sql(
                    "SELECT revision FROM list_revisions WHERE list_id = 0").scalar() == 1
            assert store.upgrade() == ("0006_list_broken", head_revision())
            with store.engine.connect() as connection:
                shared = connection.execute(
                    select(r.c.revision, r.c.nonce).where(r.c.list_id == 0)).one()
            assert shared[0] == 1 and 0 < shared[1] < 2 ** 60
            with store.write() as session:
                q.add_list(session, LIST)
                q.add_domain(session, "lists.example.net", alias_of="lists.example.org")
            with store.engine.connect() as connection:
                rows = dict(connection.execute(select(r.c.list_id, r.c.nonce)).all())
            assert len(rows) == 2 and rows[0] != shared[1]
            assert all(0 <= n < 2 ** 60 for n in rows.values())
        finally:
            store.close()

    # --- writes that bypass the triggers -------------------------------------------------

    BYPASSED = ("addresses", "policyd_rev_addresses_au")

    @staticmethod
    def drop_trigger(connection, table: str, name: str) -> None:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
        else:
            connection.exec_driver_sql(f"DROP TRIGGER {name}")

    @staticmethod
    def recreate_triggers(store) -> None:
        """What re-running migrations 0007's and 0010's upgrades does: every trigger made
        again."""
        import importlib

        versions = "policyd.store.migrations.versions."
        migration = importlib.import_module(versions + "0002_list_revisions")
        later = importlib.import_module(versions + "0010_truncate_and_replace")
        with store.engine.begin() as connection:
            for statement in (migration.statements(connection.dialect.name, nonce=True)
                              + later.statements(connection.dialect.name)):
                connection.exec_driver_sql(statement)

    @staticmethod
    def rename_member(connection, old: str, new: str) -> None:
        a = Address.__table__
        connection.execute(update(a).where(a.c.email == old).values(email=new, original=new))

    @staticmethod
    def serve(backend):
        """A snapshot service over ``backend`` on a ``Clock``, the store thread run
        synchronously."""
        from twisted.internet.task import Clock

        from policyd.snapshot_service import SnapshotService
        from tests.protocols.fakes import run_now

        clock = Clock()
        service = SnapshotService(backend, interval=2.0, clock=clock, run_in_thread=run_now,
                                  monotonic=clock.seconds)
        service.startService()
        return service, clock

    @staticmethod
    def logged(events, words: str) -> list:
        return [e for e in events if words in e.get("log_format", "")]

    def test_a_write_around_a_dropped_trigger_is_caught_by_the_verification_build(
            self, store, backend, two_lists):
        """A change trigger dropped by hand, then an address edited (a member renamed):
        no revision moves, nor the change token, and the old code served the old member
        for ever with a healthy status.  The next verification build (``[store]
        verify_interval``) serves what the store holds and logs the divergence naming
        the list; it also finds the trigger missing: status says unhealthy naming it
        (logged once), and every refresh is a verification build until the trigger is
        back, which ends it with one line."""
        from tests.protocols.fakes import captured_events

        service, clock = self.serve(backend)
        try:
            with store.engine.begin() as connection:
                self.drop_trigger(connection, *self.BYPASSED)
                if connection.dialect.name == "sqlite":
                    # Migration 0010's trigger for a REPLACE sees an update too.
                    self.drop_trigger(connection, "addresses", "policyd_rev_addresses_bu")
                self.rename_member(connection, "a@example.com", "mallory@example.com")
            assert backend.change_token() == service.current.version
            with captured_events() as events:
                clock.advance(2)  # verification not due yet: the token alone is read
                assert "a@example.com" in service.current.lists[LIST].members
                backend.verifications.last_full -= 600
                clock.advance(2)
                clock.advance(2)
            served = service.current.lists[LIST].members
            assert "mallory@example.com" in served and "a@example.com" not in served
            assert self.content(service.current) == self.content(backend.load_snapshot())
            [divergence] = self.logged(events, "the incremental snapshot differed")
            assert divergence["differences"] == LIST
            [trouble] = self.logged(events, "until that is fixed")
            assert "missing: policyd_rev_addresses_au on addresses" in trouble["problem"]
            status = service.status()["store"]
            assert status["healthy"] is False
            assert "policyd_rev_addresses_au on addresses" in status["unhealthy_reason"]
            assert backend.verification_due()

            # Without the trigger, a rename back is still seen at the next refresh.
            with store.engine.begin() as connection:
                self.rename_member(connection, "mallory@example.com", "a@example.com")
            clock.advance(2)
            assert "a@example.com" in service.current.lists[LIST].members

            self.recreate_triggers(store)
            with captured_events() as events:
                clock.advance(2)
            assert self.logged(events, "change triggers all fire again")
            assert service.status()["store"]["healthy"] is True
            assert not backend.verification_due()
        finally:
            service.stopService()

    def test_repair_makes_dropped_and_disabled_triggers_again(self, store, backend,
                                                               two_lists):
        """``engine.repair_triggers`` (``policyctl migrate``): a dropped trigger (and on
        PostgreSQL a disabled one) made again as the schema at head has them; a write
        moves the token again; nothing to repair afterwards."""
        from policyd.store import engine as engine_module

        with store.engine.begin() as connection:
            self.drop_trigger(connection, *self.BYPASSED)
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(
                    "ALTER TABLE lists DISABLE TRIGGER policyd_rev_lists_au")
        repaired = store.repair_triggers()
        assert "policyd_rev_addresses_au on addresses" in repaired
        with store.engine.connect() as connection:
            assert engine_module.trigger_problem(connection) is None
        before = backend.change_token()
        with store.engine.begin() as connection:
            self.rename_member(connection, "a@example.com", "mallory@example.com")
        assert backend.change_token() != before
        assert store.repair_triggers() is None

    def test_check_and_describe_name_a_dropped_trigger(self, store, backend, mlist):
        """``check()`` (``policyctl status --offline``, ``query --offline``) still passes
        with a change trigger missing (full builds stay right), and ``describe()`` names
        the trigger and its table; with the triggers back it says nothing of them."""
        backend.check()
        assert "trigger" not in backend.describe()
        with store.engine.begin() as connection:
            self.drop_trigger(connection, "lists", "policyd_rev_lists_au")
        backend.check()
        assert "missing: policyd_rev_lists_au on lists" in backend.describe()
        assert backend.change_detection_problem in backend.describe()
        self.recreate_triggers(store)
        backend.check()
        assert backend.change_detection_problem is None
        assert "trigger" not in backend.describe()

    def test_the_expected_change_triggers_are_the_ones_the_migrations_make(self, store):
        """``engine.expected_triggers`` (what the daemon looks for) is exactly the set of
        policyd's triggers a migrated store has, the NOTIFY ones aside: a migration that
        adds a change trigger without listing it in its ``change_triggers`` fails here."""
        from policyd.store import engine as engine_module

        with store.engine.connect() as connection:
            expected = engine_module.expected_triggers(connection.dialect.name)
            made = {(table, name) for table, name
                    in engine_module._triggers_present(connection)
                    if name.startswith("policyd_") and not name.startswith("policyd_notify_")}
            assert engine_module.trigger_problem(connection) is None
        assert set(expected) == made
