"""The Decider: one query on the live snapshot, answered as an ``Answer``.

What every protocol calls: the current snapshot + ``chain.decide`` + the configured
``ReplyPolicy``, with the error policy (no snapshot yet, an empty snapshot, or any
exception inside the decision give the configured 4xx, never a 5xx; so does a snapshot
the store has not confirmed for ``[store] max_stale`` seconds) and the verdict
counters ``policyctl status`` and the metrics show.  It renders nothing and logs only its
own trouble: each protocol turns the ``Answer`` into its wire text and writes its
decision line.

Its trouble is logged once per incident, never once per request (``Incidents``): an
exception in the decision (any sender can cause one: a ``From:`` nested too deep for the
standard library's address parser) with its traceback once per kind, an Exim question
about a domain that is not a list domain naming the first few domains; the rest are
counted and summed up in one line a minute.
"""

from __future__ import annotations

import email
from bisect import bisect_left
from collections import Counter
from functools import partial
from os.path import basename, dirname
from time import monotonic, perf_counter
from typing import Callable, NamedTuple

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, maybeDeferred
from twisted.logger import Logger

from .core.chain import decide as chain_decide
from .core.dmarc import LookupNeeded
from .core.passwords import VerificationNeeded, verify_and_remember, verify_elsewhere
from .core.replies import ReplyPolicy, SmtpReply
from .core.rules import ROLE_LOCAL_PARTS
from .core.verdict import Decision, Query
from .logging import capped

__all__ = ["Answer", "Decider", "FixedSnapshot", "Incidents", "LatencyHistogram"]

log = Logger(namespace="policyd.decision")


class Answer(NamedTuple):
    """The decision (``None`` on trouble), the SMTP reply, and on trouble its label
    (``unavailable`` or ``error``) and reason.  ``started`` is when deciding began
    (``perf_counter``), for the decision line's elapsed time."""

    decision: Decision | None
    reply: SmtpReply
    trouble: str | None = None
    reason: str | None = None
    started: float = 0.0
    # A moderator password that must be verified (off the reactor: ``Decider.verify``)
    # before this query can be decided; the reply meanwhile is the temporary failure.
    pending: VerificationNeeded | None = None


# An Answer with every field given, built in C (``tuple.__new__``): one per decision.
_new_answer = partial(tuple.__new__, Answer)


def _take_one(counts, key) -> None:
    """One less of ``key`` in ``counts``, gone at zero (never a label counting 0)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    elif left == 0:
        del counts[key]


class Decider:
    """Decide one query on the current snapshot and count it."""

    def __init__(self, snapshots, policy: ReplyPolicy, *, decide=chain_decide,
                 fail_closed: bool = True, null_sender: str = "reject",
                 roles: frozenset[str] | None = None,
                 per_list: bool = False, latency: bool = False,
                 run_in_thread: Callable[..., Deferred] | None = None,
                 clock=None) -> None:
        self.snapshots = snapshots
        # Why the snapshot may no longer be the store's state (``SnapshotService``'s
        # ``[store] max_stale``), read for every query; a fixed snapshot has none.
        self._stale_reason = getattr(snapshots, "stale_reason", None)
        self.policy = policy
        # Where a moderator password is verified (a fifth of a second of CPU): with
        # ``run_in_thread`` (the daemon), never in ``decide``; without (policyctl), inline.
        self.run_in_thread = run_in_thread
        self._verifying = DeferredSemaphore(self.VERIFY_THREADS)
        self._waiting = 0
        # ``[rules] null_sender``: the chain takes it as an argument (it is pure); only a
        # non-default value is passed, so a ``decide`` without the argument still works.
        self._decide = decide if null_sender == "reject" else \
            partial(decide, null_sender=null_sender)
        # ``[rules] role_addresses``: likewise, passed only when it is not the default.
        if roles is not None and frozenset(roles) != ROLE_LOCAL_PARTS:
            self._decide = partial(self._decide, roles=frozenset(roles))
        # (protocol, verdict, rule) -> count: every decision, for the metrics.
        self.by_rule: Counter = Counter()
        # ``[metrics] per_list``: (protocol, list, verdict) -> count, for the lists of the
        # snapshot only (a recipient is whatever the client typed: never a label).
        self.per_list = per_list
        self.by_list: Counter = Counter()
        # protocol -> ``LatencyHistogram``, filled by the protocols (``[metrics] listen``
        # set); empty otherwise, and then the protocols observe nothing.
        self.latency: dict[str, LatencyHistogram] = {}
        if latency:
            for name in ("exim", "postfix"):
                self.latency[name] = LatencyHistogram()
        # An empty snapshot (no list at all) is a store in trouble, not a site without
        # lists: answered like no snapshot (4xx) instead of "not a list domain".
        self.fail_closed = fail_closed
        # protocol -> error, unavailable, malformed, other-state... -> count: what is not
        # a decision (decisions are counted once, in ``by_rule``; ``by_protocol`` sums).
        self._labels: dict[str, Counter] = {}
        # protocol -> what was answered (ACCEPT, REJECT, ..., or Postfix's DUNNO, OK)
        self.answers: dict[str, Counter] = {}
        self._warned_version = None
        # Trouble an outsider can repeat at will, logged once per incident (``Incidents``,
        # on ``clock``: the reactor in the daemon, which also closes each interval; without
        # one, the monotonic clock and an interval closes at the next such event).
        self.failures = Incidents(self._failures_left_out, clock=clock)
        self.unmanaged = Incidents(self._domains_left_out, clock=clock)
        # Queries turned away at ``MAX_WAITING``: one warning per incident.
        self.limited = Incidents(self._limited_left_out, clock=clock)

    def decide(self, query: Query, protocol: str, *, explain: bool = False,
               names_a_list: bool = False, counted: bool = True) -> Answer:
        """Never raises for the query's sake.  ``explain`` adds the rule trace and the
        reasons (``policyctl query``); the MTA path goes without them.

        ``names_a_list``: the query comes from a configuration that only ever asks about
        list addresses (Exim's DATA ACL), so a domain the snapshot does not manage means
        the snapshot is wrong, not that the mail is none of policyd's business: with
        ``fail_closed`` that is a 4xx too.  ``counted=False``: a second look at the same
        query (``policyctl query`` shows each MTA's view), not counted again."""
        if not counted:
            protocol = None
        started = perf_counter()
        snapshot = self.snapshots.current
        if snapshot is None:
            return self.trouble(protocol, "unavailable", self.snapshots.unavailable_reason,
                                started)
        if self._stale_reason is not None:
            # Not confirmed for too long (a failing or stuck store): doubt about the
            # lists, answered as if there were no snapshot, never from what may be gone
            # from the store.  Mail to a domain the snapshot does not manage is none of
            # the list store's business: the host's other mail keeps flowing.
            stale = self._stale_reason()
            if stale is not None and (names_a_list or not snapshot.domains or
                                      snapshot.resolve(query.recipient).managed_domain):
                return self.trouble(protocol, "unavailable", stale, started)
        if self.fail_closed and not snapshot.lists and (
                names_a_list or not snapshot.domains
                or snapshot.resolve(query.recipient).managed_domain):
            self._warn_once(snapshot, "the snapshot (version {version}) has no lists: list "
                            "queries get the temporary failure until it has some")
            return self.trouble(protocol, "unavailable",
                                "the store has no lists (empty or replaced store?)", started)
        try:
            # Only a message can carry a password to verify (an ``Approved:`` header).
            if self.run_in_thread is None or query.message is None:
                decision = self._decide(snapshot, query, explain=explain)
            else:
                with verify_elsewhere():
                    decision = self._decide(snapshot, query, explain=explain)
            reply = self.policy.reply(decision)
        except (VerificationNeeded, LookupNeeded) as pending:
            return Answer(None, self.policy.error(), "verifying", str(pending), started,
                          pending)
        except Exception as error:
            where = self.failed(error, protocol, query)
            return self.trouble(protocol, "error", f"error in the decision: {where}", started)
        # Not ``decision.managed``: a role address (``role-address``) of a list domain is
        # no list either, yet the domain is one, and the snapshot is not wrong about it.
        if names_a_list and self.fail_closed and decision.rule == "not-managed":
            domain = query.recipient.rpartition("@")[2].lower()
            # Only an MTA's question is news: ``policyctl query`` (uncounted) asks the
            # same to show each MTA's view, and must not use up the incident's line.
            if protocol is not None and self.unmanaged.first(domain):
                log.warn("{protocol} asked about {domain}, which is not a list domain in "
                         "snapshot {version}: answering the temporary failure (check the "
                         "MTA's list domains and the store)", protocol=protocol,
                         domain=capped(domain), version=snapshot.version)
            return self.trouble(protocol, "not-managed",
                                f"{domain or '(no domain)'} is not a list domain here",
                                started)
        # ``_value_``: the member's plain attribute (``.value`` is a property, a Python
        # call per access on 3.11).
        if protocol is not None:
            verdict = decision.verdict._value_
            self.by_rule[protocol, verdict, decision.rule] += 1
            if self.per_list and decision.list in snapshot.lists:
                self.by_list[protocol, decision.list, verdict] += 1
        return _new_answer((decision, reply, None, None, started, None))

    def failed(self, error: Exception, protocol: str | None, query: Query | None,
               doing: str = "the decision") -> str:
        """Log an exception raised while deciding or answering ``query`` (``doing``:
        what failed) once per incident, and say where it was raised: the kind of failure
        (``_raised_at``).  Called in the ``except`` block that caught ``error``: the
        traceback logged is the one being handled.  Counting and answering are the
        caller's."""
        # Any sender controls what reaches the decision (a From: that makes the stdlib's
        # address parser recurse too deep): the traceback is logged once per incident
        # (exception type and where it was raised), the rest counted.
        where, in_email = _raised_at(error)
        logged = self.failures.first(where)
        recipient = sender = None
        if query is not None:
            # Cut like the decision line's fields: an address can be tens of kilobytes.
            recipient, sender = capped(query.recipient), capped(query.envelope_sender)
        if logged and in_email and isinstance(error, RecursionError):
            # Not a bug of policyd's: a header nested too deep for the standard
            # library's parser (``a:a:a:...``), which any sender can send.
            log.warn("{doing} failed for {protocol} recipient={recipient!r} "
                     "sender={sender!r}: a header too deeply nested for Python's email "
                     "parser ({where}): answering the temporary failure (further ones "
                     "are counted, not logged)", doing=doing, protocol=protocol,
                     where=where, recipient=recipient, sender=sender)
        elif logged:
            log.failure("{doing} failed for {protocol} recipient={recipient!r}"
                        " sender={sender!r} ({where}; further failures like it are "
                        "counted, not logged)", doing=doing, protocol=protocol,
                        where=where, recipient=recipient, sender=sender)
        return where

    # Verifications at once, and waiting at most: beyond that a query with a password
    # to verify gets the temporary failure at once (a flood of made-up ``Approved:``
    # headers costs CPU in threads, never the reactor, and never grows a queue).
    VERIFY_THREADS = 2
    MAX_WAITING = 64

    def verify(self, pending: list[VerificationNeeded]) -> Deferred | None:
        """Verify the passwords in threads; fires when all are known (decide again then).
        ``None`` when too many are waiting already (logged once per incident: the caller
        answers ``busy_reason(True)``, counted as busy).  Each slot is given back
        whatever happens to its check (``addBoth``, even on an exception raised at
        once)."""
        if self.run_in_thread is None:
            return None
        if self._waiting + len(pending) > self.MAX_WAITING:
            if self.limited.first("waiting"):
                log.warn("{waiting} DMARC lookups and password checks are waiting, the "
                         "limit: queries that need one more get the temporary failure at "
                         "once, counted as busy (further ones are summed up once a minute)",
                         waiting=self._waiting)
            return None
        self._waiting += len(pending)

        def one(item):
            if isinstance(item, LookupNeeded):  # DNS, on the reactor (policyd.dmarc_lookup)
                d = maybeDeferred(self.dmarc.lookup, item.names)
            else:
                d = maybeDeferred(self._verifying.run, self.run_in_thread,
                                  verify_and_remember, item.password, item.hashed)

            def done(result):
                self._waiting -= 1
                return result
            return d.addBoth(done)
        return DeferredList([one(item) for item in pending], consumeErrors=True)

    def busy_reason(self, limit: bool) -> str:
        """Why a query that needs a check gets the temporary failure without one."""
        if limit:
            return (f"busy: {self.MAX_WAITING} DMARC lookups and password checks waiting "
                    "already")
        return "busy: still undecided after its DMARC lookups and password checks"

    @staticmethod
    def _limited_left_out(left_out: Counter, new: int, others: int, more: bool,
                          interval: float) -> None:
        log.warn("{count} more queries got the temporary failure in the last {interval:g} "
                 "s because too many DMARC lookups and password checks were waiting "
                 "(counted as busy)", count=sum(left_out.values()), interval=interval)

    def use_dmarc(self, lookup) -> None:
        """Decide with ``lookup``'s DMARC answers (``policyd.dmarc_lookup``)."""
        self.dmarc = lookup
        self._decide = partial(self._decide, dmarc=lookup)

    def _warn_once(self, snapshot, text: str, **fields) -> None:
        """Log ``text`` once per snapshot version (an empty store: one line per store
        change at most, which no outsider causes)."""
        version = snapshot.version
        if self._warned_version == version:
            return
        self._warned_version = version
        log.warn(text, version=version, **fields)

    @staticmethod
    def _failures_left_out(left_out: Counter, new: int, others: int, more: bool,
                           interval: float) -> None:
        if not left_out:
            return
        log.error("the decision failed {count} more times in the last {interval:g} s, not "
                  "logged one by one ({kinds}): each answered the temporary failure and "
                  "counted as error", count=sum(left_out.values()),
                  interval=interval, kinds=", ".join(
                      f"{where}: {count}" for where, count in left_out.most_common(10))
                  + (", ..." if len(left_out) > 10 else ""))

    @staticmethod
    def _domains_left_out(left_out: Counter, new: int, others: int, more: bool,
                          interval: float) -> None:
        if not others:  # only queries about domains named already: nothing new
            return
        log.warn("{count} more queries about {domains} other non-list domains in the last "
                 "{interval:g} s, not named one by one: each answered the temporary failure "
                 "and counted as not-managed", count=new,
                 domains=f"{others}{'+' if more else ''}", interval=interval)

    def trouble(self, protocol: str | None, label: str, reason: str,
                started: float | None = None) -> Answer:
        """The configured temporary failure, counted under ``label``."""
        if protocol is not None:
            self.count(protocol, label)
        return Answer(None, self.policy.error(), label, reason,
                      perf_counter() if started is None else started)

    def count(self, protocol: str, label: str, answer: str | None = None) -> None:
        """Count what is not a decision (error, unavailable, malformed, other-state...)
        and, unless ``None``, what was answered."""
        counts = self._labels.get(protocol)
        if counts is None:
            counts = self._labels[protocol] = Counter()
        counts[label] += 1
        if answer is not None:
            self.count_answer(protocol, answer)

    def uncount(self, protocol: str, answers) -> None:
        """Take back what ``decide`` counted for ``answers`` (a request whose answering
        then failed is counted once, as the ``error`` it was answered with)."""
        for answer in answers:
            decision = answer.decision
            if decision is not None:
                verdict = decision.verdict._value_
                _take_one(self.by_rule, (protocol, verdict, decision.rule))
                _take_one(self.by_list, (protocol, decision.list, verdict))
            elif answer.pending is None:  # what ``trouble`` counted
                _take_one(self._labels.get(protocol, {}), answer.trouble)

    def count_answer(self, protocol: str, answer: str) -> None:
        self.answer_counter(protocol)[answer] += 1

    def answer_counter(self, protocol: str) -> Counter:
        """The counter of what ``protocol`` answered (for a protocol that counts on its
        request path without a method call)."""
        answers = self.answers.get(protocol)
        if answers is None:
            answers = self.answers[protocol] = Counter()
        return answers

    @property
    def by_protocol(self) -> dict[str, Counter]:
        """protocol -> verdict (or error, unavailable, malformed, other-state) -> count,
        summed at reading time (status, metrics): the request path counts a decision
        once, by rule."""
        out = {protocol: Counter(counts) for protocol, counts in list(self._labels.items())}
        for (protocol, verdict, _), count in list(self.by_rule.items()):
            counts = out.get(protocol)
            if counts is None:
                counts = out[protocol] = Counter()
            counts[verdict] += count
        return out

    def counters(self) -> dict:
        verdicts: Counter = Counter()
        by_protocol = self.by_protocol
        for counts in by_protocol.values():
            verdicts.update(counts)
        return {
            "total": sum(verdicts.values()),
            "by_verdict": dict(verdicts),
            "by_protocol": {name: dict(counts) for name, counts in by_protocol.items()},
            "answers": {name: dict(counts) for name, counts in self.answers.items()},
        }


_EMAIL_PACKAGE = dirname(email.__file__)


def _raised_at(error: BaseException) -> tuple[str, bool]:
    """``RecursionError at _parseaddr.py:487``: the exception's type and the innermost
    frame of its traceback, what tells one failure from another; and whether that frame
    is in the standard library's ``email`` package."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = type(error).__name__
    if tb is None:
        return name, False
    filename = tb.tb_frame.f_code.co_filename
    return (f"{name} at {basename(filename)}:{tb.tb_lineno}",
            dirname(filename) == _EMAIL_PACKAGE)


class Incidents:
    """Once per incident, and bounded under a flood of distinct keys.

    ``first(key)`` says whether to log this occurrence: the first ``burst`` distinct keys
    of an interval are logged (a key logged before is not logged again until it has been
    quiet, unseen, for ``quiet`` seconds); every other occurrence is only counted.  When an
    interval that counted something is over, ``summary(left_out, new, others, more,
    interval)`` is called once: ``left_out`` counts what was not logged by key (bounded:
    at most ``max_keys`` keys, the rest under ``"..."``); ``new`` of those occurrences were
    of ``others`` keys not logged before (``more``: at least that many keys).  Memory
    stays within ``max_keys`` keys however many distinct ones come.
    """

    def __init__(self, summary, *, burst: int = 5, interval: float = 60.0,
                 quiet: float = 600.0, max_keys: int = 1000, clock=None) -> None:
        self.summary = summary
        self.burst = burst
        self.interval = interval
        self.quiet = quiet
        self.max_keys = max_keys
        self.clock = clock
        self._now = clock.seconds if clock is not None else monotonic
        self.logged: dict = {}  # key -> last seen, least recently seen first
        self.window_end: float | None = None
        self._call = None
        self._reset()
        self.total_left_out = 0

    def _reset(self) -> None:
        self.named = 0
        self.left_out: Counter = Counter()
        self.others: set = set()
        self.new = 0
        self.more = False

    def first(self, key) -> bool:
        now = self._now()
        if self.window_end is not None and now >= self.window_end:
            self.close()
        if self.window_end is None:
            self.window_end = now + self.interval
            if self.clock is not None:
                self._call = self.clock.callLater(self.interval, self.close)
        logged = self.logged
        seen = logged.pop(key, None)
        if seen is not None and now - seen < self.quiet:
            logged[key] = now  # the same incident: still going on
        elif self.named < self.burst:
            self.named += 1
            logged[key] = now
            if len(logged) > self.max_keys:
                del logged[next(iter(logged))]
            return True
        else:
            self.new += 1
            if len(self.others) < self.max_keys:
                self.others.add(key)
            else:
                self.more = True
        self.total_left_out += 1
        left_out = self.left_out
        if key in left_out or len(left_out) < self.max_keys:
            left_out[key] += 1
        else:
            left_out["..."] += 1
        return False

    def close(self) -> None:
        """End the interval (if it is over): one summary of what was left out."""
        if self.window_end is None or self._now() < self.window_end:
            return
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self.window_end = None
        # forget what has been quiet long enough (least recently seen first)
        logged, cutoff = self.logged, self._now() - self.quiet
        while logged:
            key = next(iter(logged))
            if logged[key] >= cutoff:
                break
            del logged[key]
        left_out, new, others, more = self.left_out, self.new, len(self.others), self.more
        self._reset()
        if left_out:
            try:
                self.summary(left_out, new, others, more, self.interval)
            except Exception:
                log.failure("summing up what was left out of the log failed")

    def forget(self) -> None:
        """The incident is over and its caller has summed it up: drop what this interval
        counted (no summary of it comes later) and what was logged, so the next
        occurrence of any key is logged again."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self.window_end = None
        self.logged.clear()
        self._reset()


class LatencyHistogram:
    """Decision latency of one protocol as plain numbers, read at scrape time by
    ``policyd.metrics``: ``observe(started)`` is one ``perf_counter()``, one ``bisect``
    and two additions on the reactor thread (no lock: only the reactor writes or reads).

    ``counts[i]`` counts the observations in ``(BOUNDS[i-1], BOUNDS[i]]``, the last one
    those above the largest bound (Prometheus's ``+Inf``)."""

    BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
              0.25, 1.0)
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, started: float) -> None:
        """One answer, begun at ``started`` (``perf_counter``), sent now."""
        seconds = perf_counter() - started
        self.counts[bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out, total = [], 0
        for bound, count in zip(self.BOUNDS + (float("inf"),), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class FixedSnapshot:
    """A snapshot source that never changes (``policyctl query --offline``, tests)."""

    unavailable_reason = "no snapshot"

    def __init__(self, snapshot, loaded_at: float | None = None) -> None:
        self.current = snapshot
        self.loaded_at = loaded_at if loaded_at is not None else getattr(
            snapshot, "built_at", None)
