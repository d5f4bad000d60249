"""SMTP-time moderation through the Exim and Postfix factories, with its state in a real
SQLite store (the store thread replaced by a synchronous call) and a ``Clock``."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd.config import EximConfig, PostfixConfig
from policyd.core.moderation import AT_CAP, Decision, Outcome, SmtpModeration
from policyd.core.replies import ReplyPolicy
from policyd.core.snapshot import ListSpec, MemberSpec, build
from policyd.core.verdict import Action
from policyd.decider import Decider
from policyd.moderation_service import CAP_QUIET, SUBJECT_LIMIT, ModerationService, \
    _field
from policyd.protocols.exim import EximFactory, parse_request
from policyd.protocols.postfix import PostfixFactory
from policyd.store import NativeBackend, Store
from policyd.store import moderation as store_moderation

from .fakes import MEMBER, NONMEMBER, StaticSnapshots, captured_events

MODERATED = "moderated@lists.example.com"
GREY = "grey@lists.example.com"
PLAIN = "plain@lists.example.com"
EXIM = EximConfig(listen=(), timeout=10.0, max_request=65536)
POSTFIX = PostfixConfig(listen=(), mode="safe", accept_action="dunno", idle_timeout=600.0,
                        max_line=4096, max_attributes=100, max_request=65536)


def snapshot():
    def spec(address, mode):
        return ListSpec(address, members=(MemberSpec(MEMBER),),
                        default_nonmember_action=Action.HOLD, smtp_moderation=mode)
    return build([spec(MODERATED, "moderate"), spec(GREY, "greylist"), spec(PLAIN, "off")],
                 version="v1", built_at=0.0)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def exim_line(to, sender, message_id, client) -> bytes:
    """The DATA ACL's question (policyd-data.acl); ``message_id=None``: a message
    without a Message-ID: header."""
    headers = f"From: {sender}\nSubject: Hello list\n" + (
        f"Message-ID: {message_id}\n" if message_id is not None else "")
    return (f"POLICYD/1 list={to} sender={b64(sender)} headers={b64(headers)} "
            f"client={client} id=1").encode()


class Harness:
    def __init__(self, tmp_path) -> None:
        self.url = url = f"sqlite:///{tmp_path / 'store.sqlite'}"
        self.stores: list[Store] = []
        self.store().upgrade()
        self.backend = NativeBackend(url)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.snapshots = StaticSnapshots(snapshot())
        self.decider = Decider(self.snapshots, ReplyPolicy())
        self.moderation = ModerationService(
            self.snapshots, self.backend.moderation_engine, clock=self.clock,
            wall=self.clock.seconds, store_clock=lambda engine: self.clock.seconds(),
            run_in_thread=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))
        self.moderation.sync()  # the first load

    def exim(self, to, sender=NONMEMBER, message_id="<p1@example.net>",
             client="192.0.2.7") -> bytes:
        factory = EximFactory(self.decider, EXIM, self.clock)
        factory.moderation = self.moderation
        return factory.answer(exim_line(to, sender, message_id, client), None)

    def exim_wire(self, to, sender=NONMEMBER, message_id="<p1@example.net>",
                  client="192.0.2.7", headers=True) -> bytes:
        """The bytes Exim reads back for its DATA ACL's question (``headers=False``: its
        RCPT ACL's, the envelope only), through the protocol on a ``StringTransport``."""
        factory = EximFactory(self.decider, EXIM, self.clock)
        factory.moderation = self.moderation
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        line = exim_line(to, sender, message_id, client) if headers else \
            f"POLICYD/1 list={to} sender={b64(sender)} client={client}".encode()
        proto.dataReceived(line + b"\n")
        assert transport.disconnecting
        return transport.value()

    def postfix(self, to, sender=NONMEMBER, client="192.0.2.7") -> bytes:
        factory = PostfixFactory(self.decider, POSTFIX, self.clock)
        factory.moderation = self.moderation
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(
            f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n"
            f"sender={sender}\nrecipient={to}\n\n".encode())
        return transport.value()

    def store(self) -> Store:
        """``policyctl``'s view of the same store."""
        store = Store(self.url)
        self.stores.append(store)
        return store

    def decide(self, ticket: str, decision: Decision, reason: str = "") -> None:
        with self.store().write() as session:
            store_moderation.decide_ticket(session, ticket, decision,
                                           self.clock.seconds(), reason)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.backend.close()
    for store in harness.stores:
        store.close()


def ticket_of(answer: bytes) -> str:
    assert answer.startswith(b"DEFER 451 4.7.1 Held for moderator approval, ticket ")
    return answer.rsplit(b" ", 1)[1].decode()


@pytest.mark.parametrize("decision, reason, expected", [
    (Decision.APPROVE, "", b"ACCEPT 250 2.1.5 approved by a moderator, ticket "),
    (Decision.REJECT, "Off topic here", b"REJECT 550 5.7.1 Off topic here"),
    (Decision.DISCARD, "", b"DISCARD 250 2.7.0 discarded by a moderator, ticket "),
])
def test_exim_moderate_ticket_then_decision_on_retry(h, decision, reason, expected):
    """A nonmember's post to a ``moderate`` list is deferred with a ticket (written to the
    store at the next sync); a moderator's decision in the store reaches the daemon at
    the following sync and answers the sender's retry."""
    answer = h.exim(MODERATED)
    ticket = ticket_of(answer)
    h.clock.advance(5)
    h.moderation.sync()
    assert h.exim(MODERATED) == answer  # still waiting: the same ticket
    h.decide(ticket, decision, reason)
    h.clock.advance(5)
    h.moderation.sync()
    assert h.exim(MODERATED).startswith(expected)


def test_exim_moderate_ticket_follows_the_post_to_another_network(h):
    """A moderated post is keyed by its Message-ID: the sender's retry from another
    outbound network finds the same ticket and its decision; another post (another
    Message-ID) gets a ticket of its own."""
    ticket = ticket_of(h.exim(MODERATED, client="192.0.2.7"))
    assert ticket_of(h.exim(MODERATED, client="198.51.100.9")) == ticket
    h.clock.advance(5)
    h.moderation.sync()
    h.decide(ticket, Decision.APPROVE)
    h.clock.advance(5)
    h.moderation.sync()
    assert h.exim(MODERATED, client="2001:db8::1").startswith(b"ACCEPT 250 2.1.5 approved")
    assert ticket_of(h.exim(MODERATED, message_id="<p2@example.net>")) != ticket


def test_exim_pending_rows_carry_subject_message_id_and_client(h):
    """What ``policyctl pending`` shows comes from the request."""
    ticket = ticket_of(h.exim(MODERATED))
    h.moderation.sync()
    with h.store().read() as session:
        [row] = store_moderation.pending_tickets(session, MODERATED)
    assert (row.id, row.subject, row.key.message_id, row.client, row.key.network) == (
        ticket, "Hello list", "<p1@example.net>", "192.0.2.7", "")  # keyed by Message-ID


def test_the_store_gets_wall_clock_times_while_the_reactor_runs_the_sync(h):
    """The daemon's reactor counts monotonic seconds (since boot, say), which mean
    nothing to ``policyctl`` or another daemon: the rows get the wall clock's times, a
    moderator's decision stamped by the wall clock reaches the sender's retry, and the
    sync is still run by the reactor."""
    wall = Clock()
    wall.advance(1_800_000_000)
    h.moderation = ModerationService(
        h.snapshots, h.backend.moderation_engine, clock=h.clock, wall=wall.seconds,
        store_clock=lambda engine: wall.seconds(), interval=5.0,
        run_in_thread=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))
    h.moderation.startService()  # the first load
    try:
        ticket = ticket_of(h.exim(MODERATED))
        h.clock.advance(5)  # the reactor's sync writes the ticket
        with h.store().read() as session:
            [row] = store_moderation.pending_tickets(session, MODERATED)
        assert (row.id, row.first_seen) == (ticket, 1_800_000_000)
        wall.advance(60)
        with h.store().write() as session:
            store_moderation.decide_ticket(session, ticket, Decision.APPROVE, wall.seconds())
        h.clock.advance(5)  # the next sync reads the decision
        assert h.exim(MODERATED).startswith(b"ACCEPT 250 2.1.5 approved by a moderator")
    finally:
        h.moderation.stopService()


def test_exim_greylist_defers_then_passes_after_min_delay(h):
    """Greylist: the first attempt is deferred, a retry after min_delay gets the list's
    normal outcome (held for Mailman)."""
    assert h.exim(GREY).startswith(b"DEFER 451 4.7.1 Greylisted: temporary deferral")
    h.clock.advance(60)
    assert h.exim(GREY).startswith(b"DEFER 451 4.7.1")
    h.clock.advance(300)
    assert h.exim(GREY).startswith(b"ACCEPT 250 2.6.0")


def test_members_and_lists_without_moderation_are_untouched(h):
    """A member's post, and any post to a list with smtp_moderation off, is answered as
    without moderation."""
    assert h.exim(MODERATED, sender=MEMBER).startswith(b"ACCEPT 250 2.1.5")
    assert h.exim(PLAIN).startswith(b"ACCEPT 250 2.6.0")
    assert not h.moderation.state.tickets and not h.moderation.state.entries


def test_exim_rcpt_question_is_never_moderated(h):
    """Exim's RCPT-time question (envelope only, no headers=) gets its normal answer and
    leaves no state: moderation acts at DATA, where the member test reads From:."""
    sender = base64.b64encode(NONMEMBER.encode()).decode()
    factory = EximFactory(h.decider, EXIM, h.clock)
    factory.moderation = h.moderation
    for to in (MODERATED, GREY):
        answer = factory.answer(f"POLICYD/1 list={to} sender={sender}".encode(), None)
        assert answer.startswith(b"ACCEPT 250 2.6.0")
    assert not h.moderation.state.tickets and not h.moderation.state.entries


def test_postfix_greylist_at_rcpt(h):
    """Postfix greylists at RCPT with client_address; a ``moderate`` list is left to the
    DATA-time Exim path (Postfix's normal answer)."""
    assert h.postfix(GREY) == (b"action=451 4.7.1 Greylisted: temporary deferral of a "
                               b"first post to grey@lists.example.com, please retry "
                               b"later\n\n")
    assert h.postfix(MODERATED) == b"action=DUNNO\n\n"
    h.clock.advance(301)
    assert h.postfix(GREY) == b"action=DUNNO\n\n"


def test_a_remembered_sender_passes_from_any_network_and_is_counted(h):
    """Once a greylisted sender has passed, its next posts pass at once from any client
    (remembered per list and sender, not per network) and are counted as remembered; a
    client without an address changes nothing.  The remembering ends with ``remember``:
    then the sender is greylisted again."""
    grey = lambda **kw: h.postfix(GREY, **kw)  # noqa: E731
    assert grey(client="192.0.2.7").startswith(b"action=451 4.7.1 Greylisted")
    h.clock.advance(301)
    assert grey(client="192.0.2.7") == b"action=DUNNO\n\n"  # retry in the window
    for client in ("198.51.100.9", "2001:db8::1", ""):
        assert grey(client=client) == b"action=DUNNO\n\n"
    counts = h.moderation.counts
    from policyd.core.moderation import Outcome, SmtpModeration
    assert counts[SmtpModeration.GREYLIST][Outcome.PASS]["remembered"] == 3
    assert h.exim(GREY, client="203.0.113.5").startswith(b"ACCEPT 250 2.6.0")
    h.clock.advance(h.moderation.state.settings.remember)
    assert grey(client="198.51.100.9").startswith(b"action=451 4.7.1 Greylisted")


def test_another_daemon_sees_the_first_attempt(h, tmp_path):
    """The first attempt at one daemon, the retry at another on the same store passes."""
    h.exim(GREY)
    h.moderation.sync()
    other = ModerationService(h.snapshots, h.backend.moderation_engine, clock=h.clock,
                              wall=h.clock.seconds,
                              store_clock=lambda engine: h.clock.seconds(),
                              run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    h.clock.advance(400)
    other.sync()  # its first load
    h.moderation = other
    assert h.exim(GREY).startswith(b"ACCEPT 250 2.6.0")


def test_state_unavailable_gives_the_normal_outcome_logged_once(h):
    """When the state cannot be written: the list's normal outcome (never a 5xx, never
    a deferral loop), one log line for the incident and one when it is over."""
    h.exim(GREY)

    def failing(f, *a):
        if f is store_moderation.write_changes:
            return defer.fail(RuntimeError("database is gone"))
        return defer.maybeDeferred(f, *a)
    h.moderation.run_in_thread = failing
    with captured_events() as events:
        h.moderation.sync()
        h.moderation.sync()
        for attempt in range(3):
            assert h.exim(GREY, message_id=f"<other{attempt}@x>").startswith(
                b"ACCEPT 250 2.6.0")
        h.moderation.run_in_thread = lambda f, *a: defer.maybeDeferred(f, *a)
        h.moderation.sync()
    texts = [e.get("log_format", "") for e in events
             if e.get("log_namespace") == "policyd.moderation"]
    assert sum("cannot be read or written" in t for t in texts) == 1
    assert sum("usable again" in t for t in texts) == 1
    # The change held back during the incident was written afterwards.
    with h.store().read() as session:
        assert session.execute(store_moderation.G.select()).first() is not None


def test_exim_client_key_is_optional_and_checked():
    """``client=`` is optional; empty is unknown; anything but an IP address is
    malformed."""
    base = b"POLICYD/1 list=a@b.example sender="
    assert parse_request(base).client is None
    assert parse_request(base + b" client=").client is None
    assert parse_request(base + b" client=2001:db8::1").client == "2001:db8::1"
    with pytest.raises(Exception, match="client= is not an IP address"):
        parse_request(base + b" client=evil;rm")


def test_hostile_values_are_stored_without_breaking_the_batch(h):
    """Control characters and undecodable bytes in the Subject, an over-long
    Message-ID: the row is still written (a failed batch would turn moderation off for
    every list)."""
    factory = EximFactory(h.decider, EXIM, h.clock)
    factory.moderation = h.moderation
    headers = (b"From: " + NONMEMBER.encode() + b"\nSubject: a\x01b\xff\n"
               b"Message-ID: <" + b"z" * 400 + b">\n")
    line = (b"POLICYD/1 list=" + MODERATED.encode() + b" sender="
            + base64.b64encode(NONMEMBER.encode()) + b" headers=" + base64.b64encode(headers))
    assert factory.answer(line, None).startswith(b"DEFER 451 4.7.1 Held")
    h.moderation.sync()
    assert h.moderation.usable
    with h.store().read() as session:
        [row] = store_moderation.pending_tickets(session)
    assert row.subject == "a b\ufffd" and len(row.key.message_id) == 255
    assert _field("\udcff\x00x") == "\ufffd x"


def test_field_replaces_c1_controls_and_format_characters():
    """What a peer chose reaches ``policyctl pending`` on a moderator's terminal: C1
    controls (U+009B is a CSI), format characters (U+202E reverses what follows, U+200B
    hides) and the line and paragraph separators become spaces, as C0 controls do;
    letters of any script stay."""
    assert _field("a\x9b31m\u202eb\u2028c\u2029d\u200be\x85f") == "a 31m b c d e f"
    assert _field("Grüße ÄÖ 日本 \u00e9") == "Grüße ÄÖ 日本 \u00e9"


NORMAL = b"ACCEPT 250 2.6.0 accepted for moderation by nonmember-moderation"


def small_caps(h, **caps):
    h.moderation.state.settings = replace(h.moderation.state.settings, **caps)


def flood(h, to, count, seconds, tag):
    """``count`` made-up nonmember posts over ``seconds``, each from a /24 of its own,
    the daemon syncing every 5 s as its timer does."""
    for n in range(count):
        h.clock.advance(seconds / count)
        if int(h.clock.seconds()) % 5 == 0:
            h.moderation.sync()
        h.exim(to, sender=f"spam{tag}-{n}@junk.example", message_id=f"<{tag}-{n}@junk>",
               client=f"10.{n // 250 % 250}.{n % 250}.1")


def test_a_flood_at_the_caps_costs_a_real_sender_nothing(h):
    """Made-up senders from one network filling the greylist and ticket caps between a
    real MTA's retries: its greylist entry used to be pushed out (a first attempt again
    at every retry) and its pending ticket replaced (the approval of the first found no
    ticket).  Now both stay; the flood's new first attempts get the list's normal
    outcome, counted as ``at-cap``."""
    small_caps(h, max_entries=10, max_tickets=5)
    real = dict(sender="alice@example.org", message_id="<real@example.org>",
                client="198.51.100.7")
    assert h.exim(GREY, **real).startswith(b"DEFER 451 4.7.1 Greylisted")
    flood(h, GREY, 30, 900, "g")
    assert h.exim(GREY, sender="late@junk.example", client="203.0.113.9") == NORMAL
    assert h.exim(GREY, **real) == NORMAL   # passed: to Mailman, which holds it
    passed = h.moderation.counts[SmtpModeration.GREYLIST][Outcome.PASS]
    assert passed["retry-in-window"] == 1 and passed[AT_CAP] == 22

    ticket = ticket_of(h.exim(MODERATED, **real))
    flood(h, MODERATED, 10, 3600, "m")
    assert ticket_of(h.exim(MODERATED, **real)) == ticket
    h.moderation.sync()
    h.decide(ticket, Decision.APPROVE)           # policyctl approve finds it
    h.clock.advance(5)
    h.moderation.sync()
    assert h.exim(MODERATED, **real).startswith(b"ACCEPT 250")
    assert h.moderation.counts[SmtpModeration.MODERATE][Outcome.PASS][AT_CAP] == 6


def test_a_stay_at_the_cap_is_logged_once(h):
    """A sustained flood at the cap is one incident: one line when it starts, one
    summary when it has been quiet for CAP_QUIET seconds; the warning used to come back
    at every sync (every 5 s)."""
    small_caps(h, max_entries=2)
    with captured_events() as events:
        for second in range(180):
            for n in range(3):
                h.exim(GREY, sender=f"s{second}-{n}@elsewhere.example",
                       client=f"10.{second}.{n}.1")
            h.clock.advance(1)
            if second % 5 == 4:
                h.moderation.sync()
        lines = [e for e in events if "at its cap" in e.get("log_format", "")]
        assert len(lines) == 1
        for _ in range(int(CAP_QUIET) // 5 + 1):
            h.clock.advance(5)
            h.moderation.sync()
    lines = [e for e in events if "at its cap" in e.get("log_format", "")]
    assert len(lines) == 2 and lines[1]["kept_out"] == 180 * 3 - 2
    assert len(h.moderation.state.entries) == 2


def test_the_subject_is_cut_before_the_field_cache(h, monkeypatch):
    """The Subject reached ``_field``'s cache uncut: 8,192 retries with 30 KB Subjects
    kept about 240 MB alive.  It is cut first, as the Message-ID is; the ticket keeps
    200 characters of it."""
    from policyd import moderation_service

    seen = []

    def recording(text, limit=255):
        seen.append(len(text))
        return _field(text, limit)

    monkeypatch.setattr(moderation_service, "_field", recording)
    factory = EximFactory(h.decider, EXIM, h.clock)
    factory.moderation = h.moderation
    headers = f"From: {NONMEMBER}\nSubject: {'x' * 30000}\nMessage-ID: <s@x>\n"
    line = (f"POLICYD/1 list={MODERATED} sender={b64(NONMEMBER)} headers={b64(headers)} "
            f"client=192.0.2.7 id=1").encode()
    assert factory.answer(line, None).startswith(b"DEFER 451 4.7.1 Held")
    assert seen and max(seen) <= SUBJECT_LIMIT
    [ticket] = h.moderation.state.tickets.values()
    assert ticket.subject == "x" * 200


def test_describe_for_policyctl_query(h):
    """``policyctl query`` sees the list's mode, whether it applies, and the sender's
    entries and tickets; ``print`` turns it into one line."""
    from policyd.core.verdict import Query
    from policyd.ctl.daemon import _moderation_text

    ticket = ticket_of(h.exim(MODERATED))
    h.exim(GREY)
    decision = h.decider.decide(Query(MODERATED, NONMEMBER, NONMEMBER), "t").decision
    described = h.moderation.describe(decision)
    assert (described["mode"], described["applies"]) == ("moderate", True)
    assert [t["ticket"] for t in described["tickets"]] == [ticket]
    assert _moderation_text(described) == \
        f"moderate (applies): ticket {ticket} pending (1 attempts)"
    grey = h.moderation.describe(
        h.decider.decide(Query(GREY, NONMEMBER, NONMEMBER), "t").decision)
    assert grey["greylist"][0]["state"] == "waiting"
    member = h.moderation.describe(
        h.decider.decide(Query(GREY, MEMBER, MEMBER), "t").decision)
    assert member["applies"] is False


def test_policyctl_query_line_counts_what_describe_does_not_list():
    """``describe`` lists at most ``DESCRIBE_LIMIT`` entries and tickets of a sender
    with their totals: the line says how many more there are."""
    from policyd.ctl.daemon import _moderation_text

    ticket = {"ticket": "K7Q2M9", "decision": "pending", "attempts": 1}
    described = {"mode": "moderate", "applies": True, "usable": True, "greylist": [],
                 "greylist_total": 3, "tickets": [ticket], "tickets_total": 21}
    assert _moderation_text(described) == ("moderate (applies): 3 more greylist entries; "
                                           "ticket K7Q2M9 pending (1 attempts); "
                                           "20 more tickets")


def _query(h, to, sender=NONMEMBER, client="192.0.2.7", mode="safe", from_header=None,
           message_id=None):
    from policyd.core.verdict import Query
    from policyd.protocols.control import query_result

    return query_result(h.decider, Query(to, sender, from_header), postfix_mode=mode,
                        accept_action="dunno", moderation=h.moderation, client=client,
                        message_id=message_id)


def state_of(h):
    """Everything a preview must leave as it is: the index, the changes not written
    yet, the attempt counters."""
    state = h.moderation.state
    counts = {(mode, outcome): dict(counter)
              for mode, outcomes in h.moderation.counts.items()
              for outcome, counter in outcomes.items()}
    return (dict(state.entries), dict(state.remembered), dict(state.tickets),
            dict(state.ticket_by_key), repr(state.changes), counts)


def printed(result) -> str:
    import argparse
    import io

    from policyd.ctl.daemon import print_result
    from policyd.ctl.output import Context

    out = io.StringIO()
    print_result(Context(argparse.Namespace(), out, io.StringIO(), {}, io.StringIO()),
                 result)
    return out.getvalue()


GREYLISTED = ("451 4.7.1 Greylisted: temporary deferral of a first post to "
              "grey@lists.example.com, please retry later")


def test_policyctl_query_shows_the_greylisting_postfix_gets_and_changes_nothing(h):
    """``policyctl query`` prints the Postfix action the daemon would answer, SMTP-time
    moderation included (it printed ``DUNNO`` for a sender Postfix gets the greylist's
    451 for), and it is read-only: a query begins no greylist entry (it says the MTA's
    attempt would), counts nothing and writes nothing to the store, so the sender's real
    first attempt is still a first attempt and its clock starts then."""
    result = _query(h, GREY)
    assert result["postfix"] == GREYLISTED
    previewed = result["moderation"]["postfix"]
    assert (previewed["outcome"], previewed["transition"], previewed["starts_entry"]) == \
        ("defer", "first-attempt", True)
    assert "began none" in previewed["note"]
    import argparse
    import io

    from policyd.ctl.daemon import print_result
    from policyd.ctl.output import Context

    out = io.StringIO()
    print_result(Context(argparse.Namespace(), out, io.StringIO(), {}, io.StringIO()),
                 result)
    assert (f"postfix:  action={GREYLISTED}  (greylist: first-attempt; Postfix's attempt "
            "would begin a greylist entry") in out.getvalue()
    assert _query(h, GREY, mode="envelope")["postfix"] == GREYLISTED
    state = h.moderation.state
    assert not state.entries and not state.remembered and not state.changes
    assert not any(sum(c.values()) for outcomes in h.moderation.counts.values()
                   for c in outcomes.values())
    h.moderation.sync()
    assert [list(rows) for rows in store_moderation.load_state(
        h.backend.moderation_engine, state.settings, h.clock.seconds())] == [[], [], []]

    h.clock.advance(400)  # the query started no clock: Postfix's attempt is the first
    assert h.postfix(GREY) == f"action={GREYLISTED}\n\n".encode()
    from policyd.core.moderation import Outcome, SmtpModeration
    greylist = h.moderation.counts[SmtpModeration.GREYLIST]
    assert greylist[Outcome.DEFER]["first-attempt"] == 1
    early = _query(h, GREY)
    assert early["postfix"] == GREYLISTED
    assert early["moderation"]["postfix"]["transition"] == "early-retry"
    assert early["moderation"]["postfix"]["starts_entry"] is False
    other = _query(h, GREY, client="198.51.100.9")  # another network: its own entry
    assert other["moderation"]["postfix"]["transition"] == "first-attempt"

    h.clock.advance(301)
    entries = dict(state.entries)
    passing = _query(h, GREY)
    assert passing["postfix"] == "DUNNO"
    assert passing["moderation"]["postfix"]["transition"] == "retry-in-window"
    assert state.entries == entries and not state.remembered  # still not passed
    assert h.postfix(GREY) == b"action=DUNNO\n\n"
    assert _query(h, GREY, client=None)["moderation"]["postfix"]["transition"] == \
        "remembered"
    assert greylist[Outcome.PASS]["retry-in-window"] == 1
    assert sum(greylist[Outcome.PASS].values()) == 1  # the queries counted nothing


def test_policyctl_query_postfix_action_without_moderation_to_apply(h):
    """A member, a list without SMTP-time moderation and a ``moderate`` list (the DATA-time
    Exim path's; Postfix at RCPT gets the list's normal answer) show no moderation step."""
    for to, sender in ((GREY, MEMBER), (PLAIN, NONMEMBER), (MODERATED, NONMEMBER)):
        result = _query(h, to, sender)
        assert result["postfix"] == "DUNNO", to
        assert "postfix" not in result.get("moderation", {}), to
    assert not h.moderation.state.tickets and not h.moderation.state.entries


def _exim_query(h, to, message_id="<p1@example.net>", client="192.0.2.7"):
    """``policyctl query`` for the DATA ACL's question of ``Harness.exim_wire``: the
    same sender, From:, client and Message-ID; the state must be as it was after it."""
    before = state_of(h)
    result = _query(h, to, client=client, from_header=NONMEMBER, message_id=message_id)
    assert state_of(h) == before
    return result


def test_policyctl_query_exim_line_is_the_greylist_exim_gets_and_changes_nothing(h):
    """With headers (Exim's DATA ACL question) the ``exim`` line is what EximFactory
    answers after SMTP-time moderation, byte for byte, at every step of the greylist
    (it showed the hold's ``ACCEPT`` while Exim got the greylist's 451), under
    ``moderation.exim`` the step; and the query changes nothing: the wire answers that
    follow are those of an Exim that was never asked about by ``policyctl``."""
    first = _exim_query(h, GREY)
    assert first["exim"] == "DEFER 451 4.7.1 " + GREYLISTED.split(" ", 2)[2]
    previewed = first["moderation"]["exim"]
    assert (previewed["outcome"], previewed["transition"], previewed["starts_entry"],
            previewed["message_id"], previewed["client"]) == \
        ("defer", "first-attempt", True, "<p1@example.net>", "192.0.2.7")
    assert "Exim's attempt would begin a greylist entry" in previewed["note"]
    assert "began none" in previewed["note"]
    assert f"exim:     {first['exim']}  (greylist: first-attempt; Exim's attempt " \
        "would begin a greylist entry" in printed(first)
    # The query began nothing: Exim's attempt is the first, however late it comes.
    h.clock.advance(400)
    transitions = []
    for advance in (0, 60, 300, 10):  # first attempt, early retry, in the window, remembered
        h.clock.advance(advance)
        result = _exim_query(h, GREY)
        transitions.append(result["moderation"]["exim"]["transition"])
        assert result["exim"].encode() == h.exim_wire(GREY), transitions
    assert transitions == ["first-attempt", "early-retry", "retry-in-window", "remembered"]
    assert result["exim"].startswith("ACCEPT 250 2.6.0")
    from policyd.core.moderation import Outcome, SmtpModeration
    greylist = h.moderation.counts[SmtpModeration.GREYLIST]
    assert (greylist[Outcome.DEFER]["first-attempt"], greylist[Outcome.DEFER]["early-retry"],
            greylist[Outcome.PASS]["retry-in-window"], greylist[Outcome.PASS]["remembered"]) \
        == (1, 1, 1, 1)  # the wire's attempts only


def test_policyctl_query_exim_greylist_entry_is_the_posts(h):
    """On the Exim path the greylist entry is keyed by the Message-ID too: another
    post of the sender, or a query without ``--message-id``, is a first attempt, and the
    result says what it assumed without one."""
    h.exim_wire(GREY)
    h.clock.advance(60)
    assert _exim_query(h, GREY)["moderation"]["exim"]["transition"] == "early-retry"
    other = _exim_query(h, GREY, message_id="<p2@example.net>")
    assert other["moderation"]["exim"]["transition"] == "first-attempt"
    assert other["exim"].encode() == h.exim_wire(GREY, message_id="<p2@example.net>")
    without = _exim_query(h, GREY, message_id=None)
    assert without["moderation"]["exim"]["message_id"] is None
    assert "no Message-ID given: previewed as a post without one" in \
        without["moderation"]["exim"]["note"]
    assert without["exim"].encode() == h.exim_wire(GREY, message_id=None)


def held_as_previewed(wire: bytes) -> str:
    """The wire's first ticket answer with its drawn number as a preview shows it."""
    ticket = ticket_of(wire)
    return wire.decode().replace(f"ticket {ticket}", "ticket (a new one)")


@pytest.mark.parametrize("decision, reason", [
    (Decision.APPROVE, ""), (Decision.REJECT, "Off topic here"), (Decision.DISCARD, ""),
])
def test_policyctl_query_exim_line_is_the_ticket_exim_gets_and_changes_nothing(
        h, decision, reason):
    """A ``moderate`` list: the ``exim`` line is Exim's answer after the ticket step,
    byte for byte (the first attempt's ticket number is drawn by that attempt: the
    preview names none and says it would begin one); the ticket is the post's, found by
    ``--message-id`` from any network; the query neither begins a ticket nor counts an
    attempt; the moderator's decision shows as the retry will get it."""
    first = _exim_query(h, MODERATED)
    previewed = first["moderation"]["exim"]
    assert (previewed["outcome"], previewed["transition"], previewed["ticket"],
            previewed["starts_entry"]) == ("held", "first-attempt", None, True)
    assert "Exim's attempt would begin a ticket" in previewed["note"]
    assert "(moderate: first-attempt; Exim's attempt would begin a ticket" in \
        printed(first)
    wire = h.exim_wire(MODERATED)
    assert first["exim"] == held_as_previewed(wire)
    ticket = ticket_of(wire)

    h.clock.advance(60)
    waiting = _exim_query(h, MODERATED, client="198.51.100.9")  # another network
    assert waiting["moderation"]["exim"]["transition"] == "waiting"
    assert waiting["moderation"]["exim"]["ticket"] == ticket
    assert waiting["exim"].encode() == h.exim_wire(MODERATED, client="198.51.100.9") == wire
    assert h.moderation.state.tickets[ticket].attempts == 2  # the wire's two attempts

    h.clock.advance(5)
    h.moderation.sync()
    h.decide(ticket, decision, reason)
    h.clock.advance(5)
    h.moderation.sync()
    decided = _exim_query(h, MODERATED)
    assert decided["moderation"]["exim"]["transition"] == \
        {Decision.APPROVE: "approved", Decision.REJECT: "rejected",
         Decision.DISCARD: "discarded"}[decision]
    assert decided["exim"].encode() == h.exim_wire(MODERATED)
    assert decided["exim"].split(" ", 1)[0] == {
        Decision.APPROVE: "ACCEPT", Decision.REJECT: "REJECT",
        Decision.DISCARD: "DISCARD"}[decision]


def test_policyctl_query_exim_ticket_without_message_id(h):
    """Without ``--message-id`` the preview is that of a post without a Message-ID:
    keyed by the client's network, as Exim keys such a post; a post's ticket keyed by
    its Message-ID is not found, and the result says so."""
    ticket = ticket_of(h.exim_wire(MODERATED, message_id=None))
    h.clock.advance(60)
    same = _exim_query(h, MODERATED, message_id=None)
    assert same["moderation"]["exim"]["ticket"] == ticket
    assert same["exim"].encode() == h.exim_wire(MODERATED, message_id=None)
    assert "no Message-ID given" in same["moderation"]["exim"]["note"]
    other_network = _exim_query(h, MODERATED, message_id=None, client="198.51.100.9")
    assert other_network["moderation"]["exim"]["transition"] == "first-attempt"
    keyed = _exim_query(h, MODERATED)  # <p1@example.net>: a post of its own
    assert keyed["moderation"]["exim"]["transition"] == "first-attempt"


def test_policyctl_query_envelope_only_exim_line_is_never_moderated(h):
    """Without headers the ``exim`` line is Exim's RCPT-time question (the envelope
    only), which SMTP-time moderation never answers: the hold's answer, no
    ``moderation.exim``, as EximFactory answers it."""
    for to in (GREY, MODERATED):
        result = _query(h, to, message_id="<p1@example.net>")
        assert "exim" not in result["moderation"], to
        assert result["exim"].encode() == h.exim_wire(to, headers=False), to
        assert result["exim"].startswith("ACCEPT 250 2.6.0"), to
    assert not h.moderation.state.tickets and not h.moderation.state.entries


def test_policyctl_query_exim_line_without_moderation_to_apply(h):
    """A member's post and a list with smtp_moderation off: no Exim moderation step,
    the factory's answer."""
    from policyd.core.verdict import Query
    from policyd.protocols.control import query_result

    for to, sender in ((GREY, MEMBER), (MODERATED, MEMBER), (PLAIN, NONMEMBER)):
        result = query_result(h.decider, Query(to, sender, sender), postfix_mode="safe",
                              accept_action="dunno", moderation=h.moderation,
                              client="192.0.2.7", message_id="<p1@example.net>")
        assert "exim" not in result.get("moderation", {}), to
        assert result["exim"].encode() == h.exim_wire(to, sender=sender), to
    assert not h.moderation.state.tickets and not h.moderation.state.entries


def test_a_long_sender_is_made_storable_without_being_kept():
    """The sender reached ``_field``'s cache whole: a client's sender can be tens of
    kilobytes, and 8,192 of them stayed alive.  A value longer than ``CACHED_MAX`` is
    made storable each time, the same way."""
    import tracemalloc

    long = "\x01" + "x" * 8000 + "@example.net"
    assert _field(long) == "x" * 255
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            _field(f"{i}{long}")
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 100_000


class RowsStore:
    """A moderation store (``moderation_service._default_store``'s functions) whose
    load and reads return ``count`` greylist entries."""

    def __init__(self, count: int, now: float) -> None:
        from policyd.core.moderation import Entry, Key

        self.rows = ([Entry(Key(GREY, f"s{i}@x.example", "192.0.2.0/24"), now - i, now - i)
                      for i in range(count)], [], [])
        self.now = now

    def store_clock(self, engine):
        return self.now

    def load_state(self, engine, settings, now):
        return self.rows

    def read_since(self, engine, since, remember):
        return self.rows

    def write_changes(self, engine, changes):
        return []

    def prune_rows(self, engine, settings, now):
        return 0


def test_a_big_load_and_merge_are_applied_in_batches_between_which_mtas_are_answered(
        h):
    """The store's rows (up to the caps, ~100k at start-up or after an outage) go into
    the index BATCH at a time, the reactor getting a turn between two batches (an MTA's
    request is answered there), instead of in one call on the reactor."""
    from policyd import moderation_service

    rows = RowsStore(2 * moderation_service.BATCH + 5, h.clock.seconds())
    service = ModerationService(h.snapshots, None, clock=h.clock, wall=h.clock.seconds,
                                run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a),
                                store=rows)
    done = service.sync()
    assert not done.called  # the first batch is in; the rest wait for the next turns
    assert len(service.state.entries) == moderation_service.BATCH
    h.moderation = service
    # Answered between two batches (the list's normal outcome while the state loads).
    assert h.exim(GREY, sender="someone@y.example").startswith(b"ACCEPT 250 2.6.0")
    h.clock.advance(0)
    h.clock.advance(0)
    assert done.called and service.usable
    assert len(service.state.entries) == len(rows.rows[0])
    # The next sync merges the same rows again, in batches too.
    merged = service.sync()
    assert not merged.called
    h.clock.advance(0)
    h.clock.advance(0)
    assert merged.called
