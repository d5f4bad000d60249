"""SMTP-time moderation on a daemon whose wall clock jumps (NTP mis-step, a resumed VM)
while other daemons share its store: the rows are the other daemons' and the
moderators' too, so that daemon must not expire them by its clock.  Before, its prune
of the store (every ``PRUNE_EVERY`` syncs) deleted every row expired by its clock, and
its index's expiry wrote the same deletions by id at the next sync: other daemons'
greylist entries and remembered senders, pending tickets, moderators' decisions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import defer

from policyd.core.moderation import Decision, Outcome, SmtpModeration
from policyd.moderation_service import PRUNE_EVERY, ModerationService
from policyd.store import moderation as store_moderation

from .fakes import captured_events
from .test_smtp_moderation import GREY, MODERATED, h, ticket_of  # noqa: F401 (h: the fixture)

DAY = 86400.0
WAITING = "waiting@elsewhere.example"
REMEMBERED = "remembered@elsewhere.example"


def shared_rows(h) -> dict:
    """Every row of the store, as comparable tuples."""
    with h.store().read() as session:
        return {
            "entries": sorted((r.sender, r.first_seen) for r in session.execute(
                store_moderation.G.select())),
            "remembered": sorted((r.sender, r.until) for r in session.execute(
                store_moderation.R.select())),
            "tickets": sorted((r.id, r.message_id, r.decision, r.first_seen)
                              for r in session.execute(store_moderation.T.select())),
        }


def jumping_daemon(h, jump: list) -> ModerationService:
    """A second daemon on the harness's store whose wall clock is the harness's plus
    ``jump[0]``; its store (the real functions on SQLite) reads the harness's clock as
    the store's."""
    functions = {name: getattr(store_moderation, name) for name in store_moderation.__all__}
    functions["store_clock"] = lambda engine: h.clock.seconds()
    store = SimpleNamespace(**functions)
    return ModerationService(h.snapshots, h.backend.moderation_engine, clock=h.clock,
                             wall=lambda: h.clock.seconds() + jump[0], store=store,
                             run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))


def shared_state(h):
    """Written by the harness's daemon: a remembered sender, a greylist entry, an
    approved ticket (p1) and a pending one (p2); the approved ticket's id."""
    assert h.exim(GREY, sender=REMEMBERED).startswith(b"DEFER 451")
    h.clock.advance(301)
    assert h.exim(GREY, sender=REMEMBERED).startswith(b"ACCEPT 250 2.6.0")
    approved = ticket_of(h.exim(MODERATED, message_id="<p1@example.net>"))
    ticket_of(h.exim(MODERATED, message_id="<p2@example.net>"))
    assert h.exim(GREY, sender=WAITING).startswith(b"DEFER 451")
    h.moderation.sync()
    h.decide(approved, Decision.APPROVE)
    return approved


def texts(events) -> list[str]:
    return [e.get("log_format", "") for e in events
            if e.get("log_namespace") == "policyd.moderation"]


@pytest.mark.parametrize("jump", [DAY + 3600, 31 * DAY, -DAY],
                         ids=["a-day-ahead", "a-month-ahead", "a-day-back"])
def test_a_jumped_clock_deletes_no_shared_row_and_says_so_once(h, jump):
    """One daemon's clock jumps: its prunes and its index's expiry delete nothing in the
    store (a retry it answered by the wrong clock before its sync noticed is not
    written either); it logs the incident once with both clocks, shows the offset,
    gives the lists their normal outcome; when its clock is back it says so, loads the
    store afresh and the moderator's approval answers the retry."""
    approved = shared_state(h)
    offset = [0.0]
    daemon = jumping_daemon(h, offset)
    daemon.sync()  # its first load, the clocks agreeing
    assert daemon.usable
    before = shared_rows(h)
    h.moderation = daemon
    with captured_events() as events:
        offset[0] = jump
        # A retry before the next sync: the index reads the approval as expired.
        h.exim(MODERATED, message_id="<p1@example.net>")
        for _ in range(PRUNE_EVERY + 1):
            h.clock.advance(5)
            daemon.sync()
        assert shared_rows(h) == before
        assert daemon.usable is False and daemon.clock_offset == jump
        status = daemon.status()  # policyctl status says why
        assert status["clock_offset"] == jump
        assert status["state"].startswith(
            "unusable, the wall clock and the store's clock differ by")
        # The list's normal outcome (Mailman holds the post), counted as such.
        assert h.exim(MODERATED, message_id="<p1@example.net>").startswith(
            b"ACCEPT 250 2.6.0")
        assert daemon.counts[SmtpModeration.MODERATE][Outcome.PASS]["state-unusable"] == 1
    logged = texts(events)
    assert sum("differ by" in t for t in logged) == 1
    [line] = [e for e in events if "differ by" in e.get("log_format", "")]
    assert line["offset"] == jump and line["wall"] != line["store"]

    with captured_events() as events:
        offset[0] = 0.0
        h.clock.advance(5)
        daemon.sync()  # agreement: a fresh load
        daemon.sync()
    logged = texts(events)
    assert sum("agree again" in t for t in logged) == 1
    assert not any("differ by" in t for t in logged)
    assert daemon.usable and daemon.clock_offset == 0.0
    assert shared_rows(h) == before
    assert h.exim(MODERATED, message_id="<p1@example.net>").startswith(
        b"ACCEPT 250 2.1.5 approved by a moderator, ticket " + approved.encode())
    assert (GREY, REMEMBERED) in daemon.state.remembered


def test_the_index_expiry_by_a_jumped_clock_writes_no_deletion(h):
    """Before its store prune is due: the index's own expiry (``prune`` at each sync)
    dropped the rows expired by the jumped clock and wrote their deletions at the next
    sync (decided tickets and greylist entries, by id and key)."""
    shared_state(h)
    offset = [0.0]
    daemon = jumping_daemon(h, offset)
    daemon.sync()
    before = shared_rows(h)
    offset[0] = DAY + 3600
    daemon.sync()
    daemon.sync()
    assert shared_rows(h) == before
    assert daemon.usable is False


def test_the_clocks_agree_within_half_the_slack_a_row_may_have(h):
    """A daemon within ``CLOCK_AGREE`` (15 s) of the store's clock is usable: two such
    daemons are within ``SLACK`` (30 s) of each other, so each reads back the other's
    fresh rows (next test); beyond it the state is unusable."""
    from policyd.moderation_service import CLOCK_AGREE

    offset = [CLOCK_AGREE - 10]
    daemon = jumping_daemon(h, offset)
    daemon.sync()
    assert daemon.usable and daemon.clock_offset == CLOCK_AGREE - 10
    offset[0] = -(CLOCK_AGREE + 10)
    daemon.sync()
    assert daemon.usable is False


def test_two_daemons_that_agree_with_the_store_read_each_others_rows(h):
    """At ``CLOCK_AGREE`` (150 s then), one daemon 60 s ahead of the store and one 60 s
    behind both counted as agreeing, but a sync reads back from its last one less
    ``SLACK`` (30 s) by the times the rows carry (the writer's clock): the one ahead
    never merged what the one behind wrote."""
    from policyd.core.moderation import Key
    from policyd.moderation_service import CLOCK_AGREE

    ahead = jumping_daemon(h, [CLOCK_AGREE - 1])
    behind = jumping_daemon(h, [-(CLOCK_AGREE - 1)])
    ahead.sync()
    behind.sync()
    assert ahead.usable and behind.usable
    h.clock.advance(5)
    key = Key(GREY, "new@elsewhere.example", "192.0.2.0/24", "")
    step = behind.state.check(SmtpModeration.GREYLIST, key, subject="", client="192.0.2.7",
                              digest="")
    assert step.outcome is Outcome.DEFER
    behind.sync()
    h.clock.advance(5)
    ahead.sync()
    assert key in ahead.state.entries
