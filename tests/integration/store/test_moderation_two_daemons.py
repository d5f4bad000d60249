"""SMTP-time moderation shared by two daemons on one PostgreSQL store: each daemon's
``ModerationService`` with its own engine, the store thread replaced by a synchronous
call, one ``Clock``.  The first attempt at daemon A, the retry at daemon B."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from policyd.core.moderation import Decision, Outcome
from policyd.core.replies import ReplyPolicy
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action, Query
from policyd.decider import Decider
from policyd.moderation_service import ModerationService
from policyd.store import NativeBackend, Store
from policyd.store import moderation as store_moderation
from tests.integration.store.test_store_databases import postgres_databases  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

GREY = "grey@lists.example.org"
MODERATED = "moderated@lists.example.org"
NONMEMBER = "stranger@elsewhere.example"


class Daemon:
    def __init__(self, url: str, clock: Clock, snapshots) -> None:
        self.backend = NativeBackend(url)
        self.decider = Decider(snapshots, ReplyPolicy())
        self.moderation = ModerationService(
            snapshots, self.backend.moderation_engine, clock=clock, wall=clock.seconds,
            store_clock=lambda engine: clock.seconds(),
            run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
        self.moderation.sync()  # the first load

    def ask(self, to: str, client: str, message_id: str = "<1@elsewhere.example>"):
        answer = self.decider.decide(Query(to, NONMEMBER, f"<{NONMEMBER}>"), "test")
        answer, step = self.moderation.apply(answer, Query(to, NONMEMBER),
                                             client=client, message_id=message_id)
        return answer.reply, step


class Snapshots:
    def __init__(self) -> None:
        specs = [ListSpec(address, members=(MemberSpec("member@example.org"),),
                          default_nonmember_action=Action.HOLD, smtp_moderation=mode)
                 for address, mode in ((GREY, "greylist"), (MODERATED, "moderate"))]
        self.current = build(specs, version="1", built_at=0.0)
        self.unavailable_reason = ""


@pytest.fixture
def two_daemons(postgres_databases):  # noqa: F811
    url = postgres_databases()
    store = Store(url)
    store.upgrade()
    clock = Clock()
    clock.advance(1_800_000_000)
    snapshots = Snapshots()
    a, b = Daemon(url, clock, snapshots), Daemon(url, clock, snapshots)
    yield a, b, clock, store
    for daemon in (a, b):
        daemon.backend.close()
    store.close()


def test_greylist_first_attempt_at_a_retry_at_b_passes(two_daemons):
    """A defers the first attempt; after min_delay and one sync each, B lets the retry
    (from another host of the sender's /24) through."""
    a, b, clock, _ = two_daemons
    reply, step = a.ask(GREY, "192.0.2.10")
    assert (reply.code, step.outcome) == (451, Outcome.DEFER)
    a.moderation.sync()
    clock.advance(301)
    b.moderation.sync()
    reply, step = b.ask(GREY, "192.0.2.99")
    assert (reply.code, step.transition) == (250, "retry-in-window")


def test_ticket_at_a_decision_in_the_store_retry_at_b(two_daemons):
    """A holds the post with a ticket; a moderator rejects it in the store; B answers the
    retry with the 550 and the reason."""
    a, b, clock, store = two_daemons
    reply, step = a.ask(MODERATED, "2001:db8::5")
    assert reply.code == 451 and step.ticket
    a.moderation.sync()
    with store.write() as session:
        store_moderation.decide_ticket(session, step.ticket, Decision.REJECT,
                                       clock.seconds(), "Not for this list")
    clock.advance(10)
    b.moderation.sync()
    reply, step = b.ask(MODERATED, "2001:db8::77")
    assert (reply.code, reply.status, reply.text) == (550, "5.7.1", "Not for this list")
