"""SMTP-time moderation in the daemon: the in-memory index on the reactor, its state in
the store's database through the store thread.

``ModerationService.apply`` is what the MTA factories call after the ``Decider``: only a
``hold`` by ``nonmember-moderation`` on a list whose ``smtp_moderation`` is not ``off``
is looked at, through the pure ``core.moderation.ModerationState``; the answer is
replaced by the deferral, the ticket, or the moderator's decision.  Every other answer
passes untouched, and so does everything while the state is unusable (not loaded yet, or
its last write failed): the list's normal outcome, never a 5xx and never a deferral that
could not be remembered. Each such incident is logged once, with its end; so is each stay
at a cap (``core.moderation``: a first attempt that finds no room gets the list's normal
outcome, transition ``at-cap``, ``network-at-cap`` or ``sender-at-cap``): one line when it starts, one
summary when it has been quiet for ``CAP_QUIET`` seconds.

``sync`` (a ``TimerService`` every ``interval`` seconds, only while some list has
``smtp_moderation`` set) writes the changed rows in one batch, reads what other daemons
and moderators wrote since the last sync, prunes a batch of the index, and now and then
the store's expired rows (by the store's clock).  The reactor never touches SQL.  Each
sync first reads the store's clock: while the daemon's wall clock differs from it by
more than ``CLOCK_AGREE`` (a clock that jumped: NTP mis-step, a resumed VM) the state is
unusable, an incident logged once with its end, and no shared row is expired or deleted
(``_clocks_agree``); the offset is a metric.

For the metrics (``metrics.PolicydCollector`` reads them at scrape time) the service
counts every attempt it looked at in ``counts[mode][outcome][transition]`` (three dict
look-ups and an increment; nothing for the answers it does not look at), with the
transition ``state-unusable`` for the normal outcome given while the state is unusable;
and, per sync, the moderator decisions that arrived, the rows that expired, the rows a
cap pushed out or kept out (remembered senders, other daemons' rows) and the failed
syncs.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from functools import lru_cache
from typing import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .core.moderation import REFUSED, Key, ModerationState, Outcome, Settings, \
    SmtpModeration, displayable, network_of, post_digest
from .core.addresses import CACHED_MAX
from .core.replies import Outcome as Reply, SmtpReply, clean_text
from .core.verdict import Verdict

__all__ = ["ModerationService", "moderation_fields"]

log = Logger(namespace="policyd.moderation")

_RULE = "nonmember-moderation"
# The transition counted for the normal outcome given while the state is unusable.
UNUSABLE = "state-unusable"
# Seconds of slack when reading back what changed (clocks of several hosts, rounding):
# hosts sharing a store must keep their clocks closer than this (NTP).
SLACK = 30.0
# How far the wall clock may be from the store's clock: half of ``SLACK``, so that two
# daemons that both agree with the store are within ``SLACK`` of each other and each
# reads back what the other wrote (rows carry the writer's clock; a sync reads from
# its last one less ``SLACK``), and far inside ``CLOCK_SLACK``, where a row from a
# future counts as expired.
CLOCK_AGREE = SLACK / 2
# Prune the store's expired rows every this many syncs (the index: every sync).
PRUNE_EVERY = 60
# Rows read from the store applied to the index in one turn of the reactor: a load at
# start-up, or the first sync after an outage, reads up to the caps.
BATCH = 2000
# A stay at a cap is over (its summary logged) after this many seconds without an
# attempt kept out or a row pushed out: a sustained flood is one incident, not one a sync.
CAP_QUIET = 60.0
# Characters of a Subject kept (a ticket stores 200): cut before ``_field``, whose cache
# is keyed on the text, so that it holds short strings whatever the peer sends.
SUBJECT_LIMIT = 255


def moderation_fields(step) -> str:
    """`` moderation=held ticket=K7Q2M9`` for the end of the decision line."""
    if step is None:
        return ""
    text = f" moderation={step.transition}"
    return text + (f" ticket={step.ticket}" if step.ticket else "")


class ModerationService(TimerService):
    """The moderation index of one daemon and its sync with the store.

    Two clocks: ``clock`` (the reactor) runs the sync and times the stays at a cap;
    ``wall`` gives every time of the state, the times the store shares with other
    daemons and ``policyctl`` (first seen, remembered until, decided at).  The daemon's
    reactor is on the monotonic clock (``policyd.runtime.monotonic``), whose seconds
    mean nothing outside the process.  Tests pass their ``Clock``'s ``seconds`` as both.

    A third, ``store_clock(engine)`` (in the store thread; by default the store's own,
    ``store.moderation.store_clock``), is what every daemon sharing the store reads
    alike: each sync compares ``wall`` with it first (``_clocks_agree``)."""

    def __init__(self, snapshots, engine, *, run_in_thread: Callable[..., Deferred],
                 clock, wall: Callable[[], float] = time.time,
                 settings: Settings = Settings(), interval: float = 5.0,
                 store=None, store_clock: Callable[..., float] | None = None) -> None:
        super().__init__(interval, self.sync)
        self.clock = clock
        self.wall = wall
        self.snapshots = snapshots
        self.engine = engine
        self.run_in_thread = run_in_thread
        self.state = ModerationState(settings, clock=wall)
        # ``None``: not loaded yet; False: the last load or write failed (an incident).
        self.usable: bool | None = None
        self._since = 0.0
        self._syncs = 0
        self._busy = False
        self._store = store if store is not None else _default_store()
        self._store_clock = store_clock if store_clock is not None else \
            self._store.store_clock
        # ``wall`` minus the store's clock at the last sync (``None``: not read yet), and
        # since when (reactor seconds) they disagree by more than ``CLOCK_AGREE``
        # (``None``: they agree).
        self.clock_offset: float | None = None
        self._skewed_since: float | None = None
        # Rows a cap pushed out or kept out, in all; the open incident at a cap
        # (``_CapIncident``), ``None`` when there is none.
        self.evicted = 0
        self._cap: _CapIncident | None = None
        # The metrics: mode -> outcome -> transition -> attempts (every mode and outcome
        # there from the start); moderator decisions read from the store; rows expired
        # (pruned from the index); syncs that failed.
        self.counts: dict[SmtpModeration, dict[Outcome, Counter]] = {
            mode: {outcome: Counter() for outcome in Outcome} for mode in SmtpModeration}
        self.decisions_read = 0
        self.expired = 0
        self.sync_failures = 0
        # When the last sync (or load) succeeded, by ``clock``: ``policyctl status``.
        self.last_sync_at: float | None = None

    def stopService(self):
        """Stop syncing without waiting for a sync in progress: one stuck in a dead
        database connection must not hold up shutdown (the store thread is a daemon
        thread).  Changes not written yet are lost; the senders simply retry."""
        super().stopService()
        return None

    # --- on the reactor ----------------------------------------------------------------

    def asks_about(self, decision) -> bool:
        """Whether ``apply`` may change ``decision``: a nonmember's hold on a list with
        SMTP-time moderation.  Cheap, so that a protocol reads the request's fields for
        ``apply`` (the client, the Message-ID, the Subject) only then."""
        if decision is None or decision.verdict is not Verdict.HOLD or decision.rule != _RULE:
            return False
        snapshot = self.snapshots.current
        policy = snapshot.lists.get(decision.list) if snapshot is not None else None
        return policy is not None and policy.smtp_moderation is not SmtpModeration.OFF

    def apply(self, answer, query, *, client: str | None = None, message_id: str = "",
              subject: str = "", modes=(SmtpModeration.GREYLIST, SmtpModeration.MODERATE)):
        """(answer, step): the answer, changed if moderation has something to say, and
        the moderation step (``None`` when it did not apply).  ``modes``: the settings
        this protocol applies (Postfix, at RCPT without the message: greylist only)."""
        return self._apply(answer, query, client, message_id, subject, modes, False)

    def preview(self, answer, query, *, client: str | None = None, message_id: str = "",
                modes=(SmtpModeration.GREYLIST, SmtpModeration.MODERATE)):
        """``apply`` without its effects, for ``policyctl query``: (answer, step) as the
        MTA's attempt would get them now, while the state, the counters and the store
        stay as they are (``ModerationState.preview``).  A step in
        ``core.moderation.STARTS`` is one the MTA's attempt would begin an entry or a
        ticket with; the query begins nothing."""
        return self._apply(answer, query, client, message_id, "", modes, True)

    def _apply(self, answer, query, client, message_id, subject, modes, preview: bool):
        decision = answer.decision
        if (decision is None or decision.verdict is not Verdict.HOLD
                or decision.rule != _RULE):
            return answer, None
        snapshot = self.snapshots.current
        policy = snapshot.lists.get(decision.list) if snapshot is not None else None
        if policy is None or policy.smtp_moderation not in modes:
            return answer, None
        mode = policy.smtp_moderation
        if not self.usable:
            # The list's normal outcome (the incident is logged).
            if not preview:
                self.counts[mode][Outcome.PASS][UNUSABLE] += 1
            return answer, None
        sender = _field(decision.sender or query.envelope_sender)
        if preview:
            message_id = _field(message_id)
            network = "" if mode is SmtpModeration.MODERATE and message_id else \
                network_of(client)
            step = self.state.preview(mode, Key(decision.list, sender, network, message_id),
                                      client=_field(client or "", 64))
            reply = _reply(step)
            return (answer if reply is None else answer._replace(reply=reply)), step
        if mode is SmtpModeration.GREYLIST:
            # A remembered sender passes from any network: no key to make.
            step = self.state.remembered_step(decision.list, sender)
            if step is not None:
                self.counts[mode][Outcome.PASS]["remembered"] += 1
                return answer, step
        # A ticket is the post's: with a Message-ID, a retry from another network of the
        # sender (a provider's other outbound hosts) finds it.  Greylisting keys the
        # network, as greylisting does.
        message_id = _field(message_id)
        network = "" if mode is SmtpModeration.MODERATE and message_id else network_of(client)
        key = Key(decision.list, sender, network, message_id)
        subject = subject[:SUBJECT_LIMIT]
        step = self.state.check(mode, key, subject=_field(subject),
                                client=_field(client or "", 64),
                                digest=post_digest(subject) if message_id else "")
        self.counts[mode][step.outcome][step.transition] += 1
        if step.evicted:
            self._at_cap(evicted=step.evicted)
        elif step.transition in REFUSED:
            self._at_cap(kept_out=1)
        reply = _reply(step)
        if reply is None:
            return answer, step
        return answer._replace(reply=reply), step

    def _at_cap(self, *, kept_out: int = 0, evicted: int = 0) -> None:
        """Count what a cap did; the first event of an incident logs a line."""
        now = self.clock.seconds()
        incident = self._cap
        if incident is None:
            incident = self._cap = _CapIncident(now)
            log.warn("moderation state at its cap (max_entries {entries}, max_tickets "
                     "{tickets}): new first attempts get the list's normal outcome, the "
                     "least recently remembered senders go; one summary follows when it "
                     "is over", entries=self.state.settings.max_entries,
                     tickets=self.state.settings.max_tickets)
        incident.last = now
        incident.kept_out += kept_out
        incident.evicted += evicted
        self.evicted += evicted

    def _end_cap_incident(self, now: float) -> None:
        incident = self._cap
        if incident is not None and now - incident.last >= CAP_QUIET:
            self._cap = None
            log.warn("moderation state at its cap: over after {duration:.0f} s; {kept_out} "
                     "first attempts and other daemons' rows kept out, {count} remembered "
                     "senders dropped", duration=incident.last - incident.started,
                     kept_out=incident.kept_out, count=incident.evicted)

    def describe(self, decision) -> dict | None:
        """``policyctl query``: the list's ``smtp_moderation`` and, when it is on, what
        the daemon's index holds for the decision's sender; ``None`` for no list."""
        snapshot = self.snapshots.current
        if decision is None or snapshot is None:
            return None
        policy = snapshot.lists.get(decision.list) if decision.list else None
        if policy is None:
            return None
        mode = policy.smtp_moderation
        out = {"mode": mode.value,
               "applies": (mode is not SmtpModeration.OFF
                           and decision.verdict is Verdict.HOLD and decision.rule == _RULE),
               "usable": bool(self.usable)}
        if mode is not SmtpModeration.OFF and decision.sender:
            out.update(self.state.describe(decision.list, decision.sender))
        return out

    # --- the sync, in the store thread -------------------------------------------------

    def in_use(self) -> bool:
        """Some list of the current snapshot has ``smtp_moderation`` on: the state is
        loaded and synced (and its usability worth reporting) only then."""
        return self._enabled()

    def _enabled(self) -> bool:
        snapshot = self.snapshots.current
        if snapshot is None:
            return False
        return any(p.smtp_moderation is not SmtpModeration.OFF
                   for p in snapshot.lists.values())

    @inlineCallbacks
    def _in_turns(self, steps):
        """Run ``steps``, a generator that yields between two batches of rows
        (``BATCH``), giving the reactor a turn at each yield, so that the MTAs' requests
        waiting meanwhile are answered; its return value.  One batch: no turn given
        (done at once, as before)."""
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            yield deferLater(self.clock, 0, lambda: None)

    @inlineCallbacks
    def sync(self):
        """Load (first), write the changes, read back, prune now and then.  Catches and
        logs everything: an uncaught error would stop the ``TimerService``."""
        self._end_cap_incident(self.clock.seconds())
        self.expired += self.state.take_expired()
        if self._busy or not self._enabled():
            return
        self._busy = True
        store = self._store
        settings = self.state.settings
        try:
            store_now = yield self.run_in_thread(self._store_clock, self.engine)
            # Read after the store's answer: every change drained below was made on the
            # reactor before this reading, so with a clock that agrees none carries a
            # time from a jump (one that came and went within a sync is not seen).
            now = self.wall()
            if not self._clocks_agree(now, store_now):
                return
            if self.usable is None or (self.usable is False and self._since == 0.0):
                rows = yield self.run_in_thread(store.load_state, self.engine, settings, now)
                yield self._in_turns(self.state.load_batches(*rows, size=BATCH))
                self._since = now
                self._recovered()
                return
            changes = self.state.drain()
            if changes:
                try:
                    conflicts = yield self.run_in_thread(store.write_changes, self.engine,
                                                         changes)
                except Exception:
                    self.state.restore(changes)
                    raise
                self.state.redraw(conflicts or ())
            rows = yield self.run_in_thread(store.read_since, self.engine,
                                            self._since - SLACK, settings.remember)
            decided = yield self._in_turns(self.state.merge_batches(*rows, size=BATCH))
            redrawn = self.state.take_id_conflicts()
            if redrawn:  # rare (30-bit ids): one line a sync at most
                log.warn("{count} tickets drew an id another daemon's post holds in the "
                         "store: they have new ids, the senders are told at their next "
                         "retry", count=redrawn)
            merged_out = self.state.take_merge_evicted()
            if merged_out:  # other daemons' rows filled the caps: the same incident
                self._at_cap(kept_out=merged_out)
                self.evicted += merged_out
            if decided:
                self.decisions_read += decided
                log.info("{count} moderator decisions arrived", count=decided)
            self._since = now
            self._syncs += 1
            # Every sync: one call prunes a bounded batch of the index (on the reactor).
            self.expired += self.state.prune()
            if self._syncs % PRUNE_EVERY == 0:
                # By the store's clock: the rows are every daemon's.
                yield self.run_in_thread(store.prune_rows, self.engine, settings,
                                         store_now)
            self._recovered()
        except Exception as error:
            self.sync_failures += 1
            if self.usable is not False:
                self.usable = False
                log.failure("the moderation state cannot be read or written: lists with "
                            "smtp_moderation get their normal outcome until it can "
                            "({error})", error=error)
        finally:
            self._busy = False

    def _clocks_agree(self, now: float, store_now: float) -> bool:
        """Whether ``wall`` (``now``) and the store's clock agree within ``CLOCK_AGREE``.

        While they do not, this daemon cannot tell which rows expired: its index
        would expire (and delete from the store, by id) other daemons' rows and the
        moderators' decisions, and write rows with times no other daemon can read.
        So the incident is as an unusable state: nothing is written, read, expired or
        pruned, the changes recorded since the last sync (made with a clock that may
        have jumped already) are dropped, and lists get their normal outcome, never an
        answer from an index read by a wrong clock.  When the clocks agree again the
        index is loaded afresh from the store (what it dropped or aged while the clock
        was wrong comes back).  One line for the start, one for the end."""
        offset = now - store_now
        self.clock_offset = offset
        if abs(offset) > CLOCK_AGREE:
            if self._skewed_since is None:
                self._skewed_since = self.clock.seconds()
                self.usable = False
                log.warn("the wall clock ({wall}) and the store's clock ({store}) differ "
                         "by {offset:+.0f} s, more than {slack:.0f} s: no moderation row "
                         "is expired, written or pruned, and lists with smtp_moderation "
                         "get their normal outcome until they agree again",
                         wall=_utc(now), store=_utc(store_now), offset=offset,
                         slack=CLOCK_AGREE)
            self.state.drain()
            return False
        if self._skewed_since is not None:
            log.warn("the wall clock and the store's clock agree again (offset "
                     "{offset:+.1f} s, after {duration:.0f} s): the moderation state is "
                     "loaded afresh from the store", offset=offset,
                     duration=self.clock.seconds() - self._skewed_since)
            self._skewed_since = None
            # A fresh index: the one held through the jump expired rows by it, and
            # what it began then carries the wrong times.
            self.state = ModerationState(self.state.settings, clock=self.wall)
            self.usable = False
            self._since = 0.0  # the next step is the load
        return True

    def _recovered(self) -> None:
        if self.usable is False:
            log.info("the moderation state is usable again")
        self.usable = True
        self.last_sync_at = self.clock.seconds()

    # --- policyctl status --------------------------------------------------------------

    def status(self) -> dict:
        """``policyctl status``'s ``moderation``: whether some list uses it; then
        whether the state is usable (loaded, its last sync worked), how long ago a sync
        last succeeded, the failed syncs, the size of the index, and the rows the caps
        pushed or kept out (with the stay at a cap going on, if any).  Counts and
        lengths only: it runs on the reactor, and the index holds up to the caps."""
        if not self.in_use():
            return dict(NOT_IN_USE)
        now = self.clock.seconds()
        state = self.state
        cap = self._cap
        return {
            "in_use": True,
            "state": ("usable" if self.usable else
                      "not loaded yet: lists with smtp_moderation get their normal outcome"
                      if self.usable is None else
                      f"unusable, the wall clock and the store's clock differ by "
                      f"{self.clock_offset:+.0f} s (more than {CLOCK_AGREE:.0f} s): lists "
                      "with smtp_moderation get their normal outcome"
                      if self._skewed_since is not None else
                      "unusable, the last sync failed: lists with smtp_moderation get "
                      "their normal outcome"),
            "usable": bool(self.usable),
            "clock_offset": (None if self.clock_offset is None
                             else round(self.clock_offset, 3)),
            "last_sync_age": (None if self.last_sync_at is None
                              else round(max(0.0, now - self.last_sync_at), 3)),
            "sync_interval": self.step,
            "sync_failures": self.sync_failures,
            "greylist_entries": len(state.entries),
            "remembered_senders": len(state.remembered),
            "tickets": len(state.tickets),
            "pending_tickets": state.undecided,
            "max_entries": state.settings.max_entries,
            "max_tickets": state.settings.max_tickets,
            "evicted": self.evicted,
            "at_cap": None if cap is None else {
                "running_for": round(max(0.0, now - cap.started), 3),
                "kept_out": cap.kept_out, "evicted": cap.evicted},
        }


#: ``ModerationService.status`` while no list has ``smtp_moderation`` set (or the store
#: has no place for the state: ``PolicydService.moderation`` is ``None``).
NOT_IN_USE = {"in_use": False, "state": "not in use (no list has smtp_moderation set)"}


def _utc(seconds: float) -> str:
    """Unix seconds as a UTC time for a log line (both clocks in one line)."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


class _CapIncident:
    __slots__ = ("started", "last", "kept_out", "evicted")

    def __init__(self, now: float) -> None:
        self.started = self.last = now
        self.kept_out = self.evicted = 0


def _field(text: str, limit: int = 255) -> str:
    """A value the peer chose, made storable in any database and showable on a
    moderator's terminal: undecodable bytes replaced, control, format and line-separator
    characters made spaces (``core.moderation.displayable``), at most ``limit`` characters (a row that cannot be
    written would stop the whole batch).  Remembered up to ``CACHED_MAX`` characters:
    an entry costs its key, and a sender can be kilobytes long."""
    if len(text) > CACHED_MAX:
        return _storable(text, limit)
    return _field_cached(text, limit)


def _storable(text: str, limit: int) -> str:
    if not text:
        return ""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return displayable(text).strip()[:limit]


_field_cached = lru_cache(maxsize=8192)(_storable)


def _reply(step) -> SmtpReply | None:
    outcome = step.outcome
    if outcome is Outcome.PASS:
        return None
    if outcome is Outcome.DEFER or outcome is Outcome.HELD:
        return SmtpReply(Reply.DEFER, 451, "4.7.1", clean_text(step.text))
    if outcome is Outcome.ACCEPT:
        return SmtpReply(Reply.ACCEPT, 250, "2.1.5",
                         f"approved by a moderator, ticket {step.ticket}")
    if outcome is Outcome.REJECT:
        return SmtpReply(Reply.REJECT, 550, "5.7.1", clean_text(step.text))
    return SmtpReply(Reply.DISCARD, 250, "2.7.0",
                     f"discarded by a moderator, ticket {step.ticket}")


def _default_store():
    from .store import moderation

    return moderation
