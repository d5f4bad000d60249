"""The Decider: one query on the live snapshot, answered as an ``Answer``.

What every protocol calls: the current snapshot + ``chain.decide`` + the configured
``ReplyPolicy``, with the error policy (no snapshot yet, an empty snapshot, or any
exception inside the decision give the configured 4xx, never a 5xx) and the verdict
counters ``policyctl status`` and the metrics show.  It renders nothing and logs only its
own trouble: each protocol turns the ``Answer`` into its wire text and writes its
decision line.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from functools import partial
from time import perf_counter
from typing import Callable, NamedTuple

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.logger import Logger

from .core.chain import decide as chain_decide
from .core.dmarc import LookupNeeded
from .core.passwords import VerificationNeeded, verify_and_remember, verify_elsewhere
from .core.replies import ReplyPolicy, SmtpReply
from .core.verdict import Decision, Query

__all__ = ["Answer", "Decider", "FixedSnapshot", "LatencyHistogram"]

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


class Decider:
    """Decide one query on the current snapshot and count it."""

    def __init__(self, snapshots, policy: ReplyPolicy, *, decide=chain_decide,
                 fail_closed: bool = True, null_sender: str = "reject",
                 per_list: bool = False, latency: bool = False,
                 run_in_thread: Callable[..., Deferred] | None = None) -> None:
        self.snapshots = snapshots
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
        self._warned: set = set()
        self._warned_version = None

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
        if self.fail_closed and not snapshot.lists and (
                names_a_list or not snapshot.domains
                or snapshot.resolve(query.recipient).managed_domain):
            self._warn_once(snapshot, "empty", "", "the snapshot (version {version}) has no "
                            "lists: list queries get the temporary failure until it has some")
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
        except Exception:
            log.failure("the decision failed for {protocol} recipient={recipient!r}"
                        " sender={sender!r}", protocol=protocol,
                        recipient=query.recipient, sender=query.envelope_sender)
            return self.trouble(protocol, "error", "internal error in the decision (logged)",
                                started)
        if names_a_list and self.fail_closed and not decision.managed:
            domain = query.recipient.rpartition("@")[2].lower()
            self._warn_once(snapshot, "domain", domain, "{protocol} asked about {domain}, "
                            "which is not a list domain in snapshot {version}: answering the "
                            "temporary failure (check the MTA's list domains and the store)",
                            protocol=protocol)
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

    # Verifications at once, and waiting at most: beyond that a query with a password
    # to verify gets the temporary failure at once (a flood of made-up ``Approved:``
    # headers costs CPU in threads, never the reactor, and never grows a queue).
    VERIFY_THREADS = 2
    MAX_WAITING = 64

    def verify(self, pending: list[VerificationNeeded]) -> Deferred | None:
        """Verify the passwords in threads; fires when all are known (decide again then).
        ``None`` when too many are waiting already."""
        if self.run_in_thread is None or self._waiting + len(pending) > self.MAX_WAITING:
            return None
        self._waiting += len(pending)

        def one(item):
            if isinstance(item, LookupNeeded):  # DNS, on the reactor (policyd.dmarc_lookup)
                d = self.dmarc.lookup(item.names)
            else:
                d = self._verifying.run(self.run_in_thread, verify_and_remember,
                                        item.password, item.hashed)

            def done(result):
                self._waiting -= 1
                return result
            return d.addBoth(done)
        return DeferredList([one(item) for item in pending], consumeErrors=True)

    def use_dmarc(self, lookup) -> None:
        """Decide with ``lookup``'s DMARC answers (``policyd.dmarc_lookup``)."""
        self.dmarc = lookup
        self._decide = partial(self._decide, dmarc=lookup)

    # At most this many (kind, key) warnings are remembered per snapshot version: the
    # domains come from the MTA's requests, and a flood of them must not grow memory.
    MAX_WARNINGS = 1000

    def _warn_once(self, snapshot, kind: str, key: str, text: str, **fields) -> None:
        """Log ``text`` once per (kind, key) and snapshot version: once per incident."""
        version = snapshot.version
        if self._warned_version != version:
            self._warned_version = version
            self._warned = set()
        if (kind, key) in self._warned or len(self._warned) >= self.MAX_WARNINGS:
            return
        self._warned.add((kind, key))
        log.warn(text, version=version, domain=key, **fields)

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
