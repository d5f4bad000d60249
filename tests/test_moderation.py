"""Table-driven tests of every transition of SMTP-time moderation (``core.moderation``),
with an injected clock and injected ticket ids."""

import itertools
import random
from collections import OrderedDict
from dataclasses import replace

import pytest

from policyd.core import moderation
from policyd.core.moderation import (
    AT_CAP, CLOCK_SLACK, NETWORK_AT_CAP, PRUNE_BATCH, Decision, Entry, Key, ModerationState,
    Outcome, Settings, SmtpModeration, Ticket, network_of, new_ticket_id, TICKET_ALPHABET)

GREY, MOD = SmtpModeration.GREYLIST, SmtpModeration.MODERATE
KEY = Key("test@lists.example.com", "nobody@x.example", "192.0.2.0/24", "<m1@x.example>")
SETTINGS = Settings(min_delay=300, max_age=86400, remember=30 * 86400,
                    decide_within=3 * 86400)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def state(settings=SETTINGS):
    clock = Clock()
    ids = (f"T{n:05d}" for n in itertools.count())
    return ModerationState(settings, clock=clock, ticket_id=lambda: next(ids)), clock


def run(st, clock, mode, steps):
    """``steps``: (seconds after the first attempt, action); action is ``None`` for an
    attempt of KEY, or a ``Decision`` applied to the first ticket.  The outcomes and
    transitions of the attempts."""
    start = clock.now
    seen = []
    for offset, action in steps:
        clock.now = start + offset
        if action is None:
            step = st.check(mode, KEY)
            seen.append((step.outcome, step.transition))
        else:
            assert st.decide("T00000", action, "off topic") is not None
    return seen


D, H, P = Outcome.DEFER, Outcome.HELD, Outcome.PASS
GREYLIST_CASES = [
    ("first attempt is deferred", [(0, None)], [(D, "first-attempt")]),
    ("retry before min_delay is deferred again", [(0, None), (60, None)],
     [(D, "first-attempt"), (D, "early-retry")]),
    ("retry at min_delay passes", [(0, None), (300, None)],
     [(D, "first-attempt"), (P, "retry-in-window")]),
    ("retry at max_age passes", [(0, None), (86400, None)],
     [(D, "first-attempt"), (P, "retry-in-window")]),
    ("retry after max_age is a first attempt again", [(0, None), (86401, None)],
     [(D, "first-attempt"), (D, "expired")]),
    ("a sender that passed is remembered", [(0, None), (400, None), (500, None)],
     [(D, "first-attempt"), (P, "retry-in-window"), (P, "remembered")]),
    ("remembering ends after remember", [(0, None), (400, None), (400 + 30 * 86400, None)],
     [(D, "first-attempt"), (P, "retry-in-window"), (D, "first-attempt")]),
]


@pytest.mark.parametrize("name, steps, expected", GREYLIST_CASES,
                         ids=[c[0] for c in GREYLIST_CASES])
def test_greylist_transitions(name, steps, expected):
    """Greylist: first attempt, early retry, retry in window, expiry, remembered sender."""
    st, clock = state()
    assert run(st, clock, GREY, steps) == expected


A, R, X = Decision.APPROVE, Decision.REJECT, Decision.DISCARD
MODERATE_CASES = [
    ("first attempt gets a ticket", [(0, None)], [(H, "first-attempt")]),
    ("undecided retry is held again", [(0, None), (600, None)],
     [(H, "first-attempt"), (H, "waiting")]),
    ("approved: the next retry is accepted", [(0, None), (10, A), (600, None)],
     [(H, "first-attempt"), (Outcome.ACCEPT, "approved")]),
    ("rejected: the next retry is rejected", [(0, None), (10, R), (600, None)],
     [(H, "first-attempt"), (Outcome.REJECT, "rejected")]),
    ("discarded: the next retry is discarded", [(0, None), (10, X), (600, None)],
     [(H, "first-attempt"), (Outcome.DISCARD, "discarded")]),
    ("a decision answers every retry", [(0, None), (10, R), (600, None), (900, None)],
     [(H, "first-attempt"), (Outcome.REJECT, "rejected"), (Outcome.REJECT, "rejected")]),
    ("undecided within decide_within: fallback to the normal outcome",
     [(0, None), (3 * 86400, None)], [(H, "first-attempt"), (P, "undecided-fallback")]),
    ("undecided ticket expires after decide_within + max_age",
     [(0, None), (4 * 86400 + 1, None)], [(H, "first-attempt"), (H, "expired")]),
    ("decided ticket expires max_age after the decision",
     [(0, None), (10, A), (86411, None)], [(H, "first-attempt"), (H, "expired")]),
]


@pytest.mark.parametrize("name, steps, expected", MODERATE_CASES,
                         ids=[c[0] for c in MODERATE_CASES])
def test_moderate_transitions(name, steps, expected):
    """Moderate: ticket, waiting, approve, reject, discard, fallback, expiry."""
    st, clock = state()
    assert run(st, clock, MOD, steps) == expected


def test_remembered_step_answers_as_check_does():
    """``remembered_step`` answers what ``check`` answers for a remembered sender, from
    the list and the sender alone, and ``None`` for one not (or no longer) remembered,
    whose attempt ``check`` then decides."""
    st, clock = state()
    assert st.remembered_step(KEY.list, KEY.sender) is None
    run(st, clock, GREY, [(0, None), (400, None)])  # deferred, then passes: remembered
    other_network = KEY._replace(network="198.51.100.0/24", message_id="")
    assert st.remembered_step(KEY.list, KEY.sender) == st.check(GREY, other_network)
    assert st.remembered_step(KEY.list, KEY.sender).transition == "remembered"
    assert st.remembered_step("other@lists.example.com", KEY.sender) is None
    clock.now += SETTINGS.remember
    assert st.remembered_step(KEY.list, KEY.sender) is None
    assert st.check(GREY, KEY).transition == "first-attempt"


def test_off_passes_without_state():
    """``off`` has no opinion and records nothing."""
    st, _ = state()
    assert st.check(SmtpModeration.OFF, KEY).outcome is Outcome.PASS
    assert not st.drain() and not st.entries and not st.tickets


def test_texts_and_ticket():
    """The greylist text says it is temporary; the held text carries the ticket; a
    rejection carries the moderator's reason."""
    st, clock = state()
    step = st.check(GREY, KEY)
    assert "temporary deferral" in step.text
    held = st.check(MOD, KEY._replace(message_id="<m2@x>"))
    assert held.text == "Held for moderator approval, ticket T00000"
    assert held.ticket == "T00000"
    st.decide("t00000", R, "Off topic, please write to the owner")
    rejected = st.check(MOD, KEY._replace(message_id="<m2@x>"))
    assert rejected.text == "Off topic, please write to the owner"


def test_keys_are_distinct():
    """Another network, Message-ID, sender or list is another first attempt."""
    st, clock = state()
    st.check(GREY, KEY)
    clock.now += 400
    for other in (KEY._replace(network="198.51.100.0/24"), KEY._replace(message_id="<x>"),
                  KEY._replace(sender="b@x.example"), KEY._replace(list="o@l.example")):
        assert st.check(GREY, other).transition == "first-attempt"
    assert st.check(GREY, KEY).outcome is Outcome.PASS


_SPAM = itertools.count()


def flood(st, clock, mode, count, seconds=1.0, network=None):
    """``count`` made-up senders (new ones each call), one every ``seconds``, each from
    a network of its own (from ``network`` if given): their steps."""
    steps = []
    for n in itertools.islice(_SPAM, count):
        clock.now += seconds
        where = network if network is not None else f"10.{n // 250 % 250}.{n % 250}.0/24"
        steps.append(st.check(mode, Key(KEY.list, f"spam{n}@junk.example", where,
                                        f"<{n}@junk>")))
    return steps


def test_a_flood_at_the_greylist_cap_keeps_a_real_senders_entry():
    """The cap is shared by every sender: a flood used to push the oldest entry out, a
    real MTA's among them, so its retry was a first attempt again, every time.  An entry
    younger than max_age now stays; a new first attempt that finds the cap full of such
    entries is not recorded and gets the list's normal outcome (PASS, ``at-cap``)."""
    st, clock = state(replace(SETTINGS, max_entries=3))
    assert st.check(GREY, KEY).transition == "first-attempt"
    steps = flood(st, clock, GREY, 5, 60)
    assert [(s.outcome, s.transition) for s in steps] == [(D, "first-attempt")] * 2 + [
        (P, AT_CAP)] * 3
    assert KEY in st.entries and len(st.entries) == 3
    assert len(st.changes.entries) == 3  # the kept-out attempts are not written either
    assert st.check(GREY, KEY).transition == "retry-in-window"
    # its pass made room: the next first attempt is greylisted again
    assert flood(st, clock, GREY, 1)[0].transition == "first-attempt"


def test_a_flood_at_the_ticket_cap_keeps_a_pending_ticket():
    """A pending ticket used to be pushed out by newer tickets: its retry got a new one
    and a moderator's approval of the first found no ticket.  Undecided tickets stay
    until their fallback; new posts at a full cap get the list's normal outcome."""
    st, clock = state(replace(SETTINGS, max_tickets=2))
    assert st.check(MOD, KEY).ticket == "T00000"
    steps = flood(st, clock, MOD, 4, 3600)
    assert [(s.outcome, s.transition) for s in steps] == [(H, "first-attempt")] + [
        (P, AT_CAP)] * 3
    assert list(st.tickets) == ["T00000", "T00001"]
    clock.now += 3600
    assert st.check(MOD, KEY)[:2] == (H, "waiting")
    assert st.decide("T00000", Decision.APPROVE) is not None
    clock.now += 900
    assert st.check(MOD, KEY).outcome is Outcome.ACCEPT


def test_at_a_cap_what_expired_goes_first():
    """At a cap, expired entries make room (counted as expired, the first seen first),
    so new senders are greylisted again; a live entry is never what goes."""
    st, clock = state(replace(SETTINGS, max_entries=3))
    flood(st, clock, GREY, 2)
    clock.now += SETTINGS.max_age + 1
    assert st.check(GREY, KEY).transition == "first-attempt"
    assert [s.transition for s in flood(st, clock, GREY, 3)] == [
        "first-attempt", "first-attempt", AT_CAP]
    assert st.take_expired() == 2 and st.take_expired() == 0
    assert KEY in st.entries


def test_at_the_ticket_cap_expired_and_answered_tickets_go_first():
    """Tickets whose post got its final answer (a decision answered to a retry, or the
    fallback) and expired tickets make room; the undecided one waiting does not."""
    # One network and tiny caps: the cap alone, not the network's share.
    st, clock = state(replace(SETTINGS, max_tickets=3, ticket_network_share=1.0))
    answered, waiting, old = (KEY._replace(sender=f"{n}@x") for n in ("a", "w", "o"))
    st.check(MOD, old)                       # T00000: expires
    clock.now += SETTINGS.decide_within
    st.check(MOD, answered)                  # T00001: approved, retried: done
    st.decide("T00001", Decision.APPROVE)
    clock.now += 60
    assert st.check(MOD, answered).outcome is Outcome.ACCEPT
    clock.now += SETTINGS.max_age - 59
    st.check(MOD, waiting)                   # T00002: waits for its moderator
    steps = flood(st, clock, MOD, 3)
    assert [s.transition for s in steps] == ["first-attempt", "first-attempt", AT_CAP]
    assert "T00002" in st.tickets and st.check(MOD, waiting).transition == "waiting"
    assert not {"T00000", "T00001"} & set(st.tickets) and st.take_expired() == 2
    assert st.changes.tickets["T00000"] is None and st.changes.tickets["T00001"] is None


def test_remembered_senders_at_their_cap():
    """Remembered passes are idle state: at their cap an expired one goes first, then
    the least recently remembered (the step counts it: that sender is greylisted once
    more); no MTA waits for either."""
    st, clock = state(replace(SETTINGS, max_entries=2, remember=1000))

    def pass_(sender):
        key = KEY._replace(sender=sender)
        st.check(GREY, key)
        clock.now += 300
        return st.check(GREY, key)

    pass_("a@x")
    clock.now += 1000
    pass_("b@x")
    assert pass_("c@x").evicted == 0 and st.take_expired() == 1
    assert pass_("d@x").evicted == 1 and list(st.remembered) == [
        (KEY.list, "c@x"), (KEY.list, "d@x")]


def test_the_order_of_the_index_finds_the_oldest_at_once():
    """A cap looks at the first item only: the index is ordered by first seen (a
    refreshed entry or ticket keeps its place) in OrderedDicts, whose first item is
    found at once however many were deleted before it (a plain dict walks the slots its
    deletions left)."""
    st, clock = state()
    for name in ("entries", "remembered", "tickets", "done"):
        assert type(getattr(st, name)) is OrderedDict, name
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    clock.now += 10
    other = KEY._replace(sender="b@x")
    st.check(GREY, other)
    st.check(MOD, other)
    clock.now += 10
    st.check(GREY, KEY)   # early retry
    st.check(MOD, KEY)    # waiting
    assert list(st.entries) == [KEY, other]
    assert list(st.tickets) == ["T00000", "T00001"]


def test_one_network_holds_at_most_its_share_of_the_greylist_cap():
    """A flood from one /24 keeps its own new first attempts out once it holds
    NETWORK_SHARE of max_entries (``network-at-cap``, counted as a pass); senders from
    other networks are still greylisted, and its own entries are kept."""
    st, clock = state(replace(SETTINGS, max_entries=4))
    steps = flood(st, clock, GREY, 4, network="203.0.113.0/24")
    assert [s.transition for s in steps] == ["first-attempt"] * 2 + [NETWORK_AT_CAP] * 2
    assert steps[-1].outcome is Outcome.PASS
    assert st.check(GREY, KEY).transition == "first-attempt"
    assert st.preview(GREY, KEY._replace(network="203.0.113.0/24")).transition == \
        NETWORK_AT_CAP
    assert st.by_network == {"203.0.113.0/24": 2, KEY.network: 1}
    # without a network (an unknown client) the whole cap is shared
    assert [s.transition for s in flood(st, clock, GREY, 2, network="")] == [
        "first-attempt", AT_CAP]
    clock.now += 300
    assert st.check(GREY, KEY).transition == "retry-in-window"
    assert st.by_network == {"203.0.113.0/24": 2, "": 1}


def test_preview_at_a_full_cap():
    """``policyctl query`` shows what a new first attempt would get at a full cap."""
    st, clock = state(replace(SETTINGS, max_entries=1, max_tickets=1))
    flood(st, clock, GREY, 1)
    flood(st, clock, MOD, 1)
    assert st.preview(GREY, KEY).transition == AT_CAP
    assert st.preview(MOD, KEY).transition == AT_CAP
    assert st.check(GREY, KEY).transition == AT_CAP


def test_changes_are_drained_and_restored():
    """Every change is recorded for the store thread; a failed write is put back under
    newer changes."""
    st, clock = state()
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    changes = st.drain()
    assert set(changes.entries) == {KEY} and set(changes.tickets) == {"T00000"}
    assert not st.drain()
    clock.now += 400
    st.check(GREY, KEY)  # passes: the entry is deleted, the sender remembered
    st.restore(changes)
    merged = st.drain()
    assert merged.entries[KEY] is None
    assert merged.remembered[KEY.list, KEY.sender] == clock.now + SETTINGS.remember
    assert merged.tickets["T00000"].decision is None


def test_prune_and_load():
    """``prune`` drops expired rows; ``load`` restores rows without recording them."""
    st, clock = state()
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    st.drain()
    other, _ = state()
    other.load(st.entries.values(), [], st.tickets.values())
    assert not other.drain() and other.ticket_by_key[KEY] == "T00000"
    clock.now += 5 * 86400
    assert st.prune() == 2
    assert not st.entries and not st.tickets
    assert st.drain().tickets == {"T00000": None}


def test_pending_lists_undecided():
    """``pending`` shows undecided tickets only; deciding an unknown ticket is None."""
    st, _ = state()
    st.check(MOD, KEY)
    st.check(MOD, KEY._replace(list="o@l.example"))
    st.decide("T00001", X)
    assert [t.id for t in st.pending()] == ["T00000"]
    assert st.pending("o@l.example") == []
    assert st.decide("NOSUCH", A) is None


@pytest.mark.parametrize("address, network", [
    ("192.0.2.77", "192.0.2.0/24"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("IPv6:2001:db8::1", "2001:db8::/64"),
    ("::ffff:192.0.2.9", "192.0.2.0/24"),
    ("[192.0.2.1]", "192.0.2.0/24"),
    ("", ""), (None, ""), ("unknown", ""),
])
def test_network_of(address, network):
    """/24 for IPv4 (mapped ones too), /64 for IPv6, empty when unknown."""
    assert network_of(address) == network


def test_ticket_ids():
    """Six characters of the look-alike-free base32 alphabet."""
    ticket = new_ticket_id()
    assert len(ticket) == 6 and set(ticket) <= set(TICKET_ALPHABET)


def test_settings_and_modes_validate():
    """Impossible timings and unknown modes are refused, naming what is allowed."""
    with pytest.raises(ValueError):
        Settings(min_delay=10, max_age=5)
    with pytest.raises(ValueError, match="allowed: off, greylist, moderate"):
        SmtpModeration.from_name("sometimes")
    assert SmtpModeration.from_name(" Greylist ") is GREY


def test_merge_takes_remote_decisions_and_newer_rows():
    """What other daemons and moderators wrote: a decision arrives (counted), a newer
    entry replaces an older one, an older one does not, a later ``until`` wins; nothing
    merged is recorded as a change of this daemon."""
    st, clock = state()
    st.check(MOD, KEY)
    st.check(GREY, KEY)
    st.drain()
    ticket = st.tickets["T00000"]
    entry = st.entries[KEY]
    remote = [replace(ticket, decision=R, reason="no", decided_at=clock.now)]
    older = replace(entry, first_seen=entry.first_seen - 10,
                    last_seen=entry.last_seen - 10, attempts=9)
    assert st.merge([older], [(KEY.list, "x@y", clock.now + 5)], remote) == 1
    assert st.entries[KEY] == entry
    assert st.remembered[KEY.list, "x@y"] == clock.now + 5
    assert not st.drain()
    clock.now += 60
    step = st.check(MOD, KEY)
    assert (step.outcome, step.text) == (Outcome.REJECT, "no")


def test_merge_keeps_the_caps():
    """Rows merged from the store cannot push the index over its caps, nor push out an
    entry or a ticket an MTA waits for: new rows that find no room are left out (and
    stay in the store, nothing deleted), after the expired ones made what room they
    can."""
    st, clock = state(replace(SETTINGS, max_entries=3, max_tickets=2,
                              ticket_network_share=1.0))
    stale = KEY._replace(sender="stale@x", network="198.51.100.0/24")
    st.check(GREY, stale)
    clock.now += SETTINGS.max_age + 1
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    st.drain()
    ids = (f"U{n:05d}" for n in itertools.count())
    other = ModerationState(SETTINGS, clock=clock, ticket_id=lambda: next(ids))
    for n in range(4):
        other.check(GREY, KEY._replace(sender=f"s{n}@x", network=f"10.0.{n}.0/24"))
        other.check(MOD, KEY._replace(sender=f"s{n}@x"))
    st.merge(other.entries.values(), tickets=other.tickets.values())
    assert [k.sender for k in st.entries] == [KEY.sender, "s0@x", "s1@x"]
    assert [t.key.sender for t in st.tickets.values()] == [KEY.sender, "s0@x"]
    assert st.take_merge_evicted() == 5 and st.take_expired() == 1
    assert st.drain().entries == {stale: None}


YEAR = 365 * 86400


def test_a_clock_stepped_back_does_not_defer_or_hold_for_ever():
    """The first attempt was seen with a clock a year ahead; NTP then stepped it back.
    Ages came out negative, so nothing expired: every retry was an early one for ever,
    and a ticket never fell back.  Such an entry now counts as expired: the sender starts
    over, and passes after min_delay; the ticket starts over, and falls back after
    decide_within."""
    st, clock = state()
    assert run(st, clock, GREY, [(0, None), (-YEAR + 600, None), (-YEAR + 900, None)]) == [
        (D, "first-attempt"), (D, "expired"), (P, "retry-in-window")]
    st, clock = state()
    assert run(st, clock, MOD, [(0, None), (-YEAR, None), (-YEAR + 3 * 86400, None)]) == [
        (H, "first-attempt"), (H, "expired"), (P, "undecided-fallback")]
    # A little clock difference between MX hosts is not a step back.
    st, clock = state()
    assert run(st, clock, GREY, [(0, None), (-60, None), (300, None)]) == [
        (D, "first-attempt"), (D, "early-retry"), (P, "retry-in-window")]


def test_a_pass_remembered_from_a_clock_ahead_is_no_pass_on_either_path():
    """A pass remembered with a clock a year ahead (then stepped back, or a row from a
    host whose clock ran ahead): ``remembered_step`` (the daemon's first question) and
    ``check`` agree that it is no pass; the sender's attempt is greylisted again."""
    st, clock = state()
    run(st, clock, GREY, [(YEAR, None), (YEAR + 400, None)])  # passes: remembered
    clock.now -= YEAR
    assert st.remembered_step(KEY.list, KEY.sender) is None
    assert st.check(GREY, KEY).transition == "first-attempt"


def test_pruning_drops_what_a_clock_stepped_back_left_in_the_future():
    st, clock = state()
    run(st, clock, GREY, [(0, None)])
    run(st, clock, MOD, [(0, None)])
    clock.now -= YEAR
    assert st.prune() == 2
    assert not st.entries and not st.tickets


def test_two_tickets_for_one_post_become_one_on_every_daemon():
    """The first attempt reached MX A, then at once MX B, before they synced: two
    tickets.  After merging each other's rows both keep the one A gave first (the one
    the sender's first 451 named), drop the other from the store too, and tell every
    retry that ticket."""
    clock = Clock()
    a = ModerationState(SETTINGS, clock=clock, ticket_id=iter(["AAAAAA"]).__next__)
    b = ModerationState(SETTINGS, clock=clock, ticket_id=iter(["BBBBBB"]).__next__)
    assert a.check(MOD, KEY).ticket == "AAAAAA"
    clock.now += 5
    assert b.check(MOD, KEY).ticket == "BBBBBB"
    from_a, from_b = list(a.drain().tickets.values()), list(b.drain().tickets.values())
    a.merge(tickets=from_b)
    b.merge(tickets=from_a)
    assert set(a.tickets) == set(b.tickets) == {"AAAAAA"}
    assert a.changes.tickets == {"BBBBBB": None}  # gone from the store as well
    assert b.changes.tickets.get("BBBBBB", "kept") is None
    clock.now += 900
    assert b.check(MOD, KEY).ticket == "AAAAAA"
    assert a.check(MOD, KEY).ticket == "AAAAAA"


def test_a_decided_duplicate_ticket_wins_over_an_undecided_one():
    clock = Clock()
    a = ModerationState(SETTINGS, clock=clock, ticket_id=iter(["AAAAAA"]).__next__)
    b = ModerationState(SETTINGS, clock=clock, ticket_id=iter(["BBBBBB"]).__next__)
    a.check(MOD, KEY)
    clock.now += 5
    b.check(MOD, KEY)
    b.decide("BBBBBB", Decision.APPROVE)
    a.merge(tickets=list(b.drain().tickets.values()))
    assert set(a.tickets) == {"BBBBBB"}
    clock.now += 900
    assert a.check(MOD, KEY).outcome is Outcome.ACCEPT


def test_rows_dropped_at_the_caps_by_a_merge_are_counted():
    """Other daemons' rows that find a cap full are left out: counted (and logged by the
    service) like the daemon's own attempts kept out, never silently."""
    st, clock = state(replace(SETTINGS, max_entries=5))
    entries = [Entry(KEY._replace(sender=f"s{i}@x.example", network=f"10.0.{i}.0/24"),
                     clock.now, clock.now, 1) for i in range(12)]
    st.merge(entries=entries)
    assert len(st.entries) == 5
    assert st.take_merge_evicted() == 7 and st.take_merge_evicted() == 0


def _contents(st):
    changes = st.changes
    return (dict(st.entries), dict(st.remembered), dict(st.tickets), dict(st.ticket_by_key),
            dict(changes.entries), dict(changes.remembered), dict(changes.tickets))


@pytest.mark.parametrize("mode, name, steps", [
    (GREY, name, steps) for name, steps, _ in GREYLIST_CASES] + [
    (MOD, name, steps) for name, steps, _ in MODERATE_CASES])
def test_preview_answers_as_check_would_and_changes_nothing(mode, name, steps):
    """``preview`` (``policyctl query``) gives, at every point of every transition table,
    the outcome, transition and ticket ``check`` then gives, and leaves the entries, the
    remembered senders, the tickets and the recorded changes as they were, however often
    it is asked."""
    from policyd.core.moderation import STARTS

    st, clock = state()
    start = clock.now
    for offset, action in steps:
        clock.now = start + offset
        if action is not None:
            st.decide("T00000", action, "off topic")
            continue
        before = _contents(st)
        previews = [st.preview(mode, KEY) for _ in range(3)]
        assert _contents(st) == before
        step = st.check(mode, KEY)
        for preview in previews:
            assert (preview.outcome, preview.transition) == (step.outcome, step.transition)
            if step.transition in STARTS:
                assert preview.ticket is None  # no ticket made: none to name
            else:
                assert (preview.ticket, preview.text) == (step.ticket, step.text)


def _behind_live_ones(count):
    """A state whose first entry, remembered sender and ticket are live, each followed
    by ``count`` that expired out of line: entries merged late (first seen an hour before
    the first one), passes another daemon remembered for a minute, tickets decided at
    once.  The state, at the time they have expired."""
    st, clock = state()
    start = clock.now
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    st.load(remembered=[(KEY.list, KEY.sender, start + SETTINGS.remember)])
    keys = [Key(KEY.list, f"s{n}@x") for n in range(count)]
    st.merge([Entry(key, start - 3600, start - 3600) for key in keys],
             [(key.list, key.sender, start + 60) for key in keys],
             [Ticket(f"D{n:05d}", key, start - 3600, start - 3600, decision=Decision.APPROVE,
                     decided_at=start - 3600) for n, key in enumerate(keys)])
    clock.now = start + SETTINGS.max_age - 1800
    st.drain()
    return st


def test_prune_drops_a_bounded_batch_of_what_expired_out_of_line():
    """``prune`` runs on the reactor: it used to drop everything expired in one call,
    holding up every MTA request meanwhile.  Behind live items each call now drops at
    most ``PRUNE_BATCH`` of each dict; within ``len / PRUNE_BATCH`` calls and one more
    all have gone (their deletions recorded), and the live ones stay."""
    count = 3 * PRUNE_BATCH
    st = _behind_live_ones(count)
    dropped = [st.prune() for _ in range(count // PRUNE_BATCH + 1)]
    assert max(dropped) <= 3 * PRUNE_BATCH and sum(dropped) == 3 * count
    assert list(st.entries) == [KEY] and list(st.tickets) == ["T00000"]
    assert list(st.remembered) == [(KEY.list, KEY.sender)]
    changes = st.drain()
    assert [len(changes.entries), len(changes.remembered), len(changes.tickets)] == \
        [count] * 3
    assert not {*changes.entries.values(), *changes.remembered.values(),
                *changes.tickets.values()} - {None}
    assert st.prune() == 0


def test_prune_looks_at_a_bounded_number_of_items_a_call(monkeypatch):
    """At the caps a prune that looked at every entry and ticket took tens of
    milliseconds on the reactor.  One call now looks at no more than ``PRUNE_BATCH`` in
    line and as many of its round, of each dict, live or expired; repeated, it drops
    them all."""
    count = 5 * PRUNE_BATCH
    st, clock = state()
    keys = [Key(KEY.list, f"s{n}@x") for n in range(count)]
    st.load([Entry(key, clock.now - n, clock.now - n) for n, key in enumerate(keys)], (),
            [Ticket(f"T{n:05d}", key, clock.now - n, clock.now - n)
             for n, key in enumerate(keys)])
    looked = []
    stale = moderation._stale
    monkeypatch.setattr(moderation, "_stale", lambda *a: looked.append(a) or stale(*a))
    assert st.prune() == 0
    assert 0 < len(looked) <= 2 * (PRUNE_BATCH + 1)
    clock.now += 10 * SETTINGS.max_age
    calls = []
    while st.entries or st.tickets:
        looked.clear()
        calls.append(st.prune())
        assert 0 < len(looked) <= 2 * 2 * PRUNE_BATCH
    assert sum(calls) == 2 * count and len(calls) <= count // PRUNE_BATCH


def test_prune_finds_what_a_clock_step_left_behind_live_items():
    """Rows written before the clock was stepped back lie behind older, live ones: those
    from more than ``CLOCK_SLACK`` ahead count as expired at once, those from less expire
    before the ones ahead of them.  ``prune`` drops both and keeps the live ones."""
    st, clock = state()
    start = clock.now
    ahead, behind, passed = (KEY._replace(sender=f"{n}@x") for n in ("a", "b", "p"))
    st.check(GREY, KEY)
    st.check(MOD, KEY)
    st.load(remembered=[(KEY.list, KEY.sender, start + SETTINGS.remember)])
    clock.now = start + YEAR
    st.check(GREY, ahead)
    st.check(MOD, ahead)
    st.check(GREY, passed)
    clock.now += SETTINGS.min_delay
    assert st.check(GREY, passed).transition == "retry-in-window"
    clock.now = start - CLOCK_SLACK / 2
    st.check(GREY, behind)
    st.drain()
    clock.now = start + 600
    assert st.prune() == 3
    assert list(st.entries) == [KEY, behind] and list(st.tickets) == ["T00000"]
    assert list(st.remembered) == [(KEY.list, KEY.sender)]
    clock.now = start - CLOCK_SLACK / 2 + SETTINGS.max_age + 1
    assert st.prune() == 1 and list(st.entries) == [KEY]
    assert set(st.drain().entries) == {ahead, behind}


def _live(st, now):
    """The items of ``st`` that have not expired at ``now``, by their definitions."""
    s = st.settings

    def stale(since, lifetime):
        return now - since > lifetime or since - now > CLOCK_SLACK

    def ticket_live(t):
        if t.decided_at is not None:
            return not stale(t.decided_at, s.max_age)
        return not stale(t.first_seen, s.decide_within + s.max_age)

    return ({k for k, e in st.entries.items() if not stale(e.first_seen, s.max_age)},
            {w for w, u in st.remembered.items() if now < u <= now + s.remember + CLOCK_SLACK},
            {i for i, t in st.tickets.items() if ticket_live(t)})


@pytest.mark.parametrize("seed", range(5))
def test_prune_between_any_attempts_keeps_the_live_and_drops_every_expired(monkeypatch,
                                                                           seed):
    """Attempts, decisions, rows merged from another daemon, clock jumps both ways, and a
    prune now and then of a few items a call: a prune never drops a live item, and
    repeated at one time it leaves exactly the live ones (the full scan's result)."""
    monkeypatch.setattr(moderation, "PRUNE_BATCH", 3)
    rng = random.Random(seed)
    st, clock = state(replace(SETTINGS, max_entries=40, max_tickets=20, remember=2 * 86400))
    keys = [Key(KEY.list, f"s{n}@x", f"10.0.{n % 3}.0/24") for n in range(30)]
    jumps = [60, 300, 3600, 86400, 3 * 86400, -CLOCK_SLACK / 2, -2 * CLOCK_SLACK, -86400]
    for _ in range(600):
        roll = rng.random()
        if roll < 0.5:
            st.check(rng.choice((GREY, MOD)), rng.choice(keys))
        elif roll < 0.6 and st.tickets:
            st.decide(rng.choice(list(st.tickets)), rng.choice(list(Decision)))
        elif roll < 0.7:
            key = rng.choice(keys)
            until = clock.now + rng.choice((-60, 600, 86400, 10 * 86400))
            st.merge([Entry(key, clock.now - 7200, clock.now - 7200)],
                     [(key.list, key.sender, until)])
        elif roll < 0.85:
            clock.now += rng.choice(jumps)
        else:
            live = _live(st, clock.now)
            st.prune()
            assert all(a <= set(b) for a, b in zip(live, (st.entries, st.remembered,
                                                            st.tickets)))
    live = _live(st, clock.now)
    for _ in range(40 // 3 + 2):
        st.prune()
    assert (set(st.entries), set(st.remembered), set(st.tickets)) == live


class _NoScan(OrderedDict):
    """An index that refuses to be walked: ``describe`` may only look items up."""

    def __iter__(self):
        raise AssertionError("describe walked the whole index")

    values = items = __iter__


def test_describe_looks_up_and_never_walks_the_index():
    """``policyctl query`` runs ``describe`` on the reactor: it looks the sender's
    entries and tickets up (at most ``DESCRIBE_LIMIT`` listed, with totals) and visits
    none of the other senders' items, however full the index."""
    st, clock = state()
    flood(st, clock, GREY, 300)
    flood(st, clock, MOD, 300)
    for n in range(moderation.DESCRIBE_LIMIT + 5):
        st.check(GREY, KEY._replace(network=f"10.9.{n}.0/24"))
        st.check(MOD, KEY._replace(message_id=f"<{n}@x>"))
    st.entries, st.tickets = _NoScan(st.entries), _NoScan(st.tickets)
    out = st.describe(KEY.list, KEY.sender)
    assert len(out["greylist"]) == len(out["tickets"]) == moderation.DESCRIBE_LIMIT
    assert out["greylist_total"] == out["tickets_total"] == moderation.DESCRIBE_LIMIT + 5
    assert st.describe(KEY.list, "who@else.example")["tickets"] == []


def _scanned(st):
    """The side indexes as a walk over the main ones builds them."""
    by_sender, tickets, networks = {}, {}, {}
    for key in st.entries:
        by_sender.setdefault((key.list, key.sender), set()).add(key)
    for tid, t in st.tickets.items():
        tickets.setdefault((t.key.list, t.key.sender), set()).add(tid)
        net = t.key.network or network_of(t.client)
        if net:
            networks.setdefault(net, set()).add(tid)
    return by_sender, tickets, networks


@pytest.mark.parametrize("seed", range(20))
def test_the_side_indexes_agree_with_a_scan_after_any_operations(seed):
    """Whatever mix of attempts, decisions, merges (another daemon's rows, a ticket id
    both drew), loads, caps and prunes: the side indexes ``describe`` and the ticket
    shares read hold exactly what a walk over the index finds."""
    rng = random.Random(seed)
    st, clock = state(replace(SETTINGS, max_entries=15, max_tickets=12))
    other, _ = state(replace(SETTINGS, max_entries=15, max_tickets=12))
    other.clock = clock
    senders = [f"s{n}@x" for n in range(5)]
    for _ in range(400):
        clock.now += rng.choice([1, 60, 400, 3600, 86400])
        key = Key(rng.choice(["a@l", "b@l"]), rng.choice(senders),
                  rng.choice(["", "10.0.0.0/24", "10.0.1.0/24"]), f"<{rng.randrange(6)}@x>")
        client = rng.choice(["", "192.0.2.7", "198.51.100.9"])
        op = rng.randrange(7)
        if op <= 1:
            st.check(rng.choice([GREY, MOD]), key, client=client)
        elif op == 2:
            other.check(rng.choice([GREY, MOD]), key, client=client)
        elif op == 3 and st.tickets:
            st.decide(rng.choice(list(st.tickets)), rng.choice(list(Decision)))
        elif op == 4:
            st.merge(list(other.entries.values()), [], list(other.tickets.values()))
        elif op == 5:
            st.prune()
        else:
            st.load(list(other.entries.values()), [], list(other.tickets.values()))
        by_sender, tickets, networks = _scanned(st)
        assert {g: set(m) for g, m in st.entries_by_sender.items()} == by_sender
        assert {g: set(m) for g, m in st.tickets_by_sender.items()} == tickets
        assert {g: set(m) for g, m in st.tickets_by_network.items()} == networks


def test_one_sender_cannot_fill_the_ticket_cap():
    """A flood of new Message-IDs from one From: on one list holds at most its share of
    ``max_tickets``, then keeps out only its own new attempts (``sender-at-cap``): a
    real sender's first post still gets its ticket."""
    st, clock = state(replace(SETTINGS, max_tickets=100))
    steps = [st.check(MOD, Key(KEY.list, "spam@evil.example", "", f"<{n}@evil>"),
                      client=f"203.0.{n}.9") for n in range(100)]
    assert [s.transition for s in steps].count("first-attempt") == 10
    assert steps[-1].transition == moderation.SENDER_AT_CAP
    clock.now += SETTINGS.decide_within - 60
    real = st.check(MOD, Key(KEY.list, "dave@example.org", "", "<d@example.org>"),
                    client="198.51.100.1")
    assert real.outcome is Outcome.HELD and real.transition == "first-attempt"


def test_one_network_cannot_fill_the_ticket_cap():
    """Made-up senders from one client network hold at most its share of the tickets;
    the first posts from other networks still get theirs, and once the network's first
    ticket is done with (expired) it makes room for that network again."""
    st, clock = state(replace(SETTINGS, max_tickets=10))
    steps = [st.check(MOD, Key(KEY.list, f"s{n}@evil.example", "", f"<{n}@e>"),
                      client="203.0.113.9") for n in range(10)]
    assert [s.transition for s in steps] == ["first-attempt"] * 5 + [NETWORK_AT_CAP] * 5
    real = st.check(MOD, Key(KEY.list, "d@example.org", "", "<d@o>"), client="198.51.100.1")
    assert real.transition == "first-attempt"
    assert st.preview(MOD, Key(KEY.list, "x@evil.example", "", "<x@e>"),
                      client="203.0.113.7").transition == NETWORK_AT_CAP
    clock.now += SETTINGS.decide_within + SETTINGS.max_age + 1
    again = st.check(MOD, Key(KEY.list, "t@evil.example", "", "<t@e>"), client="203.0.113.9")
    assert again.transition == "first-attempt"


def test_an_id_another_daemon_drew_for_another_post_is_redrawn_on_merge():
    """Two daemons drew one ticket id for two posts, and a moderator approved the other
    post: merging its row gives this daemon's ticket a new id (written as new, counted
    for the log) instead of the other post's decision, and the other post's row is kept
    under its id."""
    st, clock = state()
    st.ticket_id = iter(["K7Q2M9", "N3W1D2"]).__next__
    mine = KEY._replace(sender="bob@x", network="", message_id="<b@x>")
    assert st.check(MOD, mine).ticket == "K7Q2M9"
    st.drain()
    theirs = Ticket("K7Q2M9", KEY._replace(sender="alice@x", message_id="<a@x>"),
                    clock.now - 1, clock.now - 1, 1, "A's post", "", Decision.APPROVE, "",
                    clock.now)
    clock.now += 2
    st.merge(tickets=[theirs])
    step = st.check(MOD, mine)
    assert (step.transition, step.ticket) == ("waiting", "N3W1D2")
    assert st.tickets["K7Q2M9"].key == theirs.key and st.take_id_conflicts() == 1
    changes = st.drain().tickets
    assert "K7Q2M9" not in changes and changes["N3W1D2"].key == mine


def test_redraw_gives_conflicting_tickets_new_ids():
    """The store reports an id it holds for another post (``write_changes``): the
    ticket gets a new id, written as new, and the old id is no change of ours."""
    st, clock = state()
    held = st.check(MOD, KEY)
    st.drain()
    st.check(MOD, KEY)
    assert st.redraw([held.ticket, "NOSUCH"]) == 1
    new = st.ticket_by_key[KEY]
    assert new != held.ticket and held.ticket not in st.tickets
    assert set(st.drain().tickets) == {new}
    assert st.check(MOD, KEY).ticket == new


def test_a_decided_ticket_answers_only_its_own_post():
    """A ticket remembers its post's digest: a retry of the post gets the decision,
    another post under the same key (an approved post's From: and Message-ID reused)
    gets no opinion (``other-post``: the list's normal outcome) and leaves the ticket as
    it is; a ticket without a digest (stored before it existed) is not compared."""
    st, clock = state()
    held = st.check(MOD, KEY, subject="Question", digest=moderation.post_digest("Question"))
    st.decide(held.ticket, Decision.APPROVE)
    clock.now += 600
    again = st.check(MOD, KEY, digest=moderation.post_digest("Question"))
    assert again.transition == "approved"
    attempts = st.tickets[held.ticket].attempts
    clock.now += 6 * 3600
    spam = st.check(MOD, KEY, digest=moderation.post_digest("BUY CHEAP PILLS"))
    assert (spam.outcome, spam.transition) == (Outcome.PASS, moderation.OTHER_POST)
    assert st.preview(MOD, KEY, digest=moderation.post_digest("x")).transition == \
        moderation.OTHER_POST
    assert st.tickets[held.ticket].attempts == attempts
    st.tickets[held.ticket] = replace(st.tickets[held.ticket], digest="")
    assert st.check(MOD, KEY, digest=moderation.post_digest("x")).transition == "approved"


def test_a_retry_keeps_its_tickets_place_and_preview_says_what_check_does():
    """At its network's share, the oldest ticket is the one looked at: a retry refreshing
    it kept it first in its group (it went to the end, and a pending newer one refused the
    network's newcomers though the oldest was done with); ``policyctl query``'s preview
    says what the MTA's attempt then gets (it said network-at-cap where check held)."""
    st, clock = state(replace(SETTINGS, max_tickets=4))  # a network's share: 2 tickets
    client = "203.0.113.9"
    first = Key(KEY.list, "a@evil.example", "", "<a@e>")
    second = Key(KEY.list, "b@evil.example", "", "<b@e>")
    held = st.check(MOD, first, client=client)
    st.check(MOD, second, client=client)
    assert st.decide(held.ticket, Decision.REJECT, "spam") is not None
    clock.now += SETTINGS.min_delay + 1
    assert st.check(MOD, first, client=client).outcome is Outcome.REJECT  # answered
    network = network_of(client)
    assert next(iter(st.tickets_by_network[network])) == held.ticket
    newcomer = Key(KEY.list, "c@evil.example", "", "<c@e>")
    preview = st.preview(MOD, newcomer, client=client)
    step = st.check(MOD, newcomer, client=client)
    assert preview.transition == step.transition == "first-attempt"
    assert held.ticket not in st.tickets  # the answered one made room


# --- the undecided count (the metrics' and ``policyctl status``'s pending) ----------------

from hypothesis import given, settings as hsettings, strategies as hst  # noqa: E402

_KEYS = [Key("a@l", sender, net, mid) for sender in ("s1@x", "s2@x")
         for net, mid in (("", "<1@x>"), ("", "<2@x>"), ("10.0.0.0/24", ""),
                          ("10.0.1.0/24", ""))]
_MODES = hst.sampled_from([GREY, MOD])
_KEY = hst.sampled_from(_KEYS)
_CLIENT = hst.sampled_from(["", "192.0.2.7", "198.51.100.9"])
_DIGEST = hst.sampled_from(["", "d1", "d2"])
_OPS = hst.one_of(
    hst.tuples(hst.just("check"), _MODES, _KEY, _CLIENT, _DIGEST),
    hst.tuples(hst.just("other-check"), _MODES, _KEY, _CLIENT, _DIGEST),
    hst.tuples(hst.just("decide"), hst.integers(0, 20), hst.sampled_from(list(Decision))),
    hst.tuples(hst.just("other-decide"), hst.integers(0, 20),
               hst.sampled_from(list(Decision))),
    hst.tuples(hst.just("merge")),
    hst.tuples(hst.just("merge-batches"), hst.integers(1, 4)),
    hst.tuples(hst.just("load")),
    hst.tuples(hst.just("load-batches"), hst.integers(1, 4)),
    hst.tuples(hst.just("prune")),
    hst.tuples(hst.just("redraw"), hst.integers(0, 20)),
    hst.tuples(hst.just("drain-restore")),
    hst.tuples(hst.just("clock"), hst.sampled_from(
        [1, 60, 400, 3600, 86400, 3 * 86400, 5 * 86400, -2 * CLOCK_SLACK])),
)


@hsettings(max_examples=300, deadline=None)
@given(ops=hst.lists(_OPS, max_size=60), ids=hst.randoms(use_true_random=False))
def test_the_undecided_count_agrees_with_a_scan_after_any_operations(ops, ids):
    """``undecided`` (the pending gauge, ``policyctl status``: read on the reactor, so
    counted, never walked) equals a scan of the tickets after every operation: attempts
    (new, refreshed, expired, at the caps and shares), decisions, merges and loads of
    another daemon's rows (whole or in batches; two tickets for one post; one id drawn
    by both daemons for two posts), redraws, prunes, drains put back, clock jumps."""
    pool = [f"T{n:02d}" for n in range(40)]  # a small pool: the two daemons draw alike
    limits = replace(SETTINGS, max_entries=6, max_tickets=6, ticket_sender_share=0.5)
    clock = Clock()
    st = ModerationState(limits, clock=clock, ticket_id=lambda: ids.choice(pool))
    other = ModerationState(limits, clock=clock, ticket_id=lambda: ids.choice(pool))

    def rows():
        return (list(other.entries.values()),
                [(lst, who, until) for (lst, who), until in other.remembered.items()],
                list(other.tickets.values()))

    for op in ops:
        name = op[0]
        if name in ("check", "other-check"):
            mode, key, client, digest = op[1:]
            (st if name == "check" else other).check(mode, key, client=client,
                                                      digest=digest)
        elif name in ("decide", "other-decide"):
            target = st if name == "decide" else other
            if target.tickets:
                tids = list(target.tickets)
                target.decide(tids[op[1] % len(tids)], op[2], "no")
        elif name == "merge":
            st.merge(*rows())
        elif name == "merge-batches":
            for _ in st.merge_batches(*rows(), size=op[1]):
                pass
        elif name == "load":
            st.load(*rows())
        elif name == "load-batches":
            for _ in st.load_batches(*rows(), size=op[1]):
                pass
        elif name == "prune":
            st.prune()
            other.prune()
        elif name == "redraw":
            if st.tickets:
                tids = list(st.tickets)
                st.redraw([tids[op[1] % len(tids)], "NOSUCH"])
        elif name == "drain-restore":
            st.restore(st.drain())
        else:
            clock.now += op[1]
        for each in (st, other):
            assert each.undecided == sum(1 for t in each.tickets.values()
                                         if t.decision is None), op
